"""The fidelity corpus (scripts/make_corpus.py): generating it, reading its cases, sending them
to a server and comparing with the reference outputs of Python onnxruntime.

The corpus is generated into tests/fixtures/corpus/ (git-ignored) on first use and whenever
the generator or the onnx/onnxruntime versions change (`make_corpus.py --if-needed`).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from _server import ROOT

CORPUS = ROOT / "tests" / "fixtures" / "corpus"
ENGINES = ("onnxruntime", "tract")
INT8_QDQ_SLACK = 0.04 * 1.27  # h_scale * max|dequantized W2| (scripts/make_corpus.py)

NP_TO_WIRE = {
    np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16",
    np.dtype(np.int8): "INT8", np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64", np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32", np.dtype(np.uint64): "UINT64", np.dtype(np.bool_): "BOOL",
    np.dtype(np.object_): "BYTES", np.dtype(ml_dtypes.bfloat16): "BF16",
}


@functools.lru_cache(maxsize=None)
def ensure_corpus() -> Path:
    """Generates the corpus when missing or stale; fails the test (never skips) if it cannot."""
    script = ROOT / "scripts" / "make_corpus.py"
    done = subprocess.run(
        [sys.executable, str(script), "--if-needed"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        pytest.fail(
            f"scripts/make_corpus.py failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}",
            pytrace=False,
        )
    return CORPUS


@dataclass(frozen=True)
class Case:
    case: str
    model: str
    batch: int
    tract_load_failure: tuple[str, ...] | None

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(inputs, reference outputs), BF16 and strings restored to what tritonclient takes."""
        data = np.load(ensure_corpus() / "data" / f"{self.case}.npz")
        inputs: dict[str, np.ndarray] = {}
        outputs: dict[str, np.ndarray] = {}
        for key in data.files:
            if key.endswith(".bf16"):
                continue
            kind, name = key.split(".", 1)
            value = data[key]
            if f"{key}.bf16" in data.files:
                value = value.view(ml_dtypes.bfloat16)
            elif value.dtype.kind == "U":
                value = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(value)
            (inputs if kind == "in" else outputs)[name] = value
        return inputs, outputs


@functools.lru_cache(maxsize=None)
def cases() -> tuple[Case, ...]:
    raw = json.loads((ensure_corpus() / "cases.json").read_text())["cases"]
    return tuple(
        Case(c["case"], c["model"], c["batch"], tuple(c["tract_load_failure"]) if c["tract_load_failure"] else None)
        for c in raw
    )


def case_named(name: str) -> Case:
    return next(c for c in cases() if c.case == name)


def infer(server, transport: str, model: str, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """One request through tritonclient: "grpc", "http_binary" or "http_json"."""
    if transport.startswith("http"):
        binary = transport == "http_binary"
        client = httpclient.InferenceServerClient(url=server.http_host, network_timeout=120.0)
        try:
            inputs = []
            for name, arr in feeds.items():
                inp = httpclient.InferInput(name, list(arr.shape), NP_TO_WIRE[arr.dtype])
                inp.set_data_from_numpy(arr, binary_data=binary)
                inputs.append(inp)
            outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
            result = client.infer(model, inputs, outputs=outputs)
            return {n: result.as_numpy(n) for n in names}
        finally:
            client.close()
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        inputs = []
        for name, arr in feeds.items():
            inp = grpcclient.InferInput(name, list(arr.shape), NP_TO_WIRE[arr.dtype])
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
        result = client.infer(model, inputs, outputs=outputs, client_timeout=120.0)
        return {n: result.as_numpy(n) for n in names}
    finally:
        client.close()


def as_bytes(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode("utf-8")


def assert_close(name: str, case: Case, have: np.ndarray, want: np.ndarray, fp32_rel: float = 1e-5) -> float:
    """Asserts the corpus tolerance for one output (test_corpus.py's docstring says which and
    why); `fp32_rel` widens the FP32 one where an engine computes in lower precision on
    purpose. Returns the largest error as a fraction of the tensor's scale (0 for exact types)."""
    assert have.shape == want.shape, (name, have.shape, want.shape)
    if want.dtype == object:
        got = [as_bytes(x) for x in have.ravel()]
        assert got == [as_bytes(x) for x in want.ravel()], (name, got)
        return 0.0
    assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
    if want.dtype.name == "bfloat16" or want.dtype.kind in "iub":
        np.testing.assert_array_equal(have.view(np.uint16) if want.dtype.name == "bfloat16" else have,
                                      want.view(np.uint16) if want.dtype.name == "bfloat16" else want,
                                      err_msg=name)
        return 0.0
    ref = want.astype(np.float64)
    got = have.astype(np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if want.dtype == np.float16:
        rel, slack = 2.0**-9, 0.0
    else:
        rel, slack = fp32_rel, (INT8_QDQ_SLACK if case.model == "int8_qdq" else 0.0)
    bound = rel * (np.abs(ref) + scale) + slack
    excess = np.abs(got - ref) - bound
    worst = int(np.argmax(excess)) if excess.size else 0
    assert not excess.size or excess.flat[worst] <= 0, (
        f"{name}: element {np.unravel_index(worst, ref.shape)} is {got.flat[worst]!r}, reference "
        f"{ref.flat[worst]!r}: off by {abs(got.flat[worst] - ref.flat[worst]):.3g}, allowed "
        f"{bound.flat[worst]:.3g} (tensor scale {scale:.3g})"
    )
    return float(np.max(np.abs(got - ref)) / scale) if ref.size and scale else 0.0
