"""KIND_GPU on ONNX Runtime's CUDA execution provider, checked against Python onnxruntime (CPU)
on the fidelity corpus.

Needs the onnxruntime-gpu build of the library and a GPU, so it runs only where
OXSERVE_GPU_ONNXRUNTIME_LIBRARY names that build's libonnxruntime.so (with its CUDA and cuDNN
libraries on LD_LIBRARY_PATH); elsewhere the module is skipped. What KIND_GPU does without
CUDA (a clear load error) is tested everywhere, in test_corpus_loading.py.

The server gets a repository made from the corpus (tests/fixtures/corpus/onnxruntime/):

- every corpus model, same name, on one GPU instance with `use_tf32: "0"`: the corpus
  tolerances of test_corpus.py apply unchanged. cuDNN and cuBLAS sum convolutions and dot
  products in their own orders, which that tolerance (relative 1e-5 of the tensor's scale)
  already allows for;
- `<model>_cuda_defaults` for the FP32 models, with no CUDA options. ONNX Runtime's default
  lets MatMul and Conv use TF32 on Ampere and later GPUs: inputs rounded to a 10-bit
  significand (relative 2**-11 each), so results are allowed 5e-3 of (|ref| + scale);
- `cnn_cpu_and_gpu`: one CPU and one GPU instance behind one dynamic batcher;
- `cnn_pad_max` (`gpu_batch_padding: "max_batch_size"`) and `cnn_unpadded` (`"none"`). The
  other GPU models pad adaptively (the default): to the next power of two of recent batches,
  repeating the last row, and drop the padding's outputs; the corpus's batches of 3, 5 and 6
  rows (multi_io, mlp, strings, the transformer's second case) are padded that way;
- models whose GPU settings are wrong, which must fail at load with the reason while the
  rest serves: a GPU that does not exist, a misspelled CUDA option, an unknown padding
  choice, a TensorRT accelerator.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from _corpus import assert_close, case_named, cases, ensure_corpus, infer
from _server import ServerProcess

LIBRARY = os.environ.get("OXSERVE_GPU_ONNXRUNTIME_LIBRARY", "")
pytestmark = pytest.mark.skipif(
    not LIBRARY,
    reason="OXSERVE_GPU_ONNXRUNTIME_LIBRARY (the onnxruntime-gpu libonnxruntime.so) is not set",
)

GPU = 'instance_group [ { kind: KIND_GPU count: 1 gpus: [ 0 ] } ]\n'
NO_TF32 = (
    'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "cuda"\n'
    '  parameters { key: "use_tf32" value: "0" } } ] } }\n'
)
FP32_MODELS = ("mlp", "cnn", "transformer")
TF32_REL = 5e-3
BROKEN = {
    "gpu_missing": ('instance_group [ { kind: KIND_GPU gpus: [ 63 ] } ]\n', "63"),
    "cuda_option_misspelled": (
        GPU + 'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "cuda"\n'
        '  parameters { key: "use_tf3" value: "0" } } ] } }\n',
        "use_tf3",
    ),
    "padding_unknown": (
        GPU + 'parameters { key: "gpu_batch_padding" value: { string_value: "16" } }\n',
        "gpu_batch_padding",
    ),
    "tensorrt": (
        GPU + 'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }\n',
        "'tensorrt' is not available",
    ),
}


def _add(repo, source: str, name: str, extra: str) -> None:
    src = ensure_corpus() / "onnxruntime" / source
    dst = repo / name
    shutil.copytree(src, dst)
    text = (src / "config.pbtxt").read_text().replace(f'name: "{source}"', f'name: "{name}"')
    (dst / "config.pbtxt").write_text(text + extra)


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("gpu-repository")
    for model in sorted({c.model for c in cases()}):
        _add(repo, model, model, GPU + NO_TF32)
    for model in FP32_MODELS:
        _add(repo, model, f"{model}_cuda_defaults", GPU)
    _add(repo, "cnn", "cnn_cpu_and_gpu",
         'instance_group [ { kind: KIND_CPU count: 1 }, { kind: KIND_GPU count: 1 } ]\n'
         'dynamic_batching { }\n')
    _add(repo, "cnn", "cnn_pad_max",
         GPU + NO_TF32 + 'parameters { key: "gpu_batch_padding" value: { string_value: "max_batch_size" } }\n')
    _add(repo, "cnn", "cnn_unpadded",
         GPU + NO_TF32 + 'parameters { key: "gpu_batch_padding" value: { string_value: "none" } }\n')
    for name, (extra, _) in BROKEN.items():
        _add(repo, "mlp", name, extra)
    server = ServerProcess("gpu", [str(repo)], ["--onnxruntime-library", LIBRARY],
                           ready_path="/v2/models/cnn/ready").start()
    try:
        yield server
    finally:
        server.stop_and_check()


def _scaled_error(have: np.ndarray, want: np.ndarray) -> float:
    """max |have - want| / max |want|, printed so a run shows how close the GPU came."""
    if want.dtype == object or want.dtype.kind in "iub" or want.dtype.name == "bfloat16" or not want.size:
        return 0.0
    ref = want.astype(np.float64)
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(have.astype(np.float64) - ref)) / scale)


def _case_params():
    for case in cases():
        for transport in ("grpc", "http_binary"):
            yield pytest.param(case, transport, id=f"{case.case}-{transport}")


@pytest.mark.parametrize("case,transport", list(_case_params()))
def test_every_corpus_model_matches_onnxruntime_on_the_gpu(gpu_server, case, transport):
    feeds, expected = case.load()
    got = infer(gpu_server, transport, case.model, feeds, list(expected))
    for name, want in expected.items():
        assert got[name] is not None, f"output {name} missing"
        print(f"gpu {case.case} {transport} {name}: max error / scale = {_scaled_error(got[name], want):.3g}")
        assert_close(name, case, got[name], want)


@pytest.mark.parametrize("case_name", ["mlp", "cnn", "transformer_s7", "transformer_s19"])
def test_onnxruntime_default_cuda_options_stay_within_tf32_precision(gpu_server, case_name):
    case = case_named(case_name)
    feeds, expected = case.load()
    got = infer(gpu_server, "grpc", f"{case.model}_cuda_defaults", feeds, list(expected))
    for name, want in expected.items():
        print(f"gpu defaults {case.case} {name}: max error / scale = {_scaled_error(got[name], want):.3g}")
        assert_close(name, case, got[name], want, fp32_rel=TF32_REL)


@pytest.mark.parametrize("model", ["cnn", "cnn_pad_max", "cnn_unpadded"])
def test_every_padding_answers_every_row(gpu_server, model):
    case = case_named("cnn")
    feeds, expected = case.load()
    for rows in (1, 3, 32, 5, 1):
        batch = {k: np.repeat(v, rows, axis=0) for k, v in feeds.items()}
        want = np.repeat(expected["logits"], rows, axis=0)
        got = infer(gpu_server, "grpc", model, batch, ["logits"])["logits"]
        assert got.shape == want.shape, (model, rows, got.shape)
        assert_close("logits", case, got, want)


def test_config_shows_the_gpu_group_and_the_cuda_options(gpu_server):
    r = requests.get(f"{gpu_server.http_url}/v2/models/cnn/config", timeout=30)
    assert r.status_code == 200, r.text
    cfg = r.json()
    assert [g["kind"] for g in cfg["instance_group"]] == ["KIND_GPU"], cfg["instance_group"]
    assert cfg["instance_group"][0]["gpus"] == [0]
    cuda = cfg["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]
    assert cuda == {"name": "cuda", "parameters": {"use_tf32": "0"}}, cuda


def test_the_server_process_holds_gpu_memory(gpu_server):
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not installed")
    out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    pids = {line.split(",")[0].strip() for line in out.stdout.splitlines() if line.strip()}
    assert str(gpu_server.proc.pid) in pids, out.stdout


def test_cpu_and_gpu_instances_of_one_model_answer_alike(gpu_server):
    case = case_named("cnn")
    feeds, expected = case.load()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: infer(gpu_server, "grpc", "cnn_cpu_and_gpu", feeds, ["logits"]),
                                range(32)))
    for got in results:
        assert_close("logits", case, got["logits"], expected["logits"], fp32_rel=TF32_REL)
    r = requests.get(f"{gpu_server.http_url}/v2/models/cnn_cpu_and_gpu/stats", timeout=30)
    assert r.status_code == 200, r.text
    stats = r.json()["model_stats"][0]
    assert int(stats["inference_count"]) == 32, stats


def test_wrong_gpu_settings_fail_at_load_and_the_rest_serves(gpu_server):
    index = gpu_server.repository_index()
    for name, (_, reason) in BROKEN.items():
        entry = index[name]
        assert entry["state"] == "UNAVAILABLE", entry
        assert reason in entry["reason"], entry
    for model in {c.model for c in cases()}:
        assert index[model]["state"] == "READY", index[model]
    case = case_named("mlp")
    feeds, expected = case.load()
    got = infer(gpu_server, "http_binary", "mlp", feeds, list(expected))
    assert_close("logits", case, got["logits"], expected["logits"])
