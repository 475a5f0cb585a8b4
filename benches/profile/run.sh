#!/usr/bin/env bash
# Where one image's CPU time goes in a loaded server: `make profile`. Serves MODEL, loads it
# with wrk at CONCURRENCY for SECONDS while `perf record` samples the server (user space, DWARF
# call stacks), and prints benches/profile/budget.py's table: each stage's share of the
# server's samples and its CPU milliseconds per image (the server's own user + system CPU time
# over the window, from /proc, divided by the images served).
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=${PROFILE_MODEL:-mobilenet_v2-imagenet}
SECONDS_TO_RUN=${PROFILE_SECONDS:-15}
CONCURRENCY=${PROFILE_CONCURRENCY:-16}
export LOAD_PHOTO=${LOAD_PHOTO:-tests/fixtures/photos/china.jpg}
PORT=${PROFILE_PORT:-8094}
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$OUT"' EXIT

target/release/qscore serve --models-dir models --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --max-queued-images 4096 2>"$OUT/server.log" &
pid=$!
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null 2>&1 && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null || { echo "server never became ready" >&2; cat "$OUT/server.log" >&2; exit 1; }

# Warm-up, so that the window sees steady state (arenas grown, batches formed).
wrk -t2 -c"$CONCURRENCY" -d3s -s benches/load/post.lua "http://127.0.0.1:$PORT/v1/score" >/dev/null

ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(ticks)
perf record -q -F 299 --call-graph dwarf,8192 -p "$pid" -o "$OUT/perf.data" -- sleep "$SECONDS_TO_RUN" 2>"$OUT/perf.log" &
perf_pid=$!
wrk -t2 -c"$CONCURRENCY" -d"${SECONDS_TO_RUN}s" --latency -s benches/load/post.lua \
  "http://127.0.0.1:$PORT/v1/score" >"$OUT/wrk.txt"
after=$(ticks)
wait "$perf_pid"
images=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
echo "MODEL $MODEL, $(basename "$LOAD_PHOTO"), $CONCURRENCY clients, ${SECONDS_TO_RUN}s, $(nproc) cores;" \
  "$(grep Requests/sec "$OUT/wrk.txt" | tr -s ' ')"
python3 benches/profile/budget.py "$OUT/perf.data" "$images" "$((after - before))"
