#!/usr/bin/env python3
"""TorchScript figures (BENCHMARKS.md, "TorchServe"): the CNN of the TorchServe fixtures
(densenet_small's traced model.pt, 224×224×3 → 10) served by oxserve's TorchScript engine with
dynamic batching (max_batch_size 32, 500 µs queue delay, 2 instances sharing one module), at
concurrency 8, one image per request, over KServe v2 HTTP binary and gRPC and TF Serving gRPC,
against the same engine in process (`oxserve bench --protocol in-process`: libtorch with the
batcher, no protocol, no client), in one run; server CPU per request from /proc.

    .venv/bin/python bench/torch_figures.py OXSERVE_BIN [--duration 4]

OXSERVE_BIN must be built with the torch feature (`--features oxserve/torch`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tf_figures import bench, cpu_secs, start  # noqa: E402
from torchserve_figures import fixtures  # noqa: E402

CONFIG = """platform: "pytorch_libtorch"
max_batch_size: 32
input [{ name: "INPUT__0" data_type: TYPE_FP32 dims: [3, 224, 224] }]
output [{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [10] }]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [{ count: 2 kind: KIND_CPU }]
"""


def repository() -> Path:
    repo = Path(tempfile.mkdtemp(prefix="oxserve-torch-bench-"))
    (repo / "cnn" / "1").mkdir(parents=True)
    with zipfile.ZipFile(fixtures() / "model-store" / "densenet_small.mar") as z:
        (repo / "cnn" / "1" / "model.pt").write_bytes(z.read("model.pt"))
    (repo / "cnn" / "config.pbtxt").write_text(CONFIG)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    repo = repository()
    rows = []
    try:
        point = bench(args.binary, ["--model-repository", str(repo), "--model", "cnn", "--protocol", "in-process",
                                    "--concurrency", "8", "--duration", str(args.duration), "--warmup", "1"])
        rows.append(("in process (libtorch, oxserve engine)", point["throughput_rps"], point["p99_us"],
                     point.get("client_cpu_us")))
        proc, http, grpc, _ = start(args.binary, repo)
        try:
            for protocol in ("http-binary", "grpc", "tfs-grpc"):
                before = cpu_secs(proc.pid)
                point = bench(args.binary, ["--http-url", f"http://{http}", "--grpc-url", f"http://{grpc}",
                                            "--model", "cnn", "--protocol", protocol, "--concurrency", "8",
                                            "--duration", str(args.duration), "--warmup", "1"])
                total = point["throughput_rps"] * (args.duration + 1)
                rows.append((protocol, point["throughput_rps"], point["p99_us"],
                             (cpu_secs(proc.pid) - before) / total * 1e6 if total else None))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    base = rows[0][1]
    print("| path | req/s | vs in process | p99 µs | server (engine) CPU µs/request |")
    print("|---|---:|---:|---:|---:|")
    for path, rps, p99, cpu in rows:
        print(f"| {path} | {rps:,.0f} | {rps / base:.2f} | {p99:,} | {cpu:.0f} |" if cpu is not None
              else f"| {path} | {rps:,.0f} | {rps / base:.2f} | {p99:,} | – |")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
