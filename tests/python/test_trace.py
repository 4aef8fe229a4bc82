"""Triton's trace extension: `--trace-config` / the deprecated `--trace-*` flags, the settings
API (HTTP `/v2/trace/setting`, `/v2/models/{m}/trace/setting`, gRPC `TraceSetting`), Triton's
trace file (mode `triton`) and OTLP/HTTP export (mode `opentelemetry`).

Ported from Triton's qa/L0_trace (trace_endpoint_test.py and test.sh) and written against
Triton's current behaviour (after server PR #7106): every value is a string, `trace_file` can
not be changed over the network (501 / UNIMPLEMENTED), a model setting inherits every field it
does not specify from the global one, and a null (HTTP) or empty value list (gRPC) clears.
Triton's model `simple` is `add_sub` here (examples/models: FP32 INPUT0/INPUT1 [N,16] ->
OUTPUT0 = sum, OUTPUT1 = difference).

Every scenario starts its own server with trace files under pytest's tmp_path; trace files are
read after the server stopped (SIGTERM or SIGINT), except the indexed files (`<file>.N`) that a
log frequency or a used-up count writes while it runs.

The OpenTelemetry tests run a small OTLP/HTTP collector in the test process (POST /v1/traces);
it decodes OTLP/JSON and OTLP/protobuf (with the opentelemetry-proto package).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import json
import signal
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _server import ROOT, ServerProcess, oxserve_bin

MODEL = "add_sub"
UNKNOWN = "does-not-exist"
REPOSITORIES = ["examples/models"]
TIMEOUT_S = 20.0

TRACE_FILE_REFUSED = "trace file location can not be updated through network protocol"

CORE_TIMESTAMPS = ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END",
                   "COMPUTE_OUTPUT_START", "COMPUTE_END", "REQUEST_END"]
FRONTEND_TIMESTAMPS = {
    "http": ["HTTP_RECV_START", "HTTP_RECV_END", "HTTP_SEND_START", "HTTP_SEND_END"],
    "grpc": ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", "GRPC_SEND_START", "GRPC_SEND_END"],
}
MODEL_OBJECT_KEYS = {"id", "model_name", "model_version", "request_id", "parent_id"}

TRACEPARENT_TRACE_ID = "0af7651916cd43dd8448eb211c12666c"
TRACEPARENT_SPAN_ID = "b7ad6b7169242424"
TRACEPARENT = f"00-{TRACEPARENT_TRACE_ID}-{TRACEPARENT_SPAN_ID}-01"
SPAN_KIND_SERVER = 2


# ---------------------------------------------------------------------------------------
# servers and clients
# ---------------------------------------------------------------------------------------

def trace_config(*settings: str) -> list[str]:
    """`--trace-config S` for each setting S."""
    return [arg for s in settings for arg in ("--trace-config", s)]


def triton_settings(file: str, level=("TIMESTAMPS",), rate="1", count="-1", log_frequency="0") -> dict:
    """A settings response in mode triton, keys in Triton's order."""
    return {"trace_level": list(level), "trace_rate": rate, "trace_count": count,
            "log_frequency": log_frequency, "trace_file": file, "trace_mode": "triton"}


@contextlib.contextmanager
def serving(name: str, args: list[str], repositories=REPOSITORIES, **kwargs):
    """A server for the block; stopped with SIGTERM (exit code 0 and a clean stdout checked)
    at the end unless the test stopped it already."""
    server = ServerProcess(name, list(repositories), args, **kwargs).start()
    try:
        yield server
    finally:
        if server.alive():
            server.stop_and_check()


def stop(server: ServerProcess, sig: int = signal.SIGTERM) -> None:
    """Stops the server with `sig` and checks it exited with code 0: trace files are complete
    only after the server shut down."""
    assert server.proc is not None
    server.proc.send_signal(sig)
    code = server.wait_exit()
    if code != 0:
        server.fail(f"exit code {code} after {signal.Signals(sig).name}, expected 0")


@contextlib.contextmanager
def clients(server: ServerProcess):
    h = httpclient.InferenceServerClient(url=server.http_host, network_timeout=60.0,
                                         connection_timeout=60.0)
    g = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        yield h, g
    finally:
        h.close()
        g.close()


def add_sub_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[1,16] FP32 multiples of 1/4 in [-8, 8]: sums, differences and their decimal text are
    exact, so tensor data in a trace can be compared without tolerance worries."""
    r = np.random.default_rng(seed)
    a = (r.integers(-32, 33, size=(1, 16)) / 4).astype(np.float32)
    b = (r.integers(-32, 33, size=(1, 16)) / 4).astype(np.float32)
    return a, b


def infer(client, seed: int = 0, request_id: str = "", headers: dict | None = None, model: str = MODEL):
    """One add_sub request through a tritonclient HTTP or gRPC client; checks the outputs and
    returns (INPUT0, INPUT1, OUTPUT0, OUTPUT1)."""
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    a, b = add_sub_data(seed)
    inputs = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        inp = module.InferInput(name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer(model, inputs, request_id=request_id, headers=headers)
    out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)
    return a, b, out0, out1


def wait_until(predicate, what: str, server: ServerProcess | None = None, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:.0f} s waiting for {what}"
            if server is not None:
                server.fail(message)
            pytest.fail(message, pytrace=False)
        time.sleep(0.05)


def http_settings_url(server: ServerProcess, model: str | None = None) -> str:
    return server.http_url + (f"/v2/models/{model}/trace/setting" if model else "/v2/trace/setting")


def http_get(server: ServerProcess, model: str | None = None) -> dict:
    r = requests.get(http_settings_url(server, model), timeout=30)
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def http_post(server: ServerProcess, body, model: str | None = None) -> requests.Response:
    if isinstance(body, (bytes, str)):
        return requests.post(http_settings_url(server, model), data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
    return requests.post(http_settings_url(server, model), json=body, timeout=30)


def http_update(server: ServerProcess, body: dict, model: str | None = None) -> dict:
    r = http_post(server, body, model)
    assert r.status_code == 200, (body, r.status_code, r.text)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    return r.json()


def grpc_flat(response: dict) -> dict:
    """A TraceSettingResponse as JSON (tritonclient's as_json) -> {key: [values]}."""
    return {k: v.get("value", []) for k, v in response["settings"].items()}


def as_grpc(settings: dict) -> dict:
    """An HTTP settings dict -> what gRPC answers (every value a list)."""
    return {k: v if isinstance(v, list) else [v] for k, v in settings.items()}


# ---------------------------------------------------------------------------------------
# trace files (mode triton)
# ---------------------------------------------------------------------------------------

@dataclass
class Trace:
    """One trace id's entries from a trace file."""
    id: int
    model: dict | None = None
    timestamps: dict[str, int] = field(default_factory=dict)
    tensors: list[tuple[str, dict]] = field(default_factory=list)

    @property
    def request_id(self) -> str | None:
        return None if self.model is None else self.model.get("request_id")

    @property
    def protocol(self) -> str:
        found = [p for p, names in FRONTEND_TIMESTAMPS.items() if any(n in self.timestamps for n in names)]
        assert len(found) == 1, f"trace {self.id}: frontend timestamps of {found or 'no protocol'}: {self.timestamps}"
        return found[0]

    def tensor(self, activity: str, name: str) -> dict:
        found = [t for a, t in self.tensors if a == activity and t["name"] == name]
        assert len(found) == 1, f"trace {self.id}: {len(found)} {activity} entries for {name}: {self.tensors}"
        return found[0]


def read_trace_file(path: Path) -> list[dict]:
    """A whole trace file: one JSON array of objects."""
    assert path.is_file(), f"{path} does not exist; the directory holds {sorted(p.name for p in path.parent.iterdir())}"
    text = path.read_text()
    try:
        entries = json.loads(text)
    except ValueError as e:
        pytest.fail(f"{path} is not one JSON document ({e}):\n{text[:2000]}", pytrace=False)
    assert isinstance(entries, list), f"{path} is not a JSON array: {text[:500]}"
    return entries


def parse_traces(entries: list[dict], where: str = "trace file") -> dict[int, Trace]:
    """Groups a trace file's objects by id, checking each object's shape: the model object
    {"id","model_name","model_version"[,"request_id"][,"parent_id"]} (once per id, before that
    id's REQUEST_START), timestamp objects {"id","timestamps":[{"name","ns"}]} (one timestamp
    each, every name once per id) and tensor objects {"id","activity","tensor":{name,data,
    shape,dtype}}."""
    traces: dict[int, Trace] = {}
    for i, entry in enumerate(entries):
        assert isinstance(entry, dict), f"{where}[{i}] is not an object: {entry!r}"
        tid = entry.get("id")
        assert isinstance(tid, int) and not isinstance(tid, bool) and tid > 0, f"{where}[{i}]: bad id: {entry!r}"
        trace = traces.setdefault(tid, Trace(tid))
        if "model_name" in entry:
            assert set(entry) <= MODEL_OBJECT_KEYS, f"{where}[{i}]: unexpected keys: {entry!r}"
            assert trace.model is None, f"{where}[{i}]: a second model object for id {tid}: {entry!r}"
            assert "REQUEST_START" not in trace.timestamps, \
                f"{where}[{i}]: the model object of id {tid} comes after its REQUEST_START"
            assert isinstance(entry["model_name"], str), entry
            version = entry.get("model_version")
            assert isinstance(version, int) and not isinstance(version, bool), f"{where}[{i}]: {entry!r}"
            if "request_id" in entry:
                assert isinstance(entry["request_id"], str) and entry["request_id"], \
                    f"{where}[{i}]: request_id must be a non-empty string when present: {entry!r}"
            trace.model = entry
        elif "timestamps" in entry:
            assert set(entry) == {"id", "timestamps"}, f"{where}[{i}]: {entry!r}"
            stamps = entry["timestamps"]
            assert isinstance(stamps, list) and len(stamps) == 1, f"{where}[{i}]: one timestamp per object: {entry!r}"
            (stamp,) = stamps
            assert set(stamp) == {"name", "ns"}, f"{where}[{i}]: {entry!r}"
            name, ns = stamp["name"], stamp["ns"]
            assert isinstance(name, str) and isinstance(ns, int) and not isinstance(ns, bool) and ns > 0, \
                f"{where}[{i}]: {entry!r}"
            assert name not in trace.timestamps, f"{where}[{i}]: {name} twice for id {tid}"
            trace.timestamps[name] = ns
        elif "activity" in entry:
            assert set(entry) == {"id", "activity", "tensor"}, f"{where}[{i}]: {entry!r}"
            tensor = entry["tensor"]
            assert isinstance(tensor, dict) and set(tensor) == {"name", "data", "shape", "dtype"}, \
                f"{where}[{i}]: {entry!r}"
            assert all(isinstance(v, str) for v in tensor.values()), f"{where}[{i}]: {entry!r}"
            assert entry["activity"] in ("TENSOR_QUEUE_INPUT", "TENSOR_BACKEND_INPUT", "TENSOR_BACKEND_OUTPUT"), \
                f"{where}[{i}]: {entry!r}"
            trace.tensors.append((entry["activity"], tensor))
        else:
            pytest.fail(f"{where}[{i}]: neither a model, a timestamp nor a tensor object: {entry!r}",
                        pytrace=False)
    for trace in traces.values():
        assert trace.model is not None, f"{where}: id {trace.id} has no model object: {trace}"
    return traces


def read_traces(path: Path) -> list[Trace]:
    """The traces of a trace file, in file order of their first object."""
    return list(parse_traces(read_trace_file(path), path.name).values())


def check_timestamps(trace: Trace, protocol: str | None = None, model: str = MODEL) -> None:
    """The trace of one add_sub request: model object, every core timestamp in non-decreasing
    time order, and the frontend's timestamps around them."""
    assert trace.model["model_name"] == model, trace.model
    assert trace.model["model_version"] == 1, trace.model
    assert "parent_id" not in trace.model, trace.model
    ts = trace.timestamps
    proto = trace.protocol
    if protocol is not None:
        assert proto == protocol, (protocol, trace)
    expected = CORE_TIMESTAMPS + FRONTEND_TIMESTAMPS[proto]
    missing = [n for n in expected if n not in ts]
    assert not missing, f"trace {trace.id} lacks {missing}: {ts}"
    other = "grpc" if proto == "http" else "http"
    assert not set(FRONTEND_TIMESTAMPS[other]) & set(ts), f"trace {trace.id} mixes protocols: {ts}"
    core = [(n, ts[n]) for n in CORE_TIMESTAMPS]
    assert [ns for _, ns in core] == sorted(ns for _, ns in core), \
        f"trace {trace.id}: core timestamps out of order: {core}"
    recv_start, recv_end, send_start, send_end = (ts[n] for n in FRONTEND_TIMESTAMPS[proto])
    assert recv_start <= recv_end <= ts["REQUEST_START"], (trace.id, ts)
    assert ts["COMPUTE_OUTPUT_START"] <= send_start <= send_end, (trace.id, ts)


# ---------------------------------------------------------------------------------------
# 1. the settings API (trace_endpoint_test.py)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unittest_server(tmp_path_factory):
    """Started as Triton's trace_endpoint_test.py server: `--trace-config triton,file=
    <tmp>/global_unittest.log --trace-config level=TIMESTAMPS --trace-config rate=1`."""
    file = str(tmp_path_factory.mktemp("trace-settings") / "global_unittest.log")
    args = trace_config(f"triton,file={file}", "level=TIMESTAMPS", "rate=1")
    with serving("trace-settings", args) as server:
        server.trace_file = file
        yield server


@pytest.fixture
def settings_server(unittest_server):
    """The settings server; afterwards (Triton's tearDown) the model's and then the global
    settings are cleared over HTTP, back to the startup values."""
    yield unittest_server
    client = httpclient.InferenceServerClient(url=unittest_server.http_host)
    try:
        clear = {"trace_level": None, "trace_rate": None, "trace_count": None, "log_frequency": None}
        client.update_trace_settings(model_name=MODEL, settings=clear)
        client.update_trace_settings(settings=clear)
    finally:
        client.close()


def initial(server) -> dict:
    return triton_settings(server.trace_file)


def check_server_initial_state(server) -> None:
    expected = initial(server)
    client = httpclient.InferenceServerClient(url=server.http_host)
    try:
        assert client.get_trace_settings(model_name=MODEL) == expected
        assert client.get_trace_settings() == expected
    finally:
        client.close()


def test_http_get_settings(settings_server):
    expected = initial(settings_server)
    client = httpclient.InferenceServerClient(url=settings_server.http_host)
    try:
        assert client.get_trace_settings(model_name=MODEL) == expected
        assert client.get_trace_settings() == expected
        with pytest.raises(InferenceServerException) as e:
            client.get_trace_settings(model_name=UNKNOWN)
        assert f"Request for unknown model : {UNKNOWN}" in e.value.message(), e.value.message()
    finally:
        client.close()
    # The raw responses: JSON, keys in Triton's order, every scalar a string.
    for model in (MODEL, None):
        r = requests.get(http_settings_url(settings_server, model), timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json"), r.headers
        assert list(r.json()) == ["trace_level", "trace_rate", "trace_count", "log_frequency",
                                  "trace_file", "trace_mode"], r.text


def test_server_metadata_lists_the_trace_extension(settings_server):
    client = httpclient.InferenceServerClient(url=settings_server.http_host)
    try:
        assert "trace" in client.get_server_metadata()["extensions"]
    finally:
        client.close()
    g = grpcclient.InferenceServerClient(url=settings_server.grpc_host)
    try:
        assert "trace" in g.get_server_metadata().extensions
    finally:
        g.close()


def test_grpc_get_settings(settings_server):
    expected = as_grpc(initial(settings_server))
    client = grpcclient.InferenceServerClient(url=settings_server.grpc_host)
    try:
        assert grpc_flat(client.get_trace_settings(model_name=MODEL, as_json=True)) == expected
        assert grpc_flat(client.get_trace_settings(as_json=True)) == expected
        message = client.get_trace_settings()
        assert list(message.settings["trace_level"].value) == ["TIMESTAMPS"]
        with pytest.raises(InferenceServerException) as e:
            client.get_trace_settings(model_name=UNKNOWN)
        assert f"Request for unknown model : {UNKNOWN}" in e.value.message(), e.value.message()
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value.status()
    finally:
        client.close()


def test_http_update_settings(settings_server):
    base = initial(settings_server)
    both_levels = {**base, "trace_level": ["TIMESTAMPS", "TENSORS"]}
    client = httpclient.InferenceServerClient(url=settings_server.http_host)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.update_trace_settings(model_name=MODEL, settings={"trace_file": "model.log"})
        assert TRACE_FILE_REFUSED in e.value.message(), e.value.message()
        assert e.value.status() == "501", e.value.status()
        assert client.get_trace_settings(model_name=MODEL) == base

        assert client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS", "TENSORS"]}) == both_levels
        # The model has no setting of its own: it follows the global change.
        assert client.get_trace_settings(model_name=MODEL) == both_levels

        with pytest.raises(InferenceServerException) as e:
            client.update_trace_settings(model_name=UNKNOWN, settings={"trace_level": ["TIMESTAMPS"]})
        assert f"Request for unknown model : {UNKNOWN}" in e.value.message(), e.value.message()
    finally:
        client.close()
    # The refusal as a raw response: 501 with Triton's error body, for the model and globally,
    # and `null` is refused as well.
    for model in (MODEL, None):
        for value in ("model.log", None):
            r = http_post(settings_server, {"trace_file": value}, model)
            assert r.status_code == 501, (model, value, r.status_code, r.text)
            assert r.json() == {"error": TRACE_FILE_REFUSED}, r.text
    assert http_get(settings_server, MODEL) == both_levels


def test_grpc_update_settings(settings_server):
    base = initial(settings_server)
    both_levels = as_grpc({**base, "trace_level": ["TIMESTAMPS", "TENSORS"]})
    client = grpcclient.InferenceServerClient(url=settings_server.grpc_host)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.update_trace_settings(model_name=MODEL, settings={"trace_file": "model.log"})
        assert e.value.message() == TRACE_FILE_REFUSED, e.value.message()
        assert e.value.status() == "StatusCode.UNIMPLEMENTED", e.value.status()
        assert grpc_flat(client.get_trace_settings(model_name=MODEL, as_json=True)) == as_grpc(base)

        updated = client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS", "TENSORS"]}, as_json=True)
        assert grpc_flat(updated) == both_levels
        assert grpc_flat(client.get_trace_settings(model_name=MODEL, as_json=True)) == both_levels

        with pytest.raises(InferenceServerException) as e:
            client.update_trace_settings(model_name=UNKNOWN, settings={"trace_level": ["TIMESTAMPS"]})
        assert e.value.message() == f"Request for unknown model : {UNKNOWN}", e.value.message()
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value.status()
    finally:
        client.close()


def clear_sequence(update, get, base: dict) -> None:
    """trace_endpoint_test.py's clear test: `update(model, settings)` / `get(model)` with
    model None for the global settings; both return HTTP-style dicts."""
    assert update(MODEL, {"trace_rate": "12", "log_frequency": "34"}) == \
        {**base, "trace_rate": "12", "log_frequency": "34"}
    assert update(None, {"trace_rate": "56", "trace_count": "78", "trace_level": ["OFF"]}) == \
        {**base, "trace_level": ["OFF"], "trace_rate": "56", "trace_count": "78"}
    # The model keeps its own rate and log frequency and inherits level and count.
    assert get(MODEL) == {**base, "trace_level": ["OFF"], "trace_rate": "12", "trace_count": "78",
                          "log_frequency": "34"}
    # Cleared global fields return to the startup values.
    global_cleared = {**base, "trace_level": ["OFF"]}
    assert update(None, {"trace_rate": None, "trace_count": None}) == global_cleared
    assert get(MODEL) == {**base, "trace_level": ["OFF"], "trace_rate": "12", "log_frequency": "34"}
    # Cleared model fields fall back to the global ones.
    assert update(MODEL, {"trace_rate": None, "trace_level": None}) == \
        {**base, "trace_level": ["OFF"], "log_frequency": "34"}
    assert get(None) == global_cleared


def test_http_clear_settings(settings_server):
    client = httpclient.InferenceServerClient(url=settings_server.http_host)
    try:
        clear_sequence(lambda m, s: client.update_trace_settings(model_name=m, settings=s),
                       lambda m: client.get_trace_settings(model_name=m), initial(settings_server))
    finally:
        client.close()


def test_grpc_clear_settings(settings_server):
    client = grpcclient.InferenceServerClient(url=settings_server.grpc_host)

    def as_http(flat: dict) -> dict:
        return {k: v if k == "trace_level" else (v[0] if len(v) == 1 else v) for k, v in flat.items()}

    try:
        clear_sequence(
            lambda m, s: as_http(grpc_flat(client.update_trace_settings(model_name=m, settings=s, as_json=True))),
            lambda m: as_http(grpc_flat(client.get_trace_settings(model_name=m, as_json=True))),
            initial(settings_server))
    finally:
        client.close()


RANGE_U32 = "[ 0, 4294967295 ]"
HTTP_REFUSED_UPDATES = [
    ({"trace_rate": "10000000000"}, 400,
     f"Unable to parse 'trace_rate', value is out of range {RANGE_U32}, got: 10000000000"),
    ({"trace_count": "10000000000"}, 400,
     "Unable to parse 'trace_count', value is out of range [ -1, 2147483647 ], got: 10000000000"),
    ({"log_frequency": "10000000000"}, 400,
     f"Unable to parse 'log_frequency', value is out of range {RANGE_U32}, got: 10000000000"),
    ({"trace_rate": "abc"}, 400, "Unable to parse 'trace_rate', got: abc"),
    ({"trace_count": "x1"}, 400, "Unable to parse 'trace_count', got: x1"),
    ({"log_frequency": ""}, 400, "Unable to parse 'log_frequency', got: "),
    ({"trace_count": "-2"}, 400, "Unable to parse 'trace_count'. Expecting value >= -1, got:-2"),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, 400, "Expect only one trace level 'OFF' is specified"),
    ({"trace_rate": "0"}, 400, "Attempting to set invalid trace setting :sample rate must be non-zero"),
    ({"trace_count": "0"}, 400, "Attempting to set invalid trace setting :"),
    # Triton answers these two with 500; oxserve with 400 and Triton's words (docs/protocols.md).
    ({"trace_rate": 5}, 400, "attempt to access JSON non-string as string"),
    ({"trace_level": "TIMESTAMPS"}, 400, "attempt to access JSON non-array as array"),
    # The first error returns before anything is applied.
    ({"trace_rate": "7", "trace_count": "abc"}, 400, "Unable to parse 'trace_count', got: abc"),
    ({"trace_rate": "7", "trace_file": "x.log"}, 501, TRACE_FILE_REFUSED),
]


@pytest.mark.parametrize("body,status,message", HTTP_REFUSED_UPDATES,
                         ids=[json.dumps(b) for b, _, _ in HTTP_REFUSED_UPDATES])
def test_http_refused_updates_change_nothing(settings_server, body, status, message):
    base = initial(settings_server)
    for model in (MODEL, None):
        r = http_post(settings_server, body, model)
        # Triton's message whole, or (where oxserve explains it further) Triton's words first.
        assert r.status_code == status, (model, r.status_code, r.text)
        error = r.json()["error"]
        assert error == message or error.startswith(message + ": "), (model, error)
        assert http_get(settings_server, MODEL) == base
        assert http_get(settings_server) == base


def test_http_malformed_bodies_are_refused(settings_server):
    for body in (b"", b"{not json", b"[1,2]"):
        r = http_post(settings_server, body, MODEL)
        assert r.status_code in (400, 500), (body, r.status_code, r.text)
        assert isinstance(r.json().get("error"), str), r.text
    assert http_get(settings_server, MODEL) == initial(settings_server)


HTTP_ACCEPTED_UPDATES = [
    # std::stoi: leading blanks and a sign are skipped, trailing text is ignored.
    ({"trace_rate": "12abc"}, {"trace_rate": "12"}),
    ({"trace_rate": " +3"}, {"trace_rate": "3"}),
    ({"trace_rate": "1.5"}, {"trace_rate": "1"}),
    # Negative rate / log frequency wrap to uint32.
    ({"log_frequency": "-1"}, {"log_frequency": "4294967295"}),
    ({"trace_count": "-1"}, {}),
    # Levels: the response lists TIMESTAMPS before TENSORS; unknown (and lower-case) strings
    # are ignored, and so is an empty list.
    ({"trace_level": ["TENSORS", "TIMESTAMPS"]}, {"trace_level": ["TIMESTAMPS", "TENSORS"]}),
    ({"trace_level": ["TENSORS"]}, {"trace_level": ["TENSORS"]}),
    ({"trace_level": ["OFF"]}, {"trace_level": ["OFF"]}),
    ({"trace_level": []}, {}),
    ({"trace_level": ["BOGUS"]}, {}),
    ({"trace_level": ["timestamps", "tensors"]}, {}),
    # Unknown keys (trace_mode, url, ...) are ignored.
    ({"trace_mode": "opentelemetry", "url": "http://127.0.0.1:1/v1/traces", "bogus": "1"}, {}),
    ({}, {}),
]


@pytest.mark.parametrize("body,changes", HTTP_ACCEPTED_UPDATES,
                         ids=[json.dumps(b) for b, _ in HTTP_ACCEPTED_UPDATES])
def test_http_accepted_model_updates(settings_server, body, changes):
    base = initial(settings_server)
    expected = {**base, **changes}
    response = http_update(settings_server, body, MODEL)
    assert response == expected
    assert list(response) == list(base), response
    assert http_get(settings_server, MODEL) == expected
    assert http_get(settings_server) == base


GRPC_REFUSED_UPDATES = [
    ({"trace_rate": ["1", "2"]}, "StatusCode.INVALID_ARGUMENT", "expect only 1 value for 'trace_rate'"),
    ({"trace_count": ["1", "2"]}, "StatusCode.INVALID_ARGUMENT", "expect only 1 value for 'trace_count'"),
    ({"log_frequency": ["1", "2"]}, "StatusCode.INVALID_ARGUMENT", "expect only 1 value for 'log_frequency'"),
    ({"trace_count": "-2"}, "StatusCode.INVALID_ARGUMENT",
     "Unable to parse 'trace_count'. Expecting value >= -1, got: -2"),
    ({"trace_rate": "10000000000"}, "StatusCode.INVALID_ARGUMENT",
     f"Unable to parse 'trace_rate', value is out of range {RANGE_U32}, got: 10000000000"),
    ({"log_frequency": "zz"}, "StatusCode.INVALID_ARGUMENT", "Unable to parse 'log_frequency', got: zz"),
    ({"trace_level": ["OFF", "TENSORS"]}, "StatusCode.INVALID_ARGUMENT",
     "Expect only one trace level 'OFF' is specified"),
    ({"trace_rate": "0"}, "StatusCode.INVALID_ARGUMENT",
     "Attempting to set invalid trace setting :sample rate must be non-zero"),
    ({"trace_file": None}, "StatusCode.UNIMPLEMENTED", TRACE_FILE_REFUSED),
]


@pytest.mark.parametrize("settings,status,message", GRPC_REFUSED_UPDATES,
                         ids=[json.dumps(s) for s, _, _ in GRPC_REFUSED_UPDATES])
def test_grpc_refused_updates_change_nothing(settings_server, settings, status, message):
    base = as_grpc(initial(settings_server))
    client = grpcclient.InferenceServerClient(url=settings_server.grpc_host)
    try:
        for model in (MODEL, None):
            with pytest.raises(InferenceServerException) as e:
                client.update_trace_settings(model_name=model, settings=settings)
            assert (e.value.status(), e.value.message()) == (status, message), model
            assert grpc_flat(client.get_trace_settings(model_name=MODEL, as_json=True)) == base
            assert grpc_flat(client.get_trace_settings(as_json=True)) == base
    finally:
        client.close()


def test_http_routes_and_methods(settings_server):
    base = settings_server.http_url
    # A version in the path is not a trace route (Triton: 404).
    for method in ("GET", "POST"):
        r = requests.request(method, base + f"/v2/models/{MODEL}/versions/1/trace/setting",
                             json={} if method == "POST" else None, timeout=30)
        assert r.status_code == 404, (method, r.status_code, r.text)
        assert isinstance(r.json().get("error"), str), r.text
    # Methods other than GET and POST: 405.
    for path in ("/v2/trace/setting", f"/v2/models/{MODEL}/trace/setting"):
        for method in ("PUT", "DELETE", "PATCH"):
            r = requests.request(method, base + path, json={}, timeout=30)
            assert r.status_code == 405, (method, path, r.status_code, r.text)
            assert isinstance(r.json().get("error"), str), r.text
    # An unknown model: 400 with Triton's message, on GET and POST.
    for method, body in (("GET", None), ("POST", {"log_frequency": "1"})):
        r = requests.request(method, base + f"/v2/models/{UNKNOWN}/trace/setting", json=body, timeout=30)
        assert r.status_code == 400, (method, r.status_code, r.text)
        assert r.json() == {"error": f"Request for unknown model : {UNKNOWN}"}, r.text
    check_server_initial_state(settings_server)


# ---------------------------------------------------------------------------------------
# 2. the trace file (test.sh)
# ---------------------------------------------------------------------------------------

def test_off_to_timestamps_traces_every_request(tmp_path):
    """Tracing OFF at start, TIMESTAMPS through the API: 10 HTTP and 10 gRPC requests give 20
    traces, each with the model object and every timestamp in order; request ids appear when
    the client sent one."""
    file = tmp_path / "trace_off_to_min.log"
    args = trace_config(f"triton,file={file}", "level=OFF", "rate=1")
    with serving("trace-off-to-min", args) as server:
        assert http_get(server) == triton_settings(str(file), level=["OFF"])
        with clients(server) as (h, g):
            infer(h, 1, request_id="untraced-http")
            infer(g, 2, request_id="untraced-grpc")
            response = http_update(server, {"trace_level": ["TIMESTAMPS"]})
            assert response == triton_settings(str(file)), response
            sent = {}
            for i in range(10):
                for protocol, client in (("http", h), ("grpc", g)):
                    request_id = f"{protocol}-{i}" if i % 2 == 0 else ""
                    infer(client, 100 + i, request_id=request_id)
                    sent.setdefault(protocol, []).append(request_id)
        stop(server)
    traces = read_traces(file)
    assert len(traces) == 20, [(t.id, t.request_id) for t in traces]
    assert len({t.id for t in traces}) == 20
    by_protocol: dict[str, list[str]] = {"http": [], "grpc": []}
    for trace in traces:
        check_timestamps(trace)
        assert trace.tensors == [], "TIMESTAMPS level writes no tensors"
        by_protocol[trace.protocol].append(trace.request_id or "")
    for protocol in ("http", "grpc"):
        assert sorted(by_protocol[protocol]) == sorted(sent[protocol]), (protocol, by_protocol)
    # The model object has no request_id key when the client sent none.
    assert sum(1 for t in traces if "request_id" not in t.model) == 10


def test_rate_and_model_log_frequency_write_indexed_files(tmp_path):
    """rate 6 and the model's log_frequency 2: requests 6, 12 and 18 of 20 are traced;
    <file>.0 (2 traces) is written while the server runs, <file>.1 (1 trace) at shutdown, and
    the main file never."""
    file = tmp_path / "global_trace.log"
    args = trace_config(f"triton,file={file}", "level=TIMESTAMPS", "rate=6")
    with serving("trace-frequency", args) as server:
        r = http_post(server, {"trace_file": str(file)}, MODEL)
        assert r.status_code == 501 and r.json() == {"error": TRACE_FILE_REFUSED}, (r.status_code, r.text)
        response = http_update(server, {"log_frequency": "2"}, MODEL)
        assert response == triton_settings(str(file), rate="6", log_frequency="2"), response
        assert http_get(server) == triton_settings(str(file), rate="6")
        with clients(server) as (h, g):
            for i in range(1, 21):
                infer(h if i % 2 == 0 else g, i, request_id=str(i))
        first = Path(f"{file}.0")
        wait_until(first.is_file, f"{first.name} while the server runs", server)
        assert [t.request_id for t in read_traces(first)] == ["6", "12"]
        time.sleep(0.3)
        assert not Path(f"{file}.1").exists(), "the third trace is buffered until shutdown"
        stop(server)
    assert [t.request_id for t in read_traces(first)] == ["6", "12"]
    second = read_traces(Path(f"{file}.1"))
    assert [t.request_id for t in second] == ["18"]
    for trace in read_traces(first) + second:
        check_timestamps(trace, "http" if int(trace.request_id) % 2 == 0 else "grpc")
    assert not file.exists(), "with a log frequency nothing is written to the main file"
    assert not Path(f"{file}.2").exists()


def test_model_level_off_then_inherited(tmp_path):
    """test.sh's third scenario: the model's level OFF stops tracing, clearing it (null)
    inherits TIMESTAMPS again while the model's own rate 1 stays; stopped with SIGINT."""
    file = tmp_path / "global_trace.log"
    args = trace_config(f"triton,file={file}", "level=TIMESTAMPS", "rate=6")
    with serving("trace-model-off", args) as server:
        assert http_update(server, {"trace_rate": "1"}, MODEL) == triton_settings(str(file))
        response = http_update(server, {"trace_level": ["OFF"]}, MODEL)
        assert response == triton_settings(str(file), level=["OFF"]), response
        with clients(server) as (h, g):
            for i in range(20):
                infer(h if i % 2 else g, i, request_id=f"off-{i}")
            response = http_update(server, {"trace_level": None}, MODEL)
            assert response == triton_settings(str(file)), response
            assert http_get(server) == triton_settings(str(file), rate="6")
            for i in range(10):
                infer(h if i % 2 else g, i, request_id=f"on-{i}")
        stop(server, signal.SIGINT)
    traces = read_traces(file)
    assert sorted(t.request_id for t in traces) == sorted(f"on-{i}" for i in range(10))
    for trace in traces:
        check_timestamps(trace)
    assert not Path(f"{file}.0").exists()


def test_count_limits_traces_and_writes_the_first_index(tmp_path):
    """rate 1, count -1: 20 traces; the global count set to 5 allows 5 more, the live count
    reads "0" afterwards and <file>.0 (those 5) is written before shutdown; the 20 earlier traces
    end up in the main file."""
    file = tmp_path / "global_count.log"
    args = trace_config(f"triton,file={file}", "level=TIMESTAMPS", "rate=1")
    with serving("trace-count", args) as server:
        with clients(server) as (h, g):
            for i in range(20):
                infer(h if i % 2 else g, i, request_id=f"a-{i}")
            assert http_get(server, MODEL) == triton_settings(str(file))
            response = http_update(server, {"trace_count": "5"})
            assert response == triton_settings(str(file), count="5"), response
            for i in range(20):
                infer(h if i % 2 else g, i, request_id=f"b-{i}")
        assert http_get(server, MODEL) == triton_settings(str(file), count="0")
        assert http_get(server) == triton_settings(str(file), count="0")
        indexed = Path(f"{file}.0")
        wait_until(indexed.is_file, f"{indexed.name} before shutdown", server)
        assert [t.request_id for t in read_traces(indexed)] == [f"b-{i}" for i in range(5)]
        for body in ({"trace_count": "10000000000"}, {"trace_rate": "10000000000"},
                     {"log_frequency": "10000000000"}):
            r = http_post(server, body, MODEL)
            assert r.status_code == 400, (body, r.status_code, r.text)
        stop(server)
    main = read_traces(file)
    assert sorted(t.request_id for t in main) == sorted(f"a-{i}" for i in range(20))
    fifth = read_traces(indexed)
    assert [t.request_id for t in fifth] == [f"b-{i}" for i in range(5)]
    for trace in main + fifth:
        check_timestamps(trace)
    assert not Path(f"{file}.1").exists()


def numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",")] if text else []


def test_tensors_level_writes_inputs_and_outputs(tmp_path):
    """level=TIMESTAMPS plus level=TENSORS: every input as TENSOR_QUEUE_INPUT and every output
    as TENSOR_BACKEND_OUTPUT with its name, comma-joined data and shape, and Triton datatype."""
    file = tmp_path / "tensors.log"
    args = trace_config(f"triton,file={file}", "level=TIMESTAMPS", "level=TENSORS", "rate=1") + \
        ["--model-control-mode", "explicit", "--load-model", MODEL, "--load-model", "mixed_types"]
    with serving("trace-tensors", args, ["examples/models", "tests/fixtures/models"]) as server:
        assert http_get(server, MODEL) == triton_settings(str(file), level=["TIMESTAMPS", "TENSORS"])
        with clients(server) as (h, g):
            a, b, out0, out1 = infer(h, 7, request_id="add-http")
            a_mixed = np.array([7, -2, 3], dtype=np.int64)
            b_mixed = np.array([6.5, -2.0, 3.25], dtype=np.float64)
            inputs = [grpcclient.InferInput("A", [3], "INT64"), grpcclient.InferInput("B", [3], "FP64")]
            inputs[0].set_data_from_numpy(a_mixed)
            inputs[1].set_data_from_numpy(b_mixed)
            result = g.infer("mixed_types", inputs, request_id="mixed-grpc")
            np.testing.assert_array_equal(result.as_numpy("A_INT32"), [7, -2, 3])
            np.testing.assert_array_equal(result.as_numpy("A_GT_B"), [True, False, False])
        stop(server)
    traces = {t.request_id: t for t in read_traces(file)}
    assert sorted(traces) == ["add-http", "mixed-grpc"], traces

    add = traces["add-http"]
    check_timestamps(add, "http")
    for activity, name, dtype, data in (
            ("TENSOR_QUEUE_INPUT", "INPUT0", "FP32", a), ("TENSOR_QUEUE_INPUT", "INPUT1", "FP32", b),
            ("TENSOR_BACKEND_OUTPUT", "OUTPUT0", "FP32", out0),
            ("TENSOR_BACKEND_OUTPUT", "OUTPUT1", "FP32", out1)):
        tensor = add.tensor(activity, name)
        assert (tensor["dtype"], tensor["shape"]) == (dtype, "1,16"), tensor
        assert numbers(tensor["data"]) == data.ravel().tolist(), tensor
    assert {n for act, t in add.tensors if act == "TENSOR_QUEUE_INPUT" for n in [t["name"]]} == {"INPUT0", "INPUT1"}
    assert {n for act, t in add.tensors if act == "TENSOR_BACKEND_OUTPUT" for n in [t["name"]]} == {"OUTPUT0", "OUTPUT1"}

    mixed = traces["mixed-grpc"]
    check_timestamps(mixed, "grpc", model="mixed_types")
    expected = {
        ("TENSOR_QUEUE_INPUT", "A"): ("INT64", "7,-2,3"),
        ("TENSOR_BACKEND_OUTPUT", "A_INT32"): ("INT32", "7,-2,3"),
        ("TENSOR_BACKEND_OUTPUT", "A_GT_B"): ("BOOL", "1,0,0"),
    }
    for (activity, name), (dtype, data) in expected.items():
        tensor = mixed.tensor(activity, name)
        assert (tensor["dtype"], tensor["shape"], tensor["data"]) == (dtype, "3", data), tensor
    fp64 = mixed.tensor("TENSOR_QUEUE_INPUT", "B")
    assert (fp64["dtype"], fp64["shape"]) == ("FP64", "3"), fp64
    assert numbers(fp64["data"]) == b_mixed.tolist(), fp64


def test_settings_without_trace_flags_and_model_lifecycle():
    """No trace flags: the defaults (OFF, rate 1000, no file) and no way to switch tracing on
    without a file; a model's settings answer only while it is loaded (explicit mode)."""
    defaults = triton_settings("", level=["OFF"], rate="1000")
    args = ["--model-control-mode", "explicit", "--load-model", MODEL]
    with serving("trace-no-flags", args) as server:
        assert http_get(server) == defaults
        assert http_get(server, MODEL) == defaults
        r = http_post(server, {"trace_level": ["TIMESTAMPS"]})
        assert (r.status_code, r.json()) == \
            (400, {"error": "Attempting to set invalid trace setting :trace file name is not given"}), r.text

        def check(model: str, ok: bool) -> None:
            for method, body in (("GET", None), ("POST", {"log_frequency": "1"})):
                r = requests.request(method, http_settings_url(server, model), json=body, timeout=30)
                if ok:
                    assert r.status_code == 200, (model, method, r.text)
                else:
                    assert r.status_code == 400, (model, method, r.status_code, r.text)
                    assert r.json() == {"error": f"Request for unknown model : {model}"}, r.text

        check(UNKNOWN, False)
        check("iris", False)  # in the repository, not loaded
        with clients(server) as (h, _):
            h.load_model("iris")
            check("iris", True)
            assert http_get(server, "iris") == {**defaults, "log_frequency": "1"}
            h.unload_model("iris")
            wait_until(lambda: not h.is_model_ready("iris"), "iris to unload", server)
            check("iris", False)
            h.load_model("iris")
            check("iris", True)
        check(MODEL, True)


def test_trace_api_is_a_restricted_group():
    """--http-restricted-api / --grpc-restricted-protocol with the `trace` group."""
    args = ["--http-restricted-api", "trace:admin-key=admin-secret",
            "--grpc-restricted-protocol", "trace:admin-key=admin-secret"]
    with serving("trace-restricted", args) as server:
        for model in (None, MODEL):
            r = requests.get(http_settings_url(server, model), timeout=30)
            assert r.status_code == 403, (model, r.status_code, r.text)
            assert r.json() == {"error": "This API is restricted, expecting header 'admin-key'"}, r.text
            r = requests.get(http_settings_url(server, model), headers={"admin-key": "admin-secret"}, timeout=30)
            assert r.status_code == 200, r.text
        client = grpcclient.InferenceServerClient(url=server.grpc_host)
        try:
            with pytest.raises(InferenceServerException) as e:
                client.get_trace_settings()
            assert e.value.status() == "StatusCode.UNAVAILABLE", e.value.status()
            assert "restricted" in e.value.message(), e.value.message()
            settings = client.get_trace_settings(headers={"triton-grpc-protocol-admin-key": "admin-secret"},
                                                 as_json=True)
            assert grpc_flat(settings)["trace_mode"] == ["triton"]
        finally:
            client.close()


# ---------------------------------------------------------------------------------------
# 3. the command line
# ---------------------------------------------------------------------------------------

LEVEL_FLAGS = [
    (["level=timestamps"], ["TIMESTAMPS"]),
    (["level=TIMESTAMPS", "level=TENSORS"], ["TIMESTAMPS", "TENSORS"]),
    (["level=tensors"], ["TENSORS"]),
    (["level=max"], ["TIMESTAMPS"]),
    (["level=TENSORS", "level=OFF", "level=TIMESTAMPS"], ["OFF"]),
    (["level=false"], ["OFF"]),
]


@pytest.mark.parametrize("levels,expected", LEVEL_FLAGS, ids=["+".join(l) for l, _ in LEVEL_FLAGS])
def test_trace_config_levels(tmp_path, levels, expected):
    """Levels are case-insensitive and OR'ed across flags; any OFF disables tracing. The
    `--trace-config=<v>` form works too."""
    file = str(tmp_path / "levels.log")
    args = [f"--trace-config=triton,file={file}"] + trace_config(*levels) + ["--trace-config=count=3"]
    with serving("trace-levels", args) as server:
        assert http_get(server) == triton_settings(file, level=expected, rate="1000", count="3")


def test_deprecated_trace_flags(tmp_path):
    """--trace-file/-level/-rate/-count/-log-frequency still set the settings (with a
    deprecation warning); a --trace-config value wins over the deprecated flag."""
    file = str(tmp_path / "deprecated.log")
    args = ["--trace-file", file, "--trace-level", "TIMESTAMPS", "--trace-level", "TENSORS",
            "--trace-rate", "3", "--trace-count", "7", "--trace-log-frequency", "4",
            *trace_config("count=9")]
    with serving("trace-deprecated", args) as server:
        expected = triton_settings(file, level=["TIMESTAMPS", "TENSORS"], rate="3", count="9", log_frequency="4")
        assert http_get(server) == expected
        assert http_get(server, MODEL) == expected
        log = server.stderr_path.read_text(errors="replace")
        assert "--trace-file" in log and "deprecated" in log.lower(), \
            "no deprecation warning naming --trace-file on stderr:\n" + server.stderr_tail()


BAD_TRACE_CONFIG = [
    ("level=bogus", "invalid value for trace level option: bogus"),
    ("bogus,file=x.log", "invalid value for trace mode option: bogus"),
    ("mode=bogus", "invalid value for trace mode option: bogus"),
    (",file=x.log", "No trace mode specified"),
    ("rate", "--trace-config option format is"),
    ("triton,file=", "--trace-config option format is"),
    ("rate=abc", "abc"),
]


@pytest.mark.parametrize("value,words", BAD_TRACE_CONFIG, ids=[v for v, _ in BAD_TRACE_CONFIG])
def test_bad_trace_config_stops_the_start(value, words):
    command = ServerProcess("trace-bad-flag", REPOSITORIES, ["--trace-config", value]).command(oxserve_bin())
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20,
                             stdin=subprocess.DEVNULL, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"--trace-config {value!r} was accepted: the server kept running", pytrace=False)
    assert out.returncode != 0, (out.returncode, out.stderr[-2000:])
    assert words in out.stderr, out.stderr[-2000:]
    assert '"listening"' not in out.stdout


class TritonServerProcess(ServerProcess):
    """The binary started through a link named `tritonserver`, with Triton's command line."""

    def __init__(self, name: str, link: Path, args: list[str]):
        super().__init__(name, [], args)
        self.link = link

    def command(self, binary: str) -> list[str]:
        return [str(self.link), "--http-address=127.0.0.1", "--http-port=0", "--grpc-port=0",
                "--metrics-port=0"] + self.tls_args + self.extra_args


def test_tritonserver_command_line(tmp_path):
    """`tritonserver --trace-config=...` (the `=` form) with the deprecated
    --trace-log-frequency: rate 2 traces requests 2 and 4; the log frequency 3 is not reached,
    so both are written to <file>.0 at shutdown (never to the main file)."""
    link = tmp_path / "bin" / "tritonserver"
    link.parent.mkdir()
    link.symlink_to(oxserve_bin())
    file = tmp_path / "tritonserver_trace.log"
    server = TritonServerProcess("trace-tritonserver", link, [
        "--model-repository=examples/models",
        f"--trace-config=triton,file={file}", "--trace-config=level=TIMESTAMPS", "--trace-config=rate=2",
        "--trace-log-frequency=3"]).start()
    try:
        assert http_get(server) == triton_settings(str(file), rate="2", log_frequency="3")
        with clients(server) as (h, g):
            for i in range(1, 5):
                infer(h if i % 2 else g, i, request_id=f"r{i}")
        time.sleep(0.3)
        assert not Path(f"{file}.0").exists(), "2 traces < log frequency 3: nothing written yet"
    finally:
        if server.alive():
            stop(server)
    traces = read_traces(Path(f"{file}.0"))
    assert [t.request_id for t in traces] == ["r2", "r4"]
    for trace in traces:
        check_timestamps(trace, "grpc")
    assert not file.exists()


# ---------------------------------------------------------------------------------------
# 4. OpenTelemetry: an OTLP/HTTP collector in the test
# ---------------------------------------------------------------------------------------

def _pb_any_value(value):
    """An OTLP AnyValue as the Python value it holds."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_pb_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _pb_any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _pb_span(span) -> dict:
    return {
        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(), "name": span.name, "kind": span.kind,
        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
        "attributes": {a.key: _pb_any_value(a.value) for a in span.attributes},
        "events": [{"name": e.name, "time": e.time_unix_nano} for e in span.events],
    }


def decode_otlp_protobuf(body: bytes) -> list[dict]:
    """ExportTraceServiceRequest (decoded by the opentelemetry-proto package) ->
    [{"resource": {attributes}, "spans": [span dicts]}]."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return [
        {
            "resource": {a.key: _pb_any_value(a.value) for a in rs.resource.attributes},
            "spans": [_pb_span(s) for ss in rs.scope_spans for s in ss.spans],
        }
        for rs in request.resource_spans
    ]


def _json_id(value) -> str:
    """OTLP/JSON ids are hex; a protobuf-JSON mapping would give base64."""
    if not value:
        return ""
    text = str(value)
    if all(c in "0123456789abcdefABCDEF" for c in text) and len(text) in (16, 32):
        return text.lower()
    return base64.b64decode(text).hex()


def _json_any_value(value: dict):
    for key in ("stringValue", "string_value"):
        if key in value:
            return value[key]
    for key in ("boolValue", "bool_value"):
        if key in value:
            return bool(value[key])
    for key in ("intValue", "int_value"):
        if key in value:
            return int(value[key])
    for key in ("doubleValue", "double_value"):
        if key in value:
            return float(value[key])
    for key in ("arrayValue", "array_value"):
        if key in value:
            return [_json_any_value(v) for v in value[key].get("values", [])]
    return None


def _get(d: dict, camel: str, default=None):
    snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
    return d.get(camel, d.get(snake, default))


def _json_span(s: dict) -> dict:
    kind = _get(s, "kind", 0)
    if isinstance(kind, str):
        kind = ["SPAN_KIND_UNSPECIFIED", "SPAN_KIND_INTERNAL", "SPAN_KIND_SERVER", "SPAN_KIND_CLIENT",
                "SPAN_KIND_PRODUCER", "SPAN_KIND_CONSUMER"].index(kind)
    return {
        "trace_id": _json_id(_get(s, "traceId")), "span_id": _json_id(_get(s, "spanId")),
        "parent_span_id": _json_id(_get(s, "parentSpanId")), "name": s.get("name", ""), "kind": kind,
        "start": int(_get(s, "startTimeUnixNano", 0)), "end": int(_get(s, "endTimeUnixNano", 0)),
        "attributes": {a["key"]: _json_any_value(a.get("value", {})) for a in s.get("attributes", [])},
        "events": [{"name": e.get("name", ""), "time": int(_get(e, "timeUnixNano", 0))}
                   for e in s.get("events", [])],
    }


def decode_otlp_json(body: bytes) -> list[dict]:
    batches = []
    for rs in _get(json.loads(body), "resourceSpans", []):
        resource = {a["key"]: _json_any_value(a.get("value", {}))
                    for a in (rs.get("resource") or {}).get("attributes", [])}
        spans = []
        for ss in _get(rs, "scopeSpans", []) + _get(rs, "instrumentationLibrarySpans", []):
            spans += [_json_span(s) for s in ss.get("spans", [])]
        batches.append({"resource": resource, "spans": spans})
    return batches


class OtlpCollector:
    """An OTLP/HTTP trace receiver on 127.0.0.1:<free port>: POST /v1/traces with
    application/x-protobuf or application/json bodies (gzip/deflate content encoding
    accepted); answers 200 with an empty ExportTraceServiceResponse."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches: list[dict] = []
        self.problems: list[str] = []
        self.paths: list[str] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def do_POST(self):
                body = self._body()
                encoding = self.headers.get("Content-Encoding", "").lower()
                content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    if content_type == "application/json":
                        batches = decode_otlp_json(body)
                        answer = b"{}"
                    elif content_type in ("application/x-protobuf", "application/protobuf"):
                        batches = decode_otlp_protobuf(body)
                        answer = b""
                    else:
                        raise ValueError(f"unexpected Content-Type {content_type!r}")
                except Exception as e:  # noqa: BLE001 - reported by the test
                    with collector.lock:
                        collector.problems.append(f"{self.path}: {type(e).__name__}: {e}")
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with collector.lock:
                    collector.paths.append(self.path)
                    collector.batches += batches
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="otlp-collector")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/traces"

    def spans(self) -> list[dict]:
        with self.lock:
            assert not self.problems, self.problems
            assert set(self.paths) <= {"/v1/traces"}, self.paths
            return [dict(span, resource=b["resource"]) for b in self.batches for span in b["spans"]]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def otlp_collector():
    collector = OtlpCollector()
    try:
        yield collector
    finally:
        collector.close()


def otel_args(url: str, *extra: str) -> list[str]:
    return trace_config("mode=opentelemetry", f"opentelemetry,url={url}", "rate=1", "level=TIMESTAMPS",
                        "opentelemetry,bsp_schedule_delay=100", *extra)


def request_spans(spans: list[dict], request_id: str):
    """(InferRequest, model span, compute span) of the request with `request_id`, or None while
    any of them has not arrived."""
    models = [s for s in spans if s["attributes"].get("triton.request_id") == request_id
              and s["name"] not in ("InferRequest", "compute")]
    if not models:
        return None
    assert len(models) == 1, f"{len(models)} spans carry triton.request_id {request_id}: {models}"
    (model,) = models
    roots = [s for s in spans if s["span_id"] == model["parent_span_id"] and s["trace_id"] == model["trace_id"]]
    computes = [s for s in spans if s["parent_span_id"] == model["span_id"] and s["trace_id"] == model["trace_id"]]
    if not roots or not computes:
        return None
    assert len(roots) == 1 and len(computes) == 1, (roots, computes)
    return roots[0], model, computes[0]


def event_names(span: dict) -> set[str]:
    return {e["name"] for e in span["events"]}


def test_opentelemetry_settings_and_spans():
    """Mode opentelemetry: the settings show the OTel configuration (no trace_file or
    log_frequency); each request is exported as InferRequest -> add_sub -> compute with the
    frontend, request and compute events and the triton.* attributes; a W3C traceparent
    header makes the remote span the parent of InferRequest (same trace id)."""
    with otlp_collector() as collector:
        args = otel_args(collector.url, "opentelemetry,resource=test.key=test.value")
        with serving("trace-otel", args) as server:
            for model in (None, MODEL):
                r = requests.get(http_settings_url(server, model), timeout=30)
                assert r.status_code == 200, r.text
                settings = r.json()
                keys = list(settings)
                assert keys[:4] == ["trace_level", "trace_rate", "trace_count", "trace_mode"], keys
                assert keys[4:7] == ["url", "bsp_schedule_delay", "resource"], keys
                assert settings == {
                    "trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "-1",
                    "trace_mode": "opentelemetry", "url": collector.url, "bsp_schedule_delay": "100",
                    "resource": "test.key=test.value", "bsp_max_queue_size": "2048",
                    "bsp_max_export_batch_size": "512"}, settings
            g = grpcclient.InferenceServerClient(url=server.grpc_host)
            try:
                flat = grpc_flat(g.get_trace_settings(model_name=MODEL, as_json=True))
                assert "trace_file" not in flat and "log_frequency" not in flat, flat
                assert flat["trace_mode"] == ["opentelemetry"] and flat["url"] == [collector.url], flat
            finally:
                g.close()

            sent = {}
            with clients(server) as (h, g):
                for protocol, client in (("http", h), ("grpc", g)):
                    for parented in (False, True):
                        request_id = f"otel-{protocol}-{'parent' if parented else 'plain'}"
                        infer(client, len(sent), request_id=request_id,
                              headers={"traceparent": TRACEPARENT} if parented else None)
                        sent[request_id] = (protocol, parented)

            def complete():
                spans = collector.spans()
                return all(request_spans(spans, rid) for rid in sent)

            wait_until(complete, "the spans of 4 requests at the collector", server)
            stop(server)

        spans = collector.spans()
        assert len(spans) == 3 * len(sent), [(s["name"], s["attributes"]) for s in spans]
        for request_id, (protocol, parented) in sent.items():
            root, model, compute = request_spans(spans, request_id)
            assert (root["name"], model["name"], compute["name"]) == ("InferRequest", MODEL, "compute")
            for span in (root, model, compute):
                assert len(span["trace_id"]) == 32 and span["trace_id"] != "0" * 32, span
                assert len(span["span_id"]) == 16 and span["span_id"] != "0" * 16, span
                assert span["kind"] == SPAN_KIND_SERVER, span
                assert span["resource"].get("service.name") == "triton-inference-server", span["resource"]
                assert span["resource"].get("test.key") == "test.value", span["resource"]
            assert {"triton.model_name": MODEL, "triton.model_version": 1, "triton.request_id": request_id}.items() \
                <= model["attributes"].items(), model["attributes"]
            assert not any(k.startswith("triton.") for k in root["attributes"]), root["attributes"]
            if parented:
                assert root["trace_id"] == TRACEPARENT_TRACE_ID, root
                assert root["parent_span_id"] == TRACEPARENT_SPAN_ID, root
            else:
                assert root["trace_id"] != TRACEPARENT_TRACE_ID, root
                assert root["parent_span_id"] == "", root
            assert set(FRONTEND_TIMESTAMPS[protocol]) <= event_names(root), (request_id, root["events"])
            assert {"REQUEST_START", "QUEUE_START", "REQUEST_END"} <= event_names(model), model["events"]
            assert {"COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END"} \
                <= event_names(compute), compute["events"]
            assert root["start"] <= model["start"] <= compute["start"] <= compute["end"] <= model["end"] \
                <= root["end"], (root, model, compute)


def test_opentelemetry_traceparent_forces_sampling():
    """Rate 5 and count 1 through the API: of 10 plain requests only the 5th is traced and the
    count reads "0"; requests carrying a traceparent are traced all the same (their root's
    parent is the remote span), plain ones no longer are."""
    with otlp_collector() as collector:
        with serving("trace-otel-forced", otel_args(collector.url)) as server:
            response = http_update(server, {"trace_rate": "5", "trace_count": "1"})
            assert (response["trace_rate"], response["trace_count"], response["trace_mode"]) == \
                ("5", "1", "opentelemetry"), response
            settings = http_get(server, MODEL)
            assert (settings["trace_rate"], settings["trace_count"]) == ("5", "1"), settings
            assert "trace_file" not in settings and "log_frequency" not in settings, settings
            with clients(server) as (h, g):
                for i in range(1, 11):
                    infer(h if i % 2 else g, i, request_id=f"plain-{i}")
                assert http_get(server, MODEL)["trace_count"] == "0"
                for i in range(1, 4):
                    infer(h if i % 2 else g, i, request_id=f"parent-{i}", headers={"traceparent": TRACEPARENT})
                for i in range(11, 16):
                    infer(h if i % 2 else g, i, request_id=f"plain-{i}")
            expected = ["plain-5", "parent-1", "parent-2", "parent-3"]
            wait_until(lambda: all(request_spans(collector.spans(), rid) for rid in expected),
                       "the spans of the 4 traced requests", server)
            stop(server)
        spans = collector.spans()
        traced = sorted(s["attributes"].get("triton.request_id") for s in spans if s["name"] == MODEL)
        assert traced == sorted(expected), traced
        roots = [s for s in spans if s["name"] == "InferRequest"]
        assert sorted(r["parent_span_id"] for r in roots) == ["", *[TRACEPARENT_SPAN_ID] * 3], roots
        assert all(r["trace_id"] == TRACEPARENT_TRACE_ID for r in roots if r["parent_span_id"]), roots


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_asyncio_clients_read_and_change_settings(tmp_path, protocol):
    """tritonclient's asyncio clients: get_trace_settings / update_trace_settings globally and
    for a model, a model override over the global setting, and its removal by clearing."""
    import asyncio

    import tritonclient.grpc.aio as grpcaio
    import tritonclient.http.aio as httpaio

    file = str(tmp_path / "aio.log")
    args = trace_config(f"triton,file={file}", "level=TIMESTAMPS", "rate=1")

    def flat(settings) -> dict:
        if protocol == "http":
            return settings
        return {k: (v["value"] if k == "trace_level" else v["value"][0])
                for k, v in settings["settings"].items()}

    with serving("trace-aio", args) as server:
        async def main() -> None:
            client = (httpaio.InferenceServerClient(server.http_host) if protocol == "http"
                      else grpcaio.InferenceServerClient(server.grpc_host))
            kwargs = {} if protocol == "http" else {"as_json": True}
            try:
                initial = flat(await client.get_trace_settings(**kwargs))
                assert initial["trace_rate"] == "1" and initial["trace_file"] == file, initial
                changed = flat(await client.update_trace_settings(
                    model_name=MODEL, settings={"trace_rate": "7"}, **kwargs))
                assert changed["trace_rate"] == "7", changed
                assert flat(await client.get_trace_settings(**kwargs))["trace_rate"] == "1"
                cleared = flat(await client.update_trace_settings(
                    model_name=MODEL, settings={"trace_rate": None}, **kwargs))
                assert cleared == initial, cleared
            finally:
                await client.close()

        asyncio.run(main())
