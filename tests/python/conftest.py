"""Fixtures: the real oxserve binary ($OXSERVE_BIN) serving the example and fixture models.

Run (from the repository root):

    scripts/setup-python.sh
    .venv/bin/python scripts/make_models.py          # only needed after changing the script
    OXSERVE_BIN=/path/to/oxserve .venv/bin/python -m pytest tests/python -q

Without OXSERVE_BIN every test fails with a message saying so (nothing is skipped silently).

With OXSERVE_TEST_TLS=1 every server of the session serves HTTP and gRPC over TLS with a
certificate made for the session, and the clients the tests create (tritonclient HTTP and
gRPC, grpc channels, `requests`) trust it, so the unchanged suite runs over TLS.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Plain asserts in the helper modules get pytest's detailed failure messages too.
pytest.register_assert_rewrite("_models", "_server", "_corpus")

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
