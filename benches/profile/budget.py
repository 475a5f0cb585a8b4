"""Splits a `perf record --call-graph dwarf` profile of the qscore server into the stages of one
image's path, and turns the shares into CPU milliseconds per image.

    python3 budget.py PERF_DATA IMAGES CPU_TICKS

A sample is charged to the first stage found walking its stack from the leaf up, so a memcpy
called by the resizer counts as resize and one called by hyper as HTTP. ONNX Runtime ships
without symbols, so everything inside its library is "inference" whoever called it.
Prints a Markdown table on stdout.
"""
import collections
import os
import re
import subprocess
import sys

# (stage, pattern on "symbol (dso)"), first match wins for each frame.
STAGES = [
    ("inference (ONNX Runtime)", r"libonnxruntime"),
    ("JPEG structure walk (EOI check)", r"qscore::image::jpeg::walk"),
    ("JPEG decode: entropy + IDCT + colour (zune-jpeg, jpeg-decoder)", r"zune_jpeg|jpeg_decoder|image::codecs::jpeg"),
    ("decode: other formats", r"png::|image_webp|gif::|tiff::|image::codecs"),
    ("colour conversion (image crate)", r"image::images::buffer|image::color|ConvertBuffer|to_rgb8|to_luma8"),
    ("resize (fast_image_resize)", r"fast_image_resize"),
    ("crop + normalise into the tensor", r"qscore::image::(normalise_into|preprocess|resize_crop_normalise)"),
    ("batch assembly + output copies (worker)", r"qscore::engine::batch::run|qscore::model::encoder"),
    ("Q-Score + risk maths", r"qscore::qscore|qscore::risk|qscore::drift"),
    ("JSON", r"serde_json|serde::"),
    ("metrics", r"prometheus::"),
    ("HTTP (hyper, axum, body reads)", r"hyper::|axum::|http_body|tower|h2::|httparse|qscore::http"),
    ("engine (admission, budget, answer)", r"qscore::engine"),
    ("async runtime (tokio)", r"tokio::"),
    ("allocator", r"malloc|free|realloc|_int_|cfree"),
]


def frames(sample):
    for line in sample.splitlines()[1:]:
        m = re.match(r"\s*[0-9a-f]+\s+(.*)$", line)
        if m:
            yield m.group(1)


def stage_of(sample):
    for frame in frames(sample):
        for stage, pattern in STAGES:
            if re.search(pattern, frame):
                return stage
    first = next(frames(sample), "")
    if "kernel" in first:
        return "kernel (syscalls, page faults) seen in user samples"
    if "libc" in first:
        return "libc (memcpy/memset outside a known stage)"
    return "other"


def main():
    data, images = sys.argv[1], int(sys.argv[2])
    cpu_seconds = int(sys.argv[3]) / os.sysconf("SC_CLK_TCK")
    text = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"], capture_output=True, text=True,
                          check=True).stdout
    counts = collections.Counter(stage_of(s) for s in text.split("\n\n") if s.strip())
    total = sum(counts.values())
    per_image_ms = cpu_seconds * 1e3 / images
    print(f"{images} images, {cpu_seconds:.2f} CPU-seconds of the server process: "
          f"{per_image_ms:.2f} CPU-ms per image; {total} samples\n")
    print("| stage | share | CPU ms / image |")
    print("|---|---:|---:|")
    for stage, n in counts.most_common():
        print(f"| {stage} | {100 * n / total:.1f}% | {per_image_ms * n / total:.2f} |")


if __name__ == "__main__":
    main()
