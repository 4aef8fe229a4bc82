#!/usr/bin/env python3
"""Ensemble figures (BENCHMARKS.md, "Ensembles (issue 16)"): a Triton ensemble served in one call
against its steps called one after another by the client, against one server in one run.

The repository is tests/fixtures/ensemble (scripts/make_ensemble_models.py), served in explicit
model control mode with ens_pre, ens_classify, ens_post and the ensemble ens_pipeline loaded:

  (a) ensemble   one ModelInfer to ens_pipeline: RAW FP32 [1,4] in, PROBS FP32 [1,3] and
                 LABEL INT64 [1,1] out (the server runs ens_pre -> ens_classify -> ens_post);
  (b) steps      the same pipeline run by the client: ModelInfer to ens_pre (RAW -> SCALED), its
                 answer's raw bytes sent as X to ens_classify (-> LOGITS), those sent as LOGITS
                 to ens_post (-> PROBS, LABEL); three calls, each waiting for the one before;
  single steps   ens_pre, ens_classify or ens_post alone (one call = one request), for the
                 server CPU of each step measured on its own.

The clients are tritonclient.grpc's generated stubs (service_pb2 / service_pb2_grpc) on grpcio,
batch 1, tensors as raw_input_contents; requests are built once per worker (for (b), the next
call's input bytes are put into the worker's own prebuilt request). Modes are
<what>-<client>, <what> one of ensemble, steps, pre, classify, post, and <client> one of

  c1        one thread calling in a loop (latency: one pipeline in flight);
  threads   N threads (--concurrency, default 16), one shared channel;
  aio       grpc.aio, N coroutines on one channel.

Each mode runs 2 s of warm-up then D seconds measured. For (b) a "request" in the figures is a
whole pipeline (three calls): pipelines per second, latency from sending ens_pre's request to
reading ens_post's answer, CPU per pipeline. Only answers (pipelines) finished within the
window count. Server CPU per pipeline is the server process's user + system time
(/proc/<pid>/stat) over the window divided by the pipelines; client CPU is this process's
(os.times(), all its threads); stderr also gives the CPU the rest of the machine used in the
window (/proc/stat's busy time less the server's and the client's).

The overhead per step, for each client where both (a) and (b) ran, is defined as

  server CPU, vs (b):        (server CPU per pipeline of (a) − of (b)) / 3
  server CPU, vs singles:    (server CPU per pipeline of (a) − (pre + classify + post, each
                              measured alone with the same client)) / 3
  latency:                   (p50 of (a) − p50 of (b)) / 3, and the same for p99

so a negative figure means the ensemble costs less per step than a step called from the client
(it saves two client round trips per pipeline); the server-CPU figures are what the server
spends scheduling a step inside an ensemble beyond what a step costs as a request of its own.

Answers: before measuring, --check-inputs seeded random RAW rows (batch 1, and one batch of 8)
go through (a) and through (b); PROBS and LABEL must agree (bitwise equality is reported, a
difference over 1e-6 or a different LABEL fails the run) and are compared with numpy's
composition of the same constants (scripts/make_ensemble_models.py). The first answer of each
measured mode is checked against numpy too, and every call's error counts.

Before starting, the script waits (up to --wait-load seconds) for the 1-minute load average to
drop below 1.0, since client and server share the machine's cores with any other job. The
server (started in its own session) is stopped on any exit. It prints Markdown tables (stdout)
and per-mode details (stderr).

    .venv/bin/python bench/ensemble_figures.py OXSERVE_BIN [--duration 10] [--warmup 2]
        [--concurrency 16] [--modes ensemble-c1,steps-c1,...] [--check-inputs 200]
        [--wait-load 600]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

import _grpc_bench
from _grpc_bench import Window, loadavg, stop_server, wait_for_quiet

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "tests" / "fixtures" / "ensemble"
ENSEMBLE = "ens_pipeline"
STEPS = ("ens_pre", "ens_classify", "ens_post")
WHATS = ("ensemble", "steps", "pre", "classify", "post")
CLIENTS = ("c1", "threads", "aio")
DEFAULT_MODES = ("ensemble-c1", "steps-c1", "ensemble-threads", "steps-threads", "ensemble-aio",
                 "steps-aio", "pre-c1", "classify-c1", "post-c1", "pre-threads", "classify-threads",
                 "post-threads", "pre-aio", "classify-aio", "post-aio")
# One iris-like row (cm): what every measured request sends.
RAW = np.array([[6.1, 2.8, 4.7, 1.2]], dtype=np.float32)

sys.path.insert(0, str(ROOT / "scripts"))
import make_ensemble_models as mem  # noqa: E402  (MEAN, STD, the classifier's seeded weights)

W, B = mem.classify_weights()


def reference(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """numpy's composition: SCALED, LOGITS, PROBS, LABEL."""
    scaled = (raw - mem.MEAN) / mem.STD
    logits = scaled @ W + B
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    return scaled, logits, probs, logits.argmax(axis=-1).reshape(-1, 1).astype(np.int64)


# --- requests -----------------------------------------------------------------------------

def infer_request(model: str, name: str, data: np.ndarray) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model)
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = name, "FP32"
    tensor.shape.extend(data.shape)
    req.raw_input_contents.append(np.ascontiguousarray(data, dtype=np.float32).tobytes())
    return req


class Requests:
    """One worker's prebuilt requests; the chained ones get their input bytes per call, so a
    worker's requests must not be shared with another worker."""

    def __init__(self, raw: np.ndarray = RAW) -> None:
        n = raw.shape[0]
        self.ensemble = infer_request(ENSEMBLE, "RAW", raw)
        self.pre = infer_request("ens_pre", "RAW", raw)
        self.classify = infer_request("ens_classify", "X", np.zeros((n, 4), np.float32))
        self.post = infer_request("ens_post", "LOGITS", np.zeros((n, 3), np.float32))
        scaled, logits, _, _ = reference(raw)
        self.single = {"pre": self.pre,
                       "classify": infer_request("ens_classify", "X", scaled),
                       "post": infer_request("ens_post", "LOGITS", logits)}


def steps_sync(stub, r: Requests) -> service_pb2.ModelInferResponse:
    """(b): pre -> classify -> post, each answer's raw output bytes fed to the next call."""
    r.classify.raw_input_contents[0] = stub.ModelInfer(r.pre).raw_output_contents[0]
    r.post.raw_input_contents[0] = stub.ModelInfer(r.classify).raw_output_contents[0]
    return stub.ModelInfer(r.post)


async def steps_aio(stub, r: Requests) -> service_pb2.ModelInferResponse:
    r.classify.raw_input_contents[0] = (await stub.ModelInfer(r.pre)).raw_output_contents[0]
    r.post.raw_input_contents[0] = (await stub.ModelInfer(r.classify)).raw_output_contents[0]
    return await stub.ModelInfer(r.post)


def outputs(resp: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {o.name: np.frombuffer(raw, dtype=dtypes[o.datatype]).reshape(tuple(o.shape))
            for o, raw in zip(resp.outputs, resp.raw_output_contents)}


def check(what: str, resp: service_pb2.ModelInferResponse, raw: np.ndarray = RAW) -> None:
    """One answer against numpy's composition (FP32 within 1e-5, LABEL exact)."""
    scaled, logits, probs, label = reference(raw)
    want = {"pre": {"SCALED": scaled}, "classify": {"LOGITS": logits},
            "post": {"PROBS": probs, "LABEL": label}}.get(what, {"PROBS": probs, "LABEL": label})
    got = outputs(resp)
    for name, value in want.items():
        g = got.get(name)
        if g is None or g.shape != value.shape or g.dtype != value.dtype or not (
                np.array_equal(g, value) if g.dtype == np.int64 else np.allclose(g, value, atol=1e-5)):
            raise SystemExit(f"{what}: wrong answer for {name}: {g!r}, expected {value!r}")


def compare_answers(target: str, n: int) -> str:
    """(a) against (b) on n seeded random rows (batch 1) and one batch of 8."""
    channel = grpc.insecure_channel(target)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(16)
    raws = [(mem.MEAN + mem.STD * rng.normal(size=(1, 4))).astype(np.float32) for _ in range(n)]
    raws.append((mem.MEAN + mem.STD * rng.normal(size=(8, 4))).astype(np.float32))
    identical, max_diff, max_ref = 0, 0.0, 0.0
    for raw in raws:
        r = Requests(raw)
        a, b = outputs(stub.ModelInfer(r.ensemble)), outputs(steps_sync(stub, r))
        if a.keys() != {"PROBS", "LABEL"} or b.keys() != {"PROBS", "LABEL"}:
            raise SystemExit(f"outputs: ensemble {sorted(a)}, steps {sorted(b)}")
        if a["PROBS"].shape != (raw.shape[0], 3) or a["LABEL"].shape != (raw.shape[0], 1):
            raise SystemExit(f"shapes: {a['PROBS'].shape}, {a['LABEL'].shape}")
        diff = float(np.abs(a["PROBS"] - b["PROBS"]).max())
        if diff > 1e-6 or not np.array_equal(a["LABEL"], b["LABEL"]):
            raise SystemExit(f"ensemble and steps disagree on {raw}: {a} vs {b}")
        identical += a["PROBS"].tobytes() == b["PROBS"].tobytes()
        max_diff = max(max_diff, diff)
        _, _, probs, _ = reference(raw)
        max_ref = max(max_ref, float(np.abs(a["PROBS"] - probs).max()))
    channel.close()
    return (f"(a) and (b) agree on {len(raws)} requests ({n} × 1 row, 1 × 8 rows): LABEL equal, "
            f"PROBS bitwise identical in {identical}, max |Δ| {max_diff:.1e}; max |Δ| to numpy "
            f"{max_ref:.1e}")


# --- measuring ----------------------------------------------------------------------------

def run_threads(what: str, target: str, concurrency: int, duration: float) -> Window:
    channel = grpc.insecure_channel(target)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    per = [Window() for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(w: Window) -> None:
        r = Requests()
        if what == "steps":
            call = lambda: steps_sync(stub, r)  # noqa: E731
        else:
            req = r.ensemble if what == "ensemble" else r.single[what]
            call = lambda: stub.ModelInfer(req)  # noqa: E731
        start.wait()
        lat, perf = w.latencies, time.perf_counter
        while True:
            t0 = perf()
            if t0 >= stop_at[0]:
                return
            try:
                resp = call()
            except grpc.RpcError:
                w.errors += 1
                continue
            t1 = perf()
            if t1 <= stop_at[0]:
                lat.append(t1 - t0)
            if w.first is None:
                w.first = resp

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in per]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + duration
    start.wait()
    for t in threads:
        t.join()
    channel.close()
    out = Window(elapsed=duration, first=per[0].first)
    for p in per:
        out.latencies += p.latencies
        out.errors += p.errors
    return out


async def run_aio(what: str, target: str, concurrency: int, duration: float) -> Window:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        w = Window(elapsed=duration)
        perf = time.perf_counter
        stop_at = perf() + duration

        async def worker() -> None:
            r = Requests()
            req = r.ensemble if what == "ensemble" else r.single.get(what)
            while True:
                t0 = perf()
                if t0 >= stop_at:
                    return
                try:
                    resp = await (steps_aio(stub, r) if what == "steps" else stub.ModelInfer(req))
                except grpc.RpcError:
                    w.errors += 1
                    continue
                t1 = perf()
                if t1 <= stop_at:
                    w.latencies.append(t1 - t0)
                if w.first is None:
                    w.first = resp

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return w


def run_mode(mode: str, target: str, concurrency: int, duration: float) -> Window:
    what, client = mode.split("-")
    if client == "c1":
        return run_threads(what, target, 1, duration)
    if client == "threads":
        return run_threads(what, target, concurrency, duration)
    return asyncio.run(run_aio(what, target, concurrency, duration))


# --- server -------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


# --- main ---------------------------------------------------------------------------------

def start_server(binary: str) -> tuple[subprocess.Popen, str]:
    models = (*STEPS, ENSEMBLE)
    proc, target = _grpc_bench.start_server(binary, REPOSITORY, models)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            engines = []
            for m in models:
                c = stub.ModelConfig(service_pb2.ModelConfigRequest(name=m)).config
                groups = ", ".join(f"{g.count}× {type(g).Kind.Name(g.kind)}"
                                   for g in c.instance_group)
                engines.append(f"{m}: {c.platform or c.backend} [{groups}]")
            print("models: " + "; ".join(engines), file=sys.stderr, flush=True)
            r = Requests()
            check("ensemble", stub.ModelInfer(r.ensemble))
            check("steps", steps_sync(stub, r))
        return proc, target
    except BaseException:
        stop_server(proc)
        raise


def measure(mode: str, target: str, pid: int, args) -> dict:
    run_mode(mode, target, args.concurrency, args.warmup)
    w, figures = _grpc_bench.measured_window(
        lambda: run_mode(mode, target, args.concurrency, args.duration), pid, mode)
    what, client = mode.split("-")
    check(what, w.first)
    n = figures["requests"]
    row = {"mode": mode, "what": what, "client": client,
           "in_flight": 1 if client == "c1" else args.concurrency, **figures}
    unit = "pipeline" if what in ("ensemble", "steps") else "request"
    print(f"  {mode}: {row['rps']:,.0f} {unit}s/s, {n} {unit}s, {w.errors} errors, p50 "
          f"{row['p50']:,.0f} µs, p99 {row['p99']:,.0f} µs; server CPU {row['server_us']:.1f} "
          f"µs/{unit} ({row['server_cores']:.2f} cores), client CPU {row['client_us']:.1f} "
          f"µs/{unit} ({row['client_cores']:.2f} cores), everything else "
          f"{row['other_cores']:.2f} cores; load average {loadavg()}",
          file=sys.stderr, flush=True)
    return row


CLIENT_WORDS = {"c1": "1 thread, 1 in flight", "threads": "{c} threads", "aio": "grpc.aio, {c} in flight"}
WHAT_WORDS = {"ensemble": "(a) ens_pipeline, 1 call", "steps": "(b) pre → classify → post, 3 calls",
              "pre": "ens_pre alone", "classify": "ens_classify alone", "post": "ens_post alone"}


def tables(rows: list[dict], concurrency: int, answers: str) -> None:
    c = concurrency
    print("\n| mode (batch 1) | client | pipelines/s (singles: req/s) | p50 µs | p99 µs | "
          "server CPU µs/pipeline (singles: /req) | client CPU µs/pipeline (cores) | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {WHAT_WORDS[r['what']]} | {CLIENT_WORDS[r['client']].format(c=c)} | {r['rps']:,.0f} | "
              f"{r['p50']:,.0f} | {r['p99']:,.0f} | {r['server_us']:.1f} | "
              f"{r['client_us']:.1f} ({r['client_cores']:.2f}) | {r['errors']} |")
    by = {r["mode"]: r for r in rows}
    print("\n| client | (a)/(b) pipelines/s | server CPU per step, (a − b)/3 µs | "
          "server CPU per step, (a − Σ singles)/3 µs | p50 per step, (a − b)/3 µs | "
          "p99 per step, (a − b)/3 µs |")
    print("|---|---:|---:|---:|---:|---:|")
    for client in CLIENTS:
        a, b = by.get(f"ensemble-{client}"), by.get(f"steps-{client}")
        if not (a and b):
            continue
        singles = [by.get(f"{s}-{client}") for s in ("pre", "classify", "post")]
        vs_singles = (f"{(a['server_us'] - sum(s['server_us'] for s in singles)) / 3:+.1f}"
                      if all(singles) else "–")
        print(f"| {CLIENT_WORDS[client].format(c=c)} | {a['rps'] / b['rps']:.2f}× | "
              f"{(a['server_us'] - b['server_us']) / 3:+.1f} | {vs_singles} | "
              f"{(a['p50'] - b['p50']) / 3:+,.0f} | {(a['p99'] - b['p99']) / 3:+,.0f} |")
    fast = [(by[f"ensemble-{cl}"]["rps"], cl) for cl in ("threads", "aio") if f"ensemble-{cl}" in by]
    if fast:
        print(f"\nFaster {c}-in-flight client for (a): {max(fast)[1]}", end="")
        fast_b = [(by[f"steps-{cl}"]["rps"], cl) for cl in ("threads", "aio") if f"steps-{cl}" in by]
        print(f"; for (b): {max(fast_b)[1]}." if fast_b else ".")
    print(f"\n{answers}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated, in order (default: {','.join(DEFAULT_MODES)})")
    parser.add_argument("--check-inputs", type=int, default=200,
                        help="random single-row inputs sent through (a) and (b) before measuring")
    parser.add_argument("--wait-load", type=float, default=600.0,
                        help="seconds to wait for the 1-minute load average to drop below 1.0")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        what, _, client = m.partition("-")
        if what not in WHATS or client not in CLIENTS:
            parser.error(f"unknown mode {m}")
    # SIGTERM and SIGINT unwind, so the server is stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    binary = str(Path(args.binary).resolve())
    wait_for_quiet(args.wait_load)
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {binary}, {os.cpu_count()} cores, "
          f"grpcio {grpc.__version__}", file=sys.stderr, flush=True)
    proc, target = start_server(binary)
    try:
        if kids := children(proc.pid):
            print(f"warning: the server has child processes {kids}, whose CPU is not counted",
                  file=sys.stderr, flush=True)
        answers = compare_answers(target, args.check_inputs)
        print(answers, file=sys.stderr, flush=True)
        rows = [measure(m, target, proc.pid, args) for m in modes]
    finally:
        stop_server(proc)
    print(f"load average after: {loadavg()}", file=sys.stderr, flush=True)
    tables(rows, args.concurrency, answers)


if __name__ == "__main__":
    main()
