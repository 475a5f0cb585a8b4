"""Sends images through qscore's KServe v2 endpoint with the real tritonclient (PyPI
tritonclient[http]) and prints what came back as JSON, for tests/kserve.rs.

    python kserve_client.py HOST:PORT MODEL FILE...

QSCORE_TENSOR_SHAPE picks the numpy array's shape as users build it: `flat` (N,), the default;
`column` (N, 1); `row` (1, N). QSCORE_BINARY_DATA=0 sends the tensor as JSON (base64 strings,
flattened in row-major order, as tritonclient serialises them) instead of the binary-data
extension. QSCORE_COMPRESSION=gzip|deflate has tritonclient compress the infer request's body
(`request_compression_algorithm`), as Triton's users turn on for large batches.
QSCORE_MODEL_VERSION has every model call (metadata, readiness, infer) name that version, as
KServe clients that pin a version do (`/v2/models/{name}/versions/{version}/...`).
"""
import base64
import os
import json
import sys

import numpy as np
import tritonclient.http as http

url, model, files = sys.argv[1], sys.argv[2], sys.argv[3:]
compression = os.environ.get("QSCORE_COMPRESSION")
version = os.environ.get("QSCORE_MODEL_VERSION", "")
client = http.InferenceServerClient(url=url)
meta = client.get_model_metadata(model, model_version=version)
wanted = [o["name"] for o in meta["outputs"]]

binary = os.environ.get("QSCORE_BINARY_DATA", "1") == "1"
raw = [open(f, "rb").read() for f in files]
# JSON carries BYTES elements as text: image bytes go base64-encoded, as the protocol's users do.
images = np.array(raw if binary else [base64.b64encode(b).decode() for b in raw], dtype=np.object_)
shape = os.environ.get("QSCORE_TENSOR_SHAPE", "flat")
images = {"flat": images, "column": images.reshape(-1, 1), "row": images.reshape(1, -1)}[shape]
tensor = http.InferInput("image", list(images.shape), "BYTES")
tensor.set_data_from_numpy(images, binary_data=binary)
result = client.infer(model, [tensor], model_version=version, outputs=[http.InferRequestedOutput(n, binary_data=False) for n in wanted],
                      request_compression_algorithm=compression)

print(json.dumps({
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model, model_version=version),
    "server": client.get_server_metadata(),
    "metadata": meta,
    "outputs": {n: result.as_numpy(n).tolist() for n in wanted},
}))
