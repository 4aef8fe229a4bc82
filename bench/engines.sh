#!/usr/bin/env bash
# ONNX Runtime vs tract, in one run, on the fidelity corpus's ResNet-style CNN (224x224) and
# transformer block (sequence length 64), at batch 1, 8 and 32:
#
#   in-process  each engine through the backend contract only: one instance, `execute` in a
#               loop (crates/oxserve/benches/engines.rs); ONNX Runtime with the server's
#               default threads (cores / instances), tract single-threaded;
#   end to end  the release server serving both engines side by side (models
#               <model>_onnxruntime and <model>_tract, one instance each), driven by
#               `oxserve bench --protocol grpc --concurrency 8 --batch N` on the same machine;
#               for ONNX Runtime also with `--shared-memory system` (tensors left in /dev/shm
#               regions, Triton's system shared-memory extension, as a co-located client
#               sends them), and on a model whose batcher prefers the request's batch size
#               (so it executes exactly what in-process executes), with the tensors in the
#               messages and in shared memory; and that model with two instances of one
#               intra-op thread each (`instance_group [ { count: 2 } ]`), end to end with
#               shared memory and in process (two instances looping side by side,
#               `--instances 2`).
#
# Points are interleaved (for each model and batch: engine A in-process, A end to end, B
# in-process, B end to end) and the whole sweep runs ROUNDS times; the summary keeps the best
# round of each point, since on a shared machine noise only ever slows a point down.
#
# The CNN is the corpus CNN with 32 channels in its first stage (CNN_WIDTH; tests use 8, which
# is so cheap per image, 7 MMAC, that moving its 600 KB input over gRPC costs more than running
# it). "e2e / in-process" is the share of the engine's own throughput the server delivers
# over gRPC; the target for the CNN on ONNX Runtime is >= 0.9 (the shared-memory table).
#
# Usage: bench/engines.sh [seconds per point, default 5] [batches, default 1,8,32] [rounds, default 2]
# MODELS="cnn" measures the CNN alone (default "cnn transformer").
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-5}"
batches="${2:-1,8,32}"
rounds="${3:-2}"
cnn_width="${CNN_WIDTH:-32}"
models="${MODELS:-cnn transformer}"
concurrency=8
seq=64
export ORT_DISABLE_TELEMETRY=1
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

out="$PWD/bench/out/engines"
corpus="$PWD/bench/out/corpus-w$cnn_width"
scripts/setup-python.sh >&2
.venv/bin/python scripts/make_corpus.py --out "$corpus" --cnn-width "$cnn_width" --if-needed >&2
cargo build --release --locked -p oxserve >&2
bin="$target_dir/release/oxserve"
inproc_bin=$(cargo bench --locked -p oxserve --bench engines --no-run 2>&1 |
    sed -n 's/.*Executable benches\/engines.rs (\(.*\))/\1/p' | tail -1)
[ -x "$inproc_bin" ] || { echo "cannot find the engines bench executable" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out/repo"
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
    # ONNX Runtime executing exactly the request's batch (the dynamic batcher prefers that
    # size, so it never concatenates requests): the in-process measurement's batch size.
    for batch in ${batches//,/ }; do
        name="${model}_onnxruntime_b$batch"
        mkdir -p "$out/repo/$name/1"
        ln -s "$corpus/models/$model.onnx" "$out/repo/$name/1/model.onnx"
        printf 'name: "%s"\nbackend: "onnxruntime"\nmax_batch_size: 32\n%s\ndynamic_batching { preferred_batch_size: [ %s ] }\n' \
            "$name" "$io" "$batch" >"$out/repo/$name/config.pbtxt"
        # The same with two instances (one intra-op thread each, as the server sizes them).
        mkdir -p "$out/repo/${name}_i2/1"
        ln -s "$corpus/models/$model.onnx" "$out/repo/${name}_i2/1/model.onnx"
        sed "s/^name: .*/name: \"${name}_i2\"/" "$out/repo/$name/config.pbtxt" >"$out/repo/${name}_i2/config.pbtxt"
        echo 'instance_group [ { count: 2 kind: KIND_CPU } ]' >>"$out/repo/${name}_i2/config.pbtxt"
    done
done

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

tag() { # tag JSON lines with model, engine, round, kind [, server items per CPU-second]
    .venv/bin/python -c '
import json, sys
for line in sys.stdin:
    if line.strip():
        p = json.loads(line)
        p.update(model=sys.argv[1], engine=sys.argv[2], round=int(sys.argv[3]), kind=sys.argv[4])
        if len(sys.argv) > 5:
            p["server_items_per_cpu_s"] = float(sys.argv[5])
        print(json.dumps(p))' "$@"
}
# The server's CPU time (user + system, clock ticks of 1/100 s) and a model's inference count
# (statistics extension): items per server CPU-second, whatever else the machine is doing.
server_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
inferences() {
    curl -sf "http://$http/v2/models/$1/stats" |
        .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["model_stats"][0]["inference_count"])'
}

: >"$out/points.jsonl"
# inprocess_point MODEL ENGINE ROUND KIND [bench args...]: the engine alone, in this process.
inprocess_point() {
    local model="$1" engine="$2" round="$3" kind="$4"
    shift 4
    "$inproc_bin" --corpus "$corpus" --models "$model" --engines "$engine" --batches "$batch" \
        --seq "$seq" --seconds "$seconds" "$@" --json | tag "$model" "$engine" "$round" "$kind" |
        tee -a "$out/points.jsonl" >&2
}
# server_point SERVED MODEL ENGINE ROUND KIND SHM: the served model end to end over gRPC, with
# the server's items per CPU-second over the point.
server_point() {
    local served="$1" model="$2" engine="$3" round="$4" kind="$5" shm="$6" n0 n1 t0 t1 point per_cpu
    n0=$(inferences "$served")
    t0=$(server_ticks)
    point=$("$bin" bench --model "$served" --http-url "http://$http" --grpc-url "http://$grpc" \
        --protocol grpc --shared-memory "$shm" --concurrency "$concurrency" --batch "$batch" \
        --duration "$seconds" --warmup 1 --json)
    t1=$(server_ticks)
    n1=$(inferences "$served")
    per_cpu=$(awk -v n="$((n1 - n0))" -v t="$((t1 - t0))" 'BEGIN { print (t > 0 ? n / (t / 100) : 0) }')
    echo "$point" | tag "$model" "$engine" "$round" "$kind" "$per_cpu" | tee -a "$out/points.jsonl" >&2
}

for round in $(seq 1 "$rounds"); do
    for model in $models; do
        for batch in ${batches//,/ }; do
            for engine in onnxruntime tract; do
                inprocess_point "$model" "$engine" "$round" inprocess
                server_point "${model}_${engine}" "$model" "$engine" "$round" e2e none
                [ "$engine" = onnxruntime ] || continue
                # The same default-configured model with the tensors in system shared memory.
                server_point "${model}_${engine}" "$model" "$engine" "$round" e2e-shm system
                # Executing the request's batch as it is, with the tensors in the messages and
                # then in system shared memory (Triton's extension), as a client on the same
                # host would send them.
                exact="${model}_onnxruntime_b$batch"
                server_point "$exact" "$model" "$engine" "$round" e2e-exact none
                server_point "$exact" "$model" "$engine" "$round" e2e-exact-shm system
                # Two instances of one thread each: in process (both looping side by side) and
                # end to end with shared memory.
                inprocess_point "$model" "$engine" "$round" inprocess-i2 --instances 2
                server_point "${exact}_i2" "$model" "$engine" "$round" e2e-exact-shm-i2 system
            done
        done
    done
done

{
    echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo '+changes'), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), ${seconds}s per point, best of $rounds rounds, CNN width $cnn_width, sequence length $seq"
    .venv/bin/python - "$out/points.jsonl" "$concurrency" <<'EOF'
import json, math, statistics, sys

points, conc = sys.argv[1], sys.argv[2]
best = {}
best_cpu = {}
by_round = {}
for p in map(json.loads, open(points).read().splitlines()):
    if p["kind"].startswith("inprocess"):
        ips, extra, cpu = p["items_per_s"], None, p.get("items_per_cpu_s", float("nan"))
    else:
        ips = p.get("infer_per_sec", p["throughput_rps"] * p["batch"])
        if p.get("errors"):
            ips = float("nan")  # a point with errors is not a result
        extra = (p.get("server") or {}).get("avg_batch_size")
        cpu = p.get("server_items_per_cpu_s", float("nan"))
    key = (p["model"], p["engine"], p["batch"], p["kind"])
    by_round.setdefault(key, {})[p["round"]] = ips
    if key not in best or (not math.isnan(ips) and ips > best[key][0]):
        best[key] = (ips, extra)
    if not math.isnan(cpu) and cpu > best_cpu.get(key, 0.0):
        best_cpu[key] = cpu

def get(*key):
    return best.get(key, (float("nan"), None))

model_batches = sorted({(k[0], k[2]) for k in best})

print()
print(f"| model | batch | tract in-process | ONNX Runtime in-process | ORT / tract | tract e2e gRPC c={conc} "
      f"| ONNX Runtime e2e gRPC c={conc} | ORT e2e / ORT in-process | rows per ORT execution (server) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for model, batch in model_batches:
    t, _ = get(model, "tract", batch, "inprocess")
    o, _ = get(model, "onnxruntime", batch, "inprocess")
    te, _ = get(model, "tract", batch, "e2e")
    oe, rows = get(model, "onnxruntime", batch, "e2e")
    rows = f"{rows:.1f}" if rows else "–"
    print(f"| {model} | {batch} | {t:.1f} | {o:.1f} | {o / t:.1f}x | {te:.1f} | {oe:.1f} | {oe / o:.2f} | {rows} |")
print()
print("items/s (images or sequences per second); e2e = end to end through the server over gRPC.")
print()
print("ONNX Runtime executing the request's own batch (preferred_batch_size = batch), end to end over gRPC,")
print("with the tensors in the messages and in system shared memory; then with two instances of one thread")
print("each, in process (both looping side by side) and end to end with shared memory:")
print()
print("| model | batch | ORT in-process | e2e, request batch | / in-process | e2e, request batch + shm | / in-process "
      "| ORT in-process, 2 instances | e2e + shm, 2 instances | / in-process | / in-process, 2 instances |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for model, batch in model_batches:
    o, _ = get(model, "onnxruntime", batch, "inprocess")
    x, _ = get(model, "onnxruntime", batch, "e2e-exact")
    xs, _ = get(model, "onnxruntime", batch, "e2e-exact-shm")
    o2, _ = get(model, "onnxruntime", batch, "inprocess-i2")
    x2, _ = get(model, "onnxruntime", batch, "e2e-exact-shm-i2")
    print(f"| {model} | {batch} | {o:.1f} | {x:.1f} | {x / o:.2f} | {xs:.1f} | {xs / o:.2f} "
          f"| {o2:.1f} | {x2:.1f} | {x2 / o:.2f} | {x2 / o2:.2f} |")
print()
print("ONNX Runtime with the tensors in system shared memory (a client on the same host): the")
print("default-configured model (auto-completed dynamic batcher, which merges concurrent requests) and the")
print("model executing the request's own batch; best of rounds, then each round's ratio to the in-process")
print("point measured just before it:")
print()
print("| model | batch | ORT in-process | e2e + shm, default batcher | rows per execution | / in-process | per round "
      "| e2e + shm, request batch | / in-process | per round |")
print("|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
def per_round(model, batch, kind):
    base = by_round.get((model, "onnxruntime", batch, "inprocess"), {})
    served = by_round.get((model, "onnxruntime", batch, kind), {})
    ratios = [served[r] / base[r] for r in sorted(served) if r in base]
    if not ratios:
        return ""
    return " / ".join(f"{x:.2f}" for x in ratios) + f" (median {statistics.median(ratios):.2f})"
for model, batch in model_batches:
    o, _ = get(model, "onnxruntime", batch, "inprocess")
    d, rows = get(model, "onnxruntime", batch, "e2e-shm")
    xs, _ = get(model, "onnxruntime", batch, "e2e-exact-shm")
    rows = f"{rows:.1f}" if rows else "–"
    print(f"| {model} | {batch} | {o:.1f} | {d:.1f} | {rows} | {d / o:.2f} | {per_round(model, batch, 'e2e-shm')} "
          f"| {xs:.1f} | {xs / o:.2f} | {per_round(model, batch, 'e2e-exact-shm')} |")
print()
print("CPU cost, robust to what else runs on the machine: items per CPU-second of the in-process bench")
print("process, and of the server process during the end-to-end points (the load generator's CPU")
print("excluded; warm-up included on both sides of the count).")
print()
print("| model | batch | tract in-process | tract server | ORT in-process | ORT server | ORT server / in-process "
      "| ORT server, request batch | + shm | + shm / in-process | ORT in-process, 2 instances | server + shm, 2 instances | / in-process, 2 instances |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for model, batch in model_batches:
    c = lambda engine, kind: best_cpu.get((model, engine, batch, kind), float("nan"))
    ti, ts, oi, os_ = c("tract", "inprocess"), c("tract", "e2e"), c("onnxruntime", "inprocess"), c("onnxruntime", "e2e")
    ox, oxs = c("onnxruntime", "e2e-exact"), c("onnxruntime", "e2e-exact-shm")
    oi2, ox2 = c("onnxruntime", "inprocess-i2"), c("onnxruntime", "e2e-exact-shm-i2")
    print(f"| {model} | {batch} | {ti:.1f} | {ts:.1f} | {oi:.1f} | {os_:.1f} | {os_ / oi:.2f} | {ox:.1f} | {oxs:.1f} | {oxs / oi:.2f} "
          f"| {oi2:.1f} | {ox2:.1f} | {ox2 / oi2:.2f} |")
EOF
} | tee "$out/summary.md"
