#!/usr/bin/env python3
"""Write Debian's Fashion-MNIST IDX files as PNG folders in ImageFolder layout (DIR/<class>/<image>.png).

Used for the committed test fixtures (20 t10k images per class) and by anyone who wants to rerun
a calibration on the real data with one command. Images keep their split and index in the file
name, e.g. t10k-00042.png, so a folder can always be traced back to the source.

  python3 models/recipes/fmnist_to_imagefolder.py --split t10k --per-class 20 --out tests/fixtures/fmnist
  python3 models/recipes/fmnist_to_imagefolder.py --split train --out /tmp/fmnist-train

Needs numpy and Pillow (Debian python3-numpy, python3-pil).
"""
import argparse
import gzip
import pathlib

import numpy as np
from PIL import Image

CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")


def load_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["train", "t10k"], required=True)
    ap.add_argument("--per-class", type=int, default=0, help="first N images of each class (0: all)")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args()
    x = load_idx(DATA / f"{args.split}-images-idx3-ubyte.gz")
    y = load_idx(DATA / f"{args.split}-labels-idx1-ubyte.gz")
    counts = [0] * len(CLASSES)
    for i, (img, label) in enumerate(zip(x, y)):
        if args.per_class and counts[label] >= args.per_class:
            continue
        d = args.out / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(d / f"{args.split}-{i:05d}.png", optimize=True)
        counts[label] += 1
    print(f"wrote {sum(counts)} images to {args.out}: " + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts)))


if __name__ == "__main__":
    main()
