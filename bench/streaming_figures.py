#!/usr/bin/env python3
"""Streaming figures (BENCHMARKS.md, "Streaming inference (issue 16)"): Triton's bidirectional
ModelStreamInfer against unary ModelInfer on add_sub (FP32 [1,16] INPUT0/INPUT1, batch 1,
inputs as raw_input_contents), at 16 requests in flight, against one server in one run.

The clients are tritonclient.grpc's generated stubs (service_pb2 / service_pb2_grpc) on grpcio,
not the high-level client (no InferInput/InferResult objects per request). One ModelInferRequest
is built once and sent over and over. Modes, each 2 s of warm-up then D seconds measured:

  unary-threads    16 threads, each calling ModelInfer in a loop (one shared channel);
  unary-aio        grpc.aio, 16 coroutines each awaiting ModelInfer in a loop (one channel);
  stream-aio       one ModelStreamInfer stream (grpc.aio) with 16 requests kept in flight: a new
                   request is written whenever an answer arrives;
  stream-threads   the same with the synchronous API (a request generator fed from a queue,
                   answers read on the main thread);
  streams16-aio    16 streams (grpc.aio, one channel), one request in flight on each.

Latency is send-to-answer per request (for a stream: from writing the request to reading its
answer; the server answers in order, so answers are matched to send times first in, first
out). Only answers that arrive within the measured window count. Server CPU per request is the
server process's user + system time (/proc/<pid>/stat) over the window divided by the answers;
client CPU is this process's (os.times(), all its threads, grpcio's included), per request and as
a share of one core; stderr also gives the CPU the rest of the machine used in the window
(/proc/stat's busy time less the server's and the client's), which shows whether another job
shared the cores. Every answer is checked for an error message; the first of each mode is
checked against INPUT0 + INPUT1.

Before starting, the script waits (up to --wait-load seconds) for the 1-minute load average to
drop below 1.0, since client and server share the machine's cores with any other job. The
server (started in its own session) is stopped on any exit. It prints a Markdown table (stdout)
and per-mode details (stderr).

    .venv/bin/python bench/streaming_figures.py OXSERVE_BIN [--duration 10] [--warmup 2]
        [--concurrency 16] [--modes unary-threads,unary-aio,...] [--wait-load 600]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import queue
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
MODEL = "add_sub"
A = np.arange(16, dtype=np.float32).reshape(1, 16)
B = np.ones((1, 16), dtype=np.float32)
MODES = ("unary-threads", "unary-aio", "stream-aio", "stream-threads", "streams16-aio")
DESCRIPTIONS = {
    "unary-threads": "unary ModelInfer, {c} threads",
    "unary-aio": "unary ModelInfer, grpc.aio, {c} concurrent calls",
    "stream-aio": "1 ModelStreamInfer stream, {c} in flight (grpc.aio)",
    "stream-threads": "1 ModelStreamInfer stream, {c} in flight (sync API, request generator)",
    "streams16-aio": "{c} ModelStreamInfer streams, 1 in flight each (grpc.aio)",
}


def request() -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    for name in ("INPUT0", "INPUT1"):
        tensor = req.inputs.add()
        tensor.name, tensor.datatype = name, "FP32"
        tensor.shape.extend([1, 16])
    req.raw_input_contents.extend([A.tobytes(), B.tobytes()])
    return req


def check(resp: service_pb2.ModelInferResponse) -> None:
    """The first answer of each mode: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    outputs = {o.name: np.frombuffer(raw, dtype=np.float32)
               for o, raw in zip(resp.outputs, resp.raw_output_contents)}
    if not (np.array_equal(outputs.get("OUTPUT0"), (A + B).ravel())
            and np.array_equal(outputs.get("OUTPUT1"), (A - B).ravel())):
        raise SystemExit(f"wrong answer: {resp}")


# --- unary --------------------------------------------------------------------------------

def unary_threads(target: str, concurrency: int, duration: float) -> Window:
    req = request()
    channel = grpc.insecure_channel(target)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    per = [Window() for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(w: Window) -> None:
        start.wait()
        lat, perf = w.latencies, time.perf_counter
        while True:
            t0 = perf()
            if t0 >= stop_at[0]:
                return
            try:
                resp = stub.ModelInfer(req)
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
    began = time.perf_counter()
    stop_at[0] = began + duration
    start.wait()
    for t in threads:
        t.join()
    channel.close()
    return merge(per, duration, per[0].first)


async def unary_aio(target: str, concurrency: int, duration: float) -> Window:
    req = request()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        w = Window()
        perf = time.perf_counter
        stop_at = perf() + duration

        async def worker() -> None:
            while True:
                t0 = perf()
                if t0 >= stop_at:
                    return
                try:
                    resp = await stub.ModelInfer(req)
                except grpc.RpcError:
                    w.errors += 1
                    continue
                t1 = perf()
                if t1 <= stop_at:
                    w.latencies.append(t1 - t0)
                if w.first is None:
                    w.first = resp

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        w.elapsed = duration
        return w


# --- streams ------------------------------------------------------------------------------

async def aio_stream(stub, req, in_flight: int, stop_at: float, w: Window) -> None:
    """One stream with `in_flight` requests kept outstanding until stop_at, then drained. A
    writer and a reader task, so that a write and a read can be pending at once: the reader frees
    a slot for each answer, the writer writes a request for each free slot."""
    perf = time.perf_counter
    call = stub.ModelStreamInfer()
    sent: collections.deque[float] = collections.deque()
    slots = asyncio.Semaphore(in_flight)
    written = [0]

    async def writer() -> None:
        while True:
            await slots.acquire()
            if perf() >= stop_at:
                break
            sent.append(perf())
            written[0] += 1
            await call.write(req)
        await call.done_writing()

    async def reader() -> None:
        answered = 0
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                w.errors += written[0] - answered
                return
            t1 = perf()
            t0 = sent.popleft()
            answered += 1
            if resp.error_message:
                w.errors += 1
            elif t1 <= stop_at:
                w.latencies.append(t1 - t0)
                if w.first is None:
                    w.first = resp.infer_response
            slots.release()

    await asyncio.gather(writer(), reader())


async def streams_aio(target: str, streams: int, in_flight: int, duration: float) -> Window:
    req = request()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        w = Window()
        stop_at = time.perf_counter() + duration
        await asyncio.gather(*(aio_stream(stub, req, in_flight, stop_at, w) for _ in range(streams)))
        w.elapsed = duration
        return w


def stream_threads(target: str, in_flight: int, duration: float) -> Window:
    """The synchronous API: grpcio consumes the request iterator on a thread of its own; the
    main thread reads the answers and queues a new request for each."""
    req = request()
    channel = grpc.insecure_channel(target)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    perf = time.perf_counter
    todo: queue.SimpleQueue = queue.SimpleQueue()
    sent: collections.deque[float] = collections.deque()

    def requests():
        while True:
            item = todo.get()
            if item is None:
                return
            sent.append(perf())
            yield req

    w = Window()
    stop_at = perf() + duration
    for _ in range(in_flight):
        todo.put(1)
    outstanding = in_flight
    answers = stub.ModelStreamInfer(requests())
    for resp in answers:
        t1 = perf()
        t0 = sent.popleft()
        outstanding -= 1
        if resp.error_message:
            w.errors += 1
        elif t1 <= stop_at:
            w.latencies.append(t1 - t0)
            if w.first is None:
                w.first = resp.infer_response
        if t1 < stop_at:
            outstanding += 1
            todo.put(1)
        elif outstanding == 0:
            todo.put(None)  # ends the request stream; the server then ends the answers
    channel.close()
    w.elapsed = duration
    return w


def merge(parts: list[Window], duration: float, first) -> Window:
    out = Window(elapsed=duration, first=first)
    for p in parts:
        out.latencies += p.latencies
        out.errors += p.errors
    return out


def run_mode(mode: str, target: str, concurrency: int, duration: float) -> Window:
    if mode == "unary-threads":
        return unary_threads(target, concurrency, duration)
    if mode == "unary-aio":
        return asyncio.run(unary_aio(target, concurrency, duration))
    if mode == "stream-aio":
        return asyncio.run(streams_aio(target, 1, concurrency, duration))
    if mode == "stream-threads":
        return stream_threads(target, concurrency, duration)
    if mode == "streams16-aio":
        return asyncio.run(streams_aio(target, concurrency, 1, duration))
    raise ValueError(mode)


# --- server -------------------------------------------------------------------------------

def start_server(binary: str) -> tuple[subprocess.Popen, str]:
    proc, target = _grpc_bench.start_server(binary, ROOT / "examples/models", (MODEL,))
    try:
        with grpc.insecure_channel(target) as channel:
            check(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request()))
        return proc, target
    except BaseException:
        stop_server(proc)
        raise


# --- main ---------------------------------------------------------------------------------

def measure(mode: str, target: str, pid: int, args) -> dict:
    run_mode(mode, target, args.concurrency, args.warmup)
    w, figures = _grpc_bench.measured_window(
        lambda: run_mode(mode, target, args.concurrency, args.duration), pid, mode)
    check(w.first)
    n = figures["requests"]
    row = {"mode": mode, **figures}
    print(f"  {mode}: {row['rps']:,.0f} req/s, {n} answers, {w.errors} errors, p50 "
          f"{row['p50']:,.0f} µs, p99 {row['p99']:,.0f} µs; server CPU {row['server_us']:.1f} "
          f"µs/request ({row['server_cores']:.2f} cores), client CPU {row['client_us']:.1f} "
          f"µs/request ({row['client_cores']:.2f} cores), everything else {row['other_cores']:.2f} cores; "
          f"load average {loadavg()}",
          file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, in order (default: {','.join(MODES)})")
    parser.add_argument("--wait-load", type=float, default=600.0,
                        help="seconds to wait for the 1-minute load average to drop below 1.0")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
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
        rows = [measure(m, target, proc.pid, args) for m in modes]
    finally:
        stop_server(proc)
    print(f"load average after: {loadavg()}", file=sys.stderr, flush=True)
    unary = [r for r in rows if r["mode"].startswith("unary")]
    base = max(unary, key=lambda r: r["rps"]) if unary else None
    c = args.concurrency
    print(f"\n| add_sub, batch 1, {c} in flight | req/s | vs best unary | p50 µs | p99 µs | "
          f"server CPU µs/req | client CPU µs/req (cores) | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['rps'] / base['rps']:.2f}×" if base else "–"
        print(f"| {DESCRIPTIONS[r['mode']].format(c=c)} | {r['rps']:,.0f} | {ratio} | {r['p50']:,.0f} | "
              f"{r['p99']:,.0f} | {r['server_us']:.1f} | {r['client_us']:.1f} ({r['client_cores']:.2f}) | "
              f"{r['errors']} |")


if __name__ == "__main__":
    main()
