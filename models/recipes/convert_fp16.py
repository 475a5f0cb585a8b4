"""Make the float16 variants of the bundled encoders, for serving on CUDA: `make fp16-models`.

Each model folder under --models-dir becomes a folder of the same name under --out (default
models-fp16/, which git ignores: it is derived, byte for byte, from the committed float32
models). The graph computes in float16 inside and keeps float32 at its edges
(onnxconverter-common's `convert_float_to_float16(keep_io_types=True)`: a Cast after the input
and before each output), so qscore feeds and reads it exactly as the float32 graph. The folder
keeps the model's name, so requests and calibration are unchanged: model.toml gains
`precision = "fp16"` (qscore refuses such a model on --device cpu, where ONNX Runtime wraps
float16 operators in casts and runs about half as fast) and a `+fp16` version, calibration.json is
copied (D, probe and threshold were fitted on the float32 features; `benches/gpu/run.sh` measures
how far fp16 moves the scores and flags).

Checks, each fatal: onnx.checker (full, with shape inference) passes; the graph's inputs and
outputs are float32; and ONNX Runtime's CPU EP, which can run the graph through its casts,
answers embeddings whose cosine to the float32 model's is at least --min-cosine on every image of
a probe batch.

    .venv-fp16/bin/python models/recipes/convert_fp16.py --models-dir models --out models-fp16
"""

import argparse
import json
import pathlib
import re
import shutil
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnxconverter_common import float16

FLOAT = onnx.TensorProto.FLOAT


def convert(src: pathlib.Path, out: pathlib.Path, min_cosine: float) -> dict:
    model = onnx.load(src / "model.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.checker.check_model(half, full_check=True)
    edges = [(v.name, v.type.tensor_type.elem_type) for v in [*half.graph.input, *half.graph.output]]
    wrong = [name for name, ty in edges if ty != FLOAT]
    if wrong:
        sys.exit(f"{src}: after conversion {wrong} are not float32; qscore feeds and reads float32")

    out.mkdir(parents=True, exist_ok=True)
    onnx.save(half, out / "model.onnx")
    (out / "model.toml").write_text(manifest(src))
    if (src / "calibration.json").exists():
        shutil.copy2(src / "calibration.json", out / "calibration.json")
    (out / "README.md").write_text(
        f"# {src.name} (float16)\n\nMade by `make fp16-models` (models/recipes/convert_fp16.py) from "
        f"`{src}/model.onnx`: float16 inside, float32 inputs and outputs. Serve it with `--device cuda` "
        f"only; provenance, licence and calibration are those of `{src}`.\n"
    )
    cosines = agreement(src / "model.onnx", out / "model.onnx")
    if cosines.min() < min_cosine:
        sys.exit(f"{src}: fp16 embeddings reach a cosine of only {cosines.min():.6f} to fp32 (< {min_cosine})")
    return {
        "model": src.name,
        "fp32_bytes": (src / "model.onnx").stat().st_size,
        "fp16_bytes": (out / "model.onnx").stat().st_size,
        "truncated_constants": len(caught),
        "min_cosine_cpu": round(float(cosines.min()), 6),
    }


def manifest(src: pathlib.Path) -> str:
    """The float32 model.toml with `precision = "fp16"` (a top-level key, so before the first
    table), a `+fp16` version and the recipe named in the provenance."""
    text = (src / "model.toml").read_text()
    if re.search(r"^precision\s*=", text, re.M):
        sys.exit(f"{src}/model.toml already names a precision; convert float32 models only")
    text, versions = re.subn(r'^(version\s*=\s*")([^"]*)(")', r"\g<1>\g<2>+fp16\g<3>", text, count=1, flags=re.M)
    text, tables = re.subn(r"^\[", 'precision = "fp16"\n\n[', text, count=1, flags=re.M)
    text, recipes = re.subn(
        r'^(recipe\s*=\s*")([^"]*)(")',
        r"\g<1>\g<2>; float16 by models/recipes/convert_fp16.py (make fp16-models)\g<3>",
        text,
        count=1,
        flags=re.M,
    )
    if (versions, tables, recipes) != (1, 1, 1):
        sys.exit(f"{src}/model.toml lacks a version, a table or a provenance recipe")
    return text


def agreement(fp32: pathlib.Path, fp16: pathlib.Path) -> np.ndarray:
    """Cosine between the two graphs' outputs on a probe batch, on ONNX Runtime's CPU EP."""
    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    inp = a.get_inputs()[0]
    shape = [8, *inp.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = a.get_outputs()[0].name
    ya = a.run([name], {inp.name: x})[0].reshape(8, -1).astype(np.float64)
    yb = b.run([name], {inp.name: x})[0].reshape(8, -1).astype(np.float64)
    if not np.isfinite(yb).all():
        sys.exit(f"{fp16}: the float16 graph answers non-finite values")
    return (ya * yb).sum(1) / (np.linalg.norm(ya, axis=1) * np.linalg.norm(yb, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=pathlib.Path, default=pathlib.Path("models"))
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models-fp16"))
    ap.add_argument("--model", action="append", help="only these model folders (repeatable)")
    ap.add_argument("--min-cosine", type=float, default=0.999)
    args = ap.parse_args()
    dirs = sorted(d for d in args.models_dir.iterdir() if (d / "model.toml").exists() and not d.name.startswith("."))
    if args.model:
        dirs = [d for d in dirs if d.name in args.model]
        missing = set(args.model) - {d.name for d in dirs}
        if missing:
            sys.exit(f"no model folder {sorted(missing)} under {args.models_dir}")
    for d in dirs:
        print(json.dumps(convert(d, args.out / d.name, args.min_cosine)))


if __name__ == "__main__":
    main()
