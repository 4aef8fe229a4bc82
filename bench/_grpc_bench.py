"""What bench/streaming_figures.py and bench/ensemble_figures.py share: a measured window
and its figures from /proc (server, client and machine CPU), the load-average wait, and starting / stopping an oxserve whose
models are loaded in explicit control mode and polled ready over gRPC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Window:
    """What one measured window collected."""
    latencies: list[float] = field(default_factory=list)  # seconds, answers within the window
    errors: int = 0
    elapsed: float = 0.0
    first: service_pb2.ModelInferResponse | None = None


def server_ticks(pid: int) -> int:
    """User + system clock ticks the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine_busy_s() -> float:
    """CPU time all processes used so far (/proc/stat: everything but idle and iowait), seconds."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")


def measured_window(run: Callable[[], Window], pid: int, name: str) -> tuple[Window, dict]:
    """Runs one measured window (`run`) and reads, over it, the server's CPU (process `pid`),
    this client's and the rest of the machine's: the window and its figures per answer."""
    hz = os.sysconf("SC_CLK_TCK")
    s0, c0, m0 = server_ticks(pid), os.times(), machine_busy_s()
    w = run()
    s1, c1, m1 = server_ticks(pid), os.times(), machine_busy_s()
    if w.first is None:
        raise SystemExit(f"{name}: no answer")
    n = len(w.latencies)
    lat = np.array(w.latencies) * 1e6
    client_s = (c1.user + c1.system) - (c0.user + c0.system)
    server_s = (s1 - s0) / hz
    return w, {
        "requests": n, "errors": w.errors, "rps": n / w.elapsed,
        "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
        "server_us": server_s * 1e6 / max(n, 1), "server_cores": server_s / w.elapsed,
        "client_us": client_s * 1e6 / max(n, 1), "client_cores": client_s / w.elapsed,
        # everything else on the machine (other jobs, the kernel outside these two processes)
        "other_cores": ((m1 - m0) - server_s - client_s) / w.elapsed,
    }


def start_server(binary: str, repository: Path, models: tuple[str, ...]) -> tuple[subprocess.Popen, str]:
    """Starts oxserve with `models` loaded; answers once every one is ready over gRPC (the
    process and its gRPC address). The caller checks an answer and stops it with stop_server."""
    cmd = [binary, "serve", "--model-repository", str(repository), "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0", "--model-control-mode", "explicit"]
    for m in models:
        cmd += ["--load-model", m]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        target = json.loads(proc.stdout.readline())["grpc"]
        with grpc.insecure_channel(target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if all(stub.ModelReady(service_pb2.ModelReadyRequest(name=m)).ready for m in models):
                        break
                except grpc.RpcError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("server did not become ready")
                time.sleep(0.05)
        return proc, target
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: anything it left behind
    except OSError:
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_for_quiet(limit: float) -> None:
    """Waits (up to `limit` seconds) for the 1-minute load average to drop below 1.0."""
    deadline = time.monotonic() + limit
    while float(loadavg().split()[0]) >= 1.0 and time.monotonic() < deadline:
        time.sleep(10)
    state = "below 1.0" if float(loadavg().split()[0]) < 1.0 else f"still ≥ 1.0 after {limit:.0f} s"
    print(f"load average at start: {loadavg()} ({state})", file=sys.stderr, flush=True)
