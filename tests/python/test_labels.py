"""Version labels and rollback (docs/model-repository.md, "Version labels and rollback"):
labels from config.pbtxt's `version_labels`, addressed by the KServe v2 label routes and by the
`version_label` request parameter over HTTP and gRPC (tritonclient), set and rolled back at
run time over HTTP, gRPC and `oxserve rollback`.
"""

from __future__ import annotations

import shutil
import subprocess

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _server import ROOT, ServerProcess, oxserve_bin

A = np.arange(16, dtype=np.float32).reshape(1, 16)
B = np.full((1, 16), 3.0, dtype=np.float32)


@pytest.fixture()
def labelled(tmp_path):
    """add_sub with versions 1, 2 and 3 all served, `stable` → 1 and `canary` → 2."""
    model = tmp_path / "repo" / "add_sub"
    shutil.copytree(ROOT / "examples/models/add_sub", model)
    for v in ("2", "3"):
        shutil.copytree(model / "1", model / v)
    config = model / "config.pbtxt"
    config.write_text(config.read_text() + 'version_policy: { all: {} }\n'
                      'version_labels { key: "stable" value: 1 }\nversion_labels { key: "canary" value: 2 }\n')
    server = ServerProcess("labels", [str(tmp_path / "repo")]).start()
    try:
        yield server
    finally:
        server.stop_and_check()


def json_body() -> dict:
    return {"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": A.ravel().tolist()},
        {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": B.ravel().tolist()},
    ]}


def served_version(server, path: str, body: dict | None = None) -> str:
    r = requests.post(server.http_url + path, json=body or json_body(), timeout=30)
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    np.testing.assert_array_equal(np.array(out["OUTPUT0"], np.float32), (A + B).ravel())
    return r.json()["model_version"]


def tc_inputs(module):
    inputs = [module.InferInput("INPUT0", [1, 16], "FP32"), module.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(A)
    inputs[1].set_data_from_numpy(B)
    return inputs


def labels_of(server) -> dict:
    r = requests.get(server.http_url + "/v2/models/add_sub/labels", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def grpc_call(server, method: str, fields: list[tuple[int, str]]) -> bytes:
    """Calls one of oxserve's extension RPCs (not in tritonclient's stubs) with a message of
    string fields, encoded by hand; returns the response bytes."""
    message = b""
    for number, text in fields:
        data = text.encode()
        message += bytes([number << 3 | 2, len(data)]) + data
    channel = grpc.insecure_channel(server.grpc_host)
    try:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return call(message, timeout=30)
    finally:
        channel.close()


def test_labels_from_the_config_route_requests(labelled):
    assert labels_of(labelled) == {"name": "add_sub", "labels": {"stable": "1", "canary": "2"},
                                   "default_version": "3"}
    assert served_version(labelled, "/v2/models/add_sub/labels/stable/infer") == "1"
    assert served_version(labelled, "/v2/models/add_sub/labels/canary/infer") == "2"
    assert served_version(labelled, "/v2/models/add_sub/infer") == "3"
    assert requests.get(labelled.http_url + "/v2/models/add_sub/labels/stable/ready", timeout=30).status_code == 200
    meta = requests.get(labelled.http_url + "/v2/models/add_sub/labels/canary", timeout=30).json()
    assert meta["name"] == "add_sub" and meta["versions"] == ["2"], meta
    r = requests.get(labelled.http_url + "/v2/models/add_sub/labels/nope/ready", timeout=30)
    assert r.status_code == 404 and "no version label 'nope'" in r.json()["error"], r.text


def test_the_version_label_parameter_over_http_and_grpc(labelled):
    h = httpclient.InferenceServerClient(labelled.http_host)
    result = h.infer("add_sub", tc_inputs(httpclient), parameters={"version_label": "stable"})
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    g = grpcclient.InferenceServerClient(labelled.grpc_host)
    result = g.infer("add_sub", tc_inputs(grpcclient), parameters={"version_label": "canary"})
    assert result.get_response().model_version == "2"
    with pytest.raises(InferenceServerException, match="give one of them"):
        g.infer("add_sub", tc_inputs(grpcclient), model_version="3", parameters={"version_label": "canary"})
    with pytest.raises(InferenceServerException, match="no version label 'gone'"):
        h.infer("add_sub", tc_inputs(httpclient), parameters={"version_label": "gone"})


def test_the_grpc_version_field_takes_a_label(labelled):
    """KServe gRPC has only a version field: a label there reaches the labelled version;
    anything else non-numeric is still Triton's malformed-version error."""
    g = grpcclient.InferenceServerClient(labelled.grpc_host)
    assert g.is_model_ready("add_sub", "stable")
    assert g.get_model_metadata("add_sub", "canary").versions == ["2"]
    assert g.get_model_config("add_sub", "stable") is not None
    result = g.infer("add_sub", tc_inputs(grpcclient), model_version="stable")
    assert result.get_response().model_version == "1"
    with pytest.raises(InferenceServerException, match="version should be an integral value"):
        g.get_model_metadata("add_sub", "nope")


def test_set_and_roll_back_a_label(labelled):
    url = labelled.http_url + "/v2/repository/models/add_sub"
    r = requests.post(url + "/labels/stable", json={"version": 3}, timeout=30)
    assert r.status_code == 200, r.text
    assert served_version(labelled, "/v2/models/add_sub/labels/stable/infer") == "3"
    r = requests.post(url + "/labels/stable", json={"version": "2"}, timeout=30)
    assert r.status_code == 200, r.text
    r = requests.post(url + "/rollback", json={"label": "stable"}, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == "3", r.text
    r = requests.post(url + "/rollback", json={"label": "stable"}, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == "1", r.text
    assert served_version(labelled, "/v2/models/add_sub/labels/stable/infer") == "1"
    r = requests.post(url + "/rollback", json={"label": "stable"}, timeout=30)
    assert r.status_code == 400 and "nothing to roll back to" in r.json()["error"], r.text
    r = requests.post(url + "/labels/stable", json={"version": 9}, timeout=30)
    assert r.status_code == 400 and "version 9: it is not serving" in r.json()["error"], r.text
    r = requests.post(url + "/labels/bad%20name", json={"version": 1}, timeout=30)
    assert r.status_code == 400, r.text


def test_roll_back_the_default_version_with_the_cli(labelled):
    if labelled.http_url.startswith("https://"):
        pytest.skip("oxserve rollback speaks plain HTTP (the suite runs over TLS here)")
    run = [oxserve_bin(), "rollback", "add_sub", "--url", labelled.http_url]
    if labelled.api_key:  # the suite under OXSERVE_TEST_API_KEY=1: the CLI sends the key too
        run += ["--header", f"authorization: Bearer {labelled.api_key}"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "the default version now points at version 2" in out.stdout, out.stdout
    assert served_version(labelled, "/v2/models/add_sub/infer") == "2"
    assert labels_of(labelled)["default_version"] == "2"
    out = subprocess.run(run + ["--label", "canary"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "nothing to roll back to" in out.stderr, out.stderr


def test_labels_over_grpc_extension_rpcs(labelled):
    grpc_call(labelled, "ModelVersionLabelSet", [(1, "add_sub"), (2, "canary"), (3, "3")])
    assert labels_of(labelled)["labels"]["canary"] == "3"
    answer = grpc_call(labelled, "ModelRollback", [(1, "add_sub"), (2, "canary")])
    assert answer == b"\x0a\x012", answer  # version = "2"
    answer = grpc_call(labelled, "ModelVersionLabels", [(1, "add_sub")])
    assert b"canary" in answer and b"stable" in answer, answer
    with pytest.raises(grpc.RpcError) as err:
        grpc_call(labelled, "ModelVersionLabelSet", [(1, "add_sub"), (2, "canary"), (3, "7")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value


def test_invalid_labels_in_the_config_are_refused(tmp_path):
    model = tmp_path / "repo" / "add_sub"
    shutil.copytree(ROOT / "examples/models/add_sub", model)
    config = model / "config.pbtxt"
    config.write_text(config.read_text() + 'version_labels { key: "a/b" value: 1 }\n')
    server = ServerProcess("labels-invalid", [str(tmp_path / "repo")], ["--strict-readiness", "false"]).start()
    try:
        entry = server.repository_index()["add_sub"]
        assert entry["state"] == "UNAVAILABLE" and "label 'a/b'" in entry["reason"], entry
    finally:
        server.stop_and_check()
