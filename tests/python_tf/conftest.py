"""TF Serving's gRPC API on oxserve, with the real client: the `tensorflow-serving-api` stubs and
Python TensorFlow (`tf.make_tensor_proto`, `tf.make_ndarray`), from the TensorFlow venv that
scripts/setup-tensorflow.sh makes ($OXSERVE_CACHE/venv-tf, default ~/.cache/oxserve/venv-tf):

    OXSERVE_BIN=/path/to/oxserve ~/.cache/oxserve/venv-tf/bin/python -m pytest tests/python_tf -q

These tests live apart from tests/python because TensorFlow's protobuf conflicts with
tritonclient's: they run under the TensorFlow venv's Python, tests/python under .venv. They reuse
tests/python's helpers that need neither tritonclient nor onnxruntime: _server.py (starting the
binary on free ports), _tf.py (the SavedModel fixtures of scripts/make_tf_models.py, their
references, the skip when TensorFlow is missing) and _models.py (input generators; its
onnxruntime import is lazy). tests/python/conftest.py is not loaded: it imports tritonclient.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Quiet TensorFlow's C++ start-up logging (oneDNN, CPU feature notes) before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PYTHON_TESTS = Path(__file__).resolve().parent.parent / "python"
if str(PYTHON_TESTS) not in sys.path:
    sys.path.insert(0, str(PYTHON_TESTS))

import _models  # noqa: E402,F401  (checked below: none of these may pull tritonclient)
import _server  # noqa: E402,F401
import _tf  # noqa: E402,F401

_TRITON = sorted(m for m in sys.modules if m == "tritonclient" or m.startswith("tritonclient."))
if _TRITON:
    raise ImportError(
        f"the shared helpers of tests/python imported {_TRITON[:3]}: tritonclient's protobuf "
        "conflicts with TensorFlow's, so tests/python_tf must not load it"
    )
