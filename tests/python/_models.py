"""Facts about the example/fixture models (made by scripts/make_models.py) and reference
outputs computed with Python onnxruntime, the original runtime (never with oxserve's code)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from _server import ROOT

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

MODEL_FILES = {
    "add_sub": "examples/models/add_sub/1/model.onnx",
    "iris": "examples/models/iris/1/model.onnx",
    "string_identity": "tests/fixtures/models/string_identity/1/model.onnx",
    "fp16_double": "tests/fixtures/models/fp16_double/1/model.onnx",
    "mixed_types": "tests/fixtures/models/mixed_types/1/model.onnx",
    "autocomplete_mlp": "tests/fixtures/models/autocomplete_mlp/1/model.onnx",
    "reshape_model": "tests/fixtures/models/reshape_model/1/model.onnx",
}

# Every model the main test server serves (examples/models + tests/fixtures/models).
MAIN_MODELS = sorted(MODEL_FILES)

IRIS_LABELS = ["setosa", "versicolor", "virginica"]

EXPECTED_EXTENSIONS = {
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "parameters",
    "statistics",
    "schedule_policy",
    "system_shared_memory",
    "logging",
}


@functools.lru_cache(maxsize=None)
def ort_session(model: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(ROOT / MODEL_FILES[model]), opts, providers=["CPUExecutionProvider"]
    )


def ort_run(model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def add_sub_inputs(batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    r = rng(seed)
    return {
        "INPUT0": r.normal(0, 10, size=(batch, 16)).astype(np.float32),
        "INPUT1": r.normal(0, 10, size=(batch, 16)).astype(np.float32),
    }


def iris_inputs(batch: int, seed: int = 2) -> dict[str, np.ndarray]:
    r = rng(seed)
    # Roughly iris-like magnitudes (cm).
    return {"features": r.uniform(0.1, 8.0, size=(batch, 4)).astype(np.float32)}


def mlp_inputs(batch: int, seed: int = 3) -> dict[str, np.ndarray]:
    return {"x": rng(seed).normal(0, 2, size=(batch, 4)).astype(np.float32)}


def fp16_inputs(batch: int, seed: int = 4) -> dict[str, np.ndarray]:
    # |x| < 1000 so x + x never overflows FP16 (max 65504).
    return {"INPUT0": rng(seed).uniform(-1000, 1000, size=(batch, 4)).astype(np.float16)}


def mixed_inputs(seed: int = 5) -> dict[str, np.ndarray]:
    r = rng(seed)
    # A stays inside the INT32 range: Cast(INT64 -> INT32) of larger values is
    # implementation-defined in ONNX, so it says nothing about the server.
    a = r.integers(-1_000_000, 1_000_000, size=3, dtype=np.int64)
    b = a.astype(np.float64) + r.choice([-0.5, 0.0, 0.5], size=3, replace=False)
    return {"A": a, "B": b}


# BYTES test strings: ASCII, non-ASCII UTF-8, empty, and longer than 255 bytes.
STRINGS = ["hello", "héllo wörld", "", "日本語 ✓ 🚀", "a" * 300, ""]


def as_text(x) -> str:
    """A BYTES element as returned by tritonclient: bytes (binary) or str (JSON)."""
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def check_classification(strings: np.ndarray, probs: np.ndarray, count: int) -> None:
    """`strings` [batch, count] of "<value>:<index>:<label>", ordered by descending value."""
    assert strings.shape == (probs.shape[0], count), strings.shape
    for row, expected_row in zip(strings, probs):
        order = np.argsort(-expected_row, kind="stable")[:count]
        values = []
        for k, item in enumerate(row):
            parts = as_text(item).split(":")
            assert len(parts) == 3, f"not value:index:label: {item!r}"
            value, index, label = float(parts[0]), int(parts[1]), parts[2]
            assert index == order[k], (row, expected_row)
            assert label == IRIS_LABELS[index]
            # The value is printed as text; compare numerically.
            assert value == pytest.approx(float(expected_row[index]), rel=1e-5, abs=1e-6)
            values.append(value)
        assert values == sorted(values, reverse=True)
