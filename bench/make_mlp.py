#!/usr/bin/env python3
"""Writes the compute-bound model repository for bench/batching.sh into DIR (a temp dir: the
model is ~68 MiB, far too big for the repository, and rebuilt identically each time).

    .venv/bin/python bench/make_mlp.py DIR [instances]

An MLP x FP32 [N, 64] → 4096 → ReLU → 4096 → ReLU → y FP32 [N, 16]: about 34 MFLOP per row
and 17 M weights, so a request is cheap on the wire and expensive to compute, and a batch
reads the weights once for all its rows. Fixed seed, IR 8 / opset 17, under two names:

  mlp_batched   max_batch_size 32, dynamic_batching { max_queue_delay_microseconds: 500 }
  mlp_plain     max_batch_size 1: every request runs alone (a batching model that names no
                scheduler gets the dynamic batcher, as in Triton, so "off" is spelled this way)

both with `instances` CPU instances (default 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIMS = [64, 4096, 4096, 16]
MAX_BATCH = 32


def graph() -> onnx.GraphProto:
    rng = np.random.default_rng(20261128)
    nodes, inits = [], []
    prev = "x"
    for i, (a, b) in enumerate(zip(DIMS, DIMS[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        last = i == len(DIMS) - 2
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], ["y" if last else f"pre{i}"])]
        if not last:
            nodes.append(helper.make_node("Relu", [f"pre{i}"], [f"h{i}"]))
            prev = f"h{i}"
    return helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIMS[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", DIMS[-1]])],
        inits,
    )


def config(name: str, batching: bool, instances: int) -> str:
    text = f"""name: "{name}"
max_batch_size: {MAX_BATCH if batching else 1}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {DIMS[0]} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {DIMS[-1]} ] }} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
"""
    if batching:
        text += "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
    return text


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    instances = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    model = helper.make_model(graph(), opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="oxserve bench/make_mlp.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    for name, batching in [("mlp_batched", True), ("mlp_plain", False)]:
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "1" / "model.onnx").write_bytes(data)
        (out / name / "config.pbtxt").write_text(config(name, batching, instances))
    return 0


if __name__ == "__main__":
    sys.exit(main())
