#!/usr/bin/env bash
# oxserve against peer servers and the HTTP JSON floor: one run, same load, same model.
#
#   bench/peers.sh [concurrency] [window_secs] [max_windows] [rounds]   (defaults: 16 2 6 3)
#
# Serves examples/models/add_sub/1/model.onnx from:
#   oxserve        the release binary on examples/models as shipped            HTTP JSON + gRPC
#                  (no backend in config.pbtxt: ONNX Runtime when its library is found, like
#                  the Python peers, else the built-in tract engine)
#   oxserve-tract  the same, with add_sub pinned to tract (`backend: "tract"`)  HTTP JSON + gRPC
#   floor          bench/floor: bare axum, parses the same JSON, add_sub inline  HTTP JSON
#   mlserver       MLServer 1.7.1, custom onnxruntime runtime (bench/peers/)     HTTP JSON + gRPC
#   pytriton       nvidia-pytriton 0.7.0 = Triton 2.51, Python backend + ORT     HTTP JSON + gRPC
# and drives each with `oxserve bench` (closed loop, windows until three agree within 10 %),
# one at a time, everything on 127.0.0.1. The machine is shared and noisy, so the three Rust
# servers are measured `rounds` times, interleaved, and the table shows each one's median
# round (the peers, 20x slower, once). Peer virtual environments are created on first use
# under bench/.venvs/ (pip only). Every wait has a timeout; every server is stopped with
# SIGTERM to its whole process group, then SIGKILL if it lingers.
#
# Env: SKIP_PEERS=1 measures only oxserve and the floor; OXSERVE_BIN=path skips the build.
# Output: a markdown table on stdout; raw JSON lines in bench/out/peers-<time>.jsonl and the
# servers' logs in bench/out/peers-<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
conc="${1:-16}"
window="${2:-2}"
max_windows="${3:-6}"
rounds="${4:-3}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
python="${PYTHON:-python3}"
venvs="$root/bench/.venvs"
model="$root/examples/models/add_sub/1/model.onnx"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$root/bench/out/peers-$stamp"
results="$root/bench/out/peers-$stamp.jsonl"
mkdir -p "$out/home"
: >"$results"
export ORT_DISABLE_TELEMETRY=1

if [ -n "${OXSERVE_BIN:-}" ]; then
    bin="$OXSERVE_BIN" # a release binary built beforehand (the tree may be changing)
else
    echo "== build (release)" >&2
    cargo build --release --locked -p oxserve >&2
    bin="$target_dir/release/oxserve"
fi
CARGO_TARGET_DIR="$root/bench/floor/target" cargo build --release --locked \
    --manifest-path bench/floor/Cargo.toml >&2
floor_bin="$root/bench/floor/target/release/oxserve-floor"

venv() { # name, packages...
    local name="$1"
    shift
    if [ ! -x "$venvs/$name/bin/python" ] || ! "$venvs/$name/bin/python" -m pip show "$1" >/dev/null 2>&1; then
        echo "== creating $venvs/$name ($*)" >&2
        "$python" -m venv "$venvs/$name"
        "$venvs/$name/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
    fi
}
if [ -z "${SKIP_PEERS:-}" ]; then
    venv mlserver mlserver==1.7.1 onnxruntime==1.32.0
    venv pytriton nvidia-pytriton==0.7.0 onnxruntime==1.32.0
fi

free_port() {
    "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# -- process groups ---------------------------------------------------------------------------
declare -A pgid=()

start_server() { # name, command... (own session, so the whole group can be stopped)
    local name="$1"
    shift
    rm -f "$out/$name.pgid"
    # setsid forks when the caller is a group leader; the shell it runs records the id of
    # the new session (= its process group) before becoming the server.
    setsid sh -c 'echo $$ >"$0"; exec "$@"' "$out/$name.pgid" "$@" \
        >"$out/$name.stdout" 2>"$out/$name.stderr" </dev/null &
    for _ in $(seq 1 100); do
        [ -s "$out/$name.pgid" ] && break
        sleep 0.05
    done
    pgid[$name]="$(cat "$out/$name.pgid")"
}

alive() { kill -0 -- "-${pgid[$1]}" 2>/dev/null; }

stop_server() { # name
    local name="$1" g="${pgid[$1]:-}"
    [ -n "$g" ] || return 0
    kill -TERM -- "-$g" 2>/dev/null || true
    for _ in $(seq 1 200); do # 20 s
        kill -0 -- "-$g" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 -- "-$g" 2>/dev/null; then
        echo "   ($name still running 20 s after SIGTERM: SIGKILL)" >&2
        kill -KILL -- "-$g" 2>/dev/null || true
    fi
    unset "pgid[$name]"
}

stop_all() {
    local name
    for name in "${!pgid[@]}"; do stop_server "$name"; done
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT TERM

listening() { # name, key → the address from the listening line (waits up to 60 s)
    local name="$1" key="$2"
    for _ in $(seq 1 600); do
        if grep -q '"event":"listening"' "$out/$name.stdout" 2>/dev/null; then
            head -n1 "$out/$name.stdout" | sed -n "s/.*\"$key\":\"\([^\"]*\)\".*/\1/p"
            return 0
        fi
        alive "$name" || break
        sleep 0.1
    done
    echo "$name did not start; stderr tail:" >&2
    tail -n 20 "$out/$name.stderr" >&2
    return 1
}

wait_ready() { # name, url (up to 120 s)
    local name="$1" url="$2"
    for _ in $(seq 1 1200); do
        if curl -sf -m 2 -o /dev/null "$url"; then
            return 0
        fi
        alive "$name" || break
        sleep 0.1
    done
    echo "$name not ready at $url; stderr tail:" >&2
    tail -n 20 "$out/$name.stderr" >&2
    return 1
}

drive() { # name, protocols, http url, grpc url
    local name="$1" protocols="$2" http="$3" grpc="$4"
    echo "== $name: $protocols at concurrency $conc" >&2
    # Bounded: warm-up plus every window of both protocols, twice over, plus a minute.
    timeout "$(awk -v w="$window" -v n="$max_windows" 'BEGIN { print int(60 + 4 * (n + 1) * w) }')" \
        "$bin" bench --model add_sub --http-url "$http" --grpc-url "$grpc" \
        --protocol "$protocols" --concurrency "$conc" --window-secs "$window" \
        --max-windows "$max_windows" --warmup 1 --json \
        | sed "s/^/$name\t/" | tee -a "$results" >&2 || echo "   bench against $name failed" >&2
}

# -- the Rust servers, interleaved rounds ----------------------------------------------------
metrics_flag=()
if "$bin" serve --help | grep -q -- --metrics-port; then metrics_flag=(--metrics-port 0); fi
mkdir -p "$out/tract-repo/add_sub/1"
cp examples/models/add_sub/1/model.onnx "$out/tract-repo/add_sub/1/"
{ cat examples/models/add_sub/config.pbtxt; echo 'backend: "tract"'; } >"$out/tract-repo/add_sub/config.pbtxt"
start_server oxserve "$bin" serve --model-repository examples/models --host 127.0.0.1 \
    --http-port 0 --grpc-port 0 "${metrics_flag[@]}" --log-format text
start_server oxserve-tract "$bin" serve --model-repository "$out/tract-repo" --host 127.0.0.1 \
    --http-port 0 --grpc-port 0 "${metrics_flag[@]}" --log-format text
start_server floor "$floor_bin" 127.0.0.1:0
declare -A http_of=() grpc_of=()
for name in oxserve oxserve-tract floor; do
    http_of[$name]="$(listening "$name" http)"
    grpc_of[$name]="$(listening "$name" grpc || true)"
    wait_ready "$name" "http://${http_of[$name]}/v2/health/ready"
done
engines=""
for name in oxserve oxserve-tract; do
    engines="$engines $name=$(grep -o 'model=add_sub version=1 backend=[^ ]*' "$out/$name.stderr" | head -n1 | sed 's/.*backend=//')"
done
for round in $(seq 1 "$rounds"); do
    echo "== round $round of $rounds" >&2
    drive oxserve http-json,grpc "http://${http_of[oxserve]}" "http://${grpc_of[oxserve]}"
    drive floor http-json "http://${http_of[floor]}" "http://127.0.0.1:1"
    drive oxserve-tract http-json,grpc "http://${http_of[oxserve-tract]}" "http://${grpc_of[oxserve-tract]}"
done
stop_all

if [ -z "${SKIP_PEERS:-}" ]; then
    # -- MLServer -----------------------------------------------------------------------------
    ml="$out/mlserver-model"
    mkdir -p "$ml"
    cp bench/peers/mlserver_runtime.py "$ml/onnx_runtime.py"
    read -r mh mg mm < <(echo "$(free_port) $(free_port) $(free_port)")
    cat >"$ml/settings.json" <<EOF
{"host": "127.0.0.1", "http_port": $mh, "grpc_port": $mg, "metrics_port": $mm, "parallel_workers": 0}
EOF
    cat >"$ml/model-settings.json" <<EOF
{"name": "add_sub", "implementation": "onnx_runtime.OnnxModel", "parameters": {"uri": "$model"},
 "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]},
            {"name": "INPUT1", "datatype": "FP32", "shape": [-1, 16]}],
 "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 16]},
             {"name": "OUTPUT1", "datatype": "FP32", "shape": [-1, 16]}]}
EOF
    start_server mlserver env -C "$ml" HOME="$out/home" "$venvs/mlserver/bin/mlserver" start .
    if wait_ready mlserver "http://127.0.0.1:$mh/v2/models/add_sub/ready"; then
        drive mlserver http-json,grpc "http://127.0.0.1:$mh" "http://127.0.0.1:$mg"
    fi
    stop_server mlserver

    # -- PyTriton -----------------------------------------------------------------------------
    libdir="$("$venvs/pytriton/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
    read -r th tg tm < <(echo "$(free_port) $(free_port) $(free_port)")
    # The workspace directory must not exist yet; HOME keeps ~/.cache/pytriton out of $HOME.
    start_server pytriton env HOME="$out/home" LD_LIBRARY_PATH="$libdir" \
        "$venvs/pytriton/bin/python" bench/peers/pytriton_server.py "$model" "$th" "$tg" "$tm" \
        "$out/pytriton-workspace"
    if wait_ready pytriton "http://127.0.0.1:$th/v2/models/add_sub/ready"; then
        drive pytriton http-json,grpc "http://127.0.0.1:$th" "http://127.0.0.1:$tg"
    fi
    stop_server pytriton
fi

echo
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty') on $(nproc) cores;" \
    "add_sub, concurrency $conc, windows of ${window}s (max $max_windows), $rounds rounds; engines:$engines"
"$python" bench/peers/table.py <"$results"
