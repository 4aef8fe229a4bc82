"""Load failures: a repository where only `good` loads (tests/fixtures/broken).

A failed model never takes down the server or the models that did load; the repository index
lists every model, the broken ones UNAVAILABLE with a reason naming the cause; with strict
readiness (the default, as in Triton) the server reports not-ready but stays live.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

BROKEN = {
    # model -> substrings of which at least one must be in its `reason` (case-insensitive)
    "truncated": ("onnx", "protobuf", "decode", "parse", "model.onnx", "truncat"),
    "bad_config": ("max_batchsize",),
    "dtype_mismatch": ("int32", "fp32", "data type", "datatype", "dtype"),
    "not_onnx": ("onnx", "protobuf", "decode", "parse", "model.onnx"),
}
ALL = sorted(["good", *BROKEN])


def _check_index(entries: list[dict]) -> None:
    by_name = {e["name"]: e for e in entries}
    assert sorted(by_name) == ALL, entries
    good = by_name["good"]
    assert good["state"] == "READY" and good["version"] == "1", good
    for name, causes in BROKEN.items():
        e = by_name[name]
        assert e["state"] == "UNAVAILABLE", e
        reason = e.get("reason", "")
        assert isinstance(reason, str) and reason.strip(), f"{name}: empty reason: {e}"
        assert any(c in reason.lower() for c in causes), f"{name}: reason {reason!r} names none of {causes}"


@pytest.mark.parametrize("body", [None, b"{}", b'{"ready": false}'], ids=["no_body", "empty_object", "ready_false"])
def test_index_http(broken_server, body):
    r = requests.post(broken_server.http_url + "/v2/repository/index", data=body, timeout=30)
    assert r.status_code == 200, r.text
    _check_index(r.json())


def test_index_http_ready_only(broken_server):
    r = requests.post(broken_server.http_url + "/v2/repository/index", data=b'{"ready": true}', timeout=30)
    assert r.status_code == 200, r.text
    assert [e["name"] for e in r.json()] == ["good"]


def test_index_tritonclient_http(broken_server):
    c = httpclient.InferenceServerClient(url=broken_server.http_host)
    try:
        _check_index(c.get_model_repository_index())
    finally:
        c.close()


def test_index_tritonclient_grpc(broken_server):
    c = grpcclient.InferenceServerClient(url=broken_server.grpc_host)
    try:
        index = c.get_model_repository_index()
        _check_index([{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                      for m in index.models])
    finally:
        c.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_good_still_serves(broken_server, protocol):
    x0 = np.arange(16, dtype=np.float32).reshape(1, 16)
    x1 = np.full((1, 16), 2.0, dtype=np.float32)
    mod = httpclient if protocol == "http" else grpcclient
    url = broken_server.http_host if protocol == "http" else broken_server.grpc_host
    c = mod.InferenceServerClient(url=url)
    try:
        inputs = [mod.InferInput("INPUT0", [1, 16], "FP32"), mod.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(x0)
        inputs[1].set_data_from_numpy(x1)
        result = c.infer("good", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x0 + x1)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x0 - x1)
        assert c.is_model_ready("good")
        for name in BROKEN:
            assert not c.is_model_ready(name), name
    finally:
        c.close()


def test_health_strict_readiness(broken_server):
    base = broken_server.http_url
    assert requests.get(base + "/v2/health/live", timeout=10).status_code == 200
    assert requests.get(base + "/v2/health/ready", timeout=10).status_code != 200
    assert requests.get(base + "/v2/models/good/ready", timeout=10).status_code == 200
    for name in BROKEN:
        assert requests.get(f"{base}/v2/models/{name}/ready", timeout=10).status_code != 200, name
    c = grpcclient.InferenceServerClient(url=broken_server.grpc_host)
    try:
        assert c.is_server_live() is True
        assert c.is_server_ready() is False
    finally:
        c.close()


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_infer_on_broken_model_is_a_clean_error(broken_server, name):
    body = {"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16},
    ]}
    r = requests.post(f"{broken_server.http_url}/v2/models/{name}/infer", json=body, timeout=30)
    # Triton: unavailable model -> 400/404 ("unknown model"/"not ready") or 503 (UNAVAILABLE).
    assert r.status_code in (400, 404, 503), (r.status_code, r.text)
    err = r.json()
    assert set(err) == {"error"} and err["error"].strip(), err
    assert requests.get(broken_server.http_url + "/v2/health/live", timeout=10).status_code == 200
