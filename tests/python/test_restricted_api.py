"""Triton's restricted APIs (--http-restricted-api / --grpc-restricted-protocol) with the
published clients: a restricted group needs its header (tritonclient's `headers=`), answers
Triton's 403 / UNAVAILABLE and message without it, and other groups stay open."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _models import add_sub_inputs
from _server import ServerProcess

HTTP_HEADER = {"admin-key": "admin-secret"}
GRPC_HEADER = {"triton-grpc-protocol-infer-key": "infer-secret"}


@pytest.fixture(scope="module")
def restricted_server():
    server = ServerProcess(
        "restricted", ["examples/models"],
        ["--http-restricted-api", "model-repository,model-config:admin-key=admin-secret",
         "--grpc-restricted-protocol", "inference:infer-key=infer-secret"],
        tls_args=[], api_key="",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def infer_inputs(module):
    data = add_sub_inputs(1, 11)
    inputs = []
    for name, array in data.items():
        inp = module.InferInput(name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return data, inputs


def test_http_restricted_groups_need_the_header(restricted_server):
    base = restricted_server.http_url
    for path, method in (("/v2/models/add_sub/config", "GET"), ("/v2/repository/index", "POST")):
        r = requests.request(method, base + path, timeout=10)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert r.json() == {"error": "This API is restricted, expecting header 'admin-key'"}, r.text
        r = requests.request(method, base + path, headers={"admin-key": "wrong"}, timeout=10)
        assert r.status_code == 403, (path, r.text)
        r = requests.request(method, base + path, headers=HTTP_HEADER, timeout=10)
        assert r.status_code == 200, (path, r.text)
    # Other groups are open over HTTP (inference is restricted over gRPC only).
    assert requests.get(base + "/v2/health/ready", timeout=10).status_code == 200
    assert requests.get(base + "/v2/models/add_sub", timeout=10).status_code == 200


def test_tritonclient_http_with_and_without_the_header(restricted_server):
    client = httpclient.InferenceServerClient(url=restricted_server.http_host)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.get_model_config("add_sub")
        assert "This API is restricted, expecting header 'admin-key'" in str(e.value)
        assert client.get_model_config("add_sub", headers=HTTP_HEADER)["name"] == "add_sub"
        assert client.get_model_repository_index(headers=HTTP_HEADER)
        data, inputs = infer_inputs(httpclient)
        result = client.infer("add_sub", inputs)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), data["INPUT0"] + data["INPUT1"], rtol=1e-6)
    finally:
        client.close()


def test_tritonclient_grpc_inference_and_streaming_need_the_header(restricted_server):
    client = grpcclient.InferenceServerClient(url=restricted_server.grpc_host)
    try:
        data, inputs = infer_inputs(grpcclient)
        with pytest.raises(InferenceServerException) as e:
            client.infer("add_sub", inputs)
        assert "This protocol is restricted, expecting header 'triton-grpc-protocol-infer-key'" \
            in e.value.message(), e.value.message()
        assert e.value.status() == "StatusCode.UNAVAILABLE", e.value.status()
        result = client.infer("add_sub", inputs, headers=GRPC_HEADER)
        np.testing.assert_allclose(result.as_numpy("OUTPUT1"), data["INPUT0"] - data["INPUT1"], rtol=1e-6)
        # Metadata and model configuration are not restricted over gRPC.
        assert client.get_model_config("add_sub").config.name == "add_sub"
        assert client.is_server_live()
        # A stream opened without the header is refused as a whole; with it, it serves.
        import queue
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=GRPC_HEADER)
        client.async_stream_infer("add_sub", inputs, request_id="s1")
        result, error = answers.get(timeout=30)
        client.stop_stream()
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), data["INPUT0"] + data["INPUT1"], rtol=1e-6)
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            client.async_stream_infer("add_sub", inputs, request_id="s2")
        except InferenceServerException:
            pass  # the refusal may already have ended the stream; it is reported below
        result, error = answers.get(timeout=30)
        client.stop_stream()
        assert result is None and "This protocol is restricted" in str(error), (result, error)
    finally:
        client.close()


@pytest.mark.parametrize("flag,value,words", [
    ("--http-restricted-api", "nosuch:k=v", "unknown API 'nosuch'"),
    ("--http-restricted-api", "inference", "expected"),
    ("--grpc-restricted-protocol", "health:k", "expected"),
])
def test_bad_restriction_flags_stop_the_start(flag, value, words):
    import subprocess
    import os
    proc = subprocess.run([os.environ["OXSERVE_BIN"], "serve", "--model-repository", "examples/models",
                           "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", flag, value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert words in proc.stderr, proc.stderr
