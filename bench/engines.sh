#!/usr/bin/env bash
# ONNX Runtime vs tract, in one run, on the fidelity corpus's CNN (224x224, ResNet-style) and
# transformer block (sequence length 64):
#
#   1. in-process: each engine through the backend contract only, one instance, `execute` in
#      a loop (crates/oxserve/benches/engines.rs), at batch 1, 8 and 32;
#   2. end to end: the release server serving both engines side by side (models
#      <model>_onnxruntime and <model>_tract), `oxserve bench --protocol grpc --concurrency 8`
#      with the same batch sizes; the client shares the machine's cores with the server.
#
# The last table puts the two side by side: e2e / in-process is the share of the engine's own
# throughput the server delivers over gRPC (the target for the CNN on ONNX Runtime is >= 0.9).
#
# Usage: bench/engines.sh [seconds per point, default 5] [batches, default 1,8,32]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-5}"
batches="${2:-1,8,32}"
concurrency=8
seq=64
export ORT_DISABLE_TELEMETRY=1
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

scripts/setup-python.sh >&2
.venv/bin/python scripts/make_corpus.py --if-needed >&2
cargo build --release --locked -p oxserve >&2
bin="$target_dir/release/oxserve"

out="bench/out/engines"
rm -rf "$out"
mkdir -p "$out/repo"
corpus="$PWD/tests/fixtures/corpus"
for model in cnn transformer; do
    case "$model" in
        cnn) io='input [ { name: "image" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]' ;;
        transformer) io="input [ { name: \"input_ids\" data_type: TYPE_INT64 dims: [ $seq ] } ]" ;;
    esac
    for engine in onnxruntime tract; do
        dir="$out/repo/${model}_${engine}"
        mkdir -p "$dir/1"
        ln -s "$corpus/models/$model.onnx" "$dir/1/model.onnx"
        printf 'name: "%s"\nbackend: "%s"\nmax_batch_size: 32\n%s\n' "${model}_${engine}" "$engine" "$io" >"$dir/config.pbtxt"
    done
done

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); ${seconds}s per point" | tee "$out/summary.txt"

echo "## in-process (backend contract, one instance)" >&2
cargo bench --locked -p oxserve --bench engines -- --corpus "$corpus" \
    --batches "$batches" --seq "$seq" --seconds "$seconds" --json | tee "$out/inprocess.jsonl" >&2

log="$out/server.log"
"$bin" serve --model-repository "$out/repo" --http-port 0 --grpc-port 0 --metrics-port 0 --log-format text \
    >"$out/listening.json" 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 400); do
    [ -s "$out/listening.json" ] && break
    sleep 0.05
done
http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$out/listening.json")
grpc=$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$out/listening.json")
until curl -sf "http://$http/v2/health/ready" >/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
done

echo "## end to end (gRPC, concurrency $concurrency)" >&2
: >"$out/e2e.jsonl"
for model in cnn transformer; do
    for engine in onnxruntime tract; do
        for batch in ${batches//,/ }; do
            "$bin" bench --model "${model}_${engine}" --http-url "http://$http" --grpc-url "http://$grpc" \
                --protocol grpc --concurrency "$concurrency" --batch "$batch" \
                --duration "$seconds" --warmup 1 --json |
                .venv/bin/python -c '
import json, sys
for line in sys.stdin:
    p = json.loads(line)
    p["model"], p["engine"] = sys.argv[1], sys.argv[2]
    print(json.dumps(p))' "$model" "$engine" | tee -a "$out/e2e.jsonl" >&2
        done
    done
done

.venv/bin/python - "$out" "$concurrency" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
from pathlib import Path

out, conc = Path(sys.argv[1]), sys.argv[2]
inproc = {(p["model"], p["engine"], p["batch"]): p for p in map(json.loads, (out / "inprocess.jsonl").read_text().splitlines())}
e2e = {}
for p in map(json.loads, (out / "e2e.jsonl").read_text().splitlines()):
    ips = p.get("infer_per_sec", p["throughput_rps"] * p["batch"])
    e2e[(p["model"], p["engine"], p["batch"])] = (ips, p.get("errors", 0), p.get("p50_us"))
print()
print(f"| model | batch | tract in-process (items/s) | ONNX Runtime in-process (items/s) | ORT / tract "
      f"| tract e2e gRPC c={conc} (items/s) | ONNX Runtime e2e gRPC c={conc} (items/s) | ORT e2e / ORT in-process |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for (model, engine, batch) in sorted({(m, "", b) for (m, _, b) in inproc}, key=lambda k: (k[0], k[2])):
    t = inproc.get((model, "tract", batch), {}).get("items_per_s", float("nan"))
    o = inproc.get((model, "onnxruntime", batch), {}).get("items_per_s", float("nan"))
    te, terr, _ = e2e.get((model, "tract", batch), (float("nan"), 0, None))
    oe, oerr, _ = e2e.get((model, "onnxruntime", batch), (float("nan"), 0, None))
    errs = f" ({terr}+{oerr} errors)" if terr or oerr else ""
    print(f"| {model} | {batch} | {t:.1f} | {o:.1f} | {o / t:.1f}x | {te:.1f} | {oe:.1f} | {oe / o:.2f}{errs} |")
EOF
