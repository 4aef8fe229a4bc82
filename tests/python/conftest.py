"""Fixtures: the real oxserve binary ($OXSERVE_BIN) serving the example and fixture models.

Run (from the repository root):

    scripts/setup-python.sh
    .venv/bin/python scripts/make_models.py          # only needed after changing the script
    OXSERVE_BIN=/path/to/oxserve .venv/bin/python -m pytest tests/python -q

Without OXSERVE_BIN every test fails with a message saying so (nothing is skipped silently).
"""

from __future__ import annotations

import os

import pytest

# Plain asserts in the helper modules get pytest's detailed failure messages too.
pytest.register_assert_rewrite("_models", "_server", "_corpus")

from _server import LIMITED_MAX_INPUT_SIZE, ServerProcess  # noqa: E402

# Set for anything in this process too (onnxruntime reference sessions).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

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
