"""Turns the raw outputs of benches/gpu/run.sh (JSON lines in one folder) into its table.

Standard library only: it runs on the GPU machine's Python as it is.
"""
import json
import math
import pathlib
import sys

work = pathlib.Path(sys.argv[1])


def lines(name):
    path = work / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def text(name):
    path = work / name
    return path.read_text().strip() if path.exists() else ""


def fmt(v, digits=0):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


print(text("header.txt").replace("\n", "  \n"))
failures = text("failures.txt")
if failures:
    print("\n**Parts that failed** (the rest ran):\n")
    for line in failures.splitlines():
        print(f"- {line}")
for precision in ("fp32", "fp16"):
    io = text(f"io-{precision}.txt")
    if io:
        print(f"qscore {precision} server: {io[io.find('io=') + 3:] if 'io=' in io else io}  ")
print()

# (a) the raw ceiling
ceiling = lines("ceiling.jsonl")
batches = sorted({r["batch"] for r in ceiling})
print("## (a) Raw ONNX Runtime ceiling: prepared batch, images/s (ms per batch)\n")
if not ceiling:
    print("(not measured)")
else:
    print("| precision | path | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---:|" * len(batches))
for label in ("fp32", "fp16"):
    for io, name in (("run", "session.run, host tensors"), ("bind", "IO binding")):
        rows = {r["batch"]: r for r in ceiling if r["label"] == label and r["io"] == io}
        if rows:
            cells = [f"{fmt(rows[b]['images_per_s'])} ({fmt(rows[b]['ms_per_batch'], 2)})" if b in rows else "-" for b in batches]
            print(f"| {label} | {name} | " + " | ".join(cells) + " |")
binding = next((r["io_description"] for r in ceiling if r["io"] == "bind"), None)
if binding:
    print(f"\nThe IO-binding rows ran with: {binding.removeprefix('IO binding: ')}.")
best = max((r["images_per_s"] for r in ceiling if r["label"] == "fp32"), default=float("nan"))

# (b), (c) end to end
load = lines("load.jsonl")
print("\n## (b) qscore and (c) the Python baseline: POST /v1/score, closed loop\n")
print("| server | concurrency | images/s | p50 ms | p99 ms | non-2xx | errors | vs best fp32 raw | vs Python |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
python = {r["concurrency"]: r["images_per_s"] for r in load if r["label"].startswith("python")}
for r in load:
    py = python.get(r["concurrency"])
    ratio = fmt(r["images_per_s"] / py, 2) if py else "-"
    print(
        f"| {r['label']} | {r['concurrency']} | {fmt(r['images_per_s'])} | {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} "
        f"| {r['non_2xx']} | {r['errors']} | {fmt(r['images_per_s'] / best, 2)} | {ratio} |"
    )
note = text("baseline-note.txt")
if note:
    print(f"\nBaseline: {note}.")


# (d) fp16 against fp32
def ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0
        i = j + 1
    return r


def pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


fp32 = {(r["model"], r["file"]): r for r in lines("embed-fp32.jsonl")}
fp16 = {(r["model"], r["file"]): r for r in lines("embed-fp16.jsonl")}
print("\n## (d) fp16 against fp32, the same images through /v1/embed\n")
print("| model | images | Q-Score Spearman | max abs dQ | cosine mean | cosine min | flag agreement | max abs dp |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for model in sorted({m for m, _ in fp32}):
    keys = sorted(k for k in fp32 if k[0] == model and k in fp16)
    if not keys:
        print(f"| {model} | 0 | - | - | - | - | - | - |")
        continue
    q32 = [fp32[k]["q_score"] for k in keys]
    q16 = [fp16[k]["q_score"] for k in keys]
    cos = [cosine(fp32[k]["embedding"], fp16[k]["embedding"]) for k in keys]
    flags = [(fp32[k]["likely_misclassified"], fp16[k]["likely_misclassified"]) for k in keys]
    flags = [(a, b) for a, b in flags if a is not None and b is not None]
    agree = f"{sum(a == b for a, b in flags)}/{len(flags)}" if flags else "uncalibrated"
    dp = [abs(fp32[k]["p_misclassified"] - fp16[k]["p_misclassified"]) for k in keys
          if fp32[k]["p_misclassified"] is not None and fp16[k]["p_misclassified"] is not None]
    print(
        f"| {model} | {len(keys)} | {fmt(pearson(ranks(q32), ranks(q16)), 4)} "
        f"| {fmt(max(abs(a - b) for a, b in zip(q32, q16)), 4)} | {fmt(sum(cos) / len(cos), 6)} | {fmt(min(cos), 6)} "
        f"| {agree} | {fmt(max(dp), 4) if dp else '-'} |"
    )
