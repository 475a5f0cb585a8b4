#!/usr/bin/env python3
"""Does an int8 model keep the science of its fp32 model? The figures of models/README.md.

For every `models/<name>-int8/` beside its `models/<name>/`, on held-out images:

- the Spearman correlation of the Q-Score between int8 and fp32 (target >= 0.99);
- the agreement of `likely_misclassified` (target >= 99%), each model answering with its own
  calibration (its own D, risk estimator, isotonic map and threshold);
- the held-out AUPRC of each model's flag estimator (p_misclassified on the calibration's test
  part, from each calibration.json; target: within 1 point of fp32's);
- the agreement of the probe's predicted class, the cosine similarity of the embeddings (mean,
  min);
- ONNX Runtime's throughput (images/s) at batch 1 and 32 on this CPU, int8 / fp32.

The Q-Score, the flag and the embedding come from qscore itself: a `qscore serve` on loopback
answers `/v1/embed` for every image, under both models. Held-out images: for a calibrated model,
the test part its calibration reported on (5,000 t10k images for Fashion-MNIST), rebuilt by
`examples/calibration_split.rs` and checked against the calibration's file list; for an
uncalibrated one (MobileNetV2), seeded views of photos the quantisation never saw (--photos).

A model missing a target is reported as such; with --remove-failing its folder is deleted (it
does not ship). With --write, the tables go into models/README.md and each int8 README between
their `<!-- agreement -->` markers. Run it with .venv-int8 (`make int8-models` does).
"""
import argparse
import concurrent.futures
import json
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from quantize_int8 import list_images, prepare, read_manifest, views  # noqa: E402
from readme_sections import replace_section  # noqa: E402

TARGETS = {"spearman": 0.99, "flag_agreement": 0.99, "auprc_points": 1.0}


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as scipy.stats.rankdata."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b) -> float:
    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    return float(np.corrcoef(ra, rb)[0, 1])


class Server:
    """`qscore serve` on an ephemeral loopback port over a models folder."""

    def __init__(self, binary, models_dir, default):
        self.proc = subprocess.Popen(
            [binary, "serve", "--host", "127.0.0.1", "--port", "0", "--models-dir", str(models_dir),
             "--model", default],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={"QSCORE_LOG": "info,ort=warn"})
        self.url = None
        deadline = time.time() + 120
        for line in self.proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
            if time.time() > deadline:
                break
        if not self.url:
            self.proc.kill()
            raise SystemExit("qscore serve did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def embed(self, model, path: pathlib.Path):
        kind = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
        req = urllib.request.Request(f"{self.url}/v1/embed?model={model}", data=path.read_bytes(),
                                     headers={"content-type": kind})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


def answers(server, model, files):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda f: server.embed(model, f), files))


def throughput(path, tensor, seconds):
    """Images per second at batch 1 and 32, best of three alternating rounds (see bench())."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = {}
    for n in (1, 32):
        x = np.repeat(tensor[None], n, axis=0)
        sess.run(None, {name: x})
        start, images = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            sess.run(None, {name: x})
            images += n
        out[n] = images / (time.perf_counter() - start)
    return out


def bench(fp32, int8, tensor, seconds):
    best = {"fp32": {1: 0.0, 32: 0.0}, "int8": {1: 0.0, 32: 0.0}}
    for _ in range(3):  # alternate, so that load from elsewhere on the machine hits both alike
        for key, path in (("fp32", fp32), ("int8", int8)):
            for n, v in throughput(path, tensor, seconds).items():
                best[key][n] = max(best[key][n], v)
    return best


def held_out_photos(photos, k, seed, tmp: pathlib.Path):
    """K seeded views of every held-out photo, written as PNG files to be uploaded."""
    rng = random.Random(seed)
    out = []
    for f in list_images(photos):
        with Image.open(f) as img:
            img.load()
            for i, v in enumerate(views(img, k, rng)):
                p = tmp / f"{f.stem}-{i}.png"
                v.convert("RGB").save(p)
                out.append(p)
    return out


def measure(args, fp32, int8, tmp):
    models = args.models_dir
    cal32, cal8 = (models / m / "calibration.json" for m in (fp32, int8))
    calibrated = cal32.exists()
    if calibrated:
        if not cal8.exists():
            raise SystemExit(f"{int8} has no calibration.json: calibrate it as {fp32} was (make int8-models)")
        c32, c8 = json.loads(cal32.read_text()), json.loads(cal8.read_text())
        if c32["data"]["file_list_sha256"] != c8["data"]["file_list_sha256"]:
            raise SystemExit(f"{int8} was calibrated on another split than {fp32}")
        files = subprocess.run([args.split_bin, args.fmnist_train, args.fmnist_t10k, str(args.split_seed), "test",
                                str(cal32)], check=True, capture_output=True, text=True).stdout.split()
        files = [pathlib.Path(f) for f in files]
        held = f"the test part of its calibration ({len(files):,} t10k images)"
    else:
        files = held_out_photos(args.photos, args.photo_views, args.seed, tmp)
        held = (f"{len(files)} held-out views ({args.photo_views} per photo) of "
                f"{len(files) // args.photo_views} photos never used to quantise")
    pair = tmp / f"pair-{fp32}"
    pair.mkdir()
    for m in (fp32, int8):
        (pair / m).symlink_to((models / m).resolve())
    server = Server(args.bin, pair, fp32)
    try:
        with urllib.request.urlopen(f"{server.url}/v1/models", timeout=30) as r:
            loaded = {m["name"] for m in json.load(r)["models"]}
        if {fp32, int8} - loaded:
            raise SystemExit(f"qscore did not load {sorted({fp32, int8} - loaded)} (see its log)")
        a32, a8 = answers(server, fp32, files), answers(server, int8, files)
    finally:
        server.close()
    q32 = np.array([a["q_score"] for a in a32])
    q8 = np.array([a["q_score"] for a in a8])
    h32 = np.array([a["embedding"] for a in a32], np.float64)
    h8 = np.array([a["embedding"] for a in a8], np.float64)
    cos = (h32 * h8).sum(1) / (np.linalg.norm(h32, axis=1) * np.linalg.norm(h8, axis=1))
    row = {
        "fp32": fp32, "int8": int8, "held_out": held, "images": len(files),
        "spearman_q": spearman(q32, q8),
        "q_zero_fp32": float((q32 == 0).mean()), "q_zero_int8": float((q8 == 0).mean()),
        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
    }
    if calibrated:
        f32 = np.array([a["likely_misclassified"] for a in a32])
        f8 = np.array([a["likely_misclassified"] for a in a8])
        row.update({
            "flag_agreement": float((f32 == f8).mean()),
            "flagged_fp32": float(f32.mean()), "flagged_int8": float(f8.mean()),
            "class_agreement": float(np.mean([x["predicted_class"] == y["predicted_class"] for x, y in zip(a32, a8)])),
            "risk_source_fp32": c32["risk_source"], "risk_source_int8": c8["risk_source"],
            "auprc_fp32": 100 * c32["evaluation"]["p_misclassified"]["auprc"],
            "auprc_int8": 100 * c8["evaluation"]["p_misclassified"]["auprc"],
        })
    manifest = read_manifest(models / fp32)
    with Image.open(files[0]) as img:
        tensor = prepare(img, manifest)
    speed = bench(models / fp32 / "model.onnx", models / int8 / "model.onnx", tensor, args.bench_seconds)
    for n in (1, 32):
        row[f"fp32_batch{n}_per_s"] = speed["fp32"][n]
        row[f"int8_batch{n}_per_s"] = speed["int8"][n]
        row[f"speed_ratio_batch{n}"] = speed["int8"][n] / speed["fp32"][n]
    misses = []
    if row["spearman_q"] < TARGETS["spearman"]:
        misses.append(f"Spearman {row['spearman_q']:.4f} < {TARGETS['spearman']}")
    if calibrated:
        if row["flag_agreement"] < TARGETS["flag_agreement"]:
            misses.append(f"flag agreement {100 * row['flag_agreement']:.2f}% < {100 * TARGETS['flag_agreement']:.0f}%")
        if abs(row["auprc_int8"] - row["auprc_fp32"]) > TARGETS["auprc_points"]:
            misses.append(f"AUPRC {row['auprc_int8']:.2f} vs {row['auprc_fp32']:.2f}")
    row["misses"] = misses
    return row


def table(rows) -> str:
    def pct(r, k):
        return f"{100 * r[k]:.2f}" if k in r else "n/a"

    def auprc(r):
        if "auprc_int8" not in r:
            return "n/a (uncalibrated)"
        return f"{r['auprc_int8']:.2f} vs {r['auprc_fp32']:.2f} ({r['auprc_int8'] - r['auprc_fp32']:+.2f})"

    out = ["| int8 model | held-out images | Spearman Q | flag agreement % | class agreement % | "
           "AUPRC int8 vs fp32 (points) | cosine mean / min | ORT int8/fp32 batch 1 | batch 32 | ships |",
           "|---|---:|---:|---:|---:|---|---|---:|---:|---|"]
    for r in rows:
        out.append(
            f"| {r['int8']} | {r['images']:,} | {r['spearman_q']:.4f} | {pct(r, 'flag_agreement')} | "
            f"{pct(r, 'class_agreement')} | {auprc(r)} | {r['cosine_mean']:.5f} / {r['cosine_min']:.5f} | "
            f"{r['speed_ratio_batch1']:.2f}x ({r['int8_batch1_per_s']:.0f} vs {r['fp32_batch1_per_s']:.0f}/s) | "
            f"{r['speed_ratio_batch32']:.2f}x ({r['int8_batch32_per_s']:.0f} vs {r['fp32_batch32_per_s']:.0f}/s) | "
            f"{'yes' if not r['misses'] else 'no: ' + '; '.join(r['misses'])} |")
    return "\n".join(out)


def notes(rows) -> str:
    lines = []
    for r in rows:
        line = f"- `{r['int8']}`: held out: {r['held_out']}; Q = 0 on {100 * r['q_zero_fp32']:.1f}% (fp32) and " \
               f"{100 * r['q_zero_int8']:.1f}% (int8) of them"
        if "flagged_fp32" in r:
            line += (f"; flagged {100 * r['flagged_fp32']:.1f}% (fp32, {r['risk_source_fp32']}) and "
                     f"{100 * r['flagged_int8']:.1f}% (int8, {r['risk_source_int8']})")
        lines.append(line + ".")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=pathlib.Path, default=pathlib.Path("models"))
    ap.add_argument("--only", nargs="*", default=[], help="int8 model names (default: every *-int8 folder)")
    ap.add_argument("--bin", default="target/release/qscore")
    ap.add_argument("--split-bin", default="target/release/examples/calibration_split")
    ap.add_argument("--fmnist-train", default="/tmp/qscore-fmnist/train")
    ap.add_argument("--fmnist-t10k", default="/tmp/qscore-fmnist/t10k")
    ap.add_argument("--split-seed", type=int, default=0, help="the seed `make calibrate` calibrates with")
    ap.add_argument("--photos", nargs="*", default=[], help="held-out photos for an uncalibrated model")
    ap.add_argument("--photo-views", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bench-seconds", type=float, default=2.0)
    ap.add_argument("--json", type=pathlib.Path, help="write the figures here")
    ap.add_argument("--write", action="store_true", help="put the tables in the READMEs")
    ap.add_argument("--remove-failing", action="store_true", help="delete the folder of a model missing a target")
    args = ap.parse_args()

    names = args.only or sorted(p.name for p in args.models_dir.iterdir() if p.name.endswith("-int8"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for int8 in names:
            fp32 = int8.removesuffix("-int8")
            print(f"measuring {int8} against {fp32}", file=sys.stderr)
            rows.append(measure(args, fp32, int8, pathlib.Path(tmp)))
            print(table(rows[-1:]), file=sys.stderr)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX-VNNI" if "avx_vnni" in flags else "no VNNI")
    machine = f"{cpu}, {isa}, ONNX Runtime {ort.__version__} (Python), {ort.get_device()}, default threads"
    print(table(rows))
    print(notes(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "targets": TARGETS, "rows": rows}, indent=1) + "\n")
    if args.write:
        body = f"{table(rows)}\n\n{notes(rows)}\n\nThroughput: ONNX Runtime sessions alone, best of three " \
               f"alternating rounds, on {machine}."
        replace_section(args.models_dir / "README.md", "agreement", body)
        for r in rows:
            readme = args.models_dir / r["int8"] / "README.md"
            if readme.exists() and not r["misses"]:
                replace_section(readme, "agreement", f"{table([r])}\n\n{notes([r])}\n\nThroughput on {machine}.")
    failed = [r for r in rows if r["misses"]]
    for r in failed:
        print(f"{r['int8']} misses its targets: {'; '.join(r['misses'])}", file=sys.stderr)
        if args.remove_failing:
            shutil.rmtree(args.models_dir / r["int8"])
            print(f"removed {args.models_dir / r['int8']}: it does not ship", file=sys.stderr)
    return 1 if failed and not args.remove_failing else 0


if __name__ == "__main__":
    sys.exit(main())
