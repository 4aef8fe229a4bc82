#!/usr/bin/env bash
# The load generator's own clients: the lean HTTP/1.1 pool and gRPC framing (`--client lean`,
# the default) against hyper-util's pooled Client and tonic's generated client
# (`--client stock`), on add_sub through the real server, in one run. Rounds alternate
# lean/stock so that drift on a shared machine falls on both. Figures per point: achieved
# req/s and the client's own CPU per request (client_cpu_us).
#
# Usage: [OXSERVE_BIN=release binary] bench/clients.sh [duration_secs] [rounds] [concurrency]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-5}"
rounds="${2:-3}"
concurrency="${3:-16}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
bin="${OXSERVE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked -p oxserve >&2
    bin="$target_dir/release/oxserve"
fi

log="$(mktemp)"
"$bin" serve --model-repository examples/models --http-port 0 --grpc-port 0 --metrics-port 0 --log-format text >"$log.out" 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log" "$log.out"' EXIT
for _ in $(seq 1 200); do
    [ -s "$log.out" ] && break
    sleep 0.05
done
http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$log.out")
grpc=$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$log.out")
until curl -sf "http://$http/v2/health/ready" >/dev/null; do sleep 0.05; done

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) on $(nproc) cores; ${duration}s per point, concurrency $concurrency"
for round in $(seq 1 "$rounds"); do
    for client in lean stock; do
        "$bin" bench --model add_sub --http-url "http://$http" --grpc-url "http://$grpc" \
            --protocol http-json,grpc --concurrency "$concurrency" --client "$client" \
            --duration "$duration" --warmup 1 --json |
            sed "s/^/round=$round /"
    done
done
