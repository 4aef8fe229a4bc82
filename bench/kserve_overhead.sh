#!/usr/bin/env bash
# Server overhead on add_sub: HTTP JSON, HTTP binary and gRPC through the real server, and the
# same model called in-process through the engine facade, in one run (ratios, not absolutes:
# the machines are shared and noisy). Client and server share the machine's cores.
#
# Usage: bench/kserve_overhead.sh [duration_secs] [concurrency list]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-5}"
concurrency="${2:-1,16}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked -p oxserve >&2
bin="$target_dir/release/oxserve"

log="$(mktemp)"
"$bin" serve --model-repository examples/models --http-port 0 --grpc-port 0 --log-format text >"$log.out" 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log" "$log.out"' EXIT
for _ in $(seq 1 200); do
    [ -s "$log.out" ] && break
    sleep 0.05
done
http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$log.out")
grpc=$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$log.out")
until curl -sf "http://$http/v2/health/ready" >/dev/null; do sleep 0.05; done

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) on $(nproc) cores; duration ${duration}s per point"
"$bin" bench --model add_sub --http-url "http://$http" --grpc-url "http://$grpc" \
    --model-repository examples/models \
    --protocol in-process,http-json,http-binary,grpc --concurrency "$concurrency" \
    --duration "$duration" --warmup 1
