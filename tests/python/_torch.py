"""The TorchScript fixtures (scripts/make_torch_models.py) and their reference outputs, for the
tests of oxserve's PyTorch engine (test_torch.py).

Where the fixtures come from, first match wins:

1. `OXSERVE_TORCH_MODELS`: a directory the generator made before (it must hold
   references.json and repo/);
2. the generator itself, run with the Python of the PyTorch venv
   (`$OXSERVE_CACHE/venv-torch/bin/python scripts/make_torch_models.py --if-needed`,
   OXSERVE_CACHE defaulting to ~/.cache/oxserve, CPU only); it prints the directory as its last
   stdout line.

`skip_reason()` says why the PyTorch tests cannot run here (no PyTorch venv to make the
fixtures, from scripts/setup-torch.sh, and no OXSERVE_TORCH_MODELS), or "" when they can. A
generator that exists but fails, or an OXSERVE_TORCH_MODELS that is not a fixture directory,
fails instead (never a silent skip). Whether the server binary has the PyTorch engine at all is
for the test module to find out (it asks the server).

references.json (see the generator's docstring): {model: {"inputs": {name: tensor},
"outputs": {name: tensor}}}, each tensor {"datatype": "FP32" (KServe v2), "shape": [...],
"data": [flat, row-major]}; shapes include the batch dim where the model batches.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

import _fixtures

MODELS_ENV = "OXSERVE_TORCH_MODELS"
# What a server built without the `torch` feature says of a pytorch_libtorch model.
NOT_BUILT_IN = "built without the PyTorch engine"

# KServe v2 datatype -> numpy dtype
DTYPES: dict[str, object] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def venv_python() -> Path:
    return _fixtures.venv_python("venv-torch")


def skip_reason() -> str:
    """Why the PyTorch fixtures cannot be had on this machine, or "" when they can."""
    if not os.environ.get(MODELS_ENV) and not venv_python().is_file():
        return (f"no PyTorch venv ({venv_python()}) to generate the TorchScript fixtures; run "
                f"scripts/setup-torch.sh, or set {MODELS_ENV} to a directory made by "
                "scripts/make_torch_models.py")
    return ""


@functools.lru_cache(maxsize=None)
def models_dir() -> Path:
    """The fixture directory (see the module docstring); fails the caller when it cannot be had."""
    return _fixtures.generated(MODELS_ENV, "venv-torch", "scripts/make_torch_models.py",
                               ["references.json", "repo"], timeout=600)


def repository() -> Path:
    return models_dir() / "repo"


@functools.lru_cache(maxsize=None)
def references() -> dict:
    return json.loads((models_dir() / "references.json").read_text())


def to_numpy(tensor: dict) -> np.ndarray:
    """A references.json tensor as the numpy array tritonclient takes and returns."""
    return np.array(tensor["data"], dtype=DTYPES[tensor["datatype"]]).reshape(tensor["shape"])


def max_batch_size(model: str) -> int:
    """max_batch_size of the fixture's config.pbtxt (0 when it has none)."""
    for line in (repository() / model / "config.pbtxt").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "max_batch_size":
            return int(value.strip())
    return 0


def assert_matches(name: str, have: np.ndarray, want: np.ndarray) -> None:
    """Reference comparison: exact for integers and booleans; FP32/FP64 within 1e-5 relative
    (with an absolute floor of 1e-5 of the tensor's largest magnitude, since the server may
    batch rows differently and reorder a reduction); FP16 within its own precision (2^-10
    relative, the same floor)."""
    assert have is not None, f"output {name} missing"
    assert have.shape == want.shape, (name, have.shape, want.shape)
    assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
    if want.dtype.kind in "iub":
        np.testing.assert_array_equal(have, want, err_msg=name)
        return
    rtol = 2.0**-10 if want.dtype == np.float16 else 1e-5
    ref = want.astype(np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    np.testing.assert_allclose(have.astype(np.float64), ref, rtol=rtol, atol=rtol * scale, err_msg=name)
