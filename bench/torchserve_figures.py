#!/usr/bin/env python3
"""TorchServe figures (BENCHMARKS.md, "TorchServe"): the same archive served by TorchServe 0.12
and by oxserve running as `torchserve`, in one run. Two cases (--only picks one; both by
default, each with its own table):

  native  the fixtures' densenet_small.mar: a traced CNN on 224×224 images with TorchServe's
          image_classifier handler (oxserve runs that handler in Rust, on libtorch); the client
          POSTs the same JPEG;
  python  the fixtures' linear_base.mar: a traced Linear(4→3) with a custom handler.py (a
          BaseHandler subclass, JSON in, JSON out); both servers run handler.py in TorchServe's
          own Python backend worker (ts/model_service_worker.py, with the TorchServe venv's
          `python`); the client POSTs a JSON list of rows (application/json).

For each case and server:

  throughput  N client threads POST the same body to /predictions/<model> for D seconds
              (closed loop, keep-alive connections): requests per second and p99;
  startup     `torchserve --start --foreground --models ...` → the first successful prediction,
              and the RSS of every process of the server then and after the load (TorchServe:
              the launcher, the JVM and its Python workers; oxserve: itself and, for custom
              handlers, its Python workers).

Each measurement also prints (stderr) the RSS of each process, the server's CPU per request
over the load window split into frontend and Python workers (/proc/<pid>/stat), the client's,
and the first answer; each table's heading says whether the two servers' answers agree.

Both servers get the same number of workers (2, this machine's cores), no batching and no
token auth. The TorchServe venv's bin comes first on PATH for both (TorchServe's launcher and
oxserve pick the workers' `python` from PATH). Every process a server started is stopped
before the next server starts, and on errors too (its process group, then anything still
naming the run's private temporary directory).

    .venv/bin/python bench/torchserve_figures.py OXSERVE_BIN [--only native|python]
        [--concurrency 16] [--duration 10]

OXSERVE_BIN must be built with the torch feature (`--features oxserve/torch`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OXSERVE_CACHE", Path.home() / ".cache/oxserve"))
TS_VENV = CACHE / "venv-torchserve"
WORKERS = 2


@dataclass
class Case:
    name: str
    title: str
    model: str
    mar: str
    content_type: str | None
    body: bytes


def cases(fx: Path) -> dict[str, Case]:
    return {
        "native": Case("native", "densenet_small.mar, image_classifier handler", "densenet_small",
                       "densenet_small.mar", None, (fx / "kitten.jpg").read_bytes()),
        "python": Case("python", "linear_base.mar, custom handler.py", "linear_base",
                       "linear_base.mar", "application/json", b"[[1.0, 2.0, 3.0, 4.0]]"),
    }


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


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree(root_pid: int) -> list[int]:
    """A process and all its descendants."""
    children, out, stack = _children(), [], [root_pid]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def cpu_ticks(pids: list[int]) -> dict[int, tuple[str, int]]:
    """User + system CPU (clock ticks) of each process, by pid, with its command name."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (comm(pid), int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def cpu_split(before: dict, after: dict, requests: int) -> str:
    """Server CPU per request (µs) over a load window: the frontend (every process that is not a
    Python worker: oxserve, or TorchServe's JVM and launcher) and the Python workers."""
    hz = os.sysconf("SC_CLK_TCK")
    front = workers = 0
    for pid, (name, ticks) in after.items():
        used = ticks - before.get(pid, (name, 0))[1]
        if name.startswith("python"):
            workers += used
        else:
            front += used
    per = 1e6 / hz / max(requests, 1)
    return f"server CPU µs/request: frontend {front * per:,.0f}, Python workers {workers * per:,.0f}"


def tree_rss_mib(root_pid: int) -> float:
    """RSS of a process and all its descendants."""
    return sum(rss_kib(pid) for pid in tree(root_pid)) / 1024


def tree_breakdown(root_pid: int) -> str:
    """'comm RSS' of each process of the tree (MiB), for the notes."""
    return ", ".join(f"{comm(pid)} {rss_kib(pid) / 1024:.0f}" for pid in tree(root_pid) if rss_kib(pid))


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains `text` (the run's own temporary directory)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop(proc: subprocess.Popen, work: Path, known: set[int]) -> None:
    """Stops the server and everything it started: SIGTERM to the server (its clean stop), then
    SIGKILL to its process group (it was started in a session of its own), to every process of
    its tree seen during the run, and to anything still naming the run's temporary directory
    (TorchServe's launcher can leave its JVM and workers behind; they name it in
    -Djava.io.tmpdir and in their socket paths)."""
    known = set(known)
    if proc.poll() is None:
        known.update(tree(proc.pid))
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while True:
        left = [pid for pid in known | set(pids_naming(str(work))) if pid != proc.pid and alive(pid)]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            print(f"warning: processes {left} survive SIGKILL", file=sys.stderr)
            return
        time.sleep(0.1)


def predict_once(port: int, case: Case) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", f"/predictions/{case.model}", body=case.body, headers=headers(case))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def headers(case: Case) -> dict[str, str]:
    return {"Content-Type": case.content_type} if case.content_type else {}


def load(port: int, case: Case, concurrency: int, duration: float) -> tuple[float, float, int, int]:
    """Requests per second, p99 (µs), errors, successful requests."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop_at = time.monotonic() + duration
    path, hdrs = f"/predictions/{case.model}", headers(case)

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                conn.request("POST", path, body=case.body, headers=hdrs)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors[i] += 1
                    continue
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            latencies[i].append(time.monotonic() - t0)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    all_lat = sorted(x for lat in latencies for x in lat)
    p99 = all_lat[int(len(all_lat) * 0.99)] * 1e6 if all_lat else 0.0
    return len(all_lat) / elapsed, p99, sum(errors), len(all_lat)


def wait_ready(name: str, proc: subprocess.Popen, port: int, case: Case, began: float,
               known: set[int]) -> tuple[float, bytes]:
    """Polls a prediction until it answers 200: the seconds since `began`, and the answer."""
    deadline = time.monotonic() + 180
    while True:
        known.update(tree(proc.pid))
        try:
            status, answer = predict_once(port, case)
            if status == 200:
                return time.monotonic() - began, answer
        except (OSError, http.client.HTTPException):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}) before serving {case.model}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not serve {case.model} within 180 s")
        time.sleep(0.05)


def measure(case: Case, server: str, binary: str, store: Path, args) -> tuple:
    work = Path(tempfile.mkdtemp(prefix="ts-bench-"))
    proc = None
    known: set[int] = set()
    try:
        ports = [free_port() for _ in range(5)]
        (work / "config.properties").write_text(
            f"inference_address=http://127.0.0.1:{ports[0]}\n"
            f"management_address=http://127.0.0.1:{ports[1]}\n"
            f"metrics_address=http://127.0.0.1:{ports[2]}\n"
            f"grpc_inference_port={ports[3]}\ngrpc_management_port={ports[4]}\n"
            f"default_workers_per_model={WORKERS}\n")
        # The TorchServe venv's bin first: TorchServe's launcher and oxserve's custom-handler
        # workers run its `python` (the one with the ts package).
        env = {**os.environ, "TMPDIR": str(work), "TEMP": str(work),
               "PATH": f"{TS_VENV / 'bin'}:{os.environ.get('PATH', '')}"}
        if server.startswith("TorchServe"):
            launcher = str(TS_VENV / "bin/torchserve")
        else:
            launcher = str(work / "torchserve")
            os.symlink(binary, launcher)
        command = [launcher, "--start", "--foreground", "--ncs", "--disable-token-auth",
                   "--model-store", str(store), "--models", f"{case.model}={case.mar}",
                   "--ts-config", "config.properties"]
        began = time.monotonic()
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        ready, answer = wait_ready(server, proc, ports[0], case, began, known)
        known.update(tree(proc.pid))
        rss, parts = tree_rss_mib(proc.pid), tree_breakdown(proc.pid)
        load(ports[0], case, args.concurrency, 2.0)  # warm-up
        pids = tree(proc.pid)
        known.update(pids)
        cpu_before, client_before = cpu_ticks(pids), os.times()
        rps, p99, errors, done = load(ports[0], case, args.concurrency, args.duration)
        client_after = os.times()
        cpu = cpu_split(cpu_before, cpu_ticks(pids), done)
        client = (client_after.user + client_after.system - client_before.user
                  - client_before.system) * 1e6 / max(done, 1)
        known.update(tree(proc.pid))
        rss_after = tree_rss_mib(proc.pid)
        print(f"  {case.name} / {server}: {rps:,.1f} req/s, p99 {p99 / 1000:,.1f} ms, {errors} errors, "
              f"ready {ready:.1f} s, RSS {rss:,.0f} → {rss_after:,.0f} MiB ({parts}); {cpu}; "
              f"client CPU µs/request {client:,.0f}; answer "
              f"{answer[:200]!r}", file=sys.stderr, flush=True)
        return (server, rps, p99, errors, ready, rss, rss_after, answer)
    finally:
        if proc is not None:
            stop(proc, work, known)
        shutil.rmtree(work, ignore_errors=True)


def close(a, b, atol: float = 1e-4) -> bool:
    """JSON values equal up to `atol` on numbers (densenet's probabilities differ by up to
    ~7e-4: oxserve's image resampling is not PIL's)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= atol
    return a == b


def agreement(answers: list[bytes]) -> str:
    if len(set(answers)) == 1:
        return "identical answers"
    try:
        values = [json.loads(a) for a in answers]
    except ValueError:
        return "answers DIFFER"
    return "answers agree within 1e-4" if all(close(values[0], v) for v in values[1:]) else "answers DIFFER"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("--only", choices=("native", "python"),
                        help="one case (default: both, native first)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    # SIGTERM and SIGINT unwind (the servers are stopped in `finally`), even where the shell
    # that started us ignores SIGINT (a background job).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    binary = str(Path(args.binary).resolve())
    fx = fixtures()
    all_cases = cases(fx)
    chosen = [all_cases[args.only]] if args.only else [all_cases["native"], all_cases["python"]]
    print(f"load average before: {loadavg()}", file=sys.stderr, flush=True)
    tables = []
    for case in chosen:
        rows = [measure(case, server, binary, fx / "model-store", args)
                for server in ("TorchServe 0.12", "oxserve as torchserve")]
        tables.append((case, rows))
    print(f"load average after: {loadavg()}", file=sys.stderr, flush=True)
    for case, rows in tables:
        print(f"\n{case.name}: {case.title} ({agreement([row[7] for row in rows])})\n")
        base = rows[0][1] or 1.0
        print(f"| server | req/s (concurrency {args.concurrency}) | vs TorchServe | p99 ms | errors | start → first prediction (s) | RSS when serving (MiB) | RSS after the load (MiB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, rps, p99, errors, ready, rss, rss_after, _ in rows:
            print(f"| {name} | {rps:,.1f} | {rps / base:.1f}× | {p99 / 1000:,.1f} | {errors} | {ready:.1f} | {rss:,.0f} | {rss_after:,.0f} |")


if __name__ == "__main__":
    main()
