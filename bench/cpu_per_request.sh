#!/usr/bin/env bash
# Server CPU per request, two builds side by side: each binary serves examples/models, and in
# alternating rounds the same `oxserve bench` load (add_sub, one protocol, one concurrency)
# is sent to each. Per round: the server's user+system CPU time from /proc/PID/stat over the
# round, divided by the successful requests the server counted (statistics extension) in the
# same interval. Client and servers share the machine's cores; only one server is loaded at a
# time.
#
# Usage: BEFORE=path/to/oxserve AFTER=path/to/oxserve bench/cpu_per_request.sh \
#            [rounds] [duration_secs] [concurrency] [protocol]
# AFTER_ARGS: extra `serve` flags of the second server (e.g. "--api-keys keys.toml"), with
# AFTER_HEADER: a header its load sends (e.g. "authorization: Bearer T"); the same binary
# twice then measures what a flag costs.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-6}"
duration="${2:-4}"
concurrency="${3:-16}"
protocol="${4:-http-json}"
: "${BEFORE:?BEFORE=path of the first oxserve binary}"
: "${AFTER:?AFTER=path of the second oxserve binary}"
clk_tck=$(getconf CLK_TCK)

work="$(mktemp -d)"
pids=()
trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$work"' EXIT

declare -A pid http grpc bin args headers
bin[before]="$BEFORE"
bin[after]="$AFTER"
args[before]=""
args[after]="${AFTER_ARGS:-}"
headers[before]=""
headers[after]="${AFTER_HEADER:-}"
for name in before after; do
    # shellcheck disable=SC2086 # AFTER_ARGS is a list of flags
    "${bin[$name]}" serve --model-repository examples/models --http-port 0 --grpc-port 0 \
        --metrics-port 0 ${args[$name]} >"$work/$name.out" 2>"$work/$name.err" &
    pid[$name]=$!
    pids+=($!)
    for _ in $(seq 1 400); do [ -s "$work/$name.out" ] && break; sleep 0.05; done
    http[$name]=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$work/$name.out")
    grpc[$name]=$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$work/$name.out")
    until curl -sf "http://${http[$name]}/v2/health/live" >/dev/null; do sleep 0.05; done
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
successes() { # http-address [header]
    curl -sf ${2:+-H "$2"} "http://$1/v2/models/add_sub/stats" |
        python3 -c 'import json,sys; print(sum(m["inference_stats"]["success"]["count"] for m in json.load(sys.stdin)["model_stats"]))'
}

echo "# $(date -u +%FT%TZ) on $(nproc) cores; $rounds rounds x ${duration}s, $protocol, concurrency $concurrency"
echo "# before: $BEFORE"
echo "# after:  $AFTER ${AFTER_ARGS:-}"
for round in $(seq 1 "$rounds"); do
    for name in before after; do
        t0=$(cpu_ticks "${pid[$name]}")
        n0=$(successes "${http[$name]}" "${headers[$name]}")
        header_flag=()
        [ -n "${headers[$name]}" ] && header_flag=(--header "${headers[$name]}")
        rps=$("${bin[$name]}" bench --model add_sub --http-url "http://${http[$name]}" \
            --grpc-url "http://${grpc[$name]}" --protocol "$protocol" "${header_flag[@]}" \
            --concurrency "$concurrency" --duration "$duration" --warmup 1 --json |
            python3 -c 'import json,sys; print(round(json.loads(sys.stdin.readline())["throughput_rps"]))')
        t1=$(cpu_ticks "${pid[$name]}")
        n1=$(successes "${http[$name]}" "${headers[$name]}")
        python3 -c "
n = $n1 - $n0
us = ($t1 - $t0) / $clk_tck * 1e6 / max(n, 1)
print(f'round $round $name: {n} requests, {$rps} req/s, server CPU {us:.1f} us/request')"
    done
done
