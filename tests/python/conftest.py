"""Fixtures: the real oxserve binary ($OXSERVE_BIN) serving the example and fixture models.

Run (from the repository root):

    scripts/setup-python.sh
    .venv/bin/python scripts/make_models.py          # only needed after changing the script
    OXSERVE_BIN=/path/to/oxserve .venv/bin/python -m pytest tests/python -q

Without OXSERVE_BIN every test fails with a message saying so (nothing is skipped silently).

With OXSERVE_TEST_TLS=1 every server of the session serves HTTP and gRPC over TLS with a
certificate made for the session, and the clients the tests create (tritonclient HTTP and
gRPC, grpc channels, `requests`) trust it, so the unchanged suite runs over TLS.

With OXSERVE_TEST_API_KEY=1 every server of the session gets an API key with every scope
(OXSERVE_API_KEY in its environment; servers started with their own --api-keys keep just
those), and the clients the tests create (tritonclient HTTP and gRPC, grpc channels,
`requests`, http.client, curl) send `authorization: Bearer <token>` to it, so the unchanged suite
runs with authentication on. The two switches combine.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# Plain asserts in the helper modules get pytest's detailed failure messages too.
pytest.register_assert_rewrite("_models", "_server", "_corpus", "_fixtures", "_tf", "_torch")

from _server import LIMITED_MAX_INPUT_SIZE, ServerProcess  # noqa: E402
from _tls import TlsFixture  # noqa: E402

# Set for anything in this process too (onnxruntime reference sessions).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")



def _use_tls_for_the_session() -> None:
    """Makes every server use TLS and every client trust its certificate."""
    import gevent.ssl
    import grpc
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    directory = Path(tempfile.mkdtemp(prefix="oxserve-tls-"))
    atexit.register(shutil.rmtree, directory, True)
    tls = TlsFixture.create(directory)
    ServerProcess.session_tls_args = tls.server_args()
    ca = str(tls.ca.cert)
    os.environ["REQUESTS_CA_BUNDLE"] = ca

    http_init = httpclient.InferenceServerClient.__init__

    def http_client_with_tls(self, url, *args, **kwargs):
        if not args and not kwargs.get("ssl"):
            kwargs.update(ssl=True, ssl_options={"ca_certs": ca},
                          ssl_context_factory=gevent.ssl.create_default_context)
        http_init(self, url, *args, **kwargs)

    grpc_init = grpcclient.InferenceServerClient.__init__

    def grpc_client_with_tls(self, url, *args, **kwargs):
        if not args and not kwargs.get("ssl") and kwargs.get("creds") is None:
            kwargs.update(ssl=True, root_certificates=ca)
        grpc_init(self, url, *args, **kwargs)

    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca.cert.read_bytes())

    def channel_with_tls(target, options=None, compression=None):
        return grpc.secure_channel(target, credentials, options, compression)

    httpclient.InferenceServerClient.__init__ = http_client_with_tls
    grpcclient.InferenceServerClient.__init__ = grpc_client_with_tls
    grpc.insecure_channel = channel_with_tls


if os.environ.get("OXSERVE_TEST_TLS") == "1":
    _use_tls_for_the_session()


def _key_for(target: str) -> str:
    """The API key of the session server listening at `target` (host:port, or a URL), or ""."""
    netloc = urlsplit(target).netloc if "//" in target else target
    keys = ServerProcess.api_key_by_address
    if netloc in keys:
        return keys[netloc]
    # A server listening on every interface (0.0.0.0 or [::]) is reached at any address.
    port = netloc.rpartition(":")[2]
    return keys.get(f"0.0.0.0:{port}") or keys.get(f"[::]:{port}", "")


def _has_authorization(headers) -> bool:
    return any(str(k).lower() == "authorization" for k in dict(headers or {}))


def _use_api_key_for_the_session() -> None:
    """Gives every server an API key with every scope and makes every client send it.

    Servers get OXSERVE_API_KEY (ServerProcess.session_api_key; not those started with their
    own --api-keys). The clients add `authorization: Bearer <token>` to requests for a session
    server's addresses (HTTP, gRPC, metrics) unless the request already carries one:
    tritonclient HTTP and gRPC (through the plugin hook every request passes), raw grpc
    channels (an interceptor), `requests`, plain http.client connections and curl (a .curlrc)."""
    import http.client

    import grpc
    import requests
    import tritonclient._client as tritonclient_base
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    ServerProcess.session_api_key = "oxserve-test-" + secrets.token_hex(16)

    def bearer(key: str) -> str:
        return f"Bearer {key}"

    # tritonclient: both clients pass every request's headers (gRPC: metadata) through
    # _call_plugin, which a registered plugin could also change.
    for client_class in (httpclient.InferenceServerClient, grpcclient.InferenceServerClient):
        def make_init(init):
            def init_with_key(self, url, *args, **kwargs):
                self._oxserve_api_key = _key_for(url)
                init(self, url, *args, **kwargs)
            return init_with_key
        client_class.__init__ = make_init(client_class.__init__)

    call_plugin = tritonclient_base.InferenceServerClientBase._call_plugin

    def call_plugin_with_key(self, request):
        call_plugin(self, request)
        key = getattr(self, "_oxserve_api_key", "")
        if key and not _has_authorization(request.headers):
            request.headers = dict(request.headers or {})
            request.headers["authorization"] = bearer(key)

    tritonclient_base.InferenceServerClientBase._call_plugin = call_plugin_with_key

    # Raw grpc channels (and the channel tritonclient.grpc makes for itself).
    class Details(grpc.ClientCallDetails):
        def __init__(self, details, metadata):
            self.method = details.method
            self.timeout = details.timeout
            self.metadata = metadata
            self.credentials = details.credentials
            self.wait_for_ready = getattr(details, "wait_for_ready", None)
            self.compression = getattr(details, "compression", None)

    class AddKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        def __init__(self, key: str):
            self.key = key

        def _details(self, details):
            metadata = list(details.metadata or [])
            if not any(k.lower() == "authorization" for k, _ in metadata):
                metadata.append(("authorization", bearer(self.key)))
            return Details(details, metadata)

        def intercept_unary_unary(self, continuation, details, request):
            return continuation(self._details(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(self._details(details), request)

        def intercept_stream_unary(self, continuation, details, request_iterator):
            return continuation(self._details(details), request_iterator)

        def intercept_stream_stream(self, continuation, details, request_iterator):
            return continuation(self._details(details), request_iterator)

    def with_key(make_channel):
        def make(target, *args, **kwargs):
            channel = make_channel(target, *args, **kwargs)
            key = _key_for(target)
            return grpc.intercept_channel(channel, AddKey(key)) if key else channel
        return make

    grpc.insecure_channel = with_key(grpc.insecure_channel)
    grpc.secure_channel = with_key(grpc.secure_channel)

    # requests (every call goes through Session.request).
    session_request = requests.Session.request

    def request_with_key(self, method, url, *args, **kwargs):
        key = _key_for(str(url))
        if key and not _has_authorization(kwargs.get("headers")) and not _has_authorization(self.headers):
            kwargs["headers"] = {**dict(kwargs.get("headers") or {}), "Authorization": bearer(key)}
        return session_request(self, method, url, *args, **kwargs)

    requests.Session.request = request_with_key

    # Plain http.client connections that tests drive themselves (urllib3's connections are
    # subclasses and already carry the header from `requests`).
    putrequest = http.client.HTTPConnection.putrequest

    def putrequest_with_key(self, *args, **kwargs):
        putrequest(self, *args, **kwargs)
        if type(self) in (http.client.HTTPConnection, http.client.HTTPSConnection):
            key = _key_for(f"{self.host}:{self.port}")
            if key:
                self.putheader("Authorization", bearer(key))

    http.client.HTTPConnection.putrequest = putrequest_with_key

    # curl run as a subprocess (test_tls) reads $CURL_HOME/.curlrc: every session server has
    # the same key, so one header line serves them all.
    curl_home = Path(tempfile.mkdtemp(prefix="oxserve-curl-"))
    atexit.register(shutil.rmtree, curl_home, True)
    (curl_home / ".curlrc").write_text(
        f'header = "Authorization: {bearer(ServerProcess.session_api_key)}"\n')
    os.environ["CURL_HOME"] = str(curl_home)


if os.environ.get("OXSERVE_TEST_API_KEY") == "1":
    _use_api_key_for_the_session()

MAIN_REPOSITORIES = ["examples/models", "tests/fixtures/models"]
BROKEN_REPOSITORIES = ["tests/fixtures/broken"]
# The small-body-limit server also serves tests/fixtures/extra (int8_identity), which only
# the bad-input tests use.
LIMITED_REPOSITORIES = ["examples/models", "tests/fixtures/extra"]


def _serve(name: str, repositories: list[str], extra_args: list[str] | None = None,
           ready_path: str = "/v2/health/ready"):
    server = ServerProcess(name, repositories, extra_args, ready_path).start()
    try:
        yield server
    finally:
        server.stop_and_check()


@pytest.fixture(scope="session")
def server():
    """oxserve with examples/models and tests/fixtures/models."""
    yield from _serve("main", MAIN_REPOSITORIES)


@pytest.fixture(scope="session")
def broken_server():
    """oxserve with tests/fixtures/broken: only `good` loads, so with strict readiness (the
    default, as in Triton) /v2/health/ready stays non-200; readiness is polled through
    /v2/models/good/ready instead."""
    yield from _serve("broken", BROKEN_REPOSITORIES, ready_path="/v2/models/good/ready")


@pytest.fixture(scope="session")
def limited_server():
    """oxserve with --http-max-input-size 4096, for the body-limit (413) cases."""
    yield from _serve(
        "limited", LIMITED_REPOSITORIES,
        ["--http-max-input-size", str(LIMITED_MAX_INPUT_SIZE)],
    )
