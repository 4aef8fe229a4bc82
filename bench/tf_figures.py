#!/usr/bin/env python3
"""TensorFlow figures (BENCHMARKS.md, "TensorFlow and TF Serving"), against a real oxserve binary
and the SavedModel fixtures of scripts/make_tf_models.py (the `mlp` and `cnn` models):

  throughput  each model served with dynamic batching (max_batch_size 32, 500 µs queue delay,
              2 instances sharing one session) at concurrency 8, batch 1 per request, over TF
              Serving gRPC and REST and KServe v2 gRPC and HTTP (`oxserve bench`), against the
              same model run in process through the C API by oxserve's engine (`oxserve bench
              --protocol in-process`, same batching) and by Python TensorFlow (8 threads calling
              the signature; `bench/tf_python.py` in the TensorFlow venv), in one run: requests
              per second, p99, and server CPU per request from /proc;
  startup     start → ready of `oxserve serve` with one SavedModel and its RSS when ready, against
              Python TensorFlow's own import + tf.saved_model.load + first call and its RSS;
  memory      the server's RSS serving the SavedModels alone, the ONNX examples alone, and both.

    .venv/bin/python bench/tf_figures.py OXSERVE_BIN [--only throughput|startup|memory]
        [--duration 4] [--models mlp,cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OXSERVE_CACHE", Path.home() / ".cache/oxserve"))
TF_PYTHON = CACHE / "venv-tf/bin/python"

BATCHED_CONFIG = """max_batch_size: 32
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [{ count: 2 kind: KIND_CPU }]
"""


BENCH_MODELS = ("mlp_large", "cnn_large")


def fixtures(model: str = "") -> Path:
    """Where a model's SavedModel versions are: bench/make_tf_bench_models.py's models, or the
    test fixtures (scripts/make_tf_models.py)."""
    if model in BENCH_MODELS:
        out = subprocess.run([str(TF_PYTHON), str(ROOT / "bench/make_tf_bench_models.py")],
                             capture_output=True, text=True, check=True)
        return Path(out.stdout.strip().splitlines()[-1])
    if os.environ.get("OXSERVE_TF_MODELS"):
        return Path(os.environ["OXSERVE_TF_MODELS"])
    out = subprocess.run([str(TF_PYTHON), str(ROOT / "scripts/make_tf_models.py"), "--if-needed"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def repository(models: list[str], config: str | None, onnx: bool = False) -> Path:
    repo = Path(tempfile.mkdtemp(prefix="oxserve-tf-bench-"))
    for m in models:
        (repo / m).mkdir()
        os.symlink(fixtures(m) / m / "1", repo / m / "1")
        if config is not None:
            (repo / m / "config.pbtxt").write_text(config)
    if onnx:
        for m in ("add_sub", "iris"):
            shutil.copytree(ROOT / "examples/models" / m, repo / m)
    return repo


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(binary: str, repo: Path) -> tuple[subprocess.Popen, str, str, float]:
    began = time.monotonic()
    proc = subprocess.Popen([binary, "serve", "--model-repository", str(repo), "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = json.loads(proc.stdout.readline())
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"http://{line['http']}/v2/health/ready", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("server not ready")
        time.sleep(0.005)
    return proc, line["http"], line["grpc"], time.monotonic() - began


def bench(binary: str, args: list[str]) -> dict:
    out = subprocess.run([binary, "bench", *args, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"oxserve bench {' '.join(args)} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[0])


def throughput(binary: str, models: list[str], duration: float) -> None:
    repo = repository(models, BATCHED_CONFIG)
    rows = []
    try:
        for model in models:
            # In process first, with no server running beside it.
            point = bench(binary, ["--model-repository", str(repo), "--model", model, "--protocol", "in-process",
                                   "--concurrency", "8", "--duration", str(duration), "--warmup", "1"])
            # In process, the load generator's CPU is the engine's: the CPU a request costs.
            rows.append((model, "in process (C API, oxserve engine)", point["throughput_rps"], point["p99_us"],
                         point.get("client_cpu_us"), None))
            py = subprocess.run([str(TF_PYTHON), str(ROOT / "bench/tf_python.py"), str(fixtures(model) / model / "1"),
                                 "--threads", "8", "--duration", str(duration)],
                                capture_output=True, text=True, check=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            result = json.loads(py.stdout.strip().splitlines()[-1])
            rows.append((model, "in process (Python TensorFlow)", result["rps"], result["p99_us"], None, None))
            proc, http, grpc, _ = start(binary, repo)
            try:
                for protocol in ("tfs-grpc", "tfs-rest", "grpc", "http-binary"):
                    before = cpu_secs(proc.pid)
                    point = bench(binary, ["--http-url", f"http://{http}", "--grpc-url", f"http://{grpc}",
                                           "--model", model, "--protocol", protocol, "--concurrency", "8",
                                           "--duration", str(duration), "--warmup", "1"])
                    # Server CPU over the whole call (warm-up included) per measured-rate request.
                    spent = cpu_secs(proc.pid) - before
                    total = point["throughput_rps"] * (duration + 1)
                    rows.append((model, protocol, point["throughput_rps"], point["p99_us"],
                                 spent / total * 1e6 if total else None, point.get("client_cpu_us")))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    print("| model | path | req/s | vs in-process C API | p99 µs | server (engine) CPU µs/request | load generator CPU µs/request |")
    print("|---|---|---:|---:|---:|---:|---:|")
    text = lambda v: f"{v:.0f}" if v is not None else "–"
    for model in models:
        base = next(r[2] for r in rows if r[0] == model and r[1].startswith("in process (C API"))
        for m, path, rps, p99, cpu, client in rows:
            if m == model:
                print(f"| {m} | {path} | {rps:,.0f} | {rps / base:.2f} | {p99:,} | {text(cpu)} | {text(client)} |")


def startup(binary: str, runs: int = 3) -> None:
    repo = repository(["mlp"], None)
    try:
        ours = []
        for _ in range(runs):
            proc, http, _, ready = start(binary, repo)
            body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
            assert requests.post(f"http://{http}/v2/models/mlp/infer", json=body, timeout=30).status_code == 200
            ours.append((ready, rss_mib(proc.pid)))
            proc.terminate()
            proc.wait(timeout=30)
        py = []
        for _ in range(runs):
            out = subprocess.run([str(TF_PYTHON), str(ROOT / "bench/tf_python.py"), str(fixtures("mlp") / "mlp/1"),
                                  "--load-only"], capture_output=True, text=True, check=True,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            py.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print("| | start → ready (s) | RSS when ready (MiB) |")
    print("|---|---:|---:|")
    print(f"| oxserve serve (dlopen TensorFlow + load the SavedModel + ready) | {med([r for r, _ in ours]):.2f} | {med([m for _, m in ours]):.0f} |")
    print(f"| Python: import tensorflow + tf.saved_model.load + first call | {med([p['total_s'] for p in py]):.2f} | {med([p['rss_mib'] for p in py]):.0f} |")
    print(f"| of which tf.saved_model.load + first call | {med([p['load_s'] for p in py]):.2f} | |")


def memory(binary: str, models: list[str]) -> None:
    print("| served | RSS when ready (MiB) | after one request each (MiB) |")
    print("|---|---:|---:|")
    for label, tf_models, onnx in (("SavedModels " + "+".join(models), models, False),
                                   ("ONNX add_sub + iris", [], True),
                                   ("both", models, True)):
        repo = repository(tf_models, None, onnx=onnx)
        try:
            proc, http, _, _ = start(binary, repo)
            ready = rss_mib(proc.pid)
            for m in requests.post(f"http://{http}/v2/repository/index", timeout=30).json():
                meta = requests.get(f"http://{http}/v2/models/{m['name']}", timeout=30).json()
                inputs = []
                for t in meta["inputs"]:
                    shape = [1 if d == -1 else d for d in t["shape"]]
                    n = 1
                    for d in shape:
                        n *= d
                    inputs.append({"name": t["name"], "shape": shape, "datatype": t["datatype"], "data": [0.5] * n})
                r = requests.post(f"http://{http}/v2/models/{m['name']}/infer", json={"inputs": inputs}, timeout=60)
                assert r.status_code == 200, r.text
            print(f"| {label} | {ready:.0f} | {rss_mib(proc.pid):.0f} |")
            proc.terminate()
            proc.wait(timeout=30)
        finally:
            shutil.rmtree(repo, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("--only", choices=["throughput", "startup", "memory"])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--models", default="mlp,cnn,mlp_large,cnn_large")
    args = parser.parse_args()
    models = args.models.split(",")
    if args.only in (None, "throughput"):
        throughput(args.binary, models, args.duration)
    if args.only in (None, "startup"):
        startup(args.binary)
    if args.only in (None, "memory"):
        memory(args.binary, [m for m in models if m not in BENCH_MODELS] or models)


if __name__ == "__main__":
    main()
