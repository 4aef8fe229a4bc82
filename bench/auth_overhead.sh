#!/usr/bin/env bash
# Throughput with API-key authentication against without, side by side in one run: two
# servers from the same release binary on examples/models, one with `--api-keys` (the key
# sent as `Authorization: Bearer ...`), one without, measured in interleaved rounds with the
# same `oxserve bench` load on add_sub (HTTP JSON and gRPC). Prints one JSON line per point and
# a summary of medians and ratios. Client and servers share the machine's cores.
#
# Usage: bench/auth_overhead.sh [rounds] [duration_secs] [concurrency]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-5}"
duration="${2:-4}"
concurrency="${3:-16}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
bin="${OXSERVE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked -p oxserve >&2
    bin="$target_dir/release/oxserve"
fi

work="$(mktemp -d)"
token="bench-token-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '[[keys]]\nname = "bench"\ntoken = "%s"\nscopes = ["all"]\n' "$token" >"$work/keys.toml"
chmod 600 "$work/keys.toml"
pids=()
trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$work"' EXIT

start() { # name extra-args...
    local name="$1"; shift
    "$bin" serve --model-repository examples/models --http-port 0 --grpc-port 0 --metrics-port 0 \
        "$@" >"$work/$name.out" 2>"$work/$name.err" &
    pids+=($!)
    for _ in $(seq 1 400); do [ -s "$work/$name.out" ] && break; sleep 0.05; done
    local http
    http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$work/$name.out")
    until curl -sf "http://$http/v2/health/ready" >/dev/null; do sleep 0.05; done
}
start open
start auth --api-keys "$work/keys.toml"
addr() { sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p" "$work/$1.out"; }

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) on $(nproc) cores; $rounds rounds x ${duration}s, concurrency $concurrency"
for round in $(seq 1 "$rounds"); do
    for name in open auth; do
        headers=()
        [ "$name" = auth ] && headers=(--header "authorization: Bearer $token")
        "$bin" bench --model add_sub --http-url "http://$(addr $name http)" \
            --grpc-url "http://$(addr $name grpc)" --protocol http-json,grpc \
            --concurrency "$concurrency" --duration "$duration" --warmup 1 --json "${headers[@]}" |
            sed "s/^{/{\"target\":\"$name\",\"round\":$round,/" | tee -a "$work/points.jsonl" >&2
    done
done
python3 - "$work/points.jsonl" <<'PY'
import json, statistics, sys
points = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def key(p):
    return p["protocol"]
for proto in sorted({key(p) for p in points}):
    med = {}
    for server in ("open", "auth"):
        rates = [p["throughput_rps"] for p in points if p["target"] == server and key(p) == proto]
        med[server] = statistics.median(rates) if rates else float("nan")
        print(f"{proto:10} {server:5} median {med[server]:9.0f} req/s  rounds {sorted(round(r) for r in rates)}")
    errors = sum(p["errors"] for p in points if key(p) == proto)
    print(f"{proto:10} auth/open {med['auth'] / med['open']:.3f}  (errors: {errors})")
PY
