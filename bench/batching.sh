#!/usr/bin/env bash
# Dynamic batching on a compute-bound model: throughput through the real server with batching
# on and off, against the engine's own in-process throughput at its best batch size.
#
#   bench/batching.sh [protocols] [concurrency list] [window_secs] [max_windows] [instances] [rounds]
#   (defaults: grpc,http-json  1,4,16,64  2  6  1  3)
#
# The model (bench/make_mlp.py, generated into a temp dir): an MLP 64→4096→4096→16 (34 MFLOP a
# row), as `mlp_batched` (max batch 32, dynamic_batching with max_queue_delay 500 µs) and
# `mlp_plain` (max batch 1: every request runs alone).
# 1. in-process (`oxserve bench --protocol in-process`, no network) on mlp_batched at batch
#    sizes 1..32, one request in flight (so nothing is merged): the engine's best rows/s;
# 2. the server at each concurrency, one row per request, on both copies;
# 3. the target's ratio in `rounds` interleaved rounds: in-process at the best batch size, then
#    the server with batching at the highest concurrency (medians reported).
# Client and server share the machine. Everything on 127.0.0.1; every wait has a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
protocols="${1:-grpc,http-json}"
concurrency="${2:-1,4,16,64}"
window="${3:-2}"
max_windows="${4:-6}"
instances="${5:-1}"
rounds="${6:-3}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
export ORT_DISABLE_TELEMETRY=1

if [ -n "${OXSERVE_BIN:-}" ]; then
    bin="$OXSERVE_BIN" # a release binary built beforehand (the tree may be changing)
else
    echo "== build (release)" >&2
    cargo build --release --locked -p oxserve >&2
    bin="$target_dir/release/oxserve"
fi
scripts/setup-python.sh >&2

work="$(mktemp -d)"
pid=""
cleanup() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
.venv/bin/python bench/make_mlp.py "$work/repo" "$instances"
results="$work/results.jsonl"
bounded() { # a generous bound for one bench invocation of $1 points
    timeout "$(awk -v w="$window" -v n="$max_windows" -v p="$1" 'BEGIN { print int(60 + 2 * p * (n + 1) * w) }')" "${@:2}"
}

echo "== in-process, batch sizes 1..32" >&2
for b in 1 2 4 8 16 32; do
    bounded 1 "$bin" bench --protocol in-process --model-repository "$work/repo" --model mlp_batched \
        --batch "$b" --concurrency 1 --window-secs "$window" --max-windows "$max_windows" --json \
        | sed "s/^/in-process\t/" | tee -a "$results" >&2
done

"$bin" serve --model-repository "$work/repo" --host 127.0.0.1 --http-port 0 --grpc-port 0 \
    $("$bin" serve --help | grep -q -- --metrics-port && echo --metrics-port 0) \
    --log-format text >"$work/out" 2>"$work/err" </dev/null &
pid=$!
for _ in $(seq 1 600); do grep -q listening "$work/out" 2>/dev/null && break; sleep 0.1; done
http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$work/out")
grpc=$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$work/out")
for _ in $(seq 1 600); do curl -sf -m 2 -o /dev/null "http://$http/v2/health/ready" && break; sleep 0.1; done
curl -sf -m 2 -o /dev/null "http://$http/v2/health/ready" || { tail -n 20 "$work/err" >&2; exit 1; }
engine="$(grep -o 'backend=[^ ]*' "$work/err" | sort -u | tr '\n' ' ')"
points=$(( $(echo "$protocols" | tr ',' '\n' | wc -l) * $(echo "$concurrency" | tr ',' '\n' | wc -l) ))
for model in mlp_batched mlp_plain; do
    echo "== server, $model" >&2
    bounded "$points" "$bin" bench --model "$model" --http-url "http://$http" --grpc-url "http://$grpc" \
        --protocol "$protocols" --concurrency "$concurrency" --window-secs "$window" \
        --max-windows "$max_windows" --json | sed "s/^/$model\t/" | tee -a "$results" >&2
done

# The target's ratio, measured in interleaved rounds (the host is shared and noisy): the engine
# in-process at its best batch size from the sweep, then the server with batching at the
# highest concurrency, over each protocol.
best_batch="$(grep -P '^in-process\t' "$results" | cut -f2 | jq -s -r 'max_by(.infer_per_sec) | .batch')"
top_conc="$(echo "$concurrency" | tr ',' '\n' | sort -n | tail -n1)"
for round in $(seq 1 "$rounds"); do
    echo "== ratio round $round of $rounds: in-process batch $best_batch vs server c=$top_conc" >&2
    bounded 1 "$bin" bench --protocol in-process --model-repository "$work/repo" --model mlp_batched \
        --batch "$best_batch" --concurrency 1 --window-secs "$window" --max-windows "$max_windows" --json \
        | sed "s/^/round-in-process\t/" | tee -a "$results" >&2
    bounded 2 "$bin" bench --model mlp_batched --http-url "http://$http" --grpc-url "http://$grpc" \
        --protocol "$protocols" --concurrency "$top_conc" --window-secs "$window" \
        --max-windows "$max_windows" --json | sed "s/^/round-server\t/" | tee -a "$results" >&2
done

echo
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty') on $(nproc) cores;" \
    "MLP 64-4096-4096-16, $instances instance(s); engine: ${engine:-?}"
python3 - "$results" <<'PY'
import json, sys
from collections import defaultdict
rows = []
for line in open(sys.argv[1]):
    tag, _, payload = line.rstrip("\n").partition("\t")
    try:
        rows.append((tag, json.loads(payload)))
    except ValueError:
        pass
inproc = [p for t, p in rows if t == "in-process"]
best = max(inproc, key=lambda p: p["infer_per_sec"]) if inproc else None
print("Sweep (one pass; the last column against the sweep's best in-process figure):")
print()
print("| where | batching | protocol | conc | rows/req | rows/s | p50 µs | p99 µs | server avg batch | vs in-process best |")
print("|---|---|---|---|---|---|---|---|---|---|")
for tag, p in rows:
    if tag.startswith("round-"):
        continue
    batching = {"in-process": "n/a", "mlp_batched": "on", "mlp_plain": "off"}[tag]
    where = "in-process" if tag == "in-process" else "server"
    ratio = f"{p['infer_per_sec'] / best['infer_per_sec']:.2f}x" if best else ""
    avg = f"{p['server']['avg_batch_size']:.1f}" if p.get("server") else "-"
    print(f"| {where} | {batching} | {p['protocol']} | {p.get('concurrency', '')} | {p['batch']} "
          f"| {p['infer_per_sec']:,.0f} | {p['p50_us']:,} | {p['p99_us']:,} | {avg} | {ratio} |")

def median(xs):
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2] if xs else 0.0

base = [p["infer_per_sec"] for t, p in rows if t == "round-in-process"]
server = defaultdict(list)
for t, p in rows:
    if t == "round-server":
        server[p["protocol"]].append(p)
if base:
    b = median(base)
    print()
    print(f"Target check, {len(base)} interleaved rounds (medians): in-process at batch "
          f"{rows[[t for t, _ in rows].index('round-in-process')][1]['batch']}: {b:,.0f} rows/s "
          f"(rounds {min(base):,.0f}–{max(base):,.0f})")
    print()
    print("| protocol | conc | rows/s (median) | rounds | server avg batch | vs in-process | target 0.9x |")
    print("|---|---|---|---|---|---|---|")
    for proto, ps in server.items():
        m = median([p["infer_per_sec"] for p in ps])
        avg = median([p["server"]["avg_batch_size"] for p in ps if p.get("server")])
        r = m / b if b else 0.0
        print(f"| {proto} | {ps[0].get('concurrency', '')} | {m:,.0f} | "
              f"{min(p['infer_per_sec'] for p in ps):,.0f}–{max(p['infer_per_sec'] for p in ps):,.0f} "
              f"| {avg:.1f} | {r:.2f}x | {'met' if r >= 0.9 else 'missed'} |")
PY
