#!/usr/bin/env python3
"""Refit scikit-learn's linear probe on exactly the rows the Rust probe was fitted on.

`qscore calibrate --export-split DIR` writes the split it calibrated on (DIR/{fit,select,test}_h.npy
float32 (n, d), {part}_y.npy int64 labels, {part}_pred.npy int64: the Rust probe's predicted class,
split.json). This script fits scikit-learn's LogisticRegression on the fit rows with the same
model: features standardised by the fit rows' mean and population standard deviation
(StandardScaler; a constant feature is left unscaled, as the Rust probe does), multinomial
log-loss with L2 penalty C = 1 / alpha (alpha from split.json), the intercept unpenalised, lbfgs,
and enough iterations to converge (--max-iter, default 5000; the answer says whether it did).
It then reports, on the select and test rows: both probes' accuracy and the share of images on
which their predicted classes agree.

Usage (`make train-env` makes .venv-train with Debian's scikit-learn):
  target/release/qscore calibrate --model fmnist-simclr --fit ... --holdout ... --export-split /tmp/split
  .venv-train/bin/python -s models/recipes/sklearn_probe.py /tmp/split
Prints one JSON object and writes it to DIR/sklearn_probe.json.
"""
import argparse
import json
import pathlib
import time
import warnings

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", type=pathlib.Path, help="folder written by `qscore calibrate --export-split`")
    ap.add_argument("--max-iter", type=int, default=5000)
    args = ap.parse_args()

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    split = json.loads((args.split / "split.json").read_text())
    load = lambda name: np.load(args.split / f"{name}.npy")
    fit_h, fit_y = load("fit_h"), load("fit_y")
    scaler = StandardScaler().fit(fit_h.astype(np.float64))
    clf = LogisticRegression(C=1.0 / split["probe_alpha"], solver="lbfgs", max_iter=args.max_iter, tol=1e-6)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(scaler.transform(fit_h.astype(np.float64)), fit_y)
    seconds = time.time() - t0

    result = {
        "model": split["model"],
        "fit_rows": int(len(fit_y)),
        "C": 1.0 / split["probe_alpha"],
        "sklearn_iterations": int(np.max(clf.n_iter_)),
        "sklearn_converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "sklearn_fit_seconds": round(seconds, 1),
    }
    for part in ["fit", "select", "test"]:
        h, y, rust = load(f"{part}_h"), load(f"{part}_y"), load(f"{part}_pred")
        sk = clf.predict(scaler.transform(h.astype(np.float64)))
        result[part] = {
            "rows": int(len(y)),
            "sklearn_accuracy": float((sk == y).mean()),
            "rust_accuracy": float((rust == y).mean()),
            "agreement": float((sk == rust).mean()),
            "both_wrong_share_of_rust_mistakes": float(((sk != y) & (rust != y)).sum() / max(1, (rust != y).sum())),
        }
    text = json.dumps(result, indent=1)
    (args.split / "sklearn_probe.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
