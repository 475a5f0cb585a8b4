"""A copy of a model folder whose weights are redrawn at random: the model-randomisation sanity
check of saliency maps (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018). A map
that still looks the same once the weights are random shows the image, not what the model learnt.

Every floating-point initializer with more than one value (convolution and linear weights,
biases) is replaced by normal noise with its own tensor's mean and standard deviation, seeded,
so activations keep their scale; integer tensors (shapes, axes) are kept. The manifest is copied
with the new name; no calibration is copied (the random model has no D of its own).

    .venv-test/bin/python models/recipes/randomise_weights.py --model models/fmnist-simclr \
        --out /tmp/models/fmnist-simclr-random --seed 0

tests/explain.rs runs it (onnx is in tests/requirements.txt).
"""

import argparse
import pathlib
import re

import numpy as np
import onnx
from onnx import numpy_helper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=pathlib.Path, help="model folder (model.onnx + model.toml)")
    ap.add_argument("--out", required=True, type=pathlib.Path, help="new model folder (its name is the folder's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    model = onnx.load(str(args.model / "model.onnx"))
    redrawn = 0
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype.kind != "f" or weights.size <= 1:
            continue
        std = float(weights.std()) or 1e-3
        noise = rng.normal(float(weights.mean()), std, weights.shape).astype(weights.dtype)
        init.CopyFrom(numpy_helper.from_array(noise, init.name))
        redrawn += 1
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out / "model.onnx"))
    manifest = (args.model / "model.toml").read_text()
    manifest = re.sub(r'(?m)^name = ".*"$', f'name = "{args.out.name}"', manifest, count=1)
    (args.out / "model.toml").write_text(manifest)
    print(f"{args.out}: {redrawn} weight tensors redrawn (seed {args.seed})")


if __name__ == "__main__":
    main()
