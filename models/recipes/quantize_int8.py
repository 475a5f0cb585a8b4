#!/usr/bin/env python3
"""Quantise a bundled fp32 encoder to int8 with ONNX Runtime's static quantisation.

Writes models/<name>-int8/ (model.onnx, model.toml, README.md) from models/<name>/:

1. ONNX Runtime's pre-processing (`quant_pre_process`: symbolic and ONNX shape inference, graph
   optimisation), as ORT recommends before quantising.
2. `quantize_static` in QDQ format, uint8 activations and int8 weights (U8S8), weights per
   channel, with `reduce_range` (7-bit weights), MinMax ranges. U8S8 with reduce_range is what
   ORT 1.31's own `quantize_static` guidance gives for x86 CPUs without VNNI: ORT runs int8
   convolutions there through VPMADDUBSW, whose 16-bit intermediate sums can saturate, and
   7-bit weights cannot (255 * 64 * 2 < 32767), so the model answers alike on every x86 CPU.
   (ORT's web page calls S8S8 the first choice; measured here, int8 activations leave 12 of
   SimCLR's 20 convolutions and every residual Add unfused on x86, and the model runs slower than
   fp32.) MinMax, because the Q-Score lives in the tails: Entropy and Percentile clip the largest
   activations, which is exactly the features above mu + eps * sigma (models/README.md has the
   comparison). The global average pool and the flatten that follow the last convolution stay
   in float, so the embedding itself is not rounded to 256 levels.
3. Calibration images prepared exactly as the server prepares them (src/image.rs): EXIF
   orientation applied, RGB with alpha dropped (or 8-bit grey), torchvision's Resize(shorter)
   with Pillow's antialiased bilinear filter (fast_image_resize reproduces it) and CenterCrop
   with round-half-even offsets, or a plain bilinear resize to the input size when the manifest
   has no `resize_shorter`; scaled to [0, 1] and normalised with the manifest's mean and std.
   The recipe checks that claim before quantising: its tensors through the fp32 model must
   reproduce the model's golden.json (the reference the server is tested against) at cosine
   >= 0.9999.

Images: every file under --images (folders walked, sorted), then a seeded sample of --count;
with --views K > 1 each image also gives K - 1 seeded random crops (area 30-100%, aspect 3:4 to
4:3, half of them mirrored), each then prepared like an uploaded photo: for a handful of photos
this spreads the activation ranges over more than a handful of inputs.

Run it with .venv-int8 (`make int8-env`); `make int8-models` runs it for every bundled model.
"""
import argparse
import hashlib
import json
import pathlib
import random
import re
import shlex
import sys
import tempfile
import tomllib

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quantize_static,
)
from onnxruntime.quantization.calibrate import save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# The calibrators' settings. quantize_static passes no bin counts through, and its Entropy
# default (128 bins into 128 quantised bins) leaves a single candidate threshold: the full range,
# i.e. MinMax. Entropy gets TensorRT's 2048 bins; Percentile gets asymmetric ranges (its default
# is symmetric, which spends half of int8 on the negative values a ReLU output never has).
CALIBRATOR_OPTIONS = {
    "minmax": {},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": False},
}
# Calibration images per pass: the histogram calibrators hold every intermediate tensor of a
# pass in memory (about 40 MB an image for MobileNetV2), so ranges are collected pass by pass.
CHUNK = 32

# Ops after the last convolution: left in float so the embedding is not quantised.
FLOAT_TAIL_OPS = {"GlobalAveragePool", "Flatten"}


def read_manifest(model_dir: pathlib.Path) -> dict:
    with open(model_dir / "model.toml", "rb") as f:
        return tomllib.load(f)


def prepare(img: Image.Image, manifest: dict) -> np.ndarray:
    """One image as the server's (channels, height, width) float32 tensor."""
    inp, pre = manifest["input"], manifest.get("preprocess", {})
    img = ImageOps.exif_transpose(img)
    if inp["channels"] == 1:
        if img.mode != "L":
            # The server's grey conversion is the image crate's luma, not Pillow's: refuse
            # rather than prepare something the server would not.
            raise SystemExit(f"a grey model's calibration images must be 8-bit grey, got {img.mode}")
    else:
        img = img.convert("RGB")
    w, h = inp["width"], inp["height"]
    s = pre.get("resize_shorter")
    if s is None:
        img = img.resize((w, h), Image.BILINEAR) if img.size != (w, h) else img
        left = top = 0
    else:
        iw, ih = img.size
        size = (s, int(s * ih / iw)) if iw <= ih else (int(s * iw / ih), s)
        img = img.resize(size, Image.BILINEAR)
        left, top = round((size[0] - w) / 2), round((size[1] - h) / 2)
    a = np.asarray(img, dtype=np.float32)[top:top + h, left:left + w] / 255.0
    a = a.reshape(h, w, inp["channels"]).transpose(2, 0, 1)
    mean = np.array(pre.get("mean", [0.0] * inp["channels"]), np.float32).reshape(-1, 1, 1)
    std = np.array(pre.get("std", [1.0] * inp["channels"]), np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((a - mean) / std, dtype=np.float32)


def list_images(paths) -> list[pathlib.Path]:
    out = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out


def views(img: Image.Image, k: int, rng: random.Random) -> list[Image.Image]:
    """The image itself and k - 1 seeded random crops of it (area 30-100%, aspect 3:4-4:3,
    mirrored half the time)."""
    img = ImageOps.exif_transpose(img)
    out = [img]
    w, h = img.size
    while len(out) < k:
        area = rng.uniform(0.3, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if not (16 <= cw <= w and 16 <= ch <= h):
            continue
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        v = img.crop((x, y, x + cw, y + ch))
        out.append(v.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else v)
    return out


def calibration_tensors(paths, count, views_per_image, seed, manifest):
    files = list_images(paths)
    if not files:
        raise SystemExit(f"no images under {paths}")
    rng = random.Random(seed)
    if count and count < len(files):
        files = sorted(rng.sample(files, count))
    tensors = []
    for f in files:
        with Image.open(f) as img:
            img.load()
            for v in views(img, views_per_image, rng):
                tensors.append(prepare(v, manifest))
    return files, tensors


class Reader(CalibrationDataReader):
    def __init__(self, name, tensors):
        self.name, self.it = name, iter(tensors)

    def get_next(self):
        t = next(self.it, None)
        return None if t is None else {self.name: t[None]}


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_golden(model_dir: pathlib.Path, manifest: dict, fixtures: pathlib.Path) -> float:
    """Lowest cosine between the fp32 model on this recipe's tensors and golden.json."""
    golden = json.loads((model_dir / "golden.json").read_text())["images"]
    sess = session(model_dir / "model.onnx")
    worst = 1.0
    for rel, want in golden.items():
        f = next(p for p in (fixtures / "photos" / rel, fixtures / "fmnist" / rel) if p.exists())
        with Image.open(f) as img:
            h = sess.run(None, {manifest["input"]["name"]: prepare(img, manifest)[None]})[0][0]
        want = np.asarray(want, np.float64)
        worst = min(worst, float(h @ want / (np.linalg.norm(h) * np.linalg.norm(want))))
    if worst < 0.9999:
        raise SystemExit(f"{model_dir}: the recipe's preprocessing reproduces golden.json only to cosine {worst:.6f}")
    return worst


def toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def toml_text(doc: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in table.items()]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the fp32 model's folder name under --models-dir")
    ap.add_argument("--models-dir", type=pathlib.Path, default=pathlib.Path("models"))
    ap.add_argument("--images", nargs="+", required=True, help="calibration images: files or folders")
    ap.add_argument("--images-note", default="", help="where the calibration images come from (for provenance)")
    ap.add_argument("--count", type=int, default=0, help="seeded sample of this many images (0: all)")
    ap.add_argument("--views", type=int, default=1, help="views per image: itself and random crops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=sorted(METHODS), default="minmax")
    ap.add_argument("--activations", choices=["u8", "s8"], default="u8")
    ap.add_argument("--no-reduce-range", dest="reduce_range", action="store_false")
    ap.add_argument("--quantize-tail", action="store_true", help="quantise the pool and flatten too")
    ap.add_argument("--keep-float", help="regex: nodes whose name matches stay in float")
    ap.add_argument("--out", help="output folder name (default: MODEL-int8)")
    ap.add_argument("--fixtures", type=pathlib.Path, default=pathlib.Path("tests/fixtures"))
    args = ap.parse_args()

    src = args.models_dir / args.model
    name = args.out or f"{args.model}-int8"
    dst = args.models_dir / name
    manifest = read_manifest(src)
    golden_cos = check_golden(src, manifest, args.fixtures)
    files, tensors = calibration_tensors(args.images, args.count, args.views, args.seed, manifest)
    print(f"{args.model}: {len(tensors)} calibration tensors from {len(files)} images; "
          f"preprocessing matches golden.json to cosine >= {golden_cos:.6f}", file=sys.stderr)

    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre = pathlib.Path(tmp) / "pre.onnx"
        quant_pre_process(str(src / "model.onnx"), str(pre))
        graph = onnx.load(str(pre)).graph
        tail = [] if args.quantize_tail else [n.name for n in graph.node if n.op_type in FLOAT_TAIL_OPS]
        if args.keep_float:
            tail += [n.name for n in graph.node if re.search(args.keep_float, n.name)]
        calibrator = create_calibrator(
            pre,
            augmented_model_path=str(pathlib.Path(tmp) / "augmented.onnx"),
            calibrate_method=METHODS[args.method],
            providers=["CPUExecutionProvider"],
            extra_options=CALIBRATOR_OPTIONS[args.method],
        )
        for i in range(0, len(tensors), CHUNK):
            calibrator.collect_data(Reader(manifest["input"]["name"], tensors[i:i + CHUNK]))
        ranges = pathlib.Path(tmp) / "ranges.json"
        save_tensors_data(calibrator.compute_data(), ranges)
        del calibrator
        quantize_static(
            str(pre),
            str(dst / "model.onnx"),
            None,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8 if args.activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=args.reduce_range,
            calibrate_method=METHODS[args.method],
            nodes_to_exclude=tail,
            calibration_cache_path=ranges,
        )
    session(dst / "model.onnx")  # it loads

    fp32_sha = sha256(src / "model.onnx")
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    settings = (f"QDQ, {args.activations.upper()}S8, per-channel weights, reduce_range={args.reduce_range}, {args.method} calibration"
                f"{'' if args.quantize_tail else ', pool and flatten in float'}")
    doc = dict(manifest)
    doc["name"] = name
    doc["version"] = manifest["version"]
    doc["description"] = f"{manifest['description']}; int8 (static quantisation of {args.model})"
    doc["provenance"] = {
        "source": f"{args.model} quantised to int8 by ONNX Runtime {ort.__version__} quantize_static ({settings}); "
                  f"calibrated on {len(tensors)} tensors from {len(files)} images"
                  f"{' (' + args.images_note + ')' if args.images_note else ''}, prepared as the server prepares them",
        "weights": f"models/{args.model}/model.onnx, sha256 {fp32_sha}",
        "recipe": f"models/recipes/quantize_int8.py {argv} (make int8-models)",
        "license": manifest["provenance"]["license"],
    }
    (dst / "model.toml").write_text(toml_text(doc))
    readme = dst / "README.md"
    agreement = ""
    if readme.exists():  # keep the agreement table a previous int8_agreement.py run wrote
        old = readme.read_text()
        if "<!-- agreement -->" in old:
            agreement = old[old.index("<!-- agreement -->"):]
    if not agreement:
        agreement = "<!-- agreement -->\nNot measured yet: run `make int8-models`.\n<!-- /agreement -->\n"
    readme.write_text(f"""# {name}

`{args.model}` quantised to int8 with ONNX Runtime's static quantisation, for cheaper CPU
inference with the same Q-Score. It is served like any bundled model (`?model={name}`) and has
its own calibration (its own D, probe, risk estimator and threshold) where the fp32 model has one.

## Provenance

- fp32 model: `models/{args.model}/model.onnx`, sha256 `{fp32_sha}`.
- Recipe: `models/recipes/quantize_int8.py {argv}` (ONNX Runtime {ort.__version__}, onnx
  {onnx.__version__}; `make int8-models` rebuilds every int8 model from the fp32 ones).
- Quantisation: {settings}; ORT's `quant_pre_process` first.
- Calibration images: {len(files)} images{', ' + str(args.views) + ' views each' if args.views > 1 else ''}
  ({len(tensors)} tensors){': ' + args.images_note if args.images_note else ''}; prepared as the server
  prepares them (the recipe's tensors reproduce the fp32 model's golden.json at cosine >= {golden_cos:.6f}).
- model.onnx: {(dst / 'model.onnx').stat().st_size / 1e6:.1f} MB (fp32: {(src / 'model.onnx').stat().st_size / 1e6:.1f} MB).

## Agreement with {args.model}

Measured by `models/recipes/int8_agreement.py` (Q-Score and flag answered by qscore itself, each
model with its own calibration) on held-out images:

{agreement}""")
    print(f"wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
