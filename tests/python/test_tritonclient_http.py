"""Conformance with the published Triton HTTP client (tritonclient.http 2.73.0).

KServe v2 / Open Inference Protocol over HTTP plus Triton's extensions: binary tensor data
(tested with binary_data True and False for inputs and outputs), classification, model
configuration, model repository, request/response compression.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _models import (
    EXPECTED_EXTENSIONS,
    MAIN_MODELS,
    STRINGS,
    add_sub_inputs,
    fp16_inputs,
    iris_inputs,
    mixed_inputs,
    as_text,
    check_classification,
    ort_run,
)

BOOLS = [True, False]


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(url=server.http_host, network_timeout=30.0)
    yield c
    c.close()


def make_input(name, array, datatype, binary):
    inp = httpclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


# ---------------------------------------------------------------------------------------
# health and metadata
# ---------------------------------------------------------------------------------------

def test_server_live_and_ready(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_server_metadata(client):
    md = client.get_server_metadata()
    assert md["name"] == "oxserve"
    assert isinstance(md["version"], str) and md["version"]
    missing = EXPECTED_EXTENSIONS - set(md["extensions"])
    assert not missing, f"extensions missing from GET /v2: {sorted(missing)} (got {md['extensions']})"


@pytest.mark.parametrize("model", MAIN_MODELS)
def test_model_ready(client, model):
    assert client.is_model_ready(model) is True
    assert client.is_model_ready(model, "1") is True


def test_model_not_ready_for_unknown(client):
    assert client.is_model_ready("no_such_model") is False
    assert client.is_model_ready("add_sub", "7") is False


def _tensors(meta_list):
    return [(t["name"], t["datatype"], list(t["shape"])) for t in meta_list]


def test_model_metadata_add_sub(client):
    md = client.get_model_metadata("add_sub")
    assert md["name"] == "add_sub"
    assert "1" in md["versions"]
    assert isinstance(md["platform"], str) and md["platform"]
    assert _tensors(md["inputs"]) == [("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    assert _tensors(md["outputs"]) == [("OUTPUT0", "FP32", [-1, 16]), ("OUTPUT1", "FP32", [-1, 16])]
    # Explicit version.
    md1 = client.get_model_metadata("add_sub", "1")
    assert _tensors(md1["inputs"]) == _tensors(md["inputs"])


def test_model_metadata_iris_and_mixed(client):
    iris = client.get_model_metadata("iris")
    assert _tensors(iris["inputs"]) == [("features", "FP32", [-1, 4])]
    assert _tensors(iris["outputs"]) == [("probabilities", "FP32", [-1, 3])]
    mixed = client.get_model_metadata("mixed_types")  # max_batch_size 0: no batch dim
    assert _tensors(mixed["inputs"]) == [("A", "INT64", [3]), ("B", "FP64", [3])]
    assert _tensors(mixed["outputs"]) == [("A_INT32", "INT32", [3]), ("A_GT_B", "BOOL", [3])]
    s = client.get_model_metadata("string_identity")
    assert _tensors(s["inputs"]) == [("INPUT0", "BYTES", [-1, 1])]
    assert _tensors(s["outputs"]) == [("OUTPUT0", "BYTES", [-1, 1])]
    f = client.get_model_metadata("fp16_double")
    assert _tensors(f["inputs"]) == [("INPUT0", "FP16", [-1, 4])]


def test_model_metadata_unknown_model(client):
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert "no_such_model" in str(e.value)


def _config_tensors(lst):
    return [(t["name"], t["data_type"], list(t["dims"])) for t in lst]


def test_model_config_add_sub(client):
    cfg = client.get_model_config("add_sub")
    assert cfg["name"] == "add_sub"
    assert cfg["max_batch_size"] == 8
    assert _config_tensors(cfg["input"]) == [("INPUT0", "TYPE_FP32", [16]), ("INPUT1", "TYPE_FP32", [16])]
    assert _config_tensors(cfg["output"]) == [("OUTPUT0", "TYPE_FP32", [16]), ("OUTPUT1", "TYPE_FP32", [16])]


def test_model_config_iris_and_mixed(client):
    iris = client.get_model_config("iris")
    assert iris["max_batch_size"] == 8
    assert _config_tensors(iris["input"]) == [("features", "TYPE_FP32", [4])]
    assert _config_tensors(iris["output"]) == [("probabilities", "TYPE_FP32", [3])]
    assert iris["output"][0].get("label_filename") == "labels.txt"
    mixed = client.get_model_config("mixed_types")
    assert mixed.get("max_batch_size", 0) == 0
    assert _config_tensors(mixed["input"]) == [("A", "TYPE_INT64", [3]), ("B", "TYPE_FP64", [3])]
    assert _config_tensors(mixed["output"]) == [("A_INT32", "TYPE_INT32", [3]), ("A_GT_B", "TYPE_BOOL", [3])]
    s = client.get_model_config("string_identity")
    assert _config_tensors(s["input"]) == [("INPUT0", "TYPE_STRING", [1])]


def test_autocomplete_mlp_metadata_and_config(client):
    """No config.pbtxt: everything comes from the ONNX file (as Triton's auto-complete)."""
    md = client.get_model_metadata("autocomplete_mlp")
    assert md["name"] == "autocomplete_mlp"
    assert _tensors(md["inputs"]) == [("x", "FP32", [-1, 4])]
    assert _tensors(md["outputs"]) == [("y", "FP32", [-1, 3])]
    cfg = client.get_model_config("autocomplete_mlp")
    assert cfg["name"] == "autocomplete_mlp"
    # Triton's default-max-batch-size for auto-completed batchable models.
    assert cfg["max_batch_size"] == 4
    assert _config_tensors(cfg["input"]) == [("x", "TYPE_FP32", [4])]
    assert _config_tensors(cfg["output"]) == [("y", "TYPE_FP32", [3])]


def test_reshape_model_metadata_and_config(client):
    md = client.get_model_metadata("reshape_model")
    assert _tensors(md["inputs"]) == [("INPUT0", "FP32", [-1, 4])]
    assert _tensors(md["outputs"]) == [("OUTPUT0", "FP32", [-1, 4])]
    cfg = client.get_model_config("reshape_model")
    assert _config_tensors(cfg["input"]) == [("INPUT0", "TYPE_FP32", [4])]
    assert list(cfg["input"][0]["reshape"]["shape"]) == [2, 2]
    assert list(cfg["output"][0]["reshape"]["shape"]) == [2, 2]


def test_repository_index(client):
    index = client.get_model_repository_index()
    by_name = {m["name"]: m for m in index}
    assert sorted(by_name) == MAIN_MODELS
    for name, entry in by_name.items():
        assert entry["state"] == "READY", entry
        assert entry["version"] == "1", entry


# ---------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("binary_out", BOOLS, ids=["bin_out", "json_out"])
@pytest.mark.parametrize("binary_in", BOOLS, ids=["bin_in", "json_in"])
def test_infer_add_sub(client, binary_in, binary_out, batch):
    x = add_sub_inputs(batch)
    inputs = [make_input(n, a, "FP32", binary_in) for n, a in x.items()]
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("OUTPUT0", "OUTPUT1")]
    result = client.infer("add_sub", inputs, outputs=outputs, request_id=f"req-{batch}")
    resp = result.get_response()
    assert resp["model_name"] == "add_sub"
    assert resp["model_version"] == "1"
    assert resp["id"] == f"req-{batch}"
    out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert out0.dtype == np.float32 and out0.shape == (batch, 16)
    np.testing.assert_array_equal(out0, x["INPUT0"] + x["INPUT1"])
    np.testing.assert_array_equal(out1, x["INPUT0"] - x["INPUT1"])
    for o in resp["outputs"]:
        assert o["datatype"] == "FP32" and o["shape"] == [batch, 16]
        has_binary = "binary_data_size" in (o.get("parameters") or {})
        assert has_binary == binary_out, o


def test_infer_add_sub_default_outputs_and_version(client):
    """No outputs requested: all outputs, binary (tritonclient sets binary_data_output)."""
    x = add_sub_inputs(2, seed=11)
    inputs = [make_input(n, a, "FP32", True) for n, a in x.items()]
    result = client.infer("add_sub", inputs, model_version="1")
    assert sorted(o["name"] for o in result.get_response()["outputs"]) == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x["INPUT0"] + x["INPUT1"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x["INPUT0"] - x["INPUT1"])


@pytest.mark.parametrize("binary", BOOLS, ids=["binary", "json"])
def test_infer_only_output1(client, binary):
    x = add_sub_inputs(1, seed=12)
    inputs = [make_input(n, a, "FP32", binary) for n, a in x.items()]
    result = client.infer(
        "add_sub", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x["INPUT0"] - x["INPUT1"])


@pytest.mark.parametrize("binary", BOOLS, ids=["binary", "json"])
def test_infer_iris(client, binary):
    x = iris_inputs(4)
    result = client.infer(
        "iris", [make_input("features", x["features"], "FP32", binary)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)],
    )
    probs = result.as_numpy("probabilities")
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, ort_run("iris", x)["probabilities"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("binary", BOOLS, ids=["binary", "json"])
def test_classification_iris(client, binary, batch):
    x = iris_inputs(batch, seed=21)
    result = client.infer(
        "iris", [make_input("features", x["features"], "FP32", binary)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)],
    )
    out = [o for o in result.get_response()["outputs"] if o["name"] == "probabilities"]
    assert len(out) == 1 and out[0]["datatype"] == "BYTES" and out[0]["shape"] == [batch, 2]
    check_classification(result.as_numpy("probabilities"), ort_run("iris", x)["probabilities"], 2)


@pytest.mark.parametrize("binary_out", BOOLS, ids=["bin_out", "json_out"])
@pytest.mark.parametrize("binary_in", BOOLS, ids=["bin_in", "json_in"])
def test_infer_bytes_string_identity(client, binary_in, binary_out):
    arr = np.array([[s.encode("utf-8")] for s in STRINGS], dtype=np.object_)
    result = client.infer(
        "string_identity", [make_input("INPUT0", arr, "BYTES", binary_in)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)],
    )
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (len(STRINGS), 1)
    assert [as_text(v) for v in out.reshape(-1)] == STRINGS
    o = result.get_response()["outputs"][0]
    assert o["datatype"] == "BYTES" and o["shape"] == [len(STRINGS), 1]


def test_infer_fp16_binary(client):
    x = fp16_inputs(3)
    result = client.infer(
        "fp16_double", [make_input("INPUT0", x["INPUT0"], "FP16", True)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)],
    )
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == np.float16 and out.shape == (3, 4)
    # x + x is exact in binary floating point (no overflow for |x| < 1000).
    np.testing.assert_array_equal(out, x["INPUT0"] + x["INPUT0"])


@pytest.mark.parametrize("binary_out", BOOLS, ids=["bin_out", "json_out"])
@pytest.mark.parametrize("binary_in", BOOLS, ids=["bin_in", "json_in"])
def test_infer_mixed_types(client, binary_in, binary_out):
    x = mixed_inputs()
    result = client.infer(
        "mixed_types",
        [make_input("A", x["A"], "INT64", binary_in), make_input("B", x["B"], "FP64", binary_in)],
        outputs=[httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("A_INT32", "A_GT_B")],
    )
    a32, gt = result.as_numpy("A_INT32"), result.as_numpy("A_GT_B")
    assert a32.dtype == np.int32 and gt.dtype == np.bool_
    np.testing.assert_array_equal(a32, x["A"].astype(np.int32))
    np.testing.assert_array_equal(gt, x["A"].astype(np.float64) > x["B"])
    dtypes = {o["name"]: (o["datatype"], o["shape"]) for o in result.get_response()["outputs"]}
    assert dtypes == {"A_INT32": ("INT32", [3]), "A_GT_B": ("BOOL", [3])}


@pytest.mark.parametrize("binary", BOOLS, ids=["binary", "json"])
def test_infer_autocomplete_mlp(client, binary):
    x = {"x": np.array([[1, 2, 3, 4], [-1, 0.5, 0, 2]], dtype=np.float32)}
    result = client.infer(
        "autocomplete_mlp", [make_input("x", x["x"], "FP32", binary)],
        outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)],
    )
    np.testing.assert_allclose(result.as_numpy("y"), ort_run("autocomplete_mlp", x)["y"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("binary", BOOLS, ids=["binary", "json"])
def test_infer_reshape_model(client, binary):
    """Client [N,4] -> model [N,2,2] (transpose of each 2x2) -> client [N,4]."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = client.infer(
        "reshape_model", [make_input("INPUT0", x, "FP32", binary)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)],
    )
    o = result.get_response()["outputs"][0]
    assert o["shape"] == [2, 4]
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), np.array([[0, 2, 1, 3], [4, 6, 5, 7]], dtype=np.float32)
    )


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", BOOLS, ids=["binary", "json"])
def test_request_compression(client, algorithm, binary):
    x = add_sub_inputs(2, seed=31)
    inputs = [make_input(n, a, "FP32", binary) for n, a in x.items()]
    result = client.infer(
        "add_sub", inputs,
        outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")],
        request_compression_algorithm=algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x["INPUT0"] + x["INPUT1"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x["INPUT0"] - x["INPUT1"])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_response_compression(client, algorithm):
    """Accept-Encoding gzip/deflate: the server may compress; the client decodes either way."""
    x = add_sub_inputs(2, seed=32)
    inputs = [make_input(n, a, "FP32", True) for n, a in x.items()]
    result = client.infer("add_sub", inputs, response_compression_algorithm=algorithm,
                          request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x["INPUT0"] + x["INPUT1"])


def test_infer_error_is_exception(client):
    x = add_sub_inputs(1)
    inputs = [make_input("INPUT0", x["INPUT0"], "FP32", True)]
    with pytest.raises(InferenceServerException) as e:
        client.infer("add_sub", inputs)
    assert "INPUT1" in str(e.value)
    assert client.is_server_live()
