#!/usr/bin/env python3
"""TorchServe figures (BENCHMARKS.md, "TorchServe"): the same archive (the fixtures'
densenet_small.mar: a traced CNN on 224×224 images with TorchServe's image_classifier handler)
served by TorchServe 0.12 and by oxserve running as `torchserve`, in one run:

  throughput  N client threads POST the same JPEG to /predictions/densenet_small for D seconds
              (closed loop, keep-alive connections): requests per second and p99;
  startup     `torchserve --start --models ...` → the first successful prediction, and the RSS of
              every process of the server then (TorchServe: the JVM and its Python workers).

Both servers get the same number of workers (2, this machine's cores) and no batching.

    .venv/bin/python bench/torchserve_figures.py OXSERVE_BIN [--concurrency 16] [--duration 10]

OXSERVE_BIN must be built with the torch feature (`--features oxserve/torch`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OXSERVE_CACHE", Path.home() / ".cache/oxserve"))
TS_VENV = CACHE / "venv-torchserve"


def fixtures() -> Path:
    if os.environ.get("OXSERVE_TORCHSERVE_FIXTURES"):
        return Path(os.environ["OXSERVE_TORCHSERVE_FIXTURES"])
    out = subprocess.run([str(TS_VENV / "bin/python"), str(ROOT / "scripts/make_torchserve_fixtures.py"),
                          "--if-needed"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mib(root_pid: int) -> float:
    """RSS of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total / 1024


def predict_once(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/predictions/densenet_small", body=body)
    status = conn.getresponse().status
    conn.close()
    return status


def load(port: int, body: bytes, concurrency: int, duration: float) -> tuple[float, float, int]:
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop = time.monotonic() + duration

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                conn.request("POST", "/predictions/densenet_small", body=body)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors[i] += 1
                    continue
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            latencies[i].append(time.monotonic() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    all_lat = sorted(x for lat in latencies for x in lat)
    p99 = all_lat[int(len(all_lat) * 0.99)] * 1e6 if all_lat else 0.0
    return len(all_lat) / elapsed, p99, sum(errors)


def start(name: str, command: list[str], workdir: Path, port: int, env: dict) -> tuple[subprocess.Popen, float]:
    """Starts a server in the foreground; returns it and the seconds to its first prediction."""
    began = time.monotonic()
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = (fixtures() / "kitten.jpg").read_bytes()
    deadline = time.monotonic() + 180
    while True:
        try:
            if predict_once(port, body) == 200:
                return proc, time.monotonic() - began
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not serve")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    fx = fixtures()
    body = (fx / "kitten.jpg").read_bytes()
    rows = []
    for name in ("TorchServe 0.12", "oxserve as torchserve"):
        work = Path(tempfile.mkdtemp(prefix="ts-bench-"))
        try:
            ports = [free_port() for _ in range(4)]
            (work / "config.properties").write_text(
                f"inference_address=http://127.0.0.1:{ports[0]}\n"
                f"management_address=http://127.0.0.1:{ports[1]}\n"
                f"metrics_address=http://127.0.0.1:{ports[2]}\n"
                f"grpc_inference_port={ports[3]}\ngrpc_management_port={free_port()}\n"
                "default_workers_per_model=2\n")
            env = {**os.environ, "TMPDIR": str(work), "TEMP": str(work)}
            if name.startswith("TorchServe"):
                env["PATH"] = f"{TS_VENV / 'bin'}:{env['PATH']}"
                command = [str(TS_VENV / "bin/torchserve"), "--start", "--foreground", "--ncs",
                           "--disable-token-auth", "--model-store", str(fx / "model-store"),
                           "--models", "densenet_small=densenet_small.mar", "--ts-config", "config.properties"]
            else:
                link = work / "torchserve"
                os.symlink(args.binary, link)
                command = [str(link), "--start", "--foreground", "--ncs", "--disable-token-auth",
                           "--model-store", str(fx / "model-store"), "--models",
                           "densenet_small=densenet_small.mar", "--ts-config", "config.properties"]
            proc, ready = start(name, command, work, ports[0], env)
            try:
                rss = tree_rss_mib(proc.pid)
                load(ports[0], body, args.concurrency, 2.0)  # warm-up
                rps, p99, errors = load(ports[0], body, args.concurrency, args.duration)
                rows.append((name, rps, p99, errors, ready, rss, tree_rss_mib(proc.pid)))
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                # TorchServe's launcher leaves its JVM and workers behind: they all name the
                # run's own temporary directory.
                subprocess.run(["pkill", "-f", str(work)], check=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[0][1] or 1.0
    print(f"| server | req/s (concurrency {args.concurrency}) | vs TorchServe | p99 ms | errors | start → first prediction (s) | RSS when serving (MiB) | RSS after the load (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rps, p99, errors, ready, rss, rss_after in rows:
        print(f"| {name} | {rps:,.1f} | {rps / base:.1f}× | {p99 / 1000:,.1f} | {errors} | {ready:.1f} | {rss:,.0f} | {rss_after:,.0f} |")


if __name__ == "__main__":
    main()
