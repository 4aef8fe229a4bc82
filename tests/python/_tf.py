"""The TensorFlow SavedModel fixtures (scripts/make_tf_models.py) and their reference outputs,
for the tests of oxserve's TensorFlow engine (test_tensorflow.py).

Where the fixtures come from, first match wins:

1. `OXSERVE_TF_MODELS`: a directory the generator made before (it must hold references.json);
2. the generator itself, run with the Python of the TensorFlow venv
   (`$OXSERVE_CACHE/venv-tf/bin/python scripts/make_tf_models.py --if-needed`, OXSERVE_CACHE
   defaulting to ~/.cache/oxserve); it prints the directory as its last stdout line.

`skip_reason()` says why the TensorFlow tests cannot run here (no TensorFlow venv to make the
fixtures, or no TensorFlow C library for the server: both come from
scripts/setup-tensorflow.sh), or "" when they can. A generator that exists but fails, or an
OXSERVE_TF_MODELS that is not a fixture directory, fails instead (never a silent skip).

The JSON files (see the generator's docstring): references.json holds
{model: {version: {signature: {"method", "inputs", "outputs"}}}}, each tensor
{"dtype": "DT_*", "shape": [...], "data": [flat]}; signatures.json holds
{model: {version: {signature: {"method_name", "inputs", "outputs"}}}}, each key
{"name", "dtype", "shape"} (-1 = unknown dim).
"""

from __future__ import annotations

import base64
import functools
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import _fixtures

MODELS_ENV = "OXSERVE_TF_MODELS"
LIBRARY_FILE = "libtensorflow_cc.so.2"
LIBRARY_ENV = "OXSERVE__BACKENDS__TENSORFLOW_LIBRARY"
DEFAULT_SIGNATURE = "serving_default"

# TensorFlow dtype -> (numpy dtype, KServe v2 datatype)
DTYPES: dict[str, tuple[object, str]] = {
    "DT_FLOAT": (np.float32, "FP32"),
    "DT_DOUBLE": (np.float64, "FP64"),
    "DT_HALF": (np.float16, "FP16"),
    "DT_BFLOAT16": (ml_dtypes.bfloat16, "BF16"),
    "DT_INT8": (np.int8, "INT8"),
    "DT_INT16": (np.int16, "INT16"),
    "DT_INT32": (np.int32, "INT32"),
    "DT_INT64": (np.int64, "INT64"),
    "DT_UINT8": (np.uint8, "UINT8"),
    "DT_UINT16": (np.uint16, "UINT16"),
    "DT_UINT32": (np.uint32, "UINT32"),
    "DT_UINT64": (np.uint64, "UINT64"),
    "DT_BOOL": (np.bool_, "BOOL"),
    "DT_STRING": (np.object_, "BYTES"),
}


def cache_dir() -> Path:
    return _fixtures.cache_dir()


def venv_python() -> Path:
    return _fixtures.venv_python("venv-tf")


def tensorflow_library() -> Path | None:
    """The library the server would find by itself (crates/oxserve-tensorflow/src/library.rs):
    OXSERVE__BACKENDS__TENSORFLOW_LIBRARY (the file or its directory), else
    <cache>/tensorflow/<version>/lib/libtensorflow_cc.so.2. None when there is none."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        path = Path(explicit)
        path = path / LIBRARY_FILE if path.is_dir() else path
        return path if path.is_file() else None
    found = sorted((cache_dir() / "tensorflow").glob(f"*/lib/{LIBRARY_FILE}"))
    return found[-1] if found else None


def skip_reason() -> str:
    """Why the TensorFlow tests cannot run on this machine, or "" when they can."""
    if tensorflow_library() is None:
        where = os.environ.get(LIBRARY_ENV) or f"{cache_dir()}/tensorflow/<version>/lib/{LIBRARY_FILE}"
        return (f"TensorFlow C library not found ({where}); run scripts/setup-tensorflow.sh "
                f"or set {LIBRARY_ENV}")
    if not os.environ.get(MODELS_ENV) and not venv_python().is_file():
        return (f"no TensorFlow venv ({venv_python()}) to generate the SavedModel fixtures; run "
                f"scripts/setup-tensorflow.sh, or set {MODELS_ENV} to a directory made by "
                "scripts/make_tf_models.py")
    return ""


@functools.lru_cache(maxsize=None)
def models_dir() -> Path:
    """The fixture directory (see the module docstring); fails the caller when it cannot be had."""
    return _fixtures.generated(MODELS_ENV, "venv-tf", "scripts/make_tf_models.py",
                               ["references.json", "signatures.json"], timeout=1200)


@functools.lru_cache(maxsize=None)
def references() -> dict:
    return json.loads((models_dir() / "references.json").read_text())


@functools.lru_cache(maxsize=None)
def signatures() -> dict:
    return json.loads((models_dir() / "signatures.json").read_text())


def served_signatures(model: str, version: str) -> dict[str, dict]:
    """The model version's signatures, less `__saved_model_init_op` (not an entry point)."""
    return {name: sig for name, sig in signatures()[model][version].items()
            if not name.startswith("__") and sig.get("method_name")}


def _element(value, dtype: str):
    if dtype == "DT_STRING":
        if isinstance(value, dict):
            return base64.b64decode(value["b64"])
        return value.encode("utf-8")
    return value


def to_numpy(tensor: dict) -> np.ndarray:
    """A references.json tensor as the numpy array tritonclient takes and returns."""
    np_dtype, _ = DTYPES[tensor["dtype"]]
    data = [_element(v, tensor["dtype"]) for v in tensor["data"]]
    if tensor["dtype"] == "DT_STRING":
        arr = np.empty(len(data), dtype=object)
        arr[:] = data
    elif tensor["dtype"] == "DT_BFLOAT16":
        arr = np.array(data, dtype=np.float32).astype(ml_dtypes.bfloat16)
    else:
        arr = np.array(data, dtype=np_dtype)
    return arr.reshape(tensor["shape"])


def wire_type(tensor: dict) -> str:
    return DTYPES[tensor["dtype"]][1]


def is_utf8_text(tensor: dict) -> bool:
    """False for DT_STRING tensors holding non-UTF-8 bytes ({"b64": ...}): no JSON form."""
    return not any(isinstance(v, dict) for v in tensor["data"])


def model_is_batched(model: str, version: str) -> bool:
    """Triton's auto-complete: batching (max_batch_size > 0) when every tensor of the default
    signature has a leading -1 dim."""
    sig = signatures()[model][version][DEFAULT_SIGNATURE]
    shapes = [t["shape"] for t in (*sig["inputs"].values(), *sig["outputs"].values())]
    return all(s and s[0] == -1 for s in shapes)


def needs_trailing_one(model: str, version: str, signature: str, kind: str, name: str) -> bool:
    """Whether the tensor travels with an extra trailing dim of 1: on the default signature, a
    tensor left with no dims once the batch dim is dropped (batched [-1]) or a scalar of an
    unbatched model gets config dims [1] with reshape [] (Triton's auto-complete), so the
    client sends [N, 1] (or [1]) for it. Other signatures use the signature's own shapes."""
    if signature != DEFAULT_SIGNATURE:
        return False
    shape = signatures()[model][version][signature][kind][name]["shape"]
    if shape is None:
        return False
    rank_left = len(shape) - (1 if model_is_batched(model, version) else 0)
    return rank_left == 0


def assert_matches(name: str, have: np.ndarray, want: np.ndarray) -> None:
    """Reference comparison: exact for integers, booleans and strings; FP32/FP64 within 1e-5
    relative (with an absolute floor of 1e-5 of the tensor's largest magnitude, since the server
    may batch rows differently and reorder a reduction); FP16 / BF16 within their own precision
    (2^-10, 2^-7 relative)."""
    assert have is not None, f"output {name} missing"
    assert have.shape == want.shape, (name, have.shape, want.shape)
    if want.dtype == object:
        got = [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in have.ravel()]
        assert got == list(want.ravel()), (name, got, list(want.ravel()))
        return
    assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
    if want.dtype.kind in "iub":
        np.testing.assert_array_equal(have, want, err_msg=name)
        return
    if want.dtype == np.float16:
        rtol = 2.0**-10
    elif want.dtype == ml_dtypes.bfloat16:
        rtol = 2.0**-7
    else:
        rtol = 1e-5
    ref = want.astype(np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    np.testing.assert_allclose(have.astype(np.float64), ref, rtol=rtol, atol=rtol * scale, err_msg=name)
