"""Sends images through qscore's KServe v2 endpoint with the real tritonclient (PyPI
tritonclient[http]) and prints what came back as JSON, for tests/kserve.rs.

    python kserve_client.py [--compression=gzip|deflate] HOST:PORT MODEL FILE...

With --compression the infer request's body is compressed by tritonclient
(`request_compression_algorithm`), as Triton's users turn on for large batches.
"""
import json
import sys

import numpy as np
import tritonclient.http as http

args = sys.argv[1:]
compression = None
if args[0].startswith("--compression="):
    compression = args.pop(0).split("=", 1)[1]
url, model, files = args[0], args[1], args[2:]
client = http.InferenceServerClient(url=url)
meta = client.get_model_metadata(model)
wanted = [o["name"] for o in meta["outputs"]]

images = np.array([open(f, "rb").read() for f in files], dtype=np.object_)
tensor = http.InferInput("image", [len(files)], "BYTES")
tensor.set_data_from_numpy(images, binary_data=True)
result = client.infer(model, [tensor], outputs=[http.InferRequestedOutput(n, binary_data=False) for n in wanted],
                      request_compression_algorithm=compression)

print(json.dumps({
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "server": client.get_server_metadata(),
    "metadata": meta,
    "outputs": {n: result.as_numpy(n).tolist() for n in wanted},
}))
