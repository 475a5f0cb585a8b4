"""Posts images as multipart `image` parts with a real Python HTTP client, the way its users
do, and prints `{"status": ..., "body": ...}` as JSON, for tests/clients.rs.

    python multipart_client.py requests|httpx|aiohttp URL FILE...
"""
import asyncio
import json
import os
import sys

lib, url, files = sys.argv[1], sys.argv[2], sys.argv[3:]
parts = [(os.path.basename(f), open(f, "rb").read()) for f in files]

if lib == "requests":
    import requests

    r = requests.post(url, files=[("image", (name, data, "image/png")) for name, data in parts], timeout=120)
    status, body = r.status_code, r.json()
elif lib == "httpx":
    import httpx

    # No content type: httpx guesses one from the file name (or application/octet-stream).
    r = httpx.post(url, files=[("image", (name, data)) for name, data in parts], timeout=120)
    status, body = r.status_code, r.json()
elif lib == "aiohttp":
    import aiohttp

    async def post():
        form = aiohttp.FormData()
        for name, data in parts:
            form.add_field("image", data, filename=name, content_type="application/octet-stream")
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=form) as r:
                return r.status, await r.json()

    status, body = asyncio.run(post())
else:
    sys.exit(f"unknown client {lib}")
print(json.dumps({"status": status, "body": body}))
