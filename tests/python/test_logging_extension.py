"""Triton's logging extension (GET/POST /v2/logging, gRPC LogSettings) with tritonclient's
get_log_settings / update_log_settings: the settings are Triton's, and a change takes effect in
the running server's log at once."""

from __future__ import annotations

import time

import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _server import ServerProcess

DEFAULTS = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
            "log_verbose_level": 0, "log_format": "default"}


@pytest.fixture(scope="module")
def log_server():
    server = ServerProcess("logging", ["examples/models"],
                           ["--model-control-mode", "explicit", "--load-model", "add_sub"],
                           tls_args=[], api_key="")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def log_text(server) -> str:
    return server.stderr_path.read_text(errors="replace")


def wait_for(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_settings_and_switches_over_http(log_server):
    client = httpclient.InferenceServerClient(url=log_server.http_host)
    try:
        assert client.get_log_settings() == DEFAULTS
        # Verbose level 1: the server's debug events appear ("request rejected" for a 404).
        assert "request rejected" not in log_text(log_server)
        requests.get(log_server.http_url + "/v2/models/nosuch", timeout=10)
        time.sleep(0.3)
        assert "request rejected" not in log_text(log_server)
        assert client.update_log_settings({"log_verbose_level": 1}) == {**DEFAULTS, "log_verbose_level": 1}
        requests.get(log_server.http_url + "/v2/models/nosuch", timeout=10)
        assert wait_for(lambda: "request rejected" in log_text(log_server)), log_server.stderr_tail()
        # log_info off: loading a model logs nothing at info; back on, it does.
        client.update_log_settings({"log_verbose_level": 0, "log_info": False})
        client.load_model("iris")
        time.sleep(0.3)
        assert "model=iris" not in log_text(log_server)
        settings = client.update_log_settings({"log_info": True})
        assert settings == DEFAULTS, settings
        client.unload_model("iris")
        client.load_model("iris")
        assert wait_for(lambda: "model=iris" in log_text(log_server)), log_server.stderr_tail()
    finally:
        client.update_log_settings(DEFAULTS | {"log_file": None})
        client.close()


def test_settings_over_grpc(log_server):
    client = grpcclient.InferenceServerClient(url=log_server.grpc_host)
    try:
        def flat(message) -> dict:
            # {"log_info": {"bool_param": true}, "log_verbose_level": {"uint32_param": 0}, ...};
            # as_json leaves out zero values, so an empty setting reads as its type's zero.
            zero = {"log_file": "", "log_format": "", "log_verbose_level": 0}
            return {k: next(iter(v.values()), zero.get(k, False)) for k, v in message["settings"].items()}

        assert flat(client.get_log_settings(as_json=True)) == DEFAULTS
        updated = flat(client.update_log_settings({"log_warning": False, "log_verbose_level": 2},
                                                  as_json=True))
        assert updated == DEFAULTS | {"log_warning": False, "log_verbose_level": 2}, updated
        client.update_log_settings({"log_warning": True, "log_verbose_level": 0})
        assert flat(client.get_log_settings(as_json=True)) == DEFAULTS
    finally:
        client.close()


@pytest.mark.parametrize("body,status,words", [
    ({"log_file": "/tmp/x.log"}, 501, "log file location can not be updated through network protocol"),
    ({"log_format": "fancy"}, 400, "invalid argument for --log_format, got: fancy"),
    ({"log_info": "yes"}, 400, "'log_info' must be a boolean"),
    ({"log_verbose_level": -3}, 400, "log_verbose_level"),
])
def test_bad_updates_are_refused_and_change_nothing(log_server, body, status, words):
    r = requests.post(log_server.http_url + "/v2/logging", json=body, timeout=10)
    assert r.status_code == status, (r.status_code, r.text)
    assert words in r.json()["error"], r.text
    assert requests.get(log_server.http_url + "/v2/logging", timeout=10).json() == DEFAULTS


def test_grpc_bad_update(log_server):
    client = grpcclient.InferenceServerClient(url=log_server.grpc_host)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.update_log_settings({"log_file": "/tmp/x.log"})
        assert "log file location can not be updated" in e.value.message()
        assert e.value.status() == "StatusCode.UNIMPLEMENTED", e.value.status()
    finally:
        client.close()
