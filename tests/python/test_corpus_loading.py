"""Loading with both engines: bad model files and configurations, engine selection, a missing
ONNX Runtime library, and KIND_GPU without CUDA. Repositories come from
scripts/make_corpus.py (tests/fixtures/corpus/broken_*, selection).

Every failure is a load error: the model is UNAVAILABLE with the reason in the repository
index and in the server log, and the rest of the repository serves.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

from _corpus import ENGINES, case_named, ensure_corpus, infer
from _server import ServerProcess

# model -> substrings (case-insensitive), any of which the reason must contain, per engine.
BROKEN = {
    "truncated": {"onnxruntime": ("protobuf parsing failed",), "tract": ("not a valid onnx model",)},
    "corrupt": {"onnxruntime": ("protobuf parsing failed",), "tract": ("not a valid onnx model",)},
    "unknown_op": {"onnxruntime": ("frobnicate",), "tract": ("frobnicate",)},
    "wrong_dtype": {e: ("type_int32", "type_fp32") for e in ENGINES},
    "wrong_dims": {e: ("[-1, 63]", "[-1, 64]") for e in ENGINES},
}
MISSING_LIBRARY = "/nonexistent/onnxruntime/libonnxruntime.so.1.32.0"


def _serve(name: str, repo: str, ready_model: str, extra: list[str] | None = None) -> ServerProcess:
    ensure_corpus()
    return ServerProcess(name, [f"tests/fixtures/corpus/{repo}"], extra, ready_path=f"/v2/models/{ready_model}/ready").start()


@pytest.fixture(scope="module", params=ENGINES)
def broken(request):
    engine = request.param
    server = _serve(f"broken-{engine}", f"broken_{engine}", "good")
    try:
        yield engine, server
    finally:
        server.stop_and_check()


def _config(server, model: str) -> dict:
    r = requests.get(f"{server.http_url}/v2/models/{model}/config", timeout=30)
    assert r.status_code == 200, (model, r.status_code, r.text)
    return r.json()


def _mlp_works(server, model: str) -> None:
    case = case_named("mlp")
    feeds, expected = case.load()
    got = infer(server, "grpc", model, feeds, ["logits"])
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-5, atol=1e-5 * np.abs(expected["logits"]).max())


def test_bad_models_fail_at_load_with_the_reason(broken):
    engine, server = broken
    index = server.repository_index()
    assert index["good"]["state"] == "READY", index["good"]
    log = server.stderr_path.read_text(errors="replace").lower()
    for model, reasons in BROKEN.items():
        entry = index[model]
        assert entry["state"] == "UNAVAILABLE", entry
        reason = entry["reason"].lower()
        assert all(r in reason for r in reasons[engine]), f"{engine} {model}: {entry['reason']!r}"
        # The same reason is in the log, with the model's name.
        assert reason in log, f"{engine} {model}: reason not logged: {entry['reason']!r}"
        # Model files are named, never the server's directories.
        assert "tests/fixtures" not in reason, entry
        r = requests.get(f"{server.http_url}/v2/models/{model}/ready", timeout=30)
        assert r.status_code != 200, model


def test_the_rest_of_the_repository_serves(broken):
    engine, server = broken
    _mlp_works(server, "good")
    assert _config(server, "good")["backend"] == engine
    assert requests.get(server.http_url + "/v2/health/live", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def selection():
    server = _serve("selection", "selection", "default")
    try:
        yield server
    finally:
        server.stop_and_check()


@pytest.fixture(scope="module")
def selection_without_library():
    server = _serve("selection-nolib", "selection", "default", ["--onnxruntime-library", MISSING_LIBRARY])
    try:
        yield server
    finally:
        server.stop_and_check()


def _reason(cfg: dict) -> str:
    return cfg["parameters"]["oxserve_backend_reason"]["string_value"]


def test_engine_selection_follows_the_configuration(selection):
    expected = {
        "named_onnxruntime": ("onnxruntime", 'config.pbtxt sets backend "onnxruntime"'),
        "named_tract": ("tract", 'config.pbtxt sets backend "tract"'),
        "platform_onnxruntime": ("onnxruntime", "platform \"onnxruntime_onnx\""),
        "default": ("onnxruntime", "no backend in config.pbtxt; ONNX Runtime is available"),
        "threads": ("onnxruntime", 'config.pbtxt sets backend "onnxruntime"'),
    }
    for model, (engine, why) in expected.items():
        cfg = _config(selection, model)
        assert cfg["backend"] == engine, (model, cfg["backend"])
        assert why in _reason(cfg), (model, _reason(cfg))
        _mlp_works(selection, model)
    # The default names the library it found (the project's .venv, or ORT_DYLIB_PATH).
    assert "libonnxruntime" in _reason(_config(selection, "default"))
    log = selection.stderr_path.read_text(errors="replace")
    assert "ONNX Runtime is available" in log and "model version ready" in log


def test_session_options_from_the_configuration_load(selection):
    cfg = _config(selection, "threads")
    assert cfg["optimization"]["graph"]["level"] == 1
    assert cfg["parameters"]["execution_mode"]["string_value"] == "1"
    assert [g["count"] for g in cfg["instance_group"]] == [2]


def test_kind_gpu_without_cuda_is_a_clear_load_error(selection):
    index = selection.repository_index()
    ort = index["gpu_onnxruntime"]
    if ort["state"] == "READY":
        # Only where the onnxruntime-gpu library and a GPU are present (docs/backends.md).
        _mlp_works(selection, "gpu_onnxruntime")
    else:
        assert "CUDA execution provider not available in the loaded onnxruntime library" in ort["reason"], ort
    tract = index["gpu_tract"]
    assert tract["state"] == "UNAVAILABLE" and "CPU only" in tract["reason"], tract


def test_a_missing_library_fails_only_the_models_that_need_it(selection_without_library):
    server = selection_without_library
    index = server.repository_index()
    for model in ("named_onnxruntime", "platform_onnxruntime", "threads", "gpu_onnxruntime"):
        entry = index[model]
        assert entry["state"] == "UNAVAILABLE", entry
        assert MISSING_LIBRARY in entry["reason"] and "does not exist" in entry["reason"], entry
    for model in ("named_tract", "default"):
        assert index[model]["state"] == "READY", index[model]
        _mlp_works(server, model)
    cfg = _config(server, "default")
    assert cfg["backend"] == "tract"
    reason = _reason(cfg)
    assert "ONNX Runtime is not available" in reason and MISSING_LIBRARY in reason, reason
    assert "tract" in reason
    log = server.stderr_path.read_text(errors="replace")
    assert "ONNX Runtime is not available" in log
