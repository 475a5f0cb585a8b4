#!/usr/bin/env python3
"""Re-derive a trained Fashion-MNIST model's Q-Score epsilon without retraining.

Embeds the 60,000 training images with the exported model.onnx (ONNX Runtime), applies
train_ssl.choose_epsilon (the same label-free rule the training recipe applies), and rewrites
`epsilon` in model.toml, the README row and train_log.json. Used once on models trained before
the rule existed; the training recipe applies it itself.

  .venv-train/bin/python models/recipes/set_epsilon.py models/fmnist-simclr
"""
import json
import pathlib
import re
import sys

import onnxruntime as ort

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_ssl import MEAN, STD, choose_epsilon, load_fmnist  # noqa: E402


def main():
    for d in map(pathlib.Path, sys.argv[1:]):
        train_x, _ = load_fmnist("train")
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        x = ((train_x.astype("float32") / 255.0 - MEAN) / STD)[:, None]
        import numpy as np
        feats = np.concatenate([sess.run(["embedding"], {"pixel_values": x[i:i + 2000]})[0] for i in range(0, len(x), 2000)])
        eps, cov, coverage = choose_epsilon(feats)
        toml = (d / "model.toml").read_text()
        toml = re.sub(r"(\[qscore\]\n)(# .*\n)?epsilon = [0-9.]+",
                      f"\\1# Largest eps with a non-empty L for >= 99% of the training images (train_ssl.choose_epsilon).\nepsilon = {eps}", toml)
        (d / "model.toml").write_text(toml)
        log = json.loads((d / "train_log.json").read_text())
        log.update({"epsilon": eps, "epsilon_coverage": cov, "coverage_by_epsilon": {str(k): v for k, v in coverage.items()}})
        (d / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
        readme = (d / "README.md").read_text()
        row = (f"| Q-Score epsilon (label-free: largest eps giving a non-empty L on >= 99% of train images) | {eps} "
               f"(coverage {100 * cov:.1f}%; at eps = 4: {100 * coverage[4.0]:.1f}%) |")
        readme = re.sub(r"\| Q-Score epsilon .*\|\n", "", readme)
        readme = readme.replace("\n\n| epoch | loss | seconds |", f"\n{row}\n\n| epoch | loss | seconds |", 1)
        (d / "README.md").write_text(readme)
        print(d.name, "epsilon", eps, "coverage", round(cov, 4), {k: round(v, 3) for k, v in coverage.items()})


if __name__ == "__main__":
    main()
