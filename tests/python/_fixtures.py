"""Generated fixtures shared by the TensorFlow, PyTorch and TorchServe test helpers: the cache
the set-up scripts fill, and one generator run per fixture set; and reference outputs of an
ONNX file from Python onnxruntime.

A generator is a script run with its own virtual environment's python (`--if-needed`; it
prints its output directory as the last stdout line), unless an environment variable names a
directory it made earlier. No tritonclient here: tests/python_tf imports this module too.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """$OXSERVE_CACHE, else ~/.cache/oxserve (as the set-up scripts and the server)."""
    return Path(os.environ.get("OXSERVE_CACHE") or Path.home() / ".cache" / "oxserve")


def venv_python(venv: str) -> Path:
    return cache_dir() / venv / "bin" / "python"


def generated(env_var: str, venv: str, script: str, required: list[str], timeout: float,
              hints: dict[str, str] | None = None) -> Path:
    """The fixture directory: `$env_var`, else what `script` makes with `venv`'s python (CPU
    only). Fails the caller when the generator fails or a `required` file is missing."""
    env = os.environ.get(env_var)
    if env:
        path = Path(env).resolve()
    else:
        done = subprocess.run(
            [str(venv_python(venv)), str(ROOT / script), "--if-needed"],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            pytest.fail(f"{script} failed (exit {done.returncode}):\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}", pytrace=False)
        path = Path(lines[-1]).resolve()
    for name in required:
        if not (path / name).exists():
            pytest.fail(f"{path} is not a {script} directory (no {name})"
                        + (hints or {}).get(name, "")
                        + (f"; from ${env_var}" if env else ""), pytrace=False)
    return path


@functools.lru_cache(maxsize=None)
def _ort_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


_ort_lock = threading.Lock()


def ort_run(path: Path, feeds: dict) -> dict:
    """Every output of the ONNX file at `path` for `feeds`, by name, from Python onnxruntime on
    the CPU (one session per file, one run at a time)."""
    with _ort_lock:
        sess = _ort_session(str(path))
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))
