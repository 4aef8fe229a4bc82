"""Prints bench/peers.sh's table from `oxserve bench --json` lines tagged with the server name
(one `SERVER<TAB>JSON` per line on stdin). A server measured in several rounds is shown by its
median round (by throughput), with the range of all its rounds; the ratios are those the
targets are stated in: against the best peer on the same protocol (throughput, and p99 where
lower is better) and against the floor."""

import json
import sys
from collections import defaultdict

PEERS = {"mlserver", "pytriton"}

points = defaultdict(list)
order = []
for line in sys.stdin:
    server, _, payload = line.rstrip("\n").partition("\t")
    try:
        p = json.loads(payload)
    except ValueError:
        continue
    key = (server, p["protocol"])
    if key not in points:
        order.append(key)
    points[key].append(p)


def median(key):
    runs = sorted(points[key], key=lambda p: p["throughput_rps"])
    return runs[(len(runs) - 1) // 2]


def best(protocol, servers):
    cands = [median(k) for k in order if k[0] in servers and k[1] == protocol]
    return max(cands, key=lambda p: p["throughput_rps"]) if cands else None


print("| server | protocol | conc | req/s (median) | rounds: range | p50 µs | p90 µs | p99 µs | errors "
      "| vs best peer: req/s, p99 | vs floor |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for key in order:
    server, protocol = key
    p = median(key)
    runs = points[key]
    lo, hi = min(r["throughput_rps"] for r in runs), max(r["throughput_rps"] for r in runs)
    spread = f"{len(runs)}: {lo:,.0f}–{hi:,.0f}" if len(runs) > 1 else "1"
    peer = best(protocol, PEERS)
    floor = best(protocol, {"floor"})
    vs_peer = ""
    if peer and server not in PEERS and peer["throughput_rps"] > 0:
        vs_peer = f"{p['throughput_rps'] / peer['throughput_rps']:.1f}x"
        if peer["p99_us"] > 0:
            vs_peer += f", {p['p99_us'] / peer['p99_us']:.2f}x"
    vs_floor = ""
    if floor and server != "floor" and floor["throughput_rps"] > 0:
        vs_floor = f"{p['throughput_rps'] / floor['throughput_rps']:.2f}x"
    errors = sum(r["errors"] for r in runs)
    stable = "" if all(r["stable"] for r in runs) else " ⚠"
    print(f"| {server} | {protocol} | {p.get('concurrency', '')} | {p['throughput_rps']:,.0f}{stable} | {spread} "
          f"| {p['p50_us']:,} | {p['p90_us']:,} | {p['p99_us']:,} | {errors} | {vs_peer} | {vs_floor} |")
    for r in runs:
        if r.get("first_error"):
            print(f"<!-- {server} {protocol} first error: {r['first_error']} -->")
print()
print("⚠ = some round's last three windows did not agree within the stability band "
      "(figures from the last three windows anyway).")
