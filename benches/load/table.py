"""Turns the raw outputs of benches/load/run.sh into one Markdown table and the targets (stdout).

    python3 table.py OUT_DIR "CONCURRENCY LEVELS" CORES CPUS PHOTO
"""
import json
import pathlib
import re
import sys

out, levels, cores, cpus, photo = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3], sys.argv[4], sys.argv[5]
FP32, INT8 = "mobilenet_v2-imagenet", "mobilenet_v2-imagenet-int8"
raw = {m: json.loads((out / f"raw-{m}.json").read_text()) for m in (FP32, INT8) if (out / f"raw-{m}.json").exists()}


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


print(f"Machine: {cores} cores, servers pinned to CPUs {cpus}; MobileNetV2 224x224, ONNX Runtime 1.31.1 CPU; "
      f"POST /v1/score with {photo} as an image/jpeg body\n")
print("| what | concurrency | images/s | p50 ms | p99 ms | non-2xx | vs own raw batch 1 | vs Python (fp32) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for m, r in raw.items():
    tag = "int8" if m == INT8 else "fp32"
    ceiling = r["raw_batch_1_images_per_s"]
    print(f"| (a) {tag} raw ONNX Runtime, prepared tensor, batch 1 | - | {ceiling:.0f} | | | | 1.00 | |")
    print(f"| (a) {tag} raw ONNX Runtime, prepared tensor, batch 32 | - | {r['raw_batch_32_images_per_s']:.0f} | | | | "
          f"{r['raw_batch_32_images_per_s'] / ceiling:.2f} | |")
    print(f"| (a) {tag} decode + preprocess + batch-1 run, in process | 1 | {r['single_image_images_per_s']:.0f} | "
          f"{r['single_image_p50_ms']:.2f} | {r['single_image_p99_ms']:.2f} | | "
          f"{r['single_image_images_per_s'] / ceiling:.2f} | |")
rows = [("(b) qscore fp32", "qscore", FP32), ("(c) Python FastAPI baseline fp32", "python", FP32),
        ("(d) qscore fp32 --max-batch 1", "qscore-batch1", FP32), ("(e) qscore int8", "qscore-int8", INT8)]
for label, name, model in rows:
    if not (out / f"{name}-{levels[0]}.txt").exists():
        continue
    for c in levels:
        rps, p50, p99, bad, errs = run(name, c)
        py = run("python", c)[0]
        note = f" {errs}" if errs else ""
        print(f"| {label}{note} | {c} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {bad} | "
              f"{rps / raw[model]['raw_batch_1_images_per_s']:.2f} | {rps / py:.2f} |")

print("\nTargets (issue 15), from this run:")
loop = raw[FP32]["single_image_images_per_s"]
best = max(run("qscore", c)[0] for c in levels)
print(f"- fp32 qscore at saturation / in-process decode + inference loop: {best:.0f} / {loop:.0f} = "
      f"{best / loop:.2f} (target >= 0.9)")
if "1" in levels:
    p99 = run("qscore", "1")[2]
    floor = raw[FP32]["single_image_p99_ms"]
    print(f"- p99 at one client / in-process decode + one inference p99: {p99:.2f} / {floor:.2f} ms = "
          f"{p99 / floor:.2f} (target <= 1.2)")
if INT8 in raw:
    for c in [c for c in levels if c in ("16", "32")]:
        i8, py = run("qscore-int8", c)[0], run("python", c)[0]
        print(f"- int8 qscore / Python fp32 at {c} clients: {i8:.0f} / {py:.0f} = {i8 / py:.2f} (target >= 2)")
