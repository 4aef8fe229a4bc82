"""TorchServe's gRPC APIs against oxserve in torchserve mode, with Python stubs compiled from the
TorchServe API protos (proto/torchserve, as TorchServe's users compile TorchServe's own with
grpc_tools): Ping, Predictions, StreamPredictions and StreamPredictions2 on the gRPC inference
port (grpc_inference_port), and the management calls on grpc_management_port; answers compared
with TorchServe's recorded HTTP answers (the gRPC API answers the same JSON and predictions)."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import grpc
import pytest

import _torchserve as ts
from _torchserve import TorchServe, Workspace

_SKIP = ts.skip_reason() or ts.engine_skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
ROWS = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """inference_pb2(_grpc) and management_pb2(_grpc), compiled now with grpc_tools."""
    from grpc_tools import protoc
    import grpc_tools

    out = tmp_path_factory.mktemp("ts-stubs")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = ["torchserve/inference.proto", "torchserve/management.proto", "google/rpc/status.proto"]
    code = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--python_out={out}",
                        f"--grpc_python_out={out}", *protos])
    assert code == 0, "protoc failed"
    sys.path.insert(0, str(out))
    try:
        names = ["torchserve.inference_pb2", "torchserve.inference_pb2_grpc",
                 "torchserve.management_pb2", "torchserve.management_pb2_grpc"]
        yield {n.split(".")[1]: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts-grpc")
    store = root / "store"
    store.mkdir()
    for name in ("densenet_small", "linear_base"):
        shutil.copy(ts.model_store() / f"{name}.mar", store)
    server = TorchServe("grpc", Workspace(root / "ws"), store, "--enable-model-api",
                        "--disable-token-auth", "--models", "densenet_small.mar")
    server.start()
    try:
        server.wait_predicts("densenet_small")
        yield server
    finally:
        if server.alive():
            server.stop_and_check()


def channels(server):
    ports = server.workspace.ports
    return (grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}"),
            grpc.insecure_channel(f"127.0.0.1:{ports['grpc_management']}"))


def test_ping_and_predictions(grpc_server, stubs):
    inference_channel, _ = channels(grpc_server)
    inf = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(inference_channel)
    pb = stubs["inference_pb2"]
    try:
        from google.protobuf import empty_pb2
        health = inf.Ping(empty_pb2.Empty(), timeout=30).health
        assert json.loads(health) == {"status": "Healthy"}, health
        answer = inf.Predictions(pb.PredictionsRequest(model_name="densenet_small",
                                                       input={"data": ts.kitten()}), timeout=60)
        got = json.loads(answer.prediction)
        want = ts.exchange("predict_jpeg_raw_post")["body_json"]
        assert not ts.prediction_differences(got, want), (got, want)
        # The same through the server-streaming call: one message.
        parts = list(inf.StreamPredictions(pb.PredictionsRequest(
            model_name="densenet_small", model_version="1.0", input={"data": ts.kitten()}), timeout=60))
        assert len(parts) == 1 and json.loads(parts[0].prediction) == got
        with pytest.raises(grpc.RpcError) as e:
            inf.Predictions(pb.PredictionsRequest(model_name="nosuch", input={"data": b"x"}), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "Model not found: nosuch" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            inf.Predictions(pb.PredictionsRequest(model_name="densenet_small", model_version="9.9",
                                                  input={"data": ts.kitten()}), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "Model version: 9.9 does not exist for model: densenet_small" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            inf.Predictions(pb.PredictionsRequest(model_name="densenet_small",
                                                  input={"data": b"not an image"}), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    finally:
        inference_channel.close()


def test_management_workflow_and_python_handler(grpc_server, stubs):
    inference_channel, management_channel = channels(grpc_server)
    inf = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(inference_channel)
    mgmt = stubs["management_pb2_grpc"].ManagementAPIsServiceStub(management_channel)
    ipb, mpb = stubs["inference_pb2"], stubs["management_pb2"]
    try:
        registered = mgmt.RegisterModel(mpb.RegisterModelRequest(
            url="linear_base.mar", model_name="linear_base", initial_workers=1, synchronous=True),
            timeout=120)
        assert json.loads(registered.msg) == ts.exchange("register_linear_base")["body_json"]
        listed = json.loads(mgmt.ListModels(mpb.ListModelsRequest(), timeout=30).msg)
        assert [m["modelName"] for m in listed["models"]] == ["densenet_small", "linear_base"]
        assert "nextPageToken" in json.loads(mgmt.ListModels(mpb.ListModelsRequest(limit=1), timeout=30).msg)
        described = json.loads(mgmt.DescribeModel(mpb.DescribeModelRequest(model_name="linear_base"),
                                                  timeout=30).msg)
        assert described[0]["modelName"] == "linear_base" and described[0]["minWorkers"] == 1
        # The custom handler.py runs in TorchServe's Python worker: the recorded answer.
        answer = inf.Predictions(ipb.PredictionsRequest(
            model_name="linear_base", input={"body": json.dumps(ROWS).encode()}), timeout=60)
        assert json.loads(answer.prediction) == ts.exchange("predict_linear_json")["body_json"]
        # Bidirectional: each request answered in order with its sequence id; a failure is
        # carried in the answer and the stream goes on.
        requests = [
            ipb.PredictionsRequest(model_name="linear_base", input={"body": json.dumps(ROWS).encode()},
                                   sequenceId="s1"),
            ipb.PredictionsRequest(model_name="nosuch", input={"body": b"{}"}, sequenceId="s2"),
            ipb.PredictionsRequest(model_name="linear_base", input={"body": json.dumps(ROWS[:1]).encode()},
                                   sequenceId="s3"),
        ]
        answers = list(inf.StreamPredictions2(iter(requests), timeout=60))
        assert [a.sequenceId for a in answers] == ["s1", "s2", "s3"]
        assert json.loads(answers[0].prediction) == ts.exchange("predict_linear_json")["body_json"]
        assert answers[1].status.code == grpc.StatusCode.NOT_FOUND.value[0], answers[1]
        assert "Model not found: nosuch" in answers[1].status.message
        assert len(json.loads(answers[2].prediction)) == 1
        scaled = mgmt.ScaleWorker(mpb.ScaleWorkerRequest(model_name="linear_base", min_worker=2,
                                                         synchronous=True), timeout=120)
        assert json.loads(scaled.msg) == {"status": "Workers scaled to 2 for model: linear_base"}
        with pytest.raises(grpc.RpcError) as e:
            mgmt.SetDefault(mpb.SetDefaultRequest(model_name="linear_base", model_version="9.9"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value
        done = mgmt.UnregisterModel(mpb.UnregisterModelRequest(model_name="linear_base"), timeout=60)
        assert json.loads(done.msg) == {"status": 'Model "linear_base" unregistered'}
        with pytest.raises(grpc.RpcError) as e:
            mgmt.DescribeModel(mpb.DescribeModelRequest(model_name="linear_base"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            mgmt.RegisterModel(mpb.RegisterModelRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Parameter url is required." in e.value.details()
    finally:
        inference_channel.close()
        management_channel.close()
    assert grpc_server.predict("densenet_small").status_code == 200


def test_token_authorization_covers_the_grpc_apis(tmp_path, stubs):
    """With token authorization on (TorchServe's default), the gRPC APIs take the same keys as
    the HTTP ones in `authorization: Bearer` metadata: none or a wrong one is refused, the
    inference key runs predictions but not management calls, the management key manages."""
    ws = Workspace(tmp_path / "ws")
    server = TorchServe("grpc-auth", ws, ts.model_store(), "--models", "densenet_small.mar")
    server.start()
    try:
        keys = {k: v["key"] for k, v in json.loads((ws.cwd / "key_file.json").read_text()).items()}
        server.wait_predicts("densenet_small", headers={"Authorization": f"Bearer {keys['inference']}"})
        inference_channel, management_channel = channels(server)
        inf = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(inference_channel)
        mgmt = stubs["management_pb2_grpc"].ManagementAPIsServiceStub(management_channel)
        request = stubs["inference_pb2"].PredictionsRequest(model_name="densenet_small",
                                                            input={"data": ts.kitten()})
        bearer = lambda key: [("authorization", f"Bearer {key}")]  # noqa: E731
        try:
            for metadata in (None, bearer("wrong-key-0123456789")):
                with pytest.raises(grpc.RpcError) as e:
                    inf.Predictions(request, metadata=metadata, timeout=30)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
            answer = inf.Predictions(request, metadata=bearer(keys["inference"]), timeout=60)
            assert json.loads(answer.prediction)
            list_request = stubs["management_pb2"].ListModelsRequest()
            with pytest.raises(grpc.RpcError) as e:
                mgmt.ListModels(list_request, metadata=bearer(keys["inference"]), timeout=30)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value
            with pytest.raises(grpc.RpcError) as e:
                mgmt.ListModels(list_request, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
            listed = mgmt.ListModels(list_request, metadata=bearer(keys["management"]), timeout=30)
            assert [m["modelName"] for m in json.loads(listed.msg)["models"]] == ["densenet_small"]
        finally:
            inference_channel.close()
            management_channel.close()
    finally:
        if server.alive():
            server.stop_and_check()
