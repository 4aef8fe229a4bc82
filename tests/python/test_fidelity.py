"""Numerical fidelity: oxserve's outputs equal Python onnxruntime's on the same (seeded
random) inputs, over three transports: HTTP with binary tensors, HTTP with JSON tensors, gRPC.

Tolerances:
- FP32 / FP64: `assert_allclose(rtol=1e-5, atol=0)`. The server may run a different engine
  (tract, or onnxruntime with other threading), which can reorder a reduction (e.g. the dot
  products in Gemm/MatMul) and so differ in the last few bits: a few ulp of f32 (~1e-7
  relative each) stay far below 1e-5. No absolute slack: a wrong small value must still fail.
- Integers and booleans: exact.
- FP16 (fp16_double, y = x + x): exact. Doubling only raises the exponent, so it is exact in
  binary floating point whether an engine computes in f16 or upcasts to f32 and rounds back,
  as long as nothing overflows (inputs are kept within |x| < 1000). FP16 is not sent as JSON:
  the protocol does not carry FP16 in JSON (that case is a 400 in test_bad_input.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from _corpus import infer
from _models import (
    add_sub_inputs,
    fp16_inputs,
    iris_inputs,
    mixed_inputs,
    mlp_inputs,
    ort_run,
    ort_session,
)

CASES = {
    "add_sub": lambda: add_sub_inputs(5, seed=101),
    "iris": lambda: iris_inputs(8, seed=102),
    "autocomplete_mlp": lambda: mlp_inputs(4, seed=103),
    "mixed_types": lambda: mixed_inputs(seed=104),
    "fp16_double": lambda: fp16_inputs(6, seed=105),
}

TRANSPORTS = ["http_binary", "http_json", "grpc"]


def _params():
    for model in CASES:
        for transport in TRANSPORTS:
            if model == "fp16_double" and transport == "http_json":
                continue  # FP16 has no JSON encoding (see module docstring)
            yield pytest.param(model, transport, id=f"{model}-{transport}")


@pytest.mark.parametrize("model,transport", list(_params()))
def test_outputs_match_onnxruntime(server, model, transport):
    feeds = CASES[model]()
    expected = ort_run(model, feeds)
    names = [o.name for o in ort_session(model).get_outputs()]
    got = infer(server, transport, model, feeds, names)
    for name in names:
        want, have = expected[name], got[name]
        assert have is not None, f"output {name} missing"
        assert have.shape == want.shape, (name, have.shape, want.shape)
        assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
        if want.dtype in (np.float32, np.float64):
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=0, err_msg=name)
        else:
            # ints, bools: exact; fp16: exact (see module docstring)
            np.testing.assert_array_equal(have, want, err_msg=name)
