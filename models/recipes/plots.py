#!/usr/bin/env python3
"""Draw the calibration figures of models/README.md from every models/*/calibration.json.

- compression_curve.png: one panel per model. Probe accuracy on the test part against the share
  of features kept: the k features of highest A_j (descending A_j, the curve `qscore calibrate`
  stores in evaluation.compression.curve) and random subsets of k (mean, band = ± 1 sd over the
  seeds); D (the 50-95 band) and the A_j > 0 set as single points with their random twins.
- reliability.png: one panel per model. p_misclassified's reliability diagram on the test part
  (evaluation.reliability: 10 equal-count bins, mean p against the observed error rate), with
  the diagonal a calibrated p would follow.

Models whose calibration.json predates these fields (no curve, no bins) are listed and skipped.

Usage (`make plots`, run by `make calibrate`; matplotlib is Debian's python3-matplotlib from
`make train-env`):
  .venv-train/bin/python -s models/recipes/plots.py --models-dir models [--out models]
"""
import argparse
import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def load(models_dir):
    cals = []
    for path in sorted(models_dir.glob("*/calibration.json")):
        cals.append(json.loads(path.read_text()))
    return cals


def grid(n):
    cols = min(n, 2)
    return max(1, math.ceil(n / cols)), max(1, cols)


def compression_figure(cals, out):
    have = [c for c in cals if c["evaluation"]["compression"].get("curve")]
    if not have:
        return None
    rows, cols = grid(len(have))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax, c in zip(axes.flat, have):
        k = c["evaluation"]["compression"]
        curve = k["curve"]
        x = [100 * p["fraction"] for p in curve]
        top = [100 * p["accuracy"] for p in curve]
        mean = [100 * p["accuracy_random_mean"] for p in curve]
        sd = [100 * p["accuracy_random_sd"] for p in curve]
        ax.plot(x, top, "o-", color="C0", label="top-k by A_j (descending)")
        ax.plot(x, mean, "s--", color="C1", label="random k (mean ± sd)")
        ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color="C1", alpha=0.25)
        d = 100 * k["discriminative"] / k["dim"]
        ax.errorbar([d], [100 * k["accuracy_random_mean"]], yerr=[100 * k["accuracy_random_sd"]], fmt="x", color="C1")
        ax.plot([d], [100 * k["accuracy_discriminative"]], "D", color="C2", label=f"D (band {c['percentiles'][0]:g}-{c['percentiles'][1]:g})")
        if k.get("active"):
            a = k["active"]
            xa = 100 * a["kept"] / k["dim"]
            ax.plot([xa], [100 * a["accuracy"]], "^", color="C3", label="A_j > 0")
            if a["accuracy_random"]:
                ax.errorbar([xa], [100 * a["accuracy_random_mean"]], yerr=[100 * a["accuracy_random_sd"]], fmt="x", color="C1")
        ax.axhline(100 * k["accuracy_all"], color="grey", lw=0.8, ls=":", label="all d")
        ax.set_title(f"{c['model']} (eps {c['epsilon']:g}, d = {k['dim']})")
        ax.set_xlabel("features kept (%)")
        ax.set_ylabel("probe accuracy, test part (%)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(have):]:
        ax.axis("off")
    fig.tight_layout()
    path = out / "compression_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability_figure(cals, out):
    have = [c for c in cals if c["evaluation"].get("reliability")]
    if not have:
        return None
    rows, cols = grid(len(have))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.6 * rows), squeeze=False)
    for ax, c in zip(axes.flat, have):
        bins = c["evaluation"]["reliability"]
        p = [b["p_mean"] for b in bins]
        err = [b["error_rate"] for b in bins]
        top = max(max(p), max(err), 0.05) * 1.05
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":", label="calibrated")
        ax.plot(p, err, "o-", color="C0", label=f"{len(bins)} equal-count bins ({bins[0]['count']} images each)")
        ax.axvline(c["threshold"], color="C3", lw=0.8, ls="--", label=f"tau = {c['threshold']:.3f}")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_title(f"{c['model']} ({c['risk_source']}, prior a = {c['evaluation'].get('isotonic_prior', 0):g})")
        ax.set_xlabel("mean p_misclassified in bin")
        ax.set_ylabel("observed error rate in bin")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(have):]:
        ax.axis("off")
    fig.tight_layout()
    path = out / "reliability.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=pathlib.Path, default=pathlib.Path("models"))
    ap.add_argument("--out", type=pathlib.Path, help="folder for the PNGs [default: --models-dir]")
    args = ap.parse_args()
    out = args.out or args.models_dir
    cals = load(args.models_dir)
    if not cals:
        raise SystemExit(f"no calibration.json under {args.models_dir}/*/; run `qscore calibrate` first")
    stale = [c["model"] for c in cals if not c["evaluation"]["compression"].get("curve") or not c["evaluation"].get("reliability")]
    if stale:
        print(f"no curve or reliability bins in: {', '.join(stale)} (calibrated before they were measured; re-run `make calibrate`)")
    for path in [compression_figure(cals, out), reliability_figure(cals, out)]:
        if path:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
