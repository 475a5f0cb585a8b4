#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the checkout the device tool sends: builds and packs
# everything benches/gpu/run.sh needs on the lent GPU machine, which has no network, no registry
# and no Rust, into the git-ignored .gpu-bench/:
#
#   qscore-gpu/bin/{qscore,gpu_bench}   the release binary and the bench tool, stripped
#   qscore-gpu/models-fp16/<model>/     the fp16 graphs and manifests (make fp16-models); their
#                                       calibration.json is taken from models/ there (it travels)
#   qscore-gpu/ort-gpu/                 ONNX Runtime 1.31.1's CUDA build (PyPI onnxruntime-gpu)
#   qscore-gpu/py/                      fastapi + uvicorn (cp312 wheels) and the same wheel's
#                                       Python package, for the baseline on the CUDA EP
#
# compressed into one stream and cut into pieces .gpu-bench/1..N, each small enough to travel
# with the working tree in one device call (64 MiB together), plus .gpu-bench/unpack.sh. It ends
# by printing the exact device calls (benches/gpu/README.md explains them).
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_VERSION=1.31.1
FASTAPI=fastapi==0.163.2
UVICORN=uvicorn==0.54.0
OUT=.gpu-bench
STAGE=$OUT/stage/qscore-gpu
CACHE=$OUT/cache
# What a device call carries besides the pieces: the working tree (tracked files and untracked
# ones git does not ignore), measured now, and a margin for unpack.sh and files added later.
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((3 * 1024 * 1024))

command -v zstd >/dev/null || { echo "prepare.sh needs zstd (apt-get install zstd)" >&2; exit 1; }
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
PIECE=${QSCORE_GPU_BENCH_PIECE_BYTES:-$((LIMIT - tree - MARGIN))}
if ((PIECE < 4 * 1024 * 1024)); then
  echo "the working tree is $((tree / 1048576)) MiB: under 4 MiB is left per device call for the pieces" >&2
  exit 1
fi

echo "building the release binary and the bench tool..." >&2
cargo build --release --locked --bin qscore --example gpu_bench
[[ -f models-fp16/mobilenet_v2-imagenet/model.onnx ]] || make fp16-models

rm -rf "$OUT/stage" "$OUT"/[0-9]* "$OUT/unpack.sh"
mkdir -p "$STAGE/bin" "$STAGE/ort-gpu" "$STAGE/py" "$CACHE"
grep -qx '/.gpu-bench/' .gitignore || echo "warning: .gpu-bench/ is not in .gitignore; it must not travel whole" >&2

strip -o "$STAGE/bin/qscore" target/release/qscore
strip -o "$STAGE/bin/gpu_bench" target/release/examples/gpu_bench
for d in models-fp16/*/; do
  name=$(basename "$d")
  mkdir -p "$STAGE/models-fp16/$name"
  cp "$d"model.onnx "$d"model.toml "$d"README.md "$STAGE/models-fp16/$name/"
done

# One wheel serves both: the C library and CUDA provider for qscore, the Python package for
# the baseline (the device's Python is 3.12).
wheel=$(ls "$CACHE"/onnxruntime_gpu-$ORT_VERSION-cp312-*.whl 2>/dev/null | head -1 || true)
if [[ -z $wheel ]]; then
  echo "downloading onnxruntime-gpu==$ORT_VERSION (about 256 MB)..." >&2
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --python-version 3.12 --implementation cp -d "$CACHE" "onnxruntime-gpu==$ORT_VERSION"
  wheel=$(ls "$CACHE"/onnxruntime_gpu-$ORT_VERSION-cp312-*.whl)
fi
unzip -q -o -j "$wheel" 'onnxruntime/capi/libonnxruntime.so*' 'onnxruntime/capi/libonnxruntime_providers_cuda.so' \
  'onnxruntime/capi/libonnxruntime_providers_shared.so' -d "$STAGE/ort-gpu"
ln -sf "libonnxruntime.so.$ORT_VERSION" "$STAGE/ort-gpu/libonnxruntime.so"
# The Python package without the libraries run.sh links in from ort-gpu/ (the CUDA provider is
# 284 MB) and without TensorRT's provider, which nothing here uses.
unzip -q -o "$wheel" 'onnxruntime/*' -x 'onnxruntime/capi/libonnxruntime_providers_cuda.so' \
  'onnxruntime/capi/libonnxruntime_providers_tensorrt.so' 'onnxruntime/capi/libonnxruntime.so*' -d "$STAGE/py"
python3 -m pip install -q --no-warn-conflicts --root-user-action=ignore --disable-pip-version-check \
  --target "$STAGE/py" --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "$FASTAPI" "$UVICORN"
find "$STAGE/py" -name __pycache__ -prune -exec rm -rf {} +

echo "compressing $(du -sh "$OUT/stage" | cut -f1) (zstd -15, a few minutes on two cores)..." >&2
tar -C "$OUT/stage" -cf - qscore-gpu | zstd -T0 -15 --long=27 -q -o "$OUT/payload.tar.zst"
split -b "$PIECE" -d -a 2 "$OUT/payload.tar.zst" "$OUT/piece."
rm "$OUT/payload.tar.zst"
n=0
for p in "$OUT"/piece.*; do
  n=$((n + 1))
  mkdir -p "$OUT/$n"
  mv "$p" "$OUT/$n/"
done
# The device has no zstd; this one needs only libc, zlib, liblzma and liblz4.
cp "$(command -v zstd)" "$OUT/1/zstd"
rm -rf "$OUT/stage"

cat > "$OUT/unpack.sh" <<'UNPACK'
#!/usr/bin/env bash
# On the GPU machine: `unpack.sh K` once per piece (each in its own device call carrying
# .gpu-bench/K), then `unpack.sh assemble` builds /tmp/qscore-gpu. Pieces wait in /tmp.
set -euo pipefail
mkdir -p /tmp/qscore-gpu-pieces
if [[ ${1:-} == assemble ]]; then
  rm -rf /tmp/qscore-gpu
  cat /tmp/qscore-gpu-pieces/piece.* | /tmp/qscore-gpu-pieces/zstd -d --long=27 -q | tar -C /tmp -xf -
  ls /tmp/qscore-gpu /tmp/qscore-gpu/bin /tmp/qscore-gpu/ort-gpu
else
  cp "$(dirname "$0")/$1"/* /tmp/qscore-gpu-pieces/
  ls /tmp/qscore-gpu-pieces | wc -l
fi
UNPACK
chmod +x "$OUT/unpack.sh"

du -sh "$OUT"/[0-9]* >&2
cat <<EOF
$n pieces of at most $((PIECE / 1048576)) MiB (working tree: $((tree / 1048576)) MiB). Device calls, back to back
(the machine goes back after 30 s idle, and the pieces with it):
EOF
for ((k = 1; k < n; k++)); do
  echo "  run  carry=[\".gpu-bench/$k\", \".gpu-bench/unpack.sh\"]  command='bash .gpu-bench/unpack.sh $k'"
done
echo "  run  carry=[\".gpu-bench/$n\", \".gpu-bench/unpack.sh\"]  timeout_s=600  command='bash .gpu-bench/unpack.sh $n && bash .gpu-bench/unpack.sh assemble && bash benches/gpu/run.sh'"
