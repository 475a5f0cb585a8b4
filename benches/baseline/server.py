"""The Python baseline of qscore's load benchmark: FastAPI + uvicorn + onnxruntime + Pillow.

Written the way a competent Python engineer would serve the same model: an async endpoint that
reads the body and hands decode, resize, normalise, inference and the Q-Score to a thread pool
(off the event loop); one ONNX Runtime session shared by the pool (its `run` is thread-safe and
releases the GIL). Preprocessing is torchvision's Resize(256) + CenterCrop(224) on Pillow, the
same geometry qscore serves; the Q-Score is design.md section 1 with D = all features (the
bundled MobileNetV2 is uncalibrated).

    uvicorn --app-dir benches/baseline server:app --host 127.0.0.1 --port 8090
    (QSCORE_BASELINE_MODEL points at model.onnx; default models/mobilenet_v2-imagenet/model.onnx;
    QSCORE_BASELINE_PROVIDER=cuda runs it on ONNX Runtime's CUDA execution provider, as
    benches/gpu/run.sh does, and refuses to start if that provider is not the one in use)
"""
import io
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image

MODEL = os.environ.get("QSCORE_BASELINE_MODEL", "models/mobilenet_v2-imagenet/model.onnx")
EPSILON = 4.0
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)

PROVIDER = os.environ.get("QSCORE_BASELINE_PROVIDER", "cpu")
if PROVIDER == "cuda":
    session = ort.InferenceSession(MODEL, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    # onnxruntime falls back to the CPU silently; a GPU baseline on the CPU would be no baseline.
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"QSCORE_BASELINE_PROVIDER=cuda, but onnxruntime runs on {session.get_providers()}")
else:
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name
app = FastAPI(title="qscore Python baseline")


def preprocess(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((max(256, round(w * scale)), max(256, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - 224) / 2.0)), int(round((h - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return ((x - MEAN) / STD)[None]


def q_score(h: np.ndarray) -> dict:
    h64 = h.astype(np.float64)
    mu, sigma = h64.mean(), h64.std(ddof=1)
    active = np.nonzero(h64 > mu + EPSILON * sigma)[0] if sigma > 0 else np.array([], dtype=int)
    q = float((h64[active] - mu).mean()) if active.size else 0.0
    z_max = float((h64.max() - mu) / sigma) if sigma > 0 else 0.0
    return {"q_score": q, "active": int(active.size), "z_max": z_max}


def score(data: bytes) -> dict:
    try:
        x = preprocess(data)
    except Exception as e:  # Pillow raises many types for bad images
        raise HTTPException(status_code=422, detail=f"undecodable image: {e}")
    h = session.run(None, {INPUT: x})[0].reshape(-1)
    return q_score(h)


@app.post("/v1/score")
async def score_endpoint(request: Request) -> dict:
    body = await request.body()
    if not body:
        raise HTTPException(status_code=400, detail="empty body")
    return await run_in_threadpool(score, body)
