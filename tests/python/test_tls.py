"""TLS on the HTTP and gRPC listeners, against the real binary: tritonclient (HTTP and gRPC)
with its ssl options, curl, Python's ssl module; mutual TLS; Triton's --grpc-* SSL flags;
certificate reload on SIGHUP and on file change; unusable certificate files at start-up.

Certificates come from the `openssl` command (tests/python/_tls.py), made fresh per module.
These tests start their own servers with their own CA; run them without OXSERVE_TEST_TLS.
"""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import gevent.ssl
import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _models import add_sub_inputs
from _server import ROOT, ServerProcess, oxserve_bin
from _tls import Authority, TlsFixture, serial_of

REPOSITORIES = ["examples/models"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TlsFixture:
    return TlsFixture.create(tmp_path_factory.mktemp("pki"))


def start(name: str, pki: TlsFixture, tls_args: list[str], *, client_cert: bool = False,
          env: dict | None = None) -> ServerProcess:
    server = ServerProcess(name, REPOSITORIES, tls_args=tls_args)
    server.requests_kwargs = {"verify": str(pki.ca.cert)}
    if client_cert:
        server.requests_kwargs["cert"] = (str(pki.client_cert), str(pki.client_key))
    if env:
        import os
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return server.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return server.start()


@pytest.fixture(scope="module")
def tls_server(pki):
    server = start("tls", pki, pki.server_args())
    yield server
    server.stop_and_check()


@pytest.fixture(scope="module")
def mtls_server(pki):
    server = start("mtls", pki, pki.server_args(mutual=True), client_cert=True)
    yield server
    server.stop_and_check()


def http_client(server, pki, *, client_cert=False) -> httpclient.InferenceServerClient:
    options = {"ca_certs": str(pki.ca.cert)}
    if client_cert:
        options.update(certfile=str(pki.client_cert), keyfile=str(pki.client_key))
    return httpclient.InferenceServerClient(
        url=server.http_host, ssl=True, ssl_options=options, insecure=False,
        ssl_context_factory=gevent.ssl.create_default_context, network_timeout=30.0)


def grpc_client(server, pki, *, client_cert=False) -> grpcclient.InferenceServerClient:
    extra = {}
    if client_cert:
        extra = {"private_key": str(pki.client_key), "certificate_chain": str(pki.client_cert)}
    return grpcclient.InferenceServerClient(
        url=server.grpc_host, ssl=True, root_certificates=str(pki.ca.cert), **extra)


def add_sub_arrays():
    arrays = add_sub_inputs(1)
    return arrays["INPUT0"], arrays["INPUT1"]


def infer_add_sub_http(client) -> None:
    a, b = add_sub_arrays()
    inputs = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        inp = httpclient.InferInput(name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array, binary_data=True)
        inputs.append(inp)
    result = client.infer("add_sub", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b)


def infer_add_sub_grpc(client) -> None:
    a, b = add_sub_arrays()
    inputs = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        inp = grpcclient.InferInput(name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer("add_sub", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b)


def presented_serial(addr: str, ca_files: list[Path]) -> int:
    """The serial of the certificate the server presents to a new connection, verified
    against `ca_files`."""
    host, port = addr.rsplit(":", 1)
    context = ssl.create_default_context()
    for ca in ca_files:
        context.load_verify_locations(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    return serial_of(ssl.DER_cert_to_PEM_cert(der))


def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("these tests need the `curl` command", pytrace=False)
    return path


# ---------------------------------------------------------------------------------------------
# serving over TLS
# ---------------------------------------------------------------------------------------------

def test_tritonclient_http_infers_over_tls(tls_server, pki):
    client = http_client(tls_server, pki)
    try:
        assert client.is_server_ready()
        assert client.get_server_metadata()["name"] == "oxserve"
        infer_add_sub_http(client)
    finally:
        client.close()


def test_tritonclient_grpc_infers_over_tls(tls_server, pki):
    client = grpc_client(tls_server, pki)
    try:
        assert client.is_server_ready()
        infer_add_sub_grpc(client)
    finally:
        client.close()


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_curl_with_cacert(tls_server, pki, version):
    a, b = add_sub_arrays()
    body = ('{"inputs":[{"name":"INPUT0","shape":[1,16],"datatype":"FP32","data":%s},'
            '{"name":"INPUT1","shape":[1,16],"datatype":"FP32","data":%s}]}'
            % (a.flatten().tolist(), b.flatten().tolist()))
    out = subprocess.run(
        [curl(), "-sS", version, "--cacert", str(pki.ca.cert), "-w", "\n%{http_code} %{http_version}",
         "-H", "Content-Type: application/json", "-d", body,
         f"https://{tls_server.http_addr}/v2/models/add_sub/infer"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text, status = out.stdout.rsplit("\n", 1)
    assert status == ("200 1.1" if version == "--http1.1" else "200 2"), out.stdout
    assert '"OUTPUT0"' in text and '"model_name":"add_sub"' in text


def test_curl_without_the_ca_refuses_the_server(tls_server):
    out = subprocess.run([curl(), "-sS", f"https://{tls_server.http_addr}/v2/health/ready"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 60, (out.returncode, out.stderr)  # peer certificate not trusted


def test_plain_clients_fail_cleanly_and_the_server_keeps_serving(tls_server, pki):
    # Plain HTTP to the TLS port: a readable 400, not a hang or a reset.
    r = requests.get(f"http://{tls_server.http_addr}/v2/health/ready", timeout=10)
    assert r.status_code == 400
    assert "https://" in r.text
    # Plain gRPC to the TLS port: the call fails with UNAVAILABLE.
    channel = grpc.insecure_channel(tls_server.grpc_host)
    try:
        health = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        with pytest.raises(grpc.RpcError) as error:
            health(b"", timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    # Bytes that are neither TLS nor HTTP: the connection is closed (or reset).
    host, port = tls_server.http_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x00\x01\x02garbage")
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
    # TLS clients are still served.
    client = http_client(tls_server, pki)
    try:
        infer_add_sub_http(client)
    finally:
        client.close()
    assert tls_server.alive()


def test_metrics_port_stays_plain_http(tls_server):
    r = requests.get(tls_server.metrics_url, timeout=10)
    assert r.status_code == 200 and "# TYPE" in r.text


# ---------------------------------------------------------------------------------------------
# mutual TLS
# ---------------------------------------------------------------------------------------------

def test_mtls_http_needs_a_client_certificate(mtls_server, pki):
    anonymous = http_client(mtls_server, pki)
    try:
        with pytest.raises(Exception):
            anonymous.is_server_live()
    finally:
        anonymous.close()
    trusted = http_client(mtls_server, pki, client_cert=True)
    try:
        infer_add_sub_http(trusted)
    finally:
        trusted.close()
    # curl as well: with the client certificate 200, without a failure.
    url = f"https://{mtls_server.http_addr}/v2/health/ready"
    without = subprocess.run([curl(), "-sS", "--cacert", str(pki.ca.cert), url],
                             capture_output=True, text=True, timeout=30)
    assert without.returncode != 0
    with_cert = subprocess.run(
        [curl(), "-sS", "--cacert", str(pki.ca.cert), "--cert", str(pki.client_cert),
         "--key", str(pki.client_key), "-o", "/dev/null", "-w", "%{http_code}", url],
        capture_output=True, text=True, timeout=30)
    assert with_cert.stdout == "200", with_cert.stderr


def test_mtls_grpc_needs_a_client_certificate(mtls_server, pki, tmp_path):
    anonymous = grpc_client(mtls_server, pki)
    try:
        with pytest.raises(InferenceServerException):
            anonymous.is_server_live()
    finally:
        anonymous.close()
    # A certificate from a CA the server does not trust is refused too.
    stranger_ca = Authority.create(tmp_path, "stranger-ca")
    cert, key = stranger_ca.issue("stranger-client", server=False)
    stranger = grpcclient.InferenceServerClient(
        url=mtls_server.grpc_host, ssl=True, root_certificates=str(pki.ca.cert),
        private_key=str(key), certificate_chain=str(cert))
    try:
        with pytest.raises(InferenceServerException):
            stranger.is_server_live()
    finally:
        stranger.close()
    trusted = grpc_client(mtls_server, pki, client_cert=True)
    try:
        infer_add_sub_grpc(trusted)
    finally:
        trusted.close()


def test_triton_grpc_ssl_flags(pki):
    """Triton's flags: TLS (and here mutual TLS) on gRPC only; HTTP stays plain."""
    server = ServerProcess("triton-ssl", REPOSITORIES, tls_args=[
        "--grpc-use-ssl=true", "--grpc-server-cert", str(pki.server_cert),
        "--grpc-server-key", str(pki.server_key), "--grpc-root-cert", str(pki.client_ca.cert),
        "--grpc-use-ssl-mutual", "true"]).start()
    try:
        assert server.http_url.startswith("http://")
        assert requests.get(server.http_url + "/v2/health/ready", timeout=10).status_code == 200
        trusted = grpc_client(server, pki, client_cert=True)
        try:
            infer_add_sub_grpc(trusted)
        finally:
            trusted.close()
        anonymous = grpc_client(server, pki)
        try:
            with pytest.raises(InferenceServerException):
                anonymous.is_server_live()
        finally:
            anonymous.close()
    finally:
        server.stop_and_check()


# ---------------------------------------------------------------------------------------------
# reload
# ---------------------------------------------------------------------------------------------

def replace(target: Path, source: Path) -> None:
    """Replaces `target` by rename, as deployment tools do."""
    tmp = target.with_suffix(".new")
    shutil.copyfile(source, tmp)
    tmp.rename(target)


def wait_for_serial(addr: str, cas: list[Path], serial: int, server: ServerProcess,
                    timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = presented_serial(addr, cas)
        except (ssl.SSLError, OSError) as e:
            seen = repr(e)
        if seen == serial:
            return
        time.sleep(0.1)
    server.fail(f"{addr} never presented serial {serial} (last: {seen})")


def test_sighup_reloads_without_dropping_connections(pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"
    shutil.copyfile(pki.server_cert, cert)
    shutil.copyfile(pki.server_key, key)
    server = start("reload", pki, ["--tls-cert", str(cert), "--tls-key", str(key)],
                   env={"OXSERVE__TLS__RELOAD_INTERVAL_SECS": "0"})
    try:
        cas = [pki.ca.cert]
        assert presented_serial(server.http_addr, cas) == 1
        # A keep-alive connection and a gRPC channel opened before the reload.
        host, port = server.http_addr.rsplit(":", 1)
        old = http.client.HTTPSConnection(
            host, int(port), timeout=30, context=ssl.create_default_context(cafile=str(pki.ca.cert)))
        old.request("GET", "/v2/health/ready")
        assert old.getresponse().read() is not None
        old_socket = old.sock
        old_grpc = grpc_client(server, pki)
        infer_add_sub_grpc(old_grpc)

        # A new certificate from a new CA, serial 42, then SIGHUP.
        new_ca = Authority.create(tmp_path / "new", "new-ca")
        new_cert, new_key = new_ca.issue("server", server=True, serial=42)
        replace(cert, new_cert)
        replace(key, new_key)
        server.proc.send_signal(signal.SIGHUP)
        wait_for_serial(server.http_addr, [new_ca.cert], 42, server)
        wait_for_serial(server.grpc_addr, [new_ca.cert], 42, server)
        # The connections opened before still complete requests, on the same socket.
        old.request("GET", "/v2/health/ready")
        assert old.getresponse().status == 200
        assert old.sock is old_socket
        infer_add_sub_grpc(old_grpc)
        old_grpc.close()
        old.close()

        # A broken file: the reload fails, is logged, and the current certificate stays.
        cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload failed" not in server.stderr_tail(200) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload failed; keeping the previous certificate" in server.stderr_tail(200)
        assert presented_serial(server.http_addr, [new_ca.cert]) == 42
        assert server.alive()
    finally:
        server.stop_and_check()


def test_changed_files_reload_without_a_signal(pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"
    shutil.copyfile(pki.server_cert, cert)
    shutil.copyfile(pki.server_key, key)
    server = start("reload-poll", pki, ["--tls-cert", str(cert), "--tls-key", str(key)],
                   env={"OXSERVE__TLS__RELOAD_INTERVAL_SECS": "1"})
    try:
        new_cert, new_key = pki.ca.issue("server-77", server=True, serial=77)
        replace(key, new_key)
        replace(cert, new_cert)
        wait_for_serial(server.http_addr, [pki.ca.cert], 77, server)
    finally:
        server.stop_and_check()


# ---------------------------------------------------------------------------------------------
# start-up
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["garbage cert", "missing key", "key of another cert",
                                  "cert without key"])
def test_unusable_tls_files_stop_start_up(pki, tmp_path, case):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    _, other_key = pki.ca.issue("other", server=True, serial=3)
    args, expected = {
        "garbage cert": (["--tls-cert", str(garbage), "--tls-key", str(pki.server_key)],
                         "holds no PEM certificate"),
        "missing key": (["--tls-cert", str(pki.server_cert), "--tls-key", str(tmp_path / "nope.key")],
                        "cannot read the TLS private key file"),
        "key of another cert": (["--tls-cert", str(pki.server_cert), "--tls-key", str(other_key)],
                                "cannot serve the certificate"),
        "cert without key": (["--tls-cert", str(pki.server_cert)], "--tls-key"),
    }[case]
    proc = subprocess.run(
        [oxserve_bin(), "serve", "--model-repository", "examples/models", "--http-port", "0",
         "--grpc-port", "0", "--metrics-port", "0", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr
    assert proc.stdout == "", "no listening line for a server that cannot serve"


def test_a_large_request_for_an_unknown_model_gets_its_answer_over_tls(tls_server, pki):
    """The server answers an unknown model before reading the body; it must still read what
    the client sends, or a client that is still writing sees the TLS connection close under
    it (an SSL EOF) instead of the 'unknown model' answer."""
    client = http_client(tls_server, pki)
    big = np.zeros((1, 1_000_000), dtype=np.float32)  # 4 MB of binary tensor data
    for _ in range(20):
        inp = httpclient.InferInput("INPUT0", list(big.shape), "FP32")
        inp.set_data_from_numpy(big, binary_data=True)
        with pytest.raises(InferenceServerException) as err:
            client.infer("no_such_model", [inp])
        assert "unknown model" in str(err.value), err.value
    infer_add_sub_http(client)
