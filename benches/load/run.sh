#!/usr/bin/env bash
# The load benchmark, in one go: `make load-bench`. Prints one table with
#  (a) the raw ceiling: ONNX Runtime alone on prepared tensors, batch 1 and 32, and the
#      in-process decode + preprocess + one batch-1 run loop, for the fp32 and the int8 model;
#  (b) qscore under load (wrk) on POST /v1/score with a real JPEG, fp32 MobileNetV2;
#  (c) the same load against the Python FastAPI + uvicorn + onnxruntime + Pillow baseline (fp32);
#  (d) qscore with --max-batch 1 (no dynamic batching);
#  (e) qscore serving the int8 variant (models/mobilenet_v2-imagenet-int8), when it is bundled.
# All servers are pinned to the same CPUs (LOAD_CPUS, default all). wrk runs on the same machine,
# so it shares those CPUs with the server.
set -euo pipefail
cd "$(dirname "$0")/../.."

SECONDS_PER_RUN=${LOAD_SECONDS:-10}
CONCURRENCY=${LOAD_CONCURRENCY:-"1 16 32 64"}
CPUS=${LOAD_CPUS:-0-$(($(nproc) - 1))}
FP32=mobilenet_v2-imagenet
INT8=mobilenet_v2-imagenet-int8
export LOAD_PHOTO=${LOAD_PHOTO:-tests/fixtures/photos/china.jpg}
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$OUT"' EXIT

wait_ready() { # url
  for _ in $(seq 1 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "server at $1 never became ready" >&2; return 1
}

load() { # name url
  for c in $CONCURRENCY; do
    threads=$(( c < 2 ? 1 : 2 ))
    wrk -t"$threads" -c"$c" -d"${SECONDS_PER_RUN}s" --latency --timeout 30s -s benches/load/post.lua "$2/v1/score" \
      > "$OUT/$1-$c.txt"
  done
}

variants=(qscore qscore-batch1)
models=("$FP32")
if [ -f "models/$INT8/model.onnx" ]; then variants+=(qscore-int8); models+=("$INT8"); fi

cargo build --release --quiet --example raw_ceiling
for m in "${models[@]}"; do
  echo "raw ceiling of $m (ONNX Runtime alone, ${SECONDS_PER_RUN}s per batch size)..." >&2
  taskset -c "$CPUS" target/release/examples/raw_ceiling "$LOAD_PHOTO" "$SECONDS_PER_RUN" "models/$m" > "$OUT/raw-$m.json"
done

for variant in "${variants[@]}"; do
  extra=(); model=$FP32
  [ "$variant" = qscore-batch1 ] && extra=(--max-batch 1)
  [ "$variant" = qscore-int8 ] && model=$INT8
  echo "$variant under load..." >&2
  taskset -c "$CPUS" target/release/qscore serve --models-dir models --model "$model" \
    --host 127.0.0.1 --port 8091 --max-queued-images 4096 "${extra[@]}" 2>"$OUT/$variant.log" &
  pid=$!
  wait_ready http://127.0.0.1:8091/health/ready
  load "$variant" http://127.0.0.1:8091
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

echo "Python baseline under load..." >&2
taskset -c "$CPUS" .venv-bench/bin/uvicorn --app-dir benches/baseline server:app --host 127.0.0.1 --port 8092 \
  --log-level warning 2>"$OUT/python.log" &
pid=$!
wait_ready http://127.0.0.1:8092/docs
load python http://127.0.0.1:8092
kill "$pid"; wait "$pid" 2>/dev/null || true

python3 benches/load/table.py "$OUT" "$CONCURRENCY" "$(nproc)" "$CPUS" "$LOAD_PHOTO"
