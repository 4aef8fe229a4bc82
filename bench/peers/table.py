"""Prints bench/peers.sh's table from `oxserve bench --json` lines tagged with the server name
(one `SERVER<TAB>JSON` per line on stdin), with the ratios the targets are stated in."""

import json
import sys

rows = []
for line in sys.stdin:
    server, _, payload = line.rstrip("\n").partition("\t")
    try:
        rows.append((server, json.loads(payload)))
    except ValueError:
        continue

PEERS = {"mlserver", "pytriton"}


def best(protocol, servers):
    cands = [(p["throughput_rps"], s, p) for s, p in rows if s in servers and p["protocol"] == protocol]
    return max(cands, key=lambda c: c[0]) if cands else None


print("| server | protocol | conc | req/s | p50 µs | p90 µs | p99 µs | errors | windows | vs best peer (p99 ratio) | vs floor |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for server, p in rows:
    peer = best(p["protocol"], PEERS)
    floor = best(p["protocol"], {"floor"})
    vs_peer = f"{p['throughput_rps'] / peer[0]:.1f}x" if peer and peer[0] > 0 and server not in PEERS else ""
    if vs_peer and peer[2]["p99_us"] > 0:
        vs_peer += f" (p99 {p['p99_us'] / peer[2]['p99_us']:.2f}x)"
    vs_floor = f"{p['throughput_rps'] / floor[0]:.2f}x" if floor and floor[0] > 0 and server != "floor" else ""
    windows = f"{p['windows']}{'' if p['stable'] else ' (unstable)'}"
    print(f"| {server} | {p['protocol']} | {p.get('concurrency', '')} | {p['throughput_rps']:,.0f} "
          f"| {p['p50_us']:,} | {p['p90_us']:,} | {p['p99_us']:,} | {p['errors']} | {windows} "
          f"| {vs_peer} | {vs_floor} |")
    if p.get("first_error"):
        print(f"<!-- {server} {p['protocol']} first error: {p['first_error']} -->")
