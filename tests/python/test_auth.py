"""API keys, scopes and rate limits against the real binary (docs/security.md), with
tritonclient HTTP and gRPC passing `authorization` headers and plain HTTP requests.

Servers here are started with `--api-keys FILE` (and a `--config` file with `[[rate_limits]]`)
written to a temporary directory by the fixtures.
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _models import add_sub_inputs
from _server import ROOT, ServerProcess, oxserve_bin

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
WATCHER = "watcher-token-0123456789abcdef"
UNKNOWN = "unknown-token-0123456789abcdef"

KEY_FILE = f"""
[[keys]]
name = "admin"
token = "{ADMIN}"
scopes = ["all"]

[[keys]]
name = "reader"
token = "{READER}"
scopes = ["infer", "metadata"]

[[keys]]
name = "watcher"
token = "{WATCHER}"
scopes = ["statistics", "metrics"]
"""


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def write_keys(tmp_path_factory, text: str = KEY_FILE) -> str:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    keys = write_keys(tmp_path_factory)
    server = ServerProcess("auth", ["examples/models"], ["--api-keys", keys]).start()
    try:
        yield server
    finally:
        server.stop_and_check()


INFER_BODY = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16},
    ]
}

# (group, method, path, json body): at least one endpoint of every group over HTTP.
ENDPOINTS = [
    ("infer", "POST", "/v2/models/add_sub/infer", INFER_BODY),
    ("infer", "POST", "/v2/models/add_sub/versions/1/infer", INFER_BODY),
    ("metadata", "GET", "/v2", None),
    ("metadata", "GET", "/v2/models/add_sub", None),
    ("metadata", "GET", "/v2/models/add_sub/config", None),
    ("repository", "POST", "/v2/repository/index", {}),
    ("repository", "POST", "/v2/repository/models/add_sub/load", {}),
    ("repository", "GET", "/v2/logging", None),
    ("repository", "POST", "/v2/logging", {}),
    ("shared_memory", "GET", "/v2/systemsharedmemory/status", None),
    ("shared_memory", "POST", "/v2/systemsharedmemory/unregister", None),
    ("shared_memory", "GET", "/v2/cudasharedmemory/status", None),
    ("statistics", "GET", "/v2/models/stats", None),
    ("statistics", "GET", "/v2/models/add_sub/stats", None),
    ("metrics", "GET", "/metrics", None),
]
HEALTH = ["/v2/health/live", "/v2/health/ready", "/v2/models/add_sub/ready",
          "/v2/models/add_sub/versions/1/ready"]
SCOPES = {"admin": None, "reader": {"infer", "metadata"}, "watcher": {"statistics", "metrics"}}
TOKENS = {"admin": ADMIN, "reader": READER, "watcher": WATCHER}


def call(server: ServerProcess, method: str, path: str, body, headers=None) -> requests.Response:
    base = f"http://{server.metrics_addr}" if path == "/metrics" else server.http_url
    return requests.request(method, base + path, json=body, headers=headers or {}, timeout=30)


def assert_refused(r: requests.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert fragment in r.json()["error"], r.text
    assert r.headers["www-authenticate"].startswith("Bearer realm=")


@pytest.mark.parametrize("group,method,path,body", ENDPOINTS, ids=lambda v: v if isinstance(v, str) else None)
def test_every_group_needs_a_key_with_its_scope(auth_server, group, method, path, body):
    assert_refused(call(auth_server, method, path, body), 401, "missing API key")
    assert_refused(call(auth_server, method, path, body, bearer(UNKNOWN)), 401, "invalid API key")
    for name, scopes in SCOPES.items():
        r = call(auth_server, method, path, body, bearer(TOKENS[name]))
        if scopes is None or group in scopes:
            # Past the guard: the endpoint's own answer (this server cannot load models).
            expected = 501 if path.endswith("/load") else 200
            assert r.status_code == expected, (name, r.status_code, r.text)
        else:
            assert_refused(r, 403, f"API key '{name}' does not have the '{group}' scope")
            assert f'scope="{group}"' in r.headers["www-authenticate"]


def test_health_stays_open_for_probes(auth_server):
    for path in HEALTH:
        assert requests.get(auth_server.http_url + path, timeout=10).status_code == 200, path
        # A key without the health scope does not close them either.
        assert requests.get(auth_server.http_url + path, headers=bearer(WATCHER), timeout=10).status_code == 200
    assert httpclient.InferenceServerClient(auth_server.http_host).is_server_ready()
    g = grpcclient.InferenceServerClient(auth_server.grpc_host)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("add_sub")
    # But a wrong key is wrong everywhere.
    r = requests.get(auth_server.http_url + "/v2/health/ready", headers=bearer(UNKNOWN), timeout=10)
    assert_refused(r, 401, "invalid API key")


def test_unknown_endpoints_need_a_key_too(auth_server):
    assert_refused(call(auth_server, "GET", "/v2/nothing/here", None), 401, "missing API key")
    r = call(auth_server, "GET", "/v2/nothing/here", None, bearer(WATCHER))
    assert r.status_code == 404, r.text


def test_scheme_and_header_forms(auth_server):
    url = auth_server.http_url + "/v2/models/add_sub"
    assert requests.get(url, headers={"Authorization": f"bearer {READER}"}, timeout=10).status_code == 200
    for value in [f"Basic {READER}", READER, "Bearer", f"Token {READER}"]:
        r = requests.get(url, headers={"Authorization": value}, timeout=10)
        assert_refused(r, 401, "missing API key")


def test_tritonclient_http_with_headers(auth_server):
    client = httpclient.InferenceServerClient(auth_server.http_host)
    inputs = []
    for name, array in add_sub_inputs(2).items():
        t = httpclient.InferInput(name, list(array.shape), "FP32")
        t.set_data_from_numpy(array, binary_data=True)
        inputs.append(t)
    with pytest.raises(InferenceServerException) as e:
        client.infer("add_sub", inputs)
    assert e.value.status() == "401" and "missing API key" in e.value.message()
    result = client.infer("add_sub", inputs, headers=bearer(READER))
    data = add_sub_inputs(2)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), data["INPUT0"] + data["INPUT1"], rtol=1e-6)
    assert client.get_model_metadata("add_sub", headers=bearer(READER))["name"] == "add_sub"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_repository_index(headers=bearer(READER))
    assert e.value.status() == "403" and "'repository' scope" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status(headers=bearer(READER))
    assert e.value.status() == "403"
    assert client.get_model_repository_index(headers=bearer(ADMIN))
    assert client.get_inference_statistics("add_sub", headers=bearer(WATCHER))["model_stats"]


def test_tritonclient_grpc_with_metadata(auth_server):
    client = grpcclient.InferenceServerClient(auth_server.grpc_host)
    data = add_sub_inputs(3)
    inputs = []
    for name, array in data.items():
        t = grpcclient.InferInput(name, list(array.shape), "FP32")
        t.set_data_from_numpy(array)
        inputs.append(t)
    cases = [
        (lambda h: client.infer("add_sub", inputs, headers=h), "infer"),
        (lambda h: client.get_server_metadata(headers=h), "metadata"),
        (lambda h: client.get_model_metadata("add_sub", headers=h), "metadata"),
        (lambda h: client.get_model_config("add_sub", headers=h), "metadata"),
        (lambda h: client.get_inference_statistics("add_sub", headers=h), "statistics"),
        (lambda h: client.get_model_repository_index(headers=h), "repository"),
        (lambda h: client.get_log_settings(headers=h), "repository"),
        (lambda h: client.get_system_shared_memory_status(headers=h), "shared_memory"),
        (lambda h: client.unregister_system_shared_memory(headers=h), "shared_memory"),
    ]
    for run, group in cases:
        for headers in [None, bearer(UNKNOWN)]:
            with pytest.raises(InferenceServerException) as e:
                run(headers)
            assert e.value.status() == "StatusCode.UNAUTHENTICATED", (group, e.value)
        for name, scopes in SCOPES.items():
            if scopes is None or group in scopes:
                run(bearer(TOKENS[name]))
            else:
                with pytest.raises(InferenceServerException) as e:
                    run(bearer(TOKENS[name]))
                assert e.value.status() == "StatusCode.PERMISSION_DENIED", (group, name, e.value)
                assert f"'{group}' scope" in e.value.message()
    result = client.infer("add_sub", inputs, headers=bearer(READER))
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), data["INPUT0"] - data["INPUT1"], rtol=1e-6)


def test_refusals_are_counted_and_tokens_never_logged(auth_server):
    r = requests.get(auth_server.metrics_url, headers=bearer(WATCHER), timeout=10)
    assert r.status_code == 200
    counts = {m.group(1, 2): float(m.group(3)) for m in re.finditer(
        r'^oxserve_auth_rejected_total\{group="([a-z_]+)",reason="([a-z]+)"\} (\S+)$', r.text, re.M)}
    assert counts.get(("repository", "unauthenticated"), 0) >= 1, r.text[-2000:]
    assert counts.get(("repository", "forbidden"), 0) >= 1
    log = auth_server.stderr_path.read_text(errors="replace")
    for token in (ADMIN, READER, WATCHER, UNKNOWN):
        assert token not in log


# -- rate limits --------------------------------------------------------------------------

RATE_KEYS = KEY_FILE + f"""
[[keys]]
name = "grpc"
token = "grpc-token-0123456789abcdef"
scopes = ["all"]
"""
GRPC_TOKEN = "grpc-token-0123456789abcdef"

RATE_CONFIG = """
[[rate_limits]]
group = "infer"
model = "add_sub"
per_key = 0.1
burst = 3

[[rate_limits]]
group = "statistics"
per_address = 0.1
burst = 2
"""


@pytest.fixture(scope="module")
def rate_server(tmp_path_factory):
    keys = write_keys(tmp_path_factory, RATE_KEYS)
    config = tmp_path_factory.mktemp("config") / "oxserve.toml"
    config.write_text(RATE_CONFIG)
    server = ServerProcess("rate", ["examples/models"],
                           ["--api-keys", keys, "--config", str(config)]).start()
    try:
        yield server
    finally:
        server.stop_and_check()


def rate_limited_count(server: ServerProcess, group: str, model: str, by: str) -> float:
    text = requests.get(server.metrics_url, headers=bearer(ADMIN), timeout=10).text
    pattern = rf'^oxserve_rate_limited_total\{{group="{group}",model="{model}",by="{by}"\}} (\S+)$'
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def test_per_key_limit_over_http(rate_server):
    url = rate_server.http_url + "/v2/models/add_sub/infer"
    before = rate_limited_count(rate_server, "infer", "add_sub", "key")
    for _ in range(3):
        assert requests.post(url, json=INFER_BODY, headers=bearer(READER), timeout=10).status_code == 200
    r = requests.post(url, json=INFER_BODY, headers=bearer(READER), timeout=10)
    assert r.status_code == 429, r.text
    assert "rate limit exceeded for this API key" in r.json()["error"]
    assert 1 <= int(r.headers["retry-after"]) <= 10
    assert rate_limited_count(rate_server, "infer", "add_sub", "key") == before + 1
    # Another key has its own bucket; another model has no limit.
    assert requests.post(url, json=INFER_BODY, headers=bearer(ADMIN), timeout=10).status_code == 200
    iris = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
    meta = requests.get(rate_server.http_url + "/v2/models/iris", headers=bearer(READER), timeout=10).json()
    iris["inputs"][0]["name"] = meta["inputs"][0]["name"]
    r = requests.post(rate_server.http_url + "/v2/models/iris/infer", json=iris, headers=bearer(READER), timeout=10)
    assert r.status_code == 200, r.text


def test_per_key_limit_over_grpc_reads_the_model_from_the_message(rate_server):
    client = grpcclient.InferenceServerClient(rate_server.grpc_host)
    inputs = []
    for name, array in add_sub_inputs(1).items():
        t = grpcclient.InferInput(name, list(array.shape), "FP32")
        t.set_data_from_numpy(array)
        inputs.append(t)
    for _ in range(3):
        client.infer("add_sub", inputs, headers=bearer(GRPC_TOKEN))
    with pytest.raises(InferenceServerException) as e:
        client.infer("add_sub", inputs, headers=bearer(GRPC_TOKEN))
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "rate limit exceeded" in e.value.message()
    # Compressed messages are read too.
    with pytest.raises(InferenceServerException) as e:
        client.infer("add_sub", inputs, headers=bearer(GRPC_TOKEN), compression_algorithm="gzip")
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # The same key may still use other models and endpoints.
    meta = client.get_model_metadata("iris", headers=bearer(GRPC_TOKEN))
    x = grpcclient.InferInput(meta.inputs[0].name, [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    client.infer("iris", [x], headers=bearer(GRPC_TOKEN))
    assert client.is_server_ready()


def test_per_address_limit_and_the_server_keeps_serving(rate_server):
    url = rate_server.http_url + "/v2/models/stats"
    before = rate_limited_count(rate_server, "statistics", "", "address")
    statuses = [requests.get(url, headers=bearer(token), timeout=10).status_code
                for token in (ADMIN, WATCHER, ADMIN)]
    # The bucket is the client's address, whichever key it uses.
    assert statuses == [200, 200, 429], statuses
    r = requests.get(url, headers=bearer(WATCHER), timeout=10)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "client address" in r.json()["error"]
    g = grpcclient.InferenceServerClient(rate_server.grpc_host)
    with pytest.raises(InferenceServerException) as e:
        g.get_inference_statistics(headers=bearer(ADMIN))
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert rate_limited_count(rate_server, "statistics", "", "address") >= before + 3
    # Everything else still answers.
    assert requests.get(rate_server.http_url + "/v2/health/ready", timeout=10).status_code == 200
    r = requests.get(rate_server.http_url + "/v2/models/add_sub", headers=bearer(READER), timeout=10)
    assert r.status_code == 200, r.text


# -- start-up -----------------------------------------------------------------------------

BAD_STARTS = [
    ("keys_file", "does-not-exist.toml", None, "cannot read the API key file"),
    ("keys_file", "[[keys]]\nname = \"a\"\ntoken = \"short\"\nscopes = [\"all\"]\n", None,
     "shorter than 16"),
    ("keys_file", "[[keys]]\nname = \"a\"\ntoken = \"secret-secret-secret\"\nscopes = [\"admin\"]\n",
     None, "unknown scope 'admin'"),
    ("keys_file", "", None, "defines no [[keys]]"),
    ("config", None, "[[rate_limits]]\ngroup = \"infer\"\nper_key = 0\n", "positive number"),
    ("config", None, "[[rate_limits]]\ngroup = \"inference\"\nper_key = 1\n", "unknown group 'inference'"),
]


@pytest.mark.parametrize("kind,keys,config,expected", BAD_STARTS)
def test_bad_key_files_and_rules_stop_start_up(tmp_path, kind, keys, config, expected):
    args = [oxserve_bin(), "serve", "--model-repository", "examples/models", "--http-port", "0",
            "--grpc-port", "0", "--metrics-port", "0"]
    if keys is not None:
        path = tmp_path / "keys.toml"
        if keys != "does-not-exist.toml":
            path.write_text(keys)
        args += ["--api-keys", str(path)]
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        args += ["--config", str(tmp_path / "c.toml")]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stdout == "", "must fail before listening"
    assert expected in out.stderr, out.stderr
    assert "secret-secret-secret" not in out.stderr


@pytest.mark.skipif(not ServerProcess.session_api_key,
                    reason="checks the OXSERVE_TEST_API_KEY=1 switch (conftest.py), which is off")
def test_session_api_key_is_enforced(server):
    """Under OXSERVE_TEST_API_KEY=1 the session's servers really need the key the patched
    clients send: a request without it (a raw socket, which nothing patches) is refused, the
    same with it succeeds, and a gRPC call with another token is UNAUTHENTICATED."""
    import socket

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    if "--tls-cert" in server.tls_args:
        pytest.skip("the raw-socket half speaks plain HTTP; run without OXSERVE_TEST_TLS")
    host, port = server.http_addr.rsplit(":", 1)

    def raw_get(*headers: str) -> str:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall("\r\n".join(["GET /v2/models/add_sub HTTP/1.1", f"Host: {host}",
                                   "Connection: close", *headers, "", ""]).encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.split(b"\r\n", 1)[0].decode()

    assert " 401 " in raw_get() + " ", raw_get()
    assert " 200 " in raw_get(f"Authorization: Bearer {server.api_key}") + " "
    channel = grpc.insecure_channel(server.grpc_host)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="add_sub"), timeout=10,
                               metadata=(("authorization", "Bearer not-the-session-key-0000"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
        assert stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="add_sub"), timeout=10).name == "add_sub"
    finally:
        channel.close()
