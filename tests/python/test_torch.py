"""TorchScript models through oxserve's PyTorch engine (platform "pytorch_libtorch", backend
"pytorch"), over KServe v2 with tritonclient.

Fixtures and references: scripts/make_torch_models.py (see _torch.py for where they come from).
The module is skipped, with the reason, where there is no PyTorch venv to make them, and where
the server binary was built without the engine (cargo feature `torch`): the server is asked,
and only its own words for that ("built without the PyTorch engine", on every fixture model)
skip; any other failure to load fails.

One server (`torch_server`) serves three repositories:
- the fixture repository as the generator wrote it (cnn_traced, scripted_control, dict_out,
  fp16_model, int_types);
- a temporary one: `cnn_batched` (cnn_traced's model.pt with dynamic batching and two
  instances), `no_io` (a config.pbtxt without inputs and outputs), broken model.pt files
  (`corrupt_*`), fixture files under other configurations (CONFIGS: named single output,
  thread parameters, configurations refused at load or not matching the result), and the
  SavedModel `two_sig` (from _tf.py's fixtures, version 2) where the
  TensorFlow fixtures can be had;
- examples/models (ONNX: add_sub, iris).

Tolerances (_torch.assert_matches): FP32 1e-5 relative; FP16 its own precision (2^-10);
integers and booleans exact. FP16 has no JSON form, so the HTTP JSON transport leaves out
fp16_model.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import _tf
import _torch
from _models import add_sub_inputs, ort_run
from _server import ServerProcess

_SKIP = _torch.skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

REFERENCES = _torch.references()
FIXTURE_MODELS = sorted(REFERENCES)
EXAMPLES = "examples/models"
TRANSPORTS = ["http", "http_json", "grpc"]
PLATFORM = "pytorch_libtorch"
BACKEND = "pytorch"

NP_TO_WIRE = {np.dtype(v): k for k, v in _torch.DTYPES.items()}

CNN_BATCHED_CONFIG = """\
name: "cnn_batched"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 3, 32, 32 ] } ]
output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 2, kind: KIND_CPU } ]
"""

NO_IO_CONFIG = 'name: "no_io"\nplatform: "pytorch_libtorch"\nmax_batch_size: 8\n'

CNN_IO = """\
input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 3, 32, 32 ] } ]
output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 10 ] } ]
"""
DICT_IO_MISSING_KEY = """\
input [ { name: "features", data_type: TYPE_FP32, dims: [ 6 ] }, { name: "scale", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "probs", data_type: TYPE_FP32, dims: [ 3 ] }, { name: "missing", data_type: TYPE_FP32, dims: [ 3 ] } ]
"""

# Configurations the engine takes or refuses: name -> (fixture whose model.pt it uses, the
# config.pbtxt after name and platform, words of the reason where it must be UNAVAILABLE).
CONFIGS = {
    # A single tensor result under a named output, from a named input.
    "cnn_named": ("cnn_traced", """\
max_batch_size: 8
input [ { name: "image", data_type: TYPE_FP32, dims: [ 3, 32, 32 ] } ]
output [ { name: "logits", data_type: TYPE_FP32, dims: [ 10 ] } ]
""", None),
    "threads_ok": ("cnn_traced", "max_batch_size: 8\n" + CNN_IO + """\
parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "2" } }
parameters { key: "INTER_OP_THREAD_COUNT" value: { string_value: "2" } }
""", None),
    "threads_bad": ("cnn_traced", "max_batch_size: 8\n" + CNN_IO + """\
parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "zero" } }
""", ("INTRA_OP_THREAD_COUNT", "positive integer")),
    "input_gap": ("cnn_traced", """\
max_batch_size: 8
input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 3, 32, 32 ] }, { name: "INPUT__2", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 10 ] } ]
""", ("INPUT__<i>", "0 to N-1")),
    "uint16_input": ("int_types", """\
input [ { name: "a", data_type: TYPE_UINT16, dims: [ 2, 3 ] } ]
output [ { name: "OUTPUT__0", data_type: TYPE_INT32, dims: [ 2, 3 ] } ]
""", ("UINT16", "not a type")),
    # Loads (nothing to check a TorchScript file against), fails at inference.
    "output_index_out_of_range": ("cnn_traced", """\
max_batch_size: 8
input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 3, 32, 32 ] } ]
output [ { name: "OUTPUT__1", data_type: TYPE_FP32, dims: [ 10 ] } ]
""", None),
    "dict_missing_key": ("dict_out", "max_batch_size: 8\n" + DICT_IO_MISSING_KEY, None),
    "output_type_mismatch": ("fp16_model", """\
max_batch_size: 4
input [ { name: "INPUT__0", data_type: TYPE_FP16, dims: [ 4 ] } ]
output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 2 ] } ]
""", None),
}

# name -> how its model.pt is broken (a copy of cnn_traced's)
CORRUPT = {
    "corrupt_garbage": "model.pt replaced by bytes that are no zip archive",
    "corrupt_truncated": "model.pt cut in half",
    "corrupt_empty": "model.pt empty",
    "corrupt_missing": "no model.pt in the version directory",
}


# ---------------------------------------------------------------------------------------------
# The server


def _index(server) -> list[dict]:
    r = requests.post(server.http_url + "/v2/repository/index", timeout=30, **server.requests_kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_loaded(server, names: list[str], timeout: float = 60.0) -> list[dict]:
    """Waits until every named model is READY or UNAVAILABLE (the server listens before its
    models have loaded, and lists them with no state until their load starts); returns the
    index."""
    deadline = time.monotonic() + timeout
    while True:
        entries = _index(server)
        settled = {e["name"] for e in entries if e["state"] in ("READY", "UNAVAILABLE")}
        if set(names) <= settled:
            return entries
        if time.monotonic() > deadline:
            server.fail(f"models {names} not all loaded within {timeout:.0f} s: {entries}")
        time.sleep(0.05)


def _break(name: str, version_dir: Path) -> None:
    pt = version_dir / "model.pt"
    if name == "corrupt_garbage":
        pt.write_bytes(b"\x7f\xff\xfe not a TorchScript archive " * 64)
    elif name == "corrupt_truncated":
        data = pt.read_bytes()
        pt.write_bytes(data[: len(data) // 2])
    elif name == "corrupt_empty":
        pt.write_bytes(b"")
    elif name == "corrupt_missing":
        pt.unlink()
    else:
        raise AssertionError(name)


class TfPart:
    """The SavedModel of the side-by-side test: why it is left out ("" when it is served), or
    the failure to make its fixtures (reported by that test alone)."""

    skip = ""
    failure = ""


TF = TfPart()


def _extra_repository(repo: Path) -> list[str]:
    """Fills the temporary repository; returns the names of its models."""
    fixtures = _torch.repository()
    names = []
    # cnn_traced's file, batched dynamically over two instances.
    (repo / "cnn_batched" / "1").mkdir(parents=True)
    shutil.copy(fixtures / "cnn_traced" / "1" / "model.pt", repo / "cnn_batched" / "1" / "model.pt")
    (repo / "cnn_batched" / "config.pbtxt").write_text(CNN_BATCHED_CONFIG)
    names.append("cnn_batched")
    # A config.pbtxt that lists no inputs or outputs.
    (repo / "no_io" / "1").mkdir(parents=True)
    shutil.copy(fixtures / "cnn_traced" / "1" / "model.pt", repo / "no_io" / "1" / "model.pt")
    (repo / "no_io" / "config.pbtxt").write_text(NO_IO_CONFIG)
    names.append("no_io")
    # Broken model.pt files, each with cnn_traced's (valid) configuration.
    for name in CORRUPT:
        shutil.copytree(fixtures / "cnn_traced", repo / name)
        config = repo / name / "config.pbtxt"
        config.write_text(config.read_text().replace('name: "cnn_traced"', f'name: "{name}"'))
        _break(name, repo / name / "1")
        names.append(name)
    for name, (source, body, _) in CONFIGS.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(fixtures / source / "1" / "model.pt", repo / name / "1" / "model.pt")
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nplatform: "pytorch_libtorch"\n{body}')
        names.append(name)
    # The SavedModel, where the TensorFlow fixtures and library are here.
    TF.skip = _tf.skip_reason()
    if not TF.skip:
        try:
            tf_models = _tf.models_dir()
        except pytest.fail.Exception as e:
            TF.failure = str(e)
        else:
            shutil.copytree(tf_models / "two_sig" / "2", repo / "two_sig" / "2")
            names.append("two_sig")
    return names


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory):
    extra = tmp_path_factory.mktemp("torch-extra")
    names = [*FIXTURE_MODELS, *_extra_repository(extra), "add_sub", "iris"]
    # Strict readiness keeps /v2/health/ready non-200 with the broken models: poll liveness and
    # wait for the loads.
    server = ServerProcess("torch", [str(_torch.repository()), str(extra), EXAMPLES],
                           ready_path="/v2/health/live").start()
    skip = ""
    try:
        entries = {e["name"]: e for e in _wait_loaded(server, names)}
        fixtures = [entries[m] for m in FIXTURE_MODELS]
        if all(e["state"] == "UNAVAILABLE" and _torch.NOT_BUILT_IN in e.get("reason", "") for e in fixtures):
            skip = (f"the server binary has no PyTorch engine (build with `--features oxserve/torch`, "
                    f"LIBTORCH from scripts/setup-torch.sh): {fixtures[0]['reason']}")
        else:
            yield server
    finally:
        server.stop_and_check()
    if skip:
        pytest.skip(skip)


@pytest.fixture(autouse=True)
def _needs_the_engine(torch_server):
    """Every test here needs a server with the engine (this skips them all where it has none)."""


# ---------------------------------------------------------------------------------------------
# Requests


def infer(server, transport: str, model: str, inputs: dict[str, np.ndarray],
          outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """One inference through tritonclient: "http" (binary tensors), "http_json" or "grpc".
    `outputs` None asks for none by name (the server returns all)."""
    if transport.startswith("http"):
        binary = transport == "http"
        client = httpclient.InferenceServerClient(url=server.http_host, network_timeout=60.0)
        try:
            ins = []
            for name, arr in inputs.items():
                inp = httpclient.InferInput(name, list(arr.shape), NP_TO_WIRE[arr.dtype])
                inp.set_data_from_numpy(arr, binary_data=binary)
                ins.append(inp)
            outs = None if outputs is None else [httpclient.InferRequestedOutput(n, binary_data=binary)
                                                 for n in outputs]
            result = client.infer(model, ins, outputs=outs)
            return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
        finally:
            client.close()
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        ins = []
        for name, arr in inputs.items():
            inp = grpcclient.InferInput(name, list(arr.shape), NP_TO_WIRE[arr.dtype])
            inp.set_data_from_numpy(arr)
            ins.append(inp)
        outs = None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]
        result = client.infer(model, ins, outputs=outs, client_timeout=60.0)
        return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
    finally:
        client.close()


def reference(model: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    ref = REFERENCES[model]
    return ({n: _torch.to_numpy(t) for n, t in ref["inputs"].items()},
            {n: _torch.to_numpy(t) for n, t in ref["outputs"].items()})


def check_reference(server, transport: str, model: str, outputs: list[str] | None = None,
                    served_as: str | None = None) -> None:
    inputs, expected = reference(model)
    got = infer(server, transport, served_as or model, inputs, sorted(expected) if outputs is None else outputs)
    want = expected if outputs is None else {n: expected[n] for n in outputs}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name, value in want.items():
        _torch.assert_matches(f"{model}/{name} ({transport})", got[name], value)


def _expect_error(call, transport: str, code: str = "invalid") -> str:
    """Runs `call`, which must fail with HTTP 400 / gRPC INVALID_ARGUMENT (code "invalid"),
    HTTP 503 / gRPC UNAVAILABLE (code "unavailable") or HTTP 500 / gRPC INTERNAL (code
    "internal"); returns the message."""
    with pytest.raises(InferenceServerException) as info:
        call()
    status = str(info.value.status())
    want = {
        ("invalid", "http"): "400", ("invalid", "grpc"): "StatusCode.INVALID_ARGUMENT",
        ("unavailable", "http"): "503", ("unavailable", "grpc"): "StatusCode.UNAVAILABLE",
        ("internal", "http"): "500", ("internal", "grpc"): "StatusCode.INTERNAL",
    }[(code, "grpc" if transport == "grpc" else "http")]
    assert status == want, (status, info.value.message())
    return info.value.message() or ""


def _client(server, transport: str):
    return (httpclient.InferenceServerClient(url=server.http_host) if transport.startswith("http")
            else grpcclient.InferenceServerClient(url=server.grpc_host))


# ---------------------------------------------------------------------------------------------
# 1. Loading, and every reference through HTTP (binary and JSON) and gRPC


def test_models_load(torch_server):
    by_name = {e["name"]: e for e in _index(torch_server)}
    for name in [*FIXTURE_MODELS, "cnn_batched", "add_sub", "iris"]:
        assert by_name[name]["state"] == "READY", by_name[name]


def _reference_params():
    for model in FIXTURE_MODELS:
        for transport in TRANSPORTS:
            if transport == "http_json" and any(
                t["datatype"] == "FP16" for side in ("inputs", "outputs") for t in REFERENCES[model][side].values()
            ):
                continue
            yield pytest.param(model, transport, id=f"{model}-{transport}")


@pytest.mark.parametrize("model,transport", list(_reference_params()))
def test_reference_outputs(torch_server, model, transport):
    """Every fixture answers as Python PyTorch did: traced and scripted modules, tuple and dict
    results, INPUT__<i> listed out of order (scripted_control), named inputs in configuration
    order (dict_out, int_types), FP16, INT32/UINT8/BOOL, an unbatched model (int_types)."""
    check_reference(torch_server, transport, model)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_all_outputs_and_subsets(torch_server, transport):
    """No output asked: every configured one comes back; one asked: only it."""
    for model in ("scripted_control", "dict_out", "int_types"):
        inputs, expected = reference(model)
        got = infer(torch_server, transport, model, inputs)
        assert sorted(got) == sorted(expected), (model, sorted(got))
        for name, want in expected.items():
            _torch.assert_matches(f"{model}/{name}", got[name], want)
    check_reference(torch_server, transport, "dict_out", outputs=["probs"])
    check_reference(torch_server, transport, "scripted_control", outputs=["OUTPUT__1"])
    check_reference(torch_server, transport, "int_types", outputs=["OUTPUT__2", "OUTPUT__0"])


def test_max_batch_size_rows(torch_server):
    """cnn_traced takes up to its max_batch_size (8) rows in one request."""
    inputs, expected = reference("cnn_traced")
    rows = [i % 3 for i in range(8)]
    got = infer(torch_server, "grpc", "cnn_traced", {"INPUT__0": inputs["INPUT__0"][rows]}, ["OUTPUT__0"])
    _torch.assert_matches("OUTPUT__0", got["OUTPUT__0"], expected["OUTPUT__0"][rows])


# ---------------------------------------------------------------------------------------------
# 2. Configuration and metadata


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("model", FIXTURE_MODELS)
def test_config_and_metadata(torch_server, model, transport):
    client = _client(torch_server, transport)
    try:
        if transport == "http":
            meta, config = client.get_model_metadata(model), client.get_model_config(model)
        else:
            meta = client.get_model_metadata(model, as_json=True)
            config = client.get_model_config(model, as_json=True)["config"]
    finally:
        client.close()
    assert meta["platform"] == PLATFORM, meta
    assert config["platform"] == PLATFORM, config
    assert config["backend"] == BACKEND, config
    mbs = _torch.max_batch_size(model)
    assert int(config.get("max_batch_size", 0)) == mbs, config
    ref = REFERENCES[model]
    for side, key in (("inputs", "input"), ("outputs", "output")):
        have = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta[side]}
        want = {n: (t["datatype"], [-1, *t["shape"][1:]] if mbs else t["shape"]) for n, t in ref[side].items()}
        assert have == want, (model, side, have, want)
        dims = {t["name"]: [int(d) for d in t["dims"]] for t in config[key]}
        assert dims == {n: (t["shape"][1:] if mbs else t["shape"]) for n, t in ref[side].items()}, (model, config)


# ---------------------------------------------------------------------------------------------
# 3. Dynamic batching over two instances


def test_dynamic_batching_concurrent(torch_server):
    """Several threads, HTTP and gRPC, requests of 1..8 rows in varied orders, against two
    instances of cnn_batched behind the dynamic batcher: every row answers with its own
    reference."""
    c = httpclient.InferenceServerClient(url=torch_server.http_host)
    try:
        config = c.get_model_config("cnn_batched")
    finally:
        c.close()
    assert "dynamic_batching" in config, config
    assert [(int(g["count"]), g["kind"]) for g in config["instance_group"]] == [(2, "KIND_CPU")], config
    inputs, expected = reference("cnn_traced")
    x, y = inputs["INPUT__0"], expected["OUTPUT__0"]
    per_thread = 6

    def worker(t: int) -> int:
        for k in range(per_thread):
            size = 1 + (t + k) % 8
            rows = [(t * 5 + k + i * 2) % len(x) for i in range(size)]
            transport = "grpc" if (t + k) % 2 else "http"
            got = infer(torch_server, transport, "cnn_batched", {"INPUT__0": x[rows]}, ["OUTPUT__0"])
            _torch.assert_matches(f"OUTPUT__0 (thread {t}, request {k}, rows {rows})", got["OUTPUT__0"], y[rows])
        return per_thread

    threads = 8
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        counts = list(pool.map(worker, range(threads)))
    assert counts == [per_thread] * threads
    r = requests.get(torch_server.http_url + "/v2/models/cnn_batched/stats", timeout=10,
                     **torch_server.requests_kwargs)
    assert r.status_code == 200, r.text
    stats = r.json()["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) == threads * per_thread, stats
    assert int(stats["inference_stats"]["fail"]["count"]) == 0, stats


# ---------------------------------------------------------------------------------------------
# 4. Bad input: 400, and the server still serves

F32 = np.float32
CNN_ROW = (3, 32, 32)
BAD = {
    # name -> (model, inputs, requested outputs, words in the message)
    "wrong_dtype": ("cnn_traced", {"INPUT__0": np.zeros((2, *CNN_ROW), np.float64)}, None, ("FP64", "FP32")),
    "wrong_dtype_named": ("int_types", {"a": np.ones((2, 3), np.int32), "b": np.ones((2, 3), np.int32),
                                        "mask": np.ones((2, 3), np.bool_)}, None, ("INT32", "UINT8")),
    "wrong_shape": ("cnn_traced", {"INPUT__0": np.zeros((2, 3, 32, 31), F32)}, None, ("shape",)),
    "wrong_rank_unbatched": ("int_types", {"a": np.ones((1, 2, 3), np.int32), "b": np.ones((1, 2, 3), np.uint8),
                                           "mask": np.ones((1, 2, 3), np.bool_)}, None, ("shape",)),
    "batch_too_large": ("cnn_traced", {"INPUT__0": np.zeros((9, *CNN_ROW), F32)}, None, ("batch",)),
    "unknown_output": ("dict_out", {"features": np.ones((1, 6), F32), "scale": np.ones((1, 1), F32)},
                       ["nope"], ("nope",)),
    "unknown_input": ("dict_out", {"features": np.ones((1, 6), F32), "scale": np.ones((1, 1), F32),
                                   "bogus": np.ones((1, 6), F32)}, None, ("bogus",)),
    "missing_input": ("dict_out", {"features": np.ones((1, 6), F32)}, None, ("scale",)),
    # A BOOL element that is neither 0 nor 1 (the binary tensor carries the byte as it is).
    "bool_not_0_or_1": ("int_types", {"a": np.ones((2, 3), np.int32), "b": np.ones((2, 3), np.uint8),
                                      "mask": np.array([[1, 0, 2], [0, 1, 0]], np.uint8).view(np.bool_)},
                        None, ("mask",)),
}


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(torch_server, case, transport):
    model, inputs, outputs, words = BAD[case]
    message = _expect_error(lambda: infer(torch_server, transport, model, inputs, outputs), transport)
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert torch_server.alive()
    check_reference(torch_server, transport, model)


# ---------------------------------------------------------------------------------------------
# 5. Models that cannot load

# What is sent to a model that is not ready: small. The server answers 503 before it reads the
# body and then closes the connection; a large body still being written then meets a closed
# TLS connection (ssl.SSLEOFError in the client, under OXSERVE_TEST_TLS=1) instead of the 503.
UNAVAILABLE_PROBE = {"INPUT__0": np.zeros((1, 4), F32)}


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_config_without_inputs_and_outputs(torch_server, transport):
    entry = next(e for e in _index(torch_server) if e["name"] == "no_io")
    assert entry["state"] == "UNAVAILABLE", entry
    reason = entry.get("reason", "")
    assert "inputs and outputs" in reason and "must list" in reason, reason
    _expect_error(lambda: infer(torch_server, transport, "no_io", UNAVAILABLE_PROBE), transport, "unavailable")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_corrupt_model_files(torch_server, transport):
    by_name = {e["name"]: e for e in _index(torch_server)}
    for name, how in CORRUPT.items():
        entry = by_name[name]
        assert entry["state"] == "UNAVAILABLE", (how, entry)
        reason = entry.get("reason", "")
        assert any(w in reason.lower() for w in ("libtorch", "torchscript", "model.pt")), (how, reason)
        _expect_error(lambda: infer(torch_server, transport, name, UNAVAILABLE_PROBE), transport, "unavailable")
    check_reference(torch_server, transport, "cnn_traced")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_configurations_refused_at_load(torch_server, transport):
    """Configurations the engine cannot serve are UNAVAILABLE with a reason saying why; the
    server goes on serving the others."""
    by_name = {e["name"]: e for e in _index(torch_server)}
    for name, (_, _, words) in CONFIGS.items():
        entry = by_name[name]
        if words is None:
            assert entry["state"] == "READY", entry
            continue
        assert entry["state"] == "UNAVAILABLE", entry
        for word in words:
            assert word in entry.get("reason", ""), (word, entry)
    check_reference(torch_server, transport, "cnn_traced")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_named_single_output_and_thread_parameters(torch_server, transport):
    """A named input and a named output of a single tensor result (cnn_named); the thread
    parameters (threads_ok) leave the results as they were."""
    inputs, expected = reference("cnn_traced")
    got = infer(torch_server, transport, "cnn_named", {"image": inputs["INPUT__0"]}, ["logits"])
    assert sorted(got) == ["logits"], sorted(got)
    _torch.assert_matches("logits", got["logits"], expected["OUTPUT__0"])
    check_reference(torch_server, transport, "cnn_traced", served_as="threads_ok")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_result_not_matching_the_configuration(torch_server, transport):
    """A configuration the module's result does not match (an OUTPUT__<i> past its result, a
    dict key it lacks, another type) fails those requests as a server error (500 / INTERNAL),
    saying which output; the outputs that do match still answer, and so does the server."""
    inputs, _ = reference("cnn_traced")
    message = _expect_error(lambda: infer(torch_server, transport, "output_index_out_of_range", inputs),
                            transport, "internal")
    assert "OUTPUT__1" in message, message
    dict_inputs, dict_expected = reference("dict_out")
    message = _expect_error(lambda: infer(torch_server, transport, "dict_missing_key", dict_inputs),
                            transport, "internal")
    assert "'missing'" in message, message
    got = infer(torch_server, transport, "dict_missing_key", dict_inputs, ["probs"])
    _torch.assert_matches("probs", got["probs"], dict_expected["probs"])
    fp16_inputs, _ = reference("fp16_model")
    message = _expect_error(lambda: infer(torch_server, transport, "output_type_mismatch", fp16_inputs),
                            transport, "internal")
    assert "FP16" in message and "FP32" in message, message
    assert torch_server.alive()
    check_reference(torch_server, transport, "dict_out")


# ---------------------------------------------------------------------------------------------
# 6. Side by side with ONNX (and TensorFlow) models


def _check_add_sub(server, transport: str, batch: int, seed: int) -> None:
    feeds = add_sub_inputs(batch, seed=seed)
    got = infer(server, transport, "add_sub", feeds, ["OUTPUT0", "OUTPUT1"])
    for name, want in ort_run("add_sub", feeds).items():
        _torch.assert_matches(name, got[name], want)


def _check_two_sig(server, transport: str) -> None:
    """two_sig/2's serving_default (auto-completed: `total`, [-1] in the signature, comes back
    as [N, 1])."""
    ref = _tf.references()["two_sig"]["2"][_tf.DEFAULT_SIGNATURE]
    inputs = {n: _tf.to_numpy(t) for n, t in ref["inputs"].items()}
    expected = {n: _tf.to_numpy(t) for n, t in ref["outputs"].items()}
    expected["total"] = expected["total"].reshape(-1, 1)
    got = infer(server, transport, "two_sig", inputs, sorted(expected))
    for name, want in expected.items():
        _torch.assert_matches(f"two_sig/{name}", got[name], want)


def _side_by_side(server, checks) -> None:
    def worker(t: int) -> None:
        for k in range(6):
            transport = "grpc" if (t + k) % 2 else "http"
            checks[(t + k) % len(checks)](transport, t * 10 + k)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(worker, range(6)))


def test_side_by_side_with_onnx(torch_server):
    """TorchScript and ONNX models of one server, interleaved from several threads over both
    protocols."""
    c = httpclient.InferenceServerClient(url=torch_server.http_host)
    try:
        assert c.get_model_metadata("dict_out")["platform"] == PLATFORM
        assert c.get_model_metadata("add_sub")["platform"] == "onnxruntime_onnx"
    finally:
        c.close()
    _side_by_side(torch_server, [
        lambda transport, seed: check_reference(torch_server, transport, "dict_out"),
        lambda transport, seed: _check_add_sub(torch_server, transport, 1 + seed % 4, seed),
        lambda transport, seed: check_reference(torch_server, transport, "cnn_traced"),
        lambda transport, seed: check_reference(torch_server, transport, "int_types"),
    ])


def test_side_by_side_with_onnx_and_savedmodel(torch_server):
    """TorchScript, ONNX and a TensorFlow SavedModel in one server, interleaved."""
    if TF.failure:
        pytest.fail(f"the TensorFlow fixtures could not be made: {TF.failure}", pytrace=False)
    if TF.skip:
        pytest.skip(f"SavedModel part: {TF.skip}")
    entry = next(e for e in _index(torch_server) if e["name"] == "two_sig")
    assert entry["state"] == "READY", entry
    c = httpclient.InferenceServerClient(url=torch_server.http_host)
    try:
        assert c.get_model_metadata("two_sig")["platform"] == "tensorflow_savedmodel"
    finally:
        c.close()
    _side_by_side(torch_server, [
        lambda transport, seed: _check_two_sig(torch_server, transport),
        lambda transport, seed: check_reference(torch_server, transport, "scripted_control"),
        lambda transport, seed: _check_add_sub(torch_server, transport, 1 + seed % 4, seed),
        lambda transport, seed: check_reference(torch_server, transport, "fp16_model"),
    ])
