#!/usr/bin/env python3
"""Model lifecycle figures (BENCHMARKS.md, "Model lifecycle"), against a real oxserve binary
in explicit model control mode:

  reloads   failed requests while add_sub is reloaded N times (a version directory added, then
            removed, each followed by a load request) under continuous HTTP and gRPC traffic;
  latency   p99 of add_sub requests (one HTTP client) while a large model (bench/make_mlp.py,
            ~68 MiB) is loaded and unloaded over and over, against p99 with nothing loading,
            measured in alternating windows;
  memory    the server's RSS after N load/unload cycles of the fidelity corpus's CNN against
            after the first (run scripts/make_corpus.py first);
  traffic   add_sub (versions 1 and 2) through `oxserve bench` (HTTP JSON, concurrency 16) with
            no split, a split with one target (the routing alone), a 50/50 split (two versions
            share the load: smaller batches each), and the one-target split plus 10 % shadow
            traffic, set through the
            run-time traffic API in alternating rounds: the client's req/s and the server's CPU
            per client request (/proc; mirrored requests are counted as cost, not as requests).

    .venv/bin/python bench/lifecycle.py OXSERVE_BIN [--reloads 50] [--cycles 200] [--windows 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parent.parent


def start(binary: str, repository: Path, load: list[str]) -> tuple[subprocess.Popen, str, str]:
    args = [binary, "serve", "--model-repository", str(repository), "--http-port", "0",
            "--grpc-port", "0", "--metrics-port", "0", "--model-control-mode", "explicit"]
    for name in load:
        args += ["--load-model", name]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = json.loads(proc.stdout.readline())
    client = httpclient.InferenceServerClient(line["http"])
    deadline = time.monotonic() + 60
    while not client.is_server_ready():
        if time.monotonic() > deadline:
            raise SystemExit("server not ready")
        time.sleep(0.05)
    return proc, line["http"], line["grpc"]


def add_sub_inputs(module):
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.float32)
    inputs = [module.InferInput("INPUT0", [1, 16], "FP32"), module.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a + b


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS")


def reloads(binary: str, count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        shutil.copytree(ROOT / "examples/models/add_sub", repo / "add_sub")
        proc, http, grpc = start(binary, repo, ["add_sub"])
        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}
        failures: list[str] = []
        lock = threading.Lock()

        def client(module, url):
            c = module.InferenceServerClient(url)
            inputs, expected = add_sub_inputs(module)
            while not stop.is_set():
                try:
                    out = c.infer("add_sub", inputs).as_numpy("OUTPUT0")
                    ok = np.array_equal(out, expected)
                    with lock:
                        counts["ok" if ok else "failed"] += 1
                        if not ok:
                            failures.append("wrong answer")
                except Exception as e:  # noqa: BLE001 - every failure counts
                    with lock:
                        counts["failed"] += 1
                        failures.append(str(e)[:200])

        threads = [threading.Thread(target=client, args=(m, u)) for m, u in
                   [(httpclient, http), (httpclient, http), (grpcclient, grpc), (grpcclient, grpc)]]
        for t in threads:
            t.start()
        admin = httpclient.InferenceServerClient(http)
        began = time.monotonic()
        for i in range(count):
            if i % 2 == 0:
                shutil.copytree(repo / "add_sub/1", repo / "add_sub/2")
            else:
                shutil.rmtree(repo / "add_sub/2")
            admin.load_model("add_sub")
        elapsed = time.monotonic() - began
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        proc.terminate()
        proc.wait()
        print(f"reloads: {count} reloads in {elapsed:.1f} s under 2 HTTP + 2 gRPC clients: "
              f"{counts['ok']} requests answered correctly, {counts['failed']} failed"
              + (f" (e.g. {failures[:3]})" if failures else ""))


def latency(binary: str, windows: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        shutil.copytree(ROOT / "examples/models/add_sub", repo / "add_sub")
        subprocess.run([sys.executable, str(ROOT / "bench/make_mlp.py"), str(repo)], check=True,
                       stdout=subprocess.DEVNULL)
        proc, http, _ = start(binary, repo, ["add_sub"])
        client = httpclient.InferenceServerClient(http)
        admin = httpclient.InferenceServerClient(http, network_timeout=600)
        inputs, _ = add_sub_inputs(httpclient)
        loading = threading.Event()
        done = threading.Event()
        loads = [0]

        def loader():
            while not done.is_set():
                if loading.wait(0.1):
                    admin.load_model("mlp_plain")
                    admin.unload_model("mlp_plain")
                    loads[0] += 1

        t = threading.Thread(target=loader)
        t.start()

        def window() -> list[float]:
            lat = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                s = time.perf_counter()
                client.infer("add_sub", inputs)
                lat.append((time.perf_counter() - s) * 1e6)
            return lat

        idle, busy = [], []
        for _ in range(windows):
            idle += window()
            loading.set()
            busy += window()
            loading.clear()
        done.set()
        t.join()
        proc.terminate()
        proc.wait()
        p_idle, p_busy = np.percentile(idle, 99), np.percentile(busy, 99)
        print(f"latency: add_sub p99 {p_idle:.0f} us with nothing loading ({len(idle)} requests), "
              f"{p_busy:.0f} us while mlp_plain (68 MiB) loads and unloads ({len(busy)} requests, "
              f"{loads[0]} loads): {p_busy / p_idle:.2f}x; p50 {np.percentile(idle, 50):.0f} / "
              f"{np.percentile(busy, 50):.0f} us")


def memory(binary: str, cycles: int, engine: str, infers: int) -> None:
    cnn = ROOT / "tests/fixtures/corpus/onnxruntime/cnn"
    if not cnn.is_dir():
        raise SystemExit(f"{cnn} is missing: run .venv/bin/python scripts/make_corpus.py first")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        shutil.copytree(cnn, repo / "cnn", symlinks=False)
        config = repo / "cnn/config.pbtxt"
        config.write_text(config.read_text().replace('backend: "onnxruntime"', f'backend: "{engine}"'))
        proc, http, _ = start(binary, repo, [])
        admin = httpclient.InferenceServerClient(http)
        meta = None
        after = {}
        for i in range(1, cycles + 1):
            admin.load_model("cnn")
            if meta is None:
                meta = admin.get_model_metadata("cnn")
            inp = meta["inputs"][0]
            shape = [1 if d == -1 else d for d in inp["shape"]]
            x = httpclient.InferInput(inp["name"], shape, inp["datatype"])
            x.set_data_from_numpy(np.zeros(shape, dtype=np.float32))
            for _ in range(infers):
                admin.infer("cnn", [x])
            admin.unload_model("cnn")
            while admin.get_model_repository_index()[0].get("state") != "UNAVAILABLE":
                time.sleep(0.005)
            if i in (1, 10, 20, 50) or i % 100 == 0 or i == cycles:
                after[i] = rss_kib(proc.pid)
        proc.terminate()
        proc.wait()
        series = ", ".join(f"{i}: {kib / 1024:.1f}" for i, kib in sorted(after.items()))
        warm = after[min(20, cycles)]
        print(f"memory ({engine}, {infers} inference(s) per cycle): RSS in MiB after cycle {series}; "
              f"last vs first {(after[cycles] / after[1] - 1) * 100:+.1f} %, "
              f"last vs cycle {min(20, cycles)} {(after[cycles] / warm - 1) * 100:+.1f} %")


def traffic(binary: str, rounds: int, seconds: float) -> None:
    import requests
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        model = repo / "add_sub"
        shutil.copytree(ROOT / "examples/models/add_sub", model)
        shutil.copytree(model / "1", model / "2")
        config = model / "config.pbtxt"
        config.write_text(config.read_text() + "version_policy: { all: {} }\n")
        proc, http, grpc = start(binary, repo, ["add_sub"])
        url = f"http://{http}/v2/repository/models/add_sub/traffic"
        settings = {
            "none": {"traffic_split": None, "shadow": None},
            "split, one target": {"traffic_split": {"weights": {"1": 1}}, "shadow": None},
            "split 50/50": {"traffic_split": {"weights": {"1": 1, "2": 1}}, "shadow": None},
            "split + 10% shadow": {"traffic_split": {"weights": {"1": 1}}, "shadow": {"version": "2", "share": 0.1}},
        }
        def counts() -> tuple[int, int]:
            """(successes over both versions, mirrored requests the candidate ran)."""
            stats = requests.get(f"http://{http}/v2/models/add_sub/stats", timeout=30).json()["model_stats"]
            successes = sum(int(m["inference_stats"]["success"]["count"]) for m in stats)
            mirrored = sum(int((m.get("shadow") or {}).get("compared", 0)) + int((m.get("shadow") or {}).get("failed", 0))
                           for m in stats)
            return successes, mirrored

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        results: dict[str, list[tuple[float, float]]] = {k: [] for k in settings}
        for _ in range(rounds):
            for name, body in settings.items():
                assert requests.post(url, json=body, timeout=30).status_code == 200
                time.sleep(0.2)  # let the previous window's shadow requests finish
                (s0, m0), c0 = counts(), cpu()
                out = subprocess.run([binary, "bench", "--model", "add_sub", "--http-url", f"http://{http}",
                                      "--protocol", "http-json", "--concurrency", "16", "--duration", str(seconds),
                                      "--warmup", "1", "--json"], capture_output=True, text=True, check=True)
                time.sleep(0.2)
                (s1, m1), c1 = counts(), cpu()
                client_requests = (s1 - s0) - (m1 - m0)
                results[name].append((json.loads(out.stdout.splitlines()[0])["throughput_rps"],
                                      (c1 - c0) * 1e6 / max(client_requests, 1)))
        proc.terminate()
        proc.wait()
        base_rps = float(np.median([r for r, _ in results["none"]]))
        base_cpu = float(np.median([c for _, c in results["none"]]))
        for name, points in results.items():
            rps = float(np.median([r for r, _ in points]))
            us = float(np.median([c for _, c in points]))
            print(f"traffic: {name:20} median {rps:8.0f} req/s ({rps / base_rps:.3f}x), server CPU "
                  f"{us:5.1f} us per client request ({us / base_cpu:.3f}x); rounds {[round(r) for r, _ in points]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--reloads", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window-secs", type=float, default=3.0)
    parser.add_argument("--only", choices=["reloads", "latency", "memory", "traffic"])
    parser.add_argument("--rounds", type=int, default=4, help="traffic: alternating rounds")
    parser.add_argument("--engine", default="onnxruntime", help="the CNN's backend (memory)")
    parser.add_argument("--infers", type=int, default=1, help="memory: inferences per cycle")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {args.binary}")
    if args.only in (None, "reloads"):
        reloads(args.binary, args.reloads)
    if args.only in (None, "latency"):
        latency(args.binary, args.windows, args.window_secs)
    if args.only in (None, "memory"):
        memory(args.binary, args.cycles, args.engine, args.infers)
    if args.only in (None, "traffic"):
        traffic(args.binary, args.rounds, args.window_secs)


if __name__ == "__main__":
    main()
