"""Turns the raw outputs of benches/load/run.sh into one Markdown table (stdout)."""
import json
import pathlib
import re
import sys

out, levels, cores, cpus = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3], sys.argv[4]
raw = json.loads((out / "raw.json").read_text())


def ms(text, pct):
    m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def run(name, c):
    text = (out / f"{name}-{c}.txt").read_text()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    return rps, ms(text, 50), ms(text, 99), int(bad.group(1)) if bad else 0, errors.group(0) if errors else ""


ceiling = raw["raw_batch_1_images_per_s"]
best = max(ceiling, raw["raw_batch_32_images_per_s"])
print(f"Machine: {cores} cores, servers pinned to CPUs {cpus}; MobileNetV2 224x224, ONNX Runtime 1.31.1 CPU; "
      f"POST /v1/score with {pathlib.Path(sys.argv[0]).parent.parent.parent / 'tests/fixtures/photos/china.jpg'} (640x427 JPEG)\n")
print("| what | concurrency | images/s | p50 ms | p99 ms | non-2xx | vs raw ceiling | vs Python |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
print(f"| (a) raw ONNX Runtime, prepared tensor, batch 1 | - | {raw['raw_batch_1_images_per_s']:.0f} | | | | 1.00 | |")
print(f"| (a) raw ONNX Runtime, prepared tensor, batch 32 | - | {raw['raw_batch_32_images_per_s']:.0f} | | | | "
      f"{raw['raw_batch_32_images_per_s'] / ceiling:.2f} | |")
print(f"| decode + preprocess + batch-1 run, in process | 1 | {raw['single_image_images_per_s']:.0f} | "
      f"{raw['single_image_p50_ms']:.2f} | {raw['single_image_p99_ms']:.2f} | | "
      f"{raw['single_image_images_per_s'] / ceiling:.2f} | |")
for label, name in [("(b) qscore", "qscore"), ("(c) Python FastAPI baseline", "python"), ("(d) qscore --max-batch 1", "qscore-batch1")]:
    for c in levels:
        rps, p50, p99, bad, errs = run(name, c)
        py = run("python", c)[0]
        note = f" {errs}" if errs else ""
        print(f"| {label}{note} | {c} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {bad} | {rps / best:.2f} | {rps / py:.2f} |")
