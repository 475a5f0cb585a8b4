#!/usr/bin/env bash
# The GPU benchmark in one unattended run (estimated at 4 minutes on an H200, not yet timed
# there; benches/gpu/README.md has the device calls that bring its files). Prints one table with:
#  (a) the raw ONNX Runtime CUDA ceiling: MobileNetV2 on a prepared batch of 1, 32 and 256, fp32
#      and fp16, through session.run with host tensors and through qscore's IO binding;
#  (b) qscore end to end, fp32 and fp16 models: POST /v1/score with a real JPEG, closed loop at
#      concurrency 1, 64 and 256;
#  (c) the Python FastAPI + onnxruntime baseline (benches/baseline/server.py) under the same load,
#      on ONNX Runtime's CUDA EP when its CUDA build imports there, else on its CPU EP (said so);
#  (d) fp16 against fp32 on the same images through /v1/embed: Q-Score Spearman, flag agreement,
#      embedding cosine.
#
# QSCORE_GPU_BENCH_DEVICE=cpu is a dry run of the whole flow on this repo's CPU build (short
# durations, CPU EP, fp16 graphs served from a scratch copy without their CUDA-only mark): it
# checks the script, not the GPU. Without a GPU (and not in a dry run) it stops within seconds,
# naming what is missing. Results also go to $OUT (the device tool's folder) when it is set.
set -euo pipefail
cd "$(dirname "$0")/../.."

MODE=${QSCORE_GPU_BENCH_DEVICE:-cuda}
PACK=${QSCORE_GPU_BENCH_PACK:-/tmp/qscore-gpu}
MODEL=mobilenet_v2-imagenet
PHOTO=${QSCORE_GPU_BENCH_PHOTO:-tests/fixtures/photos/china.jpg}
started=$(date +%s)

case "$MODE" in
  cuda)
    BIN_DIR=${QSCORE_GPU_BENCH_BIN_DIR:-$PACK/bin}
    GPU_BENCH=$BIN_DIR/gpu_bench
    ORT_DIR=${QSCORE_GPU_BENCH_ORT_DIR:-$PACK/ort-gpu}
    [[ -z ${QSCORE_GPU_BENCH_ORT_DIR:-} && ! -e $ORT_DIR && -e /tmp/ort-gpu ]] && ORT_DIR=/tmp/ort-gpu # gpu-pack.sh's
    ORT_LIB=$ORT_DIR/libonnxruntime.so
    FP16_SRC=${QSCORE_GPU_BENCH_FP16_DIR:-$PACK/models-fp16}
    PY_SITE=$PACK/py
    PYTHON=${QSCORE_GPU_BENCH_PYTHON:-/opt/torch/.venv/bin/python3}
    DEVICE=cuda
    LOAD_SECONDS=${QSCORE_GPU_BENCH_LOAD_SECONDS:-10}
    WARMUP_SECONDS=${QSCORE_GPU_BENCH_WARMUP_SECONDS:-3}
    CEILING_SECONDS=${QSCORE_GPU_BENCH_CEILING_SECONDS:-3}
    BATCHES=${QSCORE_GPU_BENCH_BATCHES:-1,32,256}
    CONCURRENCY=${QSCORE_GPU_BENCH_CONCURRENCY:-"1 64 256"}
    ;;
  cpu)
    BIN_DIR=${QSCORE_GPU_BENCH_BIN_DIR:-target/release}
    GPU_BENCH=$BIN_DIR/examples/gpu_bench
    [[ -x $GPU_BENCH ]] || GPU_BENCH=$BIN_DIR/gpu_bench
    ORT_DIR=${QSCORE_GPU_BENCH_ORT_DIR:-.ort}
    ORT_LIB=$ORT_DIR/libonnxruntime.so
    FP16_SRC=${QSCORE_GPU_BENCH_FP16_DIR:-models-fp16}
    PY_SITE=
    PYTHON=${QSCORE_GPU_BENCH_PYTHON:-.venv-bench/bin/python}
    DEVICE=cpu
    LOAD_SECONDS=${QSCORE_GPU_BENCH_LOAD_SECONDS:-2}
    WARMUP_SECONDS=${QSCORE_GPU_BENCH_WARMUP_SECONDS:-1}
    CEILING_SECONDS=${QSCORE_GPU_BENCH_CEILING_SECONDS:-0.5}
    BATCHES=${QSCORE_GPU_BENCH_BATCHES:-1,8}
    CONCURRENCY=${QSCORE_GPU_BENCH_CONCURRENCY:-"1 8 32"}
    ;;
  *) echo "benches/gpu/run.sh: QSCORE_GPU_BENCH_DEVICE is cuda (default) or cpu (a dry run), not '$MODE'" >&2; exit 2 ;;
esac
QSCORE=$BIN_DIR/qscore

# --- Preflight: everything the run needs, checked in seconds, reported all at once. ----------
missing=()
CUDA_DIRS=()
NVIDIA_SMI=${QSCORE_GPU_BENCH_NVIDIA_SMI:-nvidia-smi}
if [[ $MODE == cuda ]]; then
  if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
    missing+=("nvidia-smi, i.e. an NVIDIA driver: this machine has no NVIDIA GPU set up")
  elif ! timeout 20 "$NVIDIA_SMI" -L 2>/dev/null | grep -q '^GPU '; then
    missing+=("a GPU: nvidia-smi lists none ($(timeout 20 "$NVIDIA_SMI" -L 2>&1 | head -1))")
  fi
  [[ -f $ORT_DIR/libonnxruntime_providers_cuda.so && -f $ORT_LIB ]] ||
    missing+=("the CUDA build of ONNX Runtime 1.31.1 (libonnxruntime.so and libonnxruntime_providers_cuda.so) in $ORT_DIR: carry benches/gpu/prepare.sh's pieces and run '.gpu-bench/unpack.sh assemble' (benches/gpu/README.md)")
  # CUDA 13 and cuDNN 9, as the CUDA provider loads them: the PyTorch venv's wheels, the library
  # path, a CUDA toolkit, or the linker cache.
  candidates=(${QSCORE_GPU_BENCH_CUDA_LIBS:-})
  candidates=(${candidates[@]//:/ })
  candidates+=(/opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib /opt/torch/.venv/lib/python3*/site-packages/nvidia/cudnn/lib)
  ld_path=${LD_LIBRARY_PATH:-}
  candidates+=(${ld_path//:/ } /usr/local/cuda/lib64)
  absent=()
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9; do
    found=
    for d in "${candidates[@]}"; do
      if [[ -e $d/$lib ]]; then found=$d; break; fi
    done
    if [[ -n $found ]]; then
      [[ " ${CUDA_DIRS[*]} " == *" $found "* ]] || CUDA_DIRS+=("$found")
    elif ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
      absent+=("$lib")
    fi
  done
  ((${#absent[@]})) &&
    missing+=("the CUDA 13 and cuDNN 9 libraries ${absent[*]}: not in the PyTorch venv (/opt/torch/.venv), LD_LIBRARY_PATH, /usr/local/cuda or ldconfig; set QSCORE_GPU_BENCH_CUDA_LIBS=DIR:DIR")
fi
for f in "$QSCORE" "$GPU_BENCH"; do
  [[ -x $f ]] || missing+=("$f: $( [[ $MODE == cuda ]] && echo "benches/gpu/prepare.sh builds it into the pack" || echo "cargo build --release --locked --bin qscore --example gpu_bench")")
done
[[ -f $FP16_SRC/$MODEL/model.onnx ]] ||
  missing+=("the fp16 models in $FP16_SRC: $( [[ $MODE == cuda ]] && echo "benches/gpu/prepare.sh packs them" || echo "make fp16-models")")
[[ $MODE == cpu && ! -f $ORT_LIB ]] && missing+=("$ORT_LIB: make ort")
if ((${#missing[@]})); then
  {
    echo "benches/gpu/run.sh: cannot run the GPU benchmark ($MODE); missing:"
    printf '  - %s\n' "${missing[@]}"
    [[ $MODE == cuda ]] && echo "A dry run of the whole flow on this machine's CPU: QSCORE_GPU_BENCH_DEVICE=cpu benches/gpu/run.sh"
  } >&2
  exit 2
fi
if ((${#CUDA_DIRS[@]})); then
  LD_LIBRARY_PATH=$(IFS=:; echo "${CUDA_DIRS[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
fi

WORK=$(mktemp -d)
servers=()
cleanup() {
  for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
CONNECTIONS=$(( $(ulimit -n) - 64 < 4096 ? $(ulimit -n) - 64 : 4096 ))
say() { echo "[gpu-bench $(( $(date +%s) - started ))s] $*" >&2; }
# A part that fails is noted (table and exit status) and the run goes on: one unattended run on
# a lent machine should bring back every part that works.
failed() { # what log
  say "FAILED: $1"
  [[ -n ${2:-} && -f ${2:-} ]] && tail -5 "$2" | sed 's/\x1b\[[0-9;]*m//g' >&2
  # The error line itself (qscore and gpu_bench print one), else the log's last line.
  local why=
  [[ -n ${2:-} ]] && why=$(sed 's/\x1b\[[0-9;]*m//g' "$2" 2>/dev/null | grep -m1 -E '^(Error: |qscore: error: )' ||
    sed 's/\x1b\[[0-9;]*m//g' "$2" 2>/dev/null | grep -v '^ *$' | tail -1)
  echo "$1${why:+: $why}" >> "$WORK/failures.txt"
}

# The fp16 models as the server reads them: the pack's graphs and manifests, with the float32
# model's calibration (fitted on fp32 features; how far fp16 moves the answers is measured in (d)).
mkdir -p "$WORK/models-fp16"
for d in "$FP16_SRC"/*/; do
  name=$(basename "$d")
  mkdir -p "$WORK/models-fp16/$name"
  cp "$d"model.onnx "$d"model.toml "$WORK/models-fp16/$name/"
  [[ -f models/$name/calibration.json ]] && cp "models/$name/calibration.json" "$WORK/models-fp16/$name/"
  if [[ $MODE == cpu ]]; then
    # qscore refuses precision = "fp16" on the CPU EP (half speed there); the dry run serves it
    # anyway from this scratch copy, to exercise the flow.
    sed -i '/^precision = "fp16"$/d' "$WORK/models-fp16/$name/model.toml"
  fi
done

# --- (a) the raw ceiling ---------------------------------------------------------------------
for precision in fp32 fp16; do
  dir=models/$MODEL; [[ $precision == fp16 ]] && dir=$WORK/models-fp16/$MODEL
  say "raw ceiling, $precision, batches $BATCHES..."
  "$GPU_BENCH" ceiling --model-dir "$dir" --device "$DEVICE" --batches "$BATCHES" --seconds "$CEILING_SECONDS" \
    --photo "$PHOTO" --label "$precision" --ort-lib "$ORT_LIB" >> "$WORK/ceiling.jsonl" 2> "$WORK/ceiling-$precision.log" ||
    failed "raw ceiling $precision" "$WORK/ceiling-$precision.log"
done

# --- (b) qscore end to end, and (d)'s embeddings ----------------------------------------------
serve() { # name models-dir port
  "$QSCORE" serve --models-dir "$2" --model "$MODEL" --device "$DEVICE" --ort-lib "$ORT_LIB" \
    --host 127.0.0.1 --port "$3" --max-queued-images 4096 --max-connections "$CONNECTIONS" \
    --max-connections-per-client "$CONNECTIONS" --reload-poll-ms 0 ${QSCORE_GPU_BENCH_SERVER_ARGS:-} \
    2> "$WORK/$1.log" &
  servers+=($!)
  "$GPU_BENCH" wait --url "http://127.0.0.1:$3/health/ready" --timeout 180 --pid "${servers[-1]}" 2>> "$WORK/$1.log" ||
    { failed "$1 did not start" "$WORK/$1.log"; return 1; }
}
stop() { kill "${servers[-1]}" 2>/dev/null || true; wait "${servers[-1]}" 2>/dev/null || true; unset 'servers[-1]'; }
load() { # label url
  for c in $CONCURRENCY; do
    say "$1, concurrency $c..."
    "$GPU_BENCH" load --url "$2/v1/score" --file "$PHOTO" --concurrency "$c" --seconds "$LOAD_SECONDS" \
      --warmup "$WARMUP_SECONDS" --label "$1" >> "$WORK/load.jsonl" 2> "$WORK/load.log" ||
      failed "$1 at concurrency $c" "$WORK/load.log"
  done
}
port=8091
for precision in fp32 fp16; do
  dir=models; [[ $precision == fp16 ]] && dir=$WORK/models-fp16
  say "qscore $precision: starting..."
  if serve "qscore-$precision" "$dir" "$port"; then
    load "qscore $precision" "http://127.0.0.1:$port"
    say "qscore $precision: embeddings for the agreement..."
    for m in $(ls "$WORK/models-fp16"); do
      paths=(tests/fixtures/fmnist)
      [[ $m == "$MODEL" ]] && paths+=(tests/fixtures/photos)
      "$GPU_BENCH" embed --url "http://127.0.0.1:$port" --model "$m" "${paths[@]}" >> "$WORK/embed-$precision.jsonl" \
        2> "$WORK/embed.log" || failed "embeddings of $m ($precision)" "$WORK/embed.log"
    done
    grep -h "IO binding ready" "$WORK/qscore-$precision.log" | head -1 | sed 's/\x1b\[[0-9;]*m//g' > "$WORK/io-$precision.txt" || true
  fi
  stop
  port=$((port + 1))
done

# --- (c) the Python baseline ------------------------------------------------------------------
baseline_note=
if [[ -n $PY_SITE && -d $PY_SITE/onnxruntime/capi ]]; then
  # The pack's onnxruntime (CUDA build's Python part) loads its providers from its own folder.
  for lib in libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so; do
    [[ -e $PY_SITE/onnxruntime/capi/$lib ]] || ln -sf "$(realpath "$ORT_DIR/$lib")" "$PY_SITE/onnxruntime/capi/$lib"
  done
  export PYTHONPATH=$PY_SITE${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then PYTHON=python3; fi
if providers=$("$PYTHON" -c 'import fastapi, uvicorn, PIL, numpy, onnxruntime as o; print(",".join(o.get_available_providers()))' 2>"$WORK/py-import.log"); then
  provider=cpu
  [[ $MODE == cuda && $providers == *CUDAExecutionProvider* ]] && provider=cuda
  [[ $MODE == cuda && $provider == cpu ]] && baseline_note="onnxruntime here has no CUDA provider ($providers): the baseline ran on its CPU EP"
  for attempt in "$provider" cpu; do
    say "Python baseline ($attempt EP): starting..."
    QSCORE_BASELINE_PROVIDER=$attempt QSCORE_BASELINE_MODEL=models/$MODEL/model.onnx \
      "$PYTHON" -m uvicorn --app-dir benches/baseline server:app --host 127.0.0.1 --port 8095 --log-level warning \
      2> "$WORK/python-$attempt.log" &
    servers+=($!)
    if "$GPU_BENCH" wait --url http://127.0.0.1:8095/docs --timeout 120 --pid "${servers[-1]}" 2>> "$WORK/python-$attempt.log"; then
      label="python baseline ($attempt EP)"
      load "$label" http://127.0.0.1:8095
      stop
      break
    fi
    stop
    baseline_note="the baseline failed on the $attempt EP: $(tail -1 "$WORK/python-$attempt.log")"
    [[ $attempt == cpu ]] && break
  done
else
  baseline_note="no Python baseline: $PYTHON cannot import fastapi, uvicorn, Pillow, numpy and onnxruntime ($(tail -1 "$WORK/py-import.log"))"
fi
echo "$baseline_note" > "$WORK/baseline-note.txt"

# --- the table --------------------------------------------------------------------------------
{
  if [[ $MODE == cuda ]]; then
    echo "machine: $("$NVIDIA_SMI" --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1), $(nproc) cores"
  else
    echo "machine: DRY RUN on the CPU EP ($(nproc) cores): checks the script's flow, not a GPU; fp16 graphs served from a copy without their CUDA-only mark"
  fi
  echo "workload: $MODEL 224x224, $(basename "$PHOTO"); load ${LOAD_SECONDS}s after ${WARMUP_SECONDS}s warm-up per level; ceiling ${CEILING_SECONDS}s per cell"
} > "$WORK/header.txt"
python3 benches/gpu/table.py "$WORK" | tee "$WORK/table.md"
say "done in $(( $(date +%s) - started ))s"
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
  cp "$WORK/table.md" "$OUT/"
  tar -C "$WORK" -czf "$OUT/gpu-bench-raw.tar.gz" --exclude=models-fp16 .
fi
[[ ! -s $WORK/failures.txt ]]
