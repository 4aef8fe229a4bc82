#!/usr/bin/env bash
# Throughput of HTTP JSON inference on add_sub with TLS against without, in one run:
# two oxserve processes (plain and --tls-cert), wrk alternating between them.
# Per round: requests/s of each, and each server's CPU per request (user+system time from
# /proc/PID/stat over the round / the requests wrk completed), which the client's own TLS work
# on the shared cores does not distort. Needs wrk (apt-get install wrk) and openssl.
# Usage: bench/tls/run.sh OXSERVE_BIN [ROUNDS] [SECONDS] [CONNECTIONS]
set -euo pipefail
bin=${1:?oxserve binary}; rounds=${2:-3}; secs=${3:-10}; conns=${4:-16}
root=$(cd "$(dirname "$0")/../.." && pwd); cd "$root"
dir=$(mktemp -d); trap 'kill $plain_pid $tls_pid 2>/dev/null; rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
start() { # name extra-args... ; prints "pid http-addr"
  local name=$1; shift
  "$bin" serve --model-repository examples/models --http-port 0 --grpc-port 0 --metrics-port 0 "$@" \
    > "$dir/$name.out" 2> "$dir/$name.err" &
  local pid=$!
  until [ -s "$dir/$name.out" ]; do sleep 0.1; done
  echo "$pid $(sed -E 's/.*"http":"([^"]+)".*/\1/' "$dir/$name.out")"
}
read -r plain_pid plain_addr < <(start plain)
read -r tls_pid tls_addr < <(start tls --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem")
until curl -sf "http://$plain_addr/v2/health/ready" >/dev/null; do sleep 0.2; done
until curl -sfk "https://$tls_addr/v2/health/ready" >/dev/null; do sleep 0.2; done
clk_tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Runs wrk against a URL; prints "requests/s server-CPU-us-per-request".
measure() { # pid url
  local t0 t1 out
  t0=$(cpu_ticks "$1")
  out=$(wrk -t2 -c"$conns" -d"${secs}s" -s bench/tls/add_sub.lua "$2")
  t1=$(cpu_ticks "$1")
  local rps requests
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  echo "$rps $(echo "($t1 - $t0) / $clk_tck * 1000000 / $requests" | bc -l)"
}
measure "$plain_pid" "http://$plain_addr/v2/models/add_sub/infer" >/dev/null   # warm-up
measure "$tls_pid" "https://$tls_addr/v2/models/add_sub/infer" >/dev/null
printf "%-6s %12s %12s %7s %14s %14s\n" round plain_rps tls_rps ratio plain_cpu_us tls_cpu_us
for r in $(seq 1 "$rounds"); do
  read -r p pc < <(measure "$plain_pid" "http://$plain_addr/v2/models/add_sub/infer")
  read -r t tc < <(measure "$tls_pid" "https://$tls_addr/v2/models/add_sub/infer")
  printf "%-6s %12s %12s %7.3f %14.1f %14.1f\n" "$r" "$p" "$t" "$(echo "$t / $p" | bc -l)" "$pc" "$tc"
done
