"""Conformance with the published Triton gRPC client (tritonclient.grpc 2.73.0) and, for
typed `contents` (which tritonclient never sends), the generated service stubs it ships."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from _models import (
    EXPECTED_EXTENSIONS,
    IRIS_LABELS,
    MAIN_MODELS,
    STRINGS,
    as_text,
    check_classification,
    add_sub_inputs,
    fp16_inputs,
    iris_inputs,
    mixed_inputs,
    ort_run,
)


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(url=server.grpc_host)
    yield c
    c.close()


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.grpc_host)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def make_input(name, array, datatype):
    inp = grpcclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


# ---------------------------------------------------------------------------------------
# health and metadata
# ---------------------------------------------------------------------------------------

def test_server_live_and_ready(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_server_metadata(client):
    md = client.get_server_metadata()
    assert md.name == "oxserve"
    assert md.version
    missing = EXPECTED_EXTENSIONS - set(md.extensions)
    assert not missing, f"extensions missing: {sorted(missing)} (got {list(md.extensions)})"


@pytest.mark.parametrize("model", MAIN_MODELS)
def test_model_ready(client, model):
    assert client.is_model_ready(model) is True
    assert client.is_model_ready(model, "1") is True


def test_model_not_ready_for_unknown(client):
    # Triton answers ModelReady for an unknown model with ready=false (status OK).
    assert client.is_model_ready("no_such_model") is False


def _tensors(lst):
    return [(t.name, t.datatype, list(t.shape)) for t in lst]


def test_model_metadata(client):
    md = client.get_model_metadata("add_sub")
    assert md.name == "add_sub"
    assert "1" in md.versions
    assert md.platform
    assert _tensors(md.inputs) == [("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    assert _tensors(md.outputs) == [("OUTPUT0", "FP32", [-1, 16]), ("OUTPUT1", "FP32", [-1, 16])]
    mixed = client.get_model_metadata("mixed_types")
    assert _tensors(mixed.inputs) == [("A", "INT64", [3]), ("B", "FP64", [3])]
    assert _tensors(mixed.outputs) == [("A_INT32", "INT32", [3]), ("A_GT_B", "BOOL", [3])]
    auto = client.get_model_metadata("autocomplete_mlp")
    assert _tensors(auto.inputs) == [("x", "FP32", [-1, 4])]
    assert _tensors(auto.outputs) == [("y", "FP32", [-1, 3])]
    reshape = client.get_model_metadata("reshape_model")
    assert _tensors(reshape.inputs) == [("INPUT0", "FP32", [-1, 4])]


def test_model_metadata_unknown_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="no_such_model"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _config_tensors(lst):
    return [(t.name, t.data_type, list(t.dims)) for t in lst]


def test_model_config(client):
    cfg = client.get_model_config("add_sub").config
    assert cfg.name == "add_sub"
    assert cfg.max_batch_size == 8
    assert _config_tensors(cfg.input) == [("INPUT0", mc.TYPE_FP32, [16]), ("INPUT1", mc.TYPE_FP32, [16])]
    assert _config_tensors(cfg.output) == [("OUTPUT0", mc.TYPE_FP32, [16]), ("OUTPUT1", mc.TYPE_FP32, [16])]
    iris = client.get_model_config("iris").config
    assert iris.output[0].label_filename == "labels.txt"
    mixed = client.get_model_config("mixed_types").config
    assert mixed.max_batch_size == 0
    assert _config_tensors(mixed.input) == [("A", mc.TYPE_INT64, [3]), ("B", mc.TYPE_FP64, [3])]
    assert _config_tensors(mixed.output) == [("A_INT32", mc.TYPE_INT32, [3]), ("A_GT_B", mc.TYPE_BOOL, [3])]
    s = client.get_model_config("string_identity").config
    assert _config_tensors(s.input) == [("INPUT0", mc.TYPE_STRING, [1])]
    f = client.get_model_config("fp16_double").config
    assert _config_tensors(f.input) == [("INPUT0", mc.TYPE_FP16, [4])]


def test_autocomplete_and_reshape_config(client):
    auto = client.get_model_config("autocomplete_mlp").config
    assert auto.name == "autocomplete_mlp"
    assert auto.max_batch_size == 4
    assert _config_tensors(auto.input) == [("x", mc.TYPE_FP32, [4])]
    assert _config_tensors(auto.output) == [("y", mc.TYPE_FP32, [3])]
    reshape = client.get_model_config("reshape_model").config
    assert list(reshape.input[0].dims) == [4]
    assert list(reshape.input[0].reshape.shape) == [2, 2]
    assert list(reshape.output[0].reshape.shape) == [2, 2]


def test_repository_index(client):
    index = client.get_model_repository_index()
    by_name = {m.name: m for m in index.models}
    assert sorted(by_name) == MAIN_MODELS
    for entry in by_name.values():
        assert entry.state == "READY", entry
        assert entry.version == "1", entry


# ---------------------------------------------------------------------------------------
# inference through tritonclient (raw_input_contents / raw_output_contents)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_infer_add_sub(client, batch):
    x = add_sub_inputs(batch)
    result = client.infer(
        "add_sub", [make_input(n, a, "FP32") for n, a in x.items()],
        outputs=[grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")],
        request_id="grpc-req",
    )
    resp = result.get_response()
    assert resp.model_name == "add_sub" and resp.model_version == "1" and resp.id == "grpc-req"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x["INPUT0"] + x["INPUT1"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x["INPUT0"] - x["INPUT1"])
    for o in resp.outputs:
        assert o.datatype == "FP32" and list(o.shape) == [batch, 16]


def test_infer_add_sub_all_outputs_by_default(client):
    x = add_sub_inputs(2, seed=7)
    result = client.infer("add_sub", [make_input(n, a, "FP32") for n, a in x.items()], model_version="1")
    assert sorted(o.name for o in result.get_response().outputs) == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x["INPUT0"] - x["INPUT1"])


def test_infer_only_output1(client):
    x = add_sub_inputs(1, seed=8)
    result = client.infer("add_sub", [make_input(n, a, "FP32") for n, a in x.items()],
                          outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    resp = result.get_response()
    assert [o.name for o in resp.outputs] == ["OUTPUT1"]
    assert len(resp.raw_output_contents) == 1
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x["INPUT0"] - x["INPUT1"])


def test_infer_iris(client):
    x = iris_inputs(4)
    result = client.infer("iris", [make_input("features", x["features"], "FP32")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), ort_run("iris", x)["probabilities"],
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_classification_iris(client, batch):
    x = iris_inputs(batch, seed=22)
    result = client.infer(
        "iris", [make_input("features", x["features"], "FP32")],
        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)],
    )
    o = result.get_response().outputs[0]
    assert o.datatype == "BYTES" and list(o.shape) == [batch, 2]
    strings = result.as_numpy("probabilities")
    check_classification(strings, ort_run("iris", x)["probabilities"], 2)
    assert {as_text(s).split(":")[2] for s in strings.reshape(-1)} <= set(IRIS_LABELS)


def test_infer_bytes_string_identity(client):
    arr = np.array([[s.encode("utf-8")] for s in STRINGS], dtype=np.object_)
    result = client.infer("string_identity", [make_input("INPUT0", arr, "BYTES")])
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (len(STRINGS), 1)
    assert [as_text(v) for v in out.reshape(-1)] == STRINGS


def test_infer_fp16(client):
    x = fp16_inputs(3)
    result = client.infer("fp16_double", [make_input("INPUT0", x["INPUT0"], "FP16")])
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, x["INPUT0"] + x["INPUT0"])


def test_infer_mixed_types(client):
    x = mixed_inputs()
    result = client.infer("mixed_types", [make_input("A", x["A"], "INT64"), make_input("B", x["B"], "FP64")])
    a32, gt = result.as_numpy("A_INT32"), result.as_numpy("A_GT_B")
    assert a32.dtype == np.int32 and gt.dtype == np.bool_
    np.testing.assert_array_equal(a32, x["A"].astype(np.int32))
    np.testing.assert_array_equal(gt, x["A"].astype(np.float64) > x["B"])


def test_infer_autocomplete_mlp(client):
    x = {"x": np.array([[1, 2, 3, 4], [-1, 0.5, 0, 2]], dtype=np.float32)}
    result = client.infer("autocomplete_mlp", [make_input("x", x["x"], "FP32")])
    np.testing.assert_allclose(result.as_numpy("y"), ort_run("autocomplete_mlp", x)["y"], rtol=1e-5, atol=0)


def test_infer_reshape_model(client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = client.infer("reshape_model", [make_input("INPUT0", x, "FP32")])
    assert list(result.get_response().outputs[0].shape) == [2, 4]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                  np.array([[0, 2, 1, 3], [4, 6, 5, 7]], dtype=np.float32))


def test_infer_error_is_exception(client):
    x = add_sub_inputs(1)
    with pytest.raises(InferenceServerException) as e:
        client.infer("add_sub", [make_input("INPUT0", x["INPUT0"], "FP32")])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.is_server_live()


# ---------------------------------------------------------------------------------------
# typed InferTensorContents (what non-Triton KServe clients send)
# ---------------------------------------------------------------------------------------

def _raw_outputs(resp):
    return {o.name: (o, raw) for o, raw in zip(resp.outputs, resp.raw_output_contents)}


def test_typed_contents_fp32(stub):
    x = add_sub_inputs(2, seed=9)
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for name, arr in x.items():
        t = req.inputs.add(name=name, datatype="FP32", shape=list(arr.shape))
        t.contents.fp32_contents.extend(arr.reshape(-1).tolist())
    resp = stub.ModelInfer(req)
    outs = _raw_outputs(resp)
    o0 = np.frombuffer(outs["OUTPUT0"][1], dtype=np.float32).reshape(2, 16)
    np.testing.assert_array_equal(o0, x["INPUT0"] + x["INPUT1"])


def test_typed_contents_int64_fp64(stub):
    x = mixed_inputs()
    req = service_pb2.ModelInferRequest(model_name="mixed_types")
    a = req.inputs.add(name="A", datatype="INT64", shape=[3])
    a.contents.int64_contents.extend(x["A"].tolist())
    b = req.inputs.add(name="B", datatype="FP64", shape=[3])
    b.contents.fp64_contents.extend(x["B"].tolist())
    outs = _raw_outputs(stub.ModelInfer(req))
    np.testing.assert_array_equal(np.frombuffer(outs["A_INT32"][1], dtype=np.int32), x["A"].astype(np.int32))
    np.testing.assert_array_equal(np.frombuffer(outs["A_GT_B"][1], dtype=np.bool_),
                                  x["A"].astype(np.float64) > x["B"])


def test_typed_contents_bytes(stub):
    req = service_pb2.ModelInferRequest(model_name="string_identity")
    t = req.inputs.add(name="INPUT0", datatype="BYTES", shape=[len(STRINGS), 1])
    t.contents.bytes_contents.extend(s.encode("utf-8") for s in STRINGS)
    outs = _raw_outputs(stub.ModelInfer(req))
    got = deserialize_bytes_tensor(outs["OUTPUT0"][1])
    assert [as_text(v) for v in got] == STRINGS
