"""TensorFlow SavedModels through oxserve's TensorFlow engine, over KServe v2 with tritonclient.

Fixtures and references: scripts/make_tf_models.py (see _tf.py for where they come from; the
module is skipped, with the reason, where the TensorFlow venv or C library is missing).

Servers (one per module, each on its own temporary repository where one is needed):
- `tf_server`: the fixture directory as it is (TF Serving layout: `<model>/<version>/
  saved_model.pb`, no config.pbtxt) next to examples/models (ONNX);
- `layout_server`: two_sig with a config.pbtxt `version_policy: { all: {} }`; Triton's layout
  (`config.pbtxt` + `<version>/model.savedmodel/`), once auto-completed (tri_two_sig) and once
  with an explicit batched config (tri_mlp: max_batch_size 8, dynamic batching, 2 instances);
- `corrupt_server`: broken SavedModels next to a good one and the ONNX examples;
- `nolib_server`: `--tensorflow-library /nonexistent/...`, a SavedModel and an ONNX model.

Shapes (Triton's auto-complete for TensorFlow): when every tensor of the default signature has
a leading -1 dim, max_batch_size is 4 and the batch dim is dropped from the config dims; a
tensor left with no dims (signature shape [-1], or [] on an unbatched model) gets dims [1] with
reshape [], so clients send [N, 1] (or [1]) for it and get [N, 1] back. A non-default signature
(request parameter `signature_name`) takes the signature's own shapes.

Tolerances (_tf.assert_matches): FP32/FP64 1e-5 relative; FP16/BF16 their own precision;
integers, booleans and strings exact. FP16/BF16 and non-UTF-8 strings have no JSON form, so the
HTTP JSON transport leaves out the signatures that have them.
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
from _models import add_sub_inputs, ort_run
from _server import ROOT, ServerProcess

_SKIP = _tf.skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

MODELS = _tf.models_dir()
REFERENCES = _tf.references()
EXAMPLES = "examples/models"
TRANSPORTS = ["http", "http_json", "grpc"]
NONEXISTENT_LIBRARY = "/nonexistent/libtensorflow_cc.so.2"
# Triton's max_batch_size for an auto-completed batched model.
AUTO_MAX_BATCH_SIZE = 4
SIGNATURE_NOT_FOUND = 'Serving signature name: "nope" not found in signature def'


# ---------------------------------------------------------------------------------------------
# Servers


def _start(name: str, repositories: list[str], extra_args: list[str] | None = None,
           ready_path: str = "/v2/health/ready"):
    server = ServerProcess(name, repositories, extra_args, ready_path).start()
    try:
        yield server
    finally:
        server.stop_and_check()


def _copy_version(model: str, version: str, dest: Path) -> None:
    shutil.copytree(MODELS / model / version, dest)


@pytest.fixture(scope="module")
def tf_server():
    yield from _start("tf", [str(MODELS), EXAMPLES])


TRI_MLP_CONFIG = """\
name: "tri_mlp"
platform: "tensorflow_savedmodel"
max_batch_size: 8
input [ { name: "x", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 10 ] } ]
dynamic_batching { }
instance_group [ { count: 2, kind: KIND_CPU } ]
parameters { key: "allow_thread_spinning" value: { string_value: "true" } }
"""


@pytest.fixture(scope="module")
def layout_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("tf-layouts")
    # TF Serving layout with a config.pbtxt that serves every version.
    for version in ("1", "2"):
        _copy_version("two_sig", version, repo / "two_sig" / version)
    (repo / "two_sig" / "config.pbtxt").write_text("version_policy: { all: {} }\n")
    # Triton's layout, config auto-completed from the SavedModel.
    _copy_version("two_sig", "2", repo / "tri_two_sig" / "2" / "model.savedmodel")
    (repo / "tri_two_sig" / "config.pbtxt").write_text('platform: "tensorflow_savedmodel"\n')
    # Triton's layout with an explicit batched configuration.
    _copy_version("mlp", "1", repo / "tri_mlp" / "1" / "model.savedmodel")
    (repo / "tri_mlp" / "config.pbtxt").write_text(TRI_MLP_CONFIG)
    yield from _start("tf-layouts", [str(repo)])


# name -> (how the copy of two_sig/2 is broken, words of which one must be in the reason)
CORRUPT = {
    "garbage_pb": ("saved_model.pb replaced by bytes that are no protobuf", ("savedmodel", "saved_model.pb")),
    "empty_pb": ("saved_model.pb empty (no MetaGraph)", ("metagraph", "savedmodel", "serve")),
    "truncated_pb": ("saved_model.pb cut in half", ("savedmodel", "saved_model.pb")),
    "corrupt_variables_index": ("variables/variables.index replaced by garbage", ("savedmodel", "variables", "sstable")),
    "missing_variables_data": ("variables/variables.data-* removed", ("savedmodel", "variables")),
    "bad_parameter": ("allow_thread_spinning neither true nor false", ("allow_thread_spinning",)),
}


def _break(name: str, version_dir: Path) -> None:
    pb = version_dir / "saved_model.pb"
    variables = version_dir / "variables"
    if name == "garbage_pb":
        # Starts with tag 0x7f (wire type 7, which does not exist): never a valid message.
        pb.write_bytes(b"\x7f\xff\xfe not a SavedModel " * 64)
    elif name == "empty_pb":
        pb.write_bytes(b"")
    elif name == "truncated_pb":
        data = pb.read_bytes()
        pb.write_bytes(data[: len(data) // 2])
    elif name == "corrupt_variables_index":
        index = variables / "variables.index"
        index.write_bytes(b"\x00garbage\xff" * (index.stat().st_size // 9 + 1))
    elif name == "missing_variables_data":
        shards = list(variables.glob("variables.data-*"))
        assert shards, f"no variables.data-* in {variables}"
        for shard in shards:
            shard.unlink()
    elif name == "bad_parameter":
        (version_dir.parent / "config.pbtxt").write_text(
            'parameters { key: "allow_thread_spinning" value: { string_value: "sometimes" } }\n')
    else:
        raise AssertionError(name)


@pytest.fixture(scope="module")
def corrupt_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("tf-corrupt")
    for name in CORRUPT:
        _copy_version("two_sig", "2", repo / name / "1")
        _break(name, repo / name / "1")
    _copy_version("scalar", "1", repo / "scalar" / "1")
    # Strict readiness keeps /v2/health/ready non-200 with broken models: poll a good one.
    server = ServerProcess("tf-corrupt", [str(repo), EXAMPLES], ready_path="/v2/models/add_sub/ready").start()
    try:
        _wait_loaded(server, [*CORRUPT, "scalar", "add_sub", "iris"])
        yield server
    finally:
        server.stop_and_check()


@pytest.fixture(scope="module")
def nolib_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("tf-nolib")
    _copy_version("scalar", "1", repo / "scalar" / "1")
    shutil.copytree(ROOT / EXAMPLES / "add_sub", repo / "add_sub")
    server = ServerProcess("tf-nolib", [str(repo)], ["--tensorflow-library", NONEXISTENT_LIBRARY],
                           ready_path="/v2/models/add_sub/ready").start()
    try:
        _wait_loaded(server, ["scalar", "add_sub"])
        yield server
    finally:
        server.stop_and_check()


def _index(server) -> list[dict]:
    r = requests.post(server.http_url + "/v2/repository/index", timeout=30, **server.requests_kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_loaded(server, names: list[str], timeout: float = 60.0) -> None:
    """Waits until every named model is READY or UNAVAILABLE (the server listens before its
    models have loaded, and lists them with no state until their load starts)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = _index(server)
        settled = {e["name"] for e in entries if e["state"] in ("READY", "UNAVAILABLE")}
        if set(names) <= settled and not any(e["state"] in ("LOADING", "UNLOADING") for e in entries):
            return
        if time.monotonic() > deadline:
            server.fail(f"models {names} not all loaded within {timeout:.0f} s: {entries}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Requests


def infer(server, transport: str, model: str, inputs: dict[str, np.ndarray], wire: dict[str, str],
          outputs: list[str] | None = None, version: str = "", signature: str | None = None):
    """One inference through tritonclient; (outputs by name, the response's model_version).
    `outputs` None requests none explicitly (the server returns all)."""
    params = {"signature_name": signature} if signature is not None else None
    if transport.startswith("http"):
        binary = transport == "http"
        client = httpclient.InferenceServerClient(url=server.http_host, network_timeout=60.0)
        try:
            ins = []
            for name, arr in inputs.items():
                inp = httpclient.InferInput(name, list(arr.shape), wire[name])
                inp.set_data_from_numpy(arr, binary_data=binary)
                ins.append(inp)
            outs = None if outputs is None else [httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs]
            result = client.infer(model, ins, model_version=version, outputs=outs, parameters=params)
            response = result.get_response()
            names = [o["name"] for o in response["outputs"]]
            return {n: result.as_numpy(n) for n in names}, response["model_version"]
        finally:
            client.close()
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        ins = []
        for name, arr in inputs.items():
            inp = grpcclient.InferInput(name, list(arr.shape), wire[name])
            inp.set_data_from_numpy(arr)
            ins.append(inp)
        outs = None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]
        result = client.infer(model, ins, model_version=version, outputs=outs, parameters=params,
                              client_timeout=60.0)
        response = result.get_response()
        names = [o.name for o in response.outputs]
        return {n: result.as_numpy(n) for n in names}, response.model_version
    finally:
        client.close()


def reference_request(model: str, version: str, signature: str):
    """(inputs, wire types, expected outputs) of a references.json entry, in the shapes the
    server takes and gives back (see the module docstring)."""
    ref = REFERENCES[model][version][signature]

    def shaped(kind: str, name: str, tensor: dict) -> np.ndarray:
        arr = _tf.to_numpy(tensor)
        if _tf.needs_trailing_one(model, version, signature, kind, name):
            arr = arr.reshape(*arr.shape, 1)
        return arr

    inputs = {n: shaped("inputs", n, t) for n, t in ref["inputs"].items()}
    wire = {n: _tf.wire_type(t) for n, t in ref["inputs"].items()}
    expected = {n: shaped("outputs", n, t) for n, t in ref["outputs"].items()}
    return inputs, wire, expected


def check_reference(server, transport: str, model: str, version: str, signature: str,
                    served_as: str | None = None, explicit_version: bool = True) -> dict[str, np.ndarray]:
    inputs, wire, expected = reference_request(model, version, signature)
    rows = len(next(iter(inputs.values())))
    # A batched model takes at most AUTO_MAX_BATCH_SIZE rows a request: longer references are
    # sent in parts.
    step = AUTO_MAX_BATCH_SIZE if _tf.model_is_batched(model, version) else rows
    parts = []
    for start in range(0, max(rows, 1), step):
        part = {n: a[start:start + step] for n, a in inputs.items()} if step != rows else inputs
        got, answered_version = infer(
            server, transport, served_as or model, part, wire, outputs=sorted(expected),
            version=version if explicit_version else "",
            signature=None if signature == _tf.DEFAULT_SIGNATURE else signature,
        )
        assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
        assert answered_version == version, answered_version
        parts.append(got)
    got = {n: np.concatenate([p[n] for p in parts]) if len(parts) > 1 else parts[0][n] for n in expected}
    for name, want in expected.items():
        _tf.assert_matches(name, got[name], want)
    return got


def _json_ok(model: str, version: str, signature: str) -> bool:
    ref = REFERENCES[model][version][signature]
    tensors = [*ref["inputs"].values(), *ref["outputs"].values()]
    return all(t["dtype"] not in ("DT_HALF", "DT_BFLOAT16") and _tf.is_utf8_text(t) for t in tensors)


def _reference_params():
    for model, versions in sorted(REFERENCES.items()):
        for version, sigs in sorted(versions.items()):
            for signature in sorted(sigs):
                for transport in TRANSPORTS:
                    if transport == "http_json" and not _json_ok(model, version, signature):
                        continue
                    yield pytest.param(model, version, signature, transport,
                                       id=f"{model}-v{version}-{signature}-{transport}")


def _latest(model: str) -> str:
    return max(REFERENCES[model], key=int)


def _expect_error(call, transport: str, code: str = "invalid") -> str:
    """Runs `call`, which must fail with HTTP 400 / gRPC INVALID_ARGUMENT (code "invalid") or
    HTTP 503 / gRPC UNAVAILABLE (code "unavailable"); returns the message."""
    with pytest.raises(InferenceServerException) as info:
        call()
    status = str(info.value.status())
    want = {
        ("invalid", "http"): "400", ("invalid", "grpc"): "StatusCode.INVALID_ARGUMENT",
        ("unavailable", "http"): "503", ("unavailable", "grpc"): "StatusCode.UNAVAILABLE",
    }[(code, "grpc" if transport == "grpc" else "http")]
    assert status == want, (status, info.value.message())
    return info.value.message() or ""


# ---------------------------------------------------------------------------------------------
# 1. Every reference through HTTP (binary and JSON) and gRPC


@pytest.mark.parametrize("model,version,signature,transport", list(_reference_params()))
def test_reference_outputs(tf_server, layout_server, model, version, signature, transport):
    """Every model/version/signature of references.json answers as Python TensorFlow did. The
    plain fixture repository serves the latest version only, so older versions are asked of
    the layout server's two_sig (version_policy all)."""
    if version != _latest(model):
        assert model == "two_sig", f"{model} v{version}: only two_sig has an older version to serve"
        check_reference(layout_server, transport, model, version, signature)
    else:
        check_reference(tf_server, transport, model, version, signature)


def test_every_fixture_model_is_ready(tf_server):
    index = _index(tf_server)
    tf_entries = {e["name"]: e for e in index if e["name"] in REFERENCES}
    assert sorted(tf_entries) == sorted(REFERENCES), index
    for name, entry in tf_entries.items():
        assert entry["state"] == "READY", entry
        assert entry["version"] == _latest(name), entry


def _expected_metadata_shape(model: str, version: str, shape: list[int]) -> list[int]:
    if _tf.model_is_batched(model, version):
        rest = shape[1:]
        return [-1, *(rest or [1])]
    return shape or [1]


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_metadata_and_autocompleted_config(tf_server, transport):
    """Metadata and config of every fixture model follow the default signature (Triton's
    auto-complete rules in the module docstring); platform tensorflow_savedmodel."""
    if transport == "http":
        client = httpclient.InferenceServerClient(url=tf_server.http_host)
        get_meta = client.get_model_metadata
        get_config = client.get_model_config
    else:
        client = grpcclient.InferenceServerClient(url=tf_server.grpc_host)
        get_meta = lambda m: client.get_model_metadata(m, as_json=True)  # noqa: E731
        get_config = lambda m: client.get_model_config(m, as_json=True)["config"]  # noqa: E731
    try:
        for model in sorted(REFERENCES):
            version = _latest(model)
            sig = _tf.signatures()[model][version][_tf.DEFAULT_SIGNATURE]
            meta = get_meta(model)
            assert meta["platform"] == "tensorflow_savedmodel", meta
            assert meta["versions"] == [version], meta
            for kind, key in (("inputs", "inputs"), ("outputs", "outputs")):
                got = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta[key]}
                want = {
                    name: (_tf.DTYPES[t["dtype"]][1], _expected_metadata_shape(model, version, t["shape"]))
                    for name, t in sig[kind].items()
                }
                assert got == want, (model, kind, got, want)
            config = get_config(model)
            assert config["platform"] == "tensorflow_savedmodel", config
            batched = _tf.model_is_batched(model, version)
            assert int(config.get("max_batch_size", 0)) == (AUTO_MAX_BATCH_SIZE if batched else 0), (model, config)
            for kind, key in (("inputs", "input"), ("outputs", "output")):
                for entry in config[key]:
                    shape = sig[kind][entry["name"]]["shape"]
                    left = shape[1:] if batched else shape
                    assert [int(d) for d in entry["dims"]] == (left or [1]), (model, entry)
                    if not left:
                        assert [int(d) for d in entry["reshape"].get("shape", [])] == [], (model, entry)
    finally:
        client.close()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_outputs_subset_and_explicit_default_signature(tf_server, transport):
    """Requesting one output returns only it; signature_name "serving_default" is the default."""
    inputs, wire, expected = reference_request("two_sig", "2", _tf.DEFAULT_SIGNATURE)
    got, _ = infer(tf_server, transport, "two_sig", inputs, wire, outputs=["total"])
    assert sorted(got) == ["total"]
    _tf.assert_matches("total", got["total"], expected["total"])
    got, _ = infer(tf_server, transport, "two_sig", inputs, wire, signature=_tf.DEFAULT_SIGNATURE)
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        _tf.assert_matches(name, got[name], want)


# ---------------------------------------------------------------------------------------------
# 2. Versions


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_default_policy_serves_latest_version_only(tf_server, transport):
    entries = [e for e in _index(tf_server) if e["name"] == "two_sig"]
    assert [(e["version"], e["state"]) for e in entries] == [("2", "READY")], entries
    # Without a version: version 2, its references.
    check_reference(tf_server, transport, "two_sig", "2", _tf.DEFAULT_SIGNATURE, explicit_version=False)
    inputs, wire, _ = reference_request("two_sig", "1", _tf.DEFAULT_SIGNATURE)
    with pytest.raises(InferenceServerException) as info:
        infer(tf_server, transport, "two_sig", inputs, wire, version="1")
    message = info.value.message() or ""
    assert "version" in message.lower() and "two_sig" in message, message
    if transport == "http":
        r = requests.get(tf_server.http_url + "/v2/models/two_sig/versions/1/ready", timeout=10,
                         **tf_server.requests_kwargs)
        assert r.status_code != 200, r.text


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_version_policy_all_serves_both_versions(layout_server, transport):
    entries = sorted((e["version"], e["state"]) for e in _index(layout_server) if e["name"] == "two_sig")
    assert entries == [("1", "READY"), ("2", "READY")]
    results = {}
    for version in ("1", "2"):
        results[version] = check_reference(layout_server, transport, "two_sig", version, _tf.DEFAULT_SIGNATURE)
        check_reference(layout_server, transport, "two_sig", version, "double")
    # The versions differ in W and b, so in every output.
    for name in results["1"]:
        assert not np.allclose(results["1"][name], results["2"][name]), name
    # No version asked: the highest.
    check_reference(layout_server, transport, "two_sig", "2", _tf.DEFAULT_SIGNATURE, explicit_version=False)
    client = (httpclient.InferenceServerClient(url=layout_server.http_host) if transport == "http"
              else grpcclient.InferenceServerClient(url=layout_server.grpc_host))
    try:
        meta = (client.get_model_metadata("two_sig") if transport == "http"
                else client.get_model_metadata("two_sig", as_json=True))
        assert sorted(meta["versions"]) == ["1", "2"], meta
        for version in ("1", "2"):
            assert client.is_model_ready("two_sig", version)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# 3. Triton's layout, explicit configs, concurrency


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_triton_layout_autocompleted(layout_server, transport):
    for signature in (_tf.DEFAULT_SIGNATURE, "double"):
        check_reference(layout_server, transport, "two_sig", "2", signature, served_as="tri_two_sig")
    client = (httpclient.InferenceServerClient(url=layout_server.http_host) if transport == "http"
              else grpcclient.InferenceServerClient(url=layout_server.grpc_host))
    try:
        if transport == "http":
            meta, config = client.get_model_metadata("tri_two_sig"), client.get_model_config("tri_two_sig")
        else:
            meta = client.get_model_metadata("tri_two_sig", as_json=True)
            config = client.get_model_config("tri_two_sig", as_json=True)["config"]
        assert meta["platform"] == "tensorflow_savedmodel", meta
        assert meta["versions"] == ["2"], meta
        assert config["platform"] == "tensorflow_savedmodel", config
        assert int(config["max_batch_size"]) == AUTO_MAX_BATCH_SIZE, config
    finally:
        client.close()


def test_explicit_config_is_used(layout_server):
    c = httpclient.InferenceServerClient(url=layout_server.http_host)
    try:
        config = c.get_model_config("tri_mlp")
        meta = c.get_model_metadata("tri_mlp")
    finally:
        c.close()
    assert config["platform"] == "tensorflow_savedmodel", config
    assert meta["platform"] == "tensorflow_savedmodel", meta
    assert int(config["max_batch_size"]) == 8, config
    assert "dynamic_batching" in config, config
    groups = config["instance_group"]
    assert [(int(g["count"]), g["kind"]) for g in groups] == [(2, "KIND_CPU")], groups
    assert config["parameters"]["allow_thread_spinning"] == {"string_value": "true"}, config
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}], meta
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}], meta


def _mlp_rows(rows: list[int]):
    inputs, wire, expected = reference_request("mlp", "1", _tf.DEFAULT_SIGNATURE)
    return {"x": inputs["x"][rows]}, wire, expected["y"][rows]


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_explicit_max_batch_size(layout_server, transport):
    """8 rows (more than the auto-completed 4) answer; 9 are refused."""
    rows = [i % 2 for i in range(8)]
    inputs, wire, want = _mlp_rows(rows)
    got, _ = infer(layout_server, transport, "tri_mlp", inputs, wire, outputs=["y"])
    _tf.assert_matches("y", got["y"], want)
    inputs, wire, _ = _mlp_rows([i % 2 for i in range(9)])
    message = _expect_error(lambda: infer(layout_server, transport, "tri_mlp", inputs, wire), transport)
    assert "batch" in message.lower(), message


def test_concurrent_requests_with_dynamic_batching(layout_server):
    """Several threads, HTTP and gRPC, batches of 1..8 rows in varied orders, against two
    instances behind the dynamic batcher: every row answers with its own reference."""

    def worker(t: int) -> int:
        done = 0
        for k in range(8):
            size = 1 + (t + k) % 8
            rows = [(t * 3 + k + i) % 2 for i in range(size)]
            inputs, wire, want = _mlp_rows(rows)
            transport = "grpc" if (t + k) % 2 else "http"
            got, version = infer(layout_server, transport, "tri_mlp", inputs, wire, outputs=["y"])
            assert version == "1"
            _tf.assert_matches(f"y (thread {t}, request {k}, rows {rows})", got["y"], want)
            done += 1
        return done

    threads = 8
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        counts = list(pool.map(worker, range(threads)))
    assert counts == [8] * threads
    r = requests.get(layout_server.http_url + "/v2/models/tri_mlp/stats", timeout=10,
                     **layout_server.requests_kwargs)
    assert r.status_code == 200, r.text
    stats = r.json()["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) >= threads * 8, stats


# ---------------------------------------------------------------------------------------------
# 4. Bad input

F32 = np.float32
BAD = {
    # name -> (model, inputs {name: (array, wire type)}, requested outputs, signature, words in the message)
    "wrong_dtype": ("two_sig", {"x": (np.ones((2, 4), np.int32), "INT32")}, None, None, ("INT32", "FP32")),
    "wrong_shape": ("two_sig", {"x": (np.ones((2, 5), F32), "FP32")}, None, None, ("shape",)),
    "batch_too_large": ("two_sig", {"x": (np.ones((5, 4), F32), "FP32")}, None, None, ("batch",)),
    "unknown_input": ("two_sig", {"x": (np.ones((1, 4), F32), "FP32"), "bogus": (np.ones((1, 4), F32), "FP32")},
                      None, None, ("bogus",)),
    "missing_input": ("types", {"i8": (np.ones((1, 2), np.int8), "INT8")}, None, None, ()),
    "unknown_output": ("two_sig", {"x": (np.ones((1, 4), F32), "FP32")}, ["nope"], None, ("nope",)),
    "unknown_signature": ("two_sig", {"a": (np.ones((1, 2), np.int64), "INT64")}, None, "nope",
                          (SIGNATURE_NOT_FOUND,)),
    "signature_wrong_dtype": ("two_sig", {"a": (np.ones((1, 2), np.int32), "INT32")}, None, "double",
                              ("INT32", "INT64")),
    "signature_wrong_shape": ("two_sig", {"a": (np.ones((1, 3), np.int64), "INT64")}, None, "double", ("shape",)),
    "signature_other_input": ("two_sig", {"x": (np.ones((1, 4), F32), "FP32")}, None, "double", ("'x'",)),
    "signature_unknown_output": ("two_sig", {"a": (np.ones((1, 2), np.int64), "INT64")}, ["y"], "double", ("'y'",)),
    "scalar_as_rank0": ("scalar", {"x": (np.array(2.0, F32), "FP32")}, None, None, ("shape",)),
}


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(tf_server, case, transport):
    model, feeds, outputs, signature, words = BAD[case]
    inputs = {n: a for n, (a, _) in feeds.items()}
    wire = {n: w for n, (_, w) in feeds.items()}
    message = _expect_error(
        lambda: infer(tf_server, transport, model, inputs, wire, outputs=outputs, signature=signature),
        transport)
    for word in words:
        assert word in message, (word, message)
    # Still serving, both signatures.
    assert tf_server.alive()
    check_reference(tf_server, transport, "two_sig", "2", _tf.DEFAULT_SIGNATURE)
    check_reference(tf_server, transport, "two_sig", "2", "double")


def test_unknown_signature_raw_http(tf_server):
    """The KServe v2 JSON request with `parameters.signature_name`, as a non-tritonclient client
    sends it; the error body carries TF Serving's message."""
    body = {"parameters": {"signature_name": "nope"},
            "inputs": [{"name": "a", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]}
    r = requests.post(tf_server.http_url + "/v2/models/two_sig/infer", json=body, timeout=30,
                      **tf_server.requests_kwargs)
    assert r.status_code == 400, r.text
    assert SIGNATURE_NOT_FOUND in r.json()["error"], r.text
    body["parameters"]["signature_name"] = "double"
    r = requests.post(tf_server.http_url + "/v2/models/two_sig/infer", json=body, timeout=30,
                      **tf_server.requests_kwargs)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert [(o["name"], o["datatype"], o["shape"], o["data"]) for o in out] == [("doubled", "INT64", [1, 2], [2, 4])], out


# ---------------------------------------------------------------------------------------------
# 5. Corrupt SavedModels


def test_corrupt_savedmodels_are_unavailable(corrupt_server):
    by_name = {e["name"]: e for e in _index(corrupt_server)}
    for name, (how, words) in CORRUPT.items():
        entry = by_name.get(name)
        assert entry is not None, (name, by_name)
        assert entry["state"] == "UNAVAILABLE", (how, entry)
        reason = entry.get("reason", "")
        assert reason.strip(), (how, entry)
        assert any(w in reason.lower() for w in words), (how, reason, words)
    for name in ("scalar", "add_sub", "iris"):
        assert by_name[name]["state"] == "READY", by_name[name]


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_corrupt_savedmodels_leave_others_serving(corrupt_server, transport):
    inputs, wire, _ = reference_request("two_sig", "2", _tf.DEFAULT_SIGNATURE)
    for name in CORRUPT:
        _expect_error(lambda: infer(corrupt_server, transport, name, inputs, wire), transport, "unavailable")
    check_reference(corrupt_server, transport, "scalar", "1", _tf.DEFAULT_SIGNATURE)
    _check_add_sub(corrupt_server, transport)


# ---------------------------------------------------------------------------------------------
# 6. No TensorFlow library


def test_missing_library(nolib_server):
    by_name = {e["name"]: e for e in _index(nolib_server)}
    scalar = by_name["scalar"]
    assert scalar["state"] == "UNAVAILABLE", scalar
    assert NONEXISTENT_LIBRARY in scalar.get("reason", ""), scalar
    assert "tensorflow" in scalar["reason"].lower(), scalar
    assert by_name["add_sub"]["state"] == "READY", by_name["add_sub"]


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_missing_library_other_models_answer(nolib_server, transport):
    inputs, wire, _ = reference_request("scalar", "1", _tf.DEFAULT_SIGNATURE)
    message = _expect_error(lambda: infer(nolib_server, transport, "scalar", inputs, wire), transport, "unavailable")
    assert "scalar" in message, message
    _check_add_sub(nolib_server, transport)


# ---------------------------------------------------------------------------------------------
# 7. SavedModels and ONNX models side by side


def _check_add_sub(server, transport: str, batch: int = 3, seed: int = 7) -> None:
    feeds = add_sub_inputs(batch, seed=seed)
    expected = ort_run("add_sub", feeds)
    got, _ = infer(server, transport, "add_sub", feeds, {n: "FP32" for n in feeds},
                   outputs=["OUTPUT0", "OUTPUT1"])
    for name, want in expected.items():
        _tf.assert_matches(name, got[name], want)


def test_tensorflow_and_onnx_side_by_side(tf_server):
    """TF and ONNX models of one server, interleaved from several threads over both protocols."""
    c = httpclient.InferenceServerClient(url=tf_server.http_host)
    try:
        assert c.get_model_metadata("two_sig")["platform"] == "tensorflow_savedmodel"
        assert c.get_model_metadata("add_sub")["platform"] != "tensorflow_savedmodel"
    finally:
        c.close()

    def worker(t: int) -> None:
        for k in range(4):
            transport = "grpc" if (t + k) % 2 else "http"
            if (t + k) % 3 == 0:
                _check_add_sub(tf_server, transport, batch=1 + k, seed=t * 10 + k)
            elif (t + k) % 3 == 1:
                check_reference(tf_server, transport, "two_sig", "2", _tf.DEFAULT_SIGNATURE)
            else:
                check_reference(tf_server, transport, "strings", "1", _tf.DEFAULT_SIGNATURE)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(worker, range(6)))
