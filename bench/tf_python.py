#!/usr/bin/env python3
"""Python TensorFlow's own figures for a SavedModel, for bench/tf_figures.py (run it with the
TensorFlow venv's python, `~/.cache/oxserve/venv-tf/bin/python`):

  default      N threads call the `serving_default` signature with batch-1 random inputs for
               D seconds: requests per second and p99 latency;
  --load-only  the time to import TensorFlow, load the SavedModel and make one call, and the
               process's RSS afterwards.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

start = time.monotonic()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

imported = time.monotonic()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def inputs_for(fn) -> dict:
    spec = fn.structured_input_signature[1]
    out = {}
    for key, t in spec.items():
        shape = [1 if d is None else d for d in t.shape.as_list()]
        out[key] = tf.constant(np.random.default_rng(0).random(shape).astype(t.dtype.as_numpy_dtype))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--load-only", action="store_true")
    args = parser.parse_args()
    load_began = time.monotonic()
    model = tf.saved_model.load(args.model)
    fn = model.signatures["serving_default"]
    feed = inputs_for(fn)
    fn(**feed)
    done = time.monotonic()
    if args.load_only:
        print(json.dumps({"total_s": done - start, "import_s": imported - start, "load_s": done - load_began,
                          "rss_mib": rss_mib()}))
        return
    for _ in range(20):
        fn(**feed)
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    stop = time.monotonic() + args.duration

    def worker(i: int) -> None:
        while True:
            t0 = time.monotonic()
            if t0 >= stop:
                return
            fn(**feed)
            latencies[i].append(time.monotonic() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    all_lat = sorted(x for lat in latencies for x in lat)
    p99 = all_lat[int(len(all_lat) * 0.99)] if all_lat else 0.0
    print(json.dumps({"rps": len(all_lat) / elapsed, "p99_us": int(p99 * 1e6), "requests": len(all_lat)}))


if __name__ == "__main__":
    main()
