"""Model lifecycle while the server takes traffic, against the real binary.

Triton's model control modes (`--model-control-mode none|poll|explicit`), the repository load
and unload requests over HTTP and gRPC (with `config` and `file:` overrides), the repository
index's states (READY / UNAVAILABLE / LOADING / UNLOADING and their reasons), reloads that swap
versions atomically while clients keep sending requests, unloads that let in-flight requests
finish, poll mode's two-scan stability rule, and the `tritonserver` command line
(docs/model-repository.md).

Every test works on copies of the example models in its own pytest `tmp_path` repository, so
it may add, corrupt and remove versions freely. The unload-while-in-flight test uses the
`testkit` model `slow_delay` (tests/fixtures/scheduling): $OXSERVE_BIN must be built with
`--features testkit` (scripts/test.sh does).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _server import ROOT, ServerProcess, oxserve_bin

EXAMPLES = ROOT / "examples" / "models"
BROKEN = ROOT / "tests" / "fixtures" / "broken"
SCHEDULING = ROOT / "tests" / "fixtures" / "scheduling"
ADD_SUB_ONNX = EXAMPLES / "add_sub" / "1" / "model.onnx"
DOCS_NOTE = "docs/model-repository.md"


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def make_repo(tmp_path: Path, *models: str, source: Path = EXAMPLES, name: str = "repo") -> Path:
    """A fresh repository under tmp_path holding copies of `models` (from `source`)."""
    repo = tmp_path / name
    repo.mkdir(exist_ok=True)
    for m in models:
        shutil.copytree(source / m, repo / m)
    return repo


@contextmanager
def serving(name: str, repos: list[Path], args: list[str], ready_path: str = "/v2/health/ready"):
    """An oxserve process for the duration of the block; stopped (and checked) at the end."""
    server = ServerProcess(name, [str(r) for r in repos], args, ready_path).start()
    try:
        yield server
    finally:
        server.stop_and_check()


def explicit(*load: str) -> list[str]:
    args = ["--model-control-mode", "explicit"]
    for m in load:
        args += ["--load-model", m]
    return args


def http_client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=server.http_host, network_timeout=60.0,
                                            connection_timeout=60.0)


def grpc_client(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=server.grpc_host)


def add_sub_data(seed: int, rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, 16)).astype(np.float32)
    b = (rng.standard_normal((rows, 16)) * 3 + seed).astype(np.float32)
    return a, b


def infer_add_sub(client, mod, a: np.ndarray, b: np.ndarray, model: str = "add_sub",
                  version: str = ""):
    """One add_sub request (tritonclient `mod` = httpclient or grpcclient); checks the outputs
    against numpy and returns the result."""
    inputs = [mod.InferInput("INPUT0", list(a.shape), "FP32"), mod.InferInput("INPUT1", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    outputs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
    kwargs = {"client_timeout": 60} if mod is grpcclient else {}
    result = client.infer(model, inputs, model_version=version, outputs=outputs, **kwargs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6, atol=1e-6)
    return result


def index_entries(server: ServerProcess) -> list[dict]:
    r = requests.post(server.http_url + "/v2/repository/index", json={}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def model_index(server: ServerProcess, model: str) -> dict[str, dict]:
    """The index rows of one model by version ("" for a row without a version)."""
    return {e.get("version", ""): e for e in index_entries(server) if e["name"] == model}


def grpc_index(server: ServerProcess) -> list[dict]:
    c = grpc_client(server)
    try:
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                for m in c.get_model_repository_index().models]
    finally:
        c.close()


def wait_for(server: ServerProcess, what: str, check, timeout_s: float = 15.0, interval_s: float = 0.05):
    """Polls `check()` until it returns a truthy value (returned); fails with `what` and the
    last index on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            server.fail(f"timed out after {timeout_s} s waiting for {what}; index: {index_entries(server)}")
        time.sleep(interval_s)


def versions_in_state(server: ServerProcess, model: str, state: str) -> set[str]:
    return {v for v, e in model_index(server, model).items() if e["state"] == state}


def wait_versions(server: ServerProcess, model: str, ready: set[str], unloaded: set[str] = frozenset(),
                  timeout_s: float = 15.0) -> dict[str, dict]:
    """Waits until exactly `ready` versions are READY and each of `unloaded` is UNAVAILABLE with
    reason "unloaded" (after draining); returns the model's index rows."""
    def check():
        rows = model_index(server, model)
        now_ready = {v for v, e in rows.items() if e["state"] == "READY"}
        done = {v for v, e in rows.items() if e["state"] == "UNAVAILABLE" and e.get("reason") == "unloaded"}
        return rows if now_ready == set(ready) and set(unloaded) <= done else None
    return wait_for(server, f"{model}: READY {sorted(ready)}, unloaded {sorted(unloaded)}", check, timeout_s)


def version_inference_count(server: ServerProcess, model: str, version: str) -> int:
    r = requests.get(f"{server.http_url}/v2/models/{model}/versions/{version}/stats", timeout=30)
    assert r.status_code == 200, r.text
    (entry,) = r.json()["model_stats"]
    return int(entry["inference_count"])


def http_post(server: ServerProcess, path: str, body: dict | None = None) -> requests.Response:
    return requests.post(server.http_url + path, json=body, timeout=120)


class Traffic:
    """Clients sending add_sub requests continuously (tritonclient HTTP and gRPC threads, no
    version named: the newest ready one), each checking its outputs against numpy; every
    failure is recorded with its message."""

    def __init__(self, server: ServerProcess, model: str = "add_sub", threads_per_protocol: int = 2):
        self.server = server
        self.model = model
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = {"http": 0, "grpc": 0}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(p, i), daemon=True,
                                         name=f"traffic-{p}-{i}")
                        for p in ("http", "grpc") for i in range(threads_per_protocol)]

    def _run(self, protocol: str, thread: int) -> None:
        mod = httpclient if protocol == "http" else grpcclient
        client = http_client(self.server) if protocol == "http" else grpc_client(self.server)
        i = 0
        try:
            while not self.stop.is_set():
                a, b = add_sub_data(thread * 100_000 + i + (0 if protocol == "http" else 50_000))
                i += 1
                try:
                    infer_add_sub(client, mod, a, b, self.model)
                    with self.lock:
                        self.ok[protocol] += 1
                except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
                    with self.lock:
                        self.failures.append(f"{protocol}: {type(e).__name__}: {e}")
        finally:
            client.close()

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        # Every client has had a request answered before the changes begin.
        deadline = time.monotonic() + 30
        while min(self.ok.values()) == 0 and not self.failures:
            if time.monotonic() > deadline:
                self.server.fail(f"traffic did not start: {self.ok}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def check(self, at_least: int = 10) -> None:
        assert not self.failures, (f"{len(self.failures)} failed requests (ok: {self.ok}); first: "
                                   f"{self.failures[:5]}")
        assert min(self.ok.values()) >= at_least, f"too little traffic to mean anything: {self.ok}"


def add_sub_config(**changes) -> dict:
    """add_sub's configuration as load-request JSON (Triton's model configuration JSON)."""
    tensor = lambda n: {"name": n, "data_type": "TYPE_FP32", "dims": [16]}  # noqa: E731
    cfg = {
        "name": "add_sub",
        "max_batch_size": 8,
        "input": [tensor("INPUT0"), tensor("INPUT1")],
        "output": [tensor("OUTPUT0"), tensor("OUTPUT1")],
    }
    cfg.update(changes)
    return cfg


# ---------------------------------------------------------------------------------------
# 1. explicit mode: the index, load and unload over both protocols, errors
# ---------------------------------------------------------------------------------------

def test_explicit_mode_load_unload_over_http_and_grpc(tmp_path):
    repo = make_repo(tmp_path, "add_sub", "iris")
    with serving("explicit", [repo], explicit()) as server:
        h, g = http_client(server), grpc_client(server)
        try:
            # Nothing loaded: the index lists the repository's models with their names only.
            index = {e["name"]: e for e in h.get_model_repository_index()}
            assert set(index) == {"add_sub", "iris"}, index
            for e in index.values():
                assert e.get("state", "") == "" and "version" not in e, e
            assert {e["name"]: e["state"] for e in grpc_index(server)} == {"add_sub": "", "iris": ""}
            assert h.is_server_ready() and g.is_server_ready()
            assert not h.is_model_ready("add_sub") and not g.is_model_ready("iris")
            with pytest.raises(InferenceServerException):
                infer_add_sub(h, httpclient, *add_sub_data(0))

            # Load add_sub over HTTP, iris over gRPC.
            h.load_model("add_sub")
            assert h.is_model_ready("add_sub") and g.is_model_ready("add_sub")
            infer_add_sub(h, httpclient, *add_sub_data(1, rows=3))
            infer_add_sub(g, grpcclient, *add_sub_data(2, rows=2))
            g.load_model("iris")
            assert g.is_model_ready("iris") and h.is_model_ready("iris")
            features = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
            inp = grpcclient.InferInput("features", [2, 4], "FP32")
            inp.set_data_from_numpy(features)
            probs = g.infer("iris", [inp]).as_numpy("probabilities")
            assert probs.shape == (2, 3)
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
            rows = {(e["name"], e.get("version")): e["state"] for e in h.get_model_repository_index()}
            assert rows == {("add_sub", "1"): "READY", ("iris", "1"): "READY"}, rows

            # Unload add_sub over HTTP: its requests fail with a clear error at once.
            h.unload_model("add_sub")
            assert not h.is_model_ready("add_sub") and not g.is_model_ready("add_sub")
            for client, mod in ((h, httpclient), (g, grpcclient)):
                with pytest.raises(InferenceServerException) as err:
                    infer_add_sub(client, mod, *add_sub_data(3))
                message = str(err.value)
                assert "add_sub" in message and ("unloaded" in message or "not ready" in message), message
            # The unload does not make the server unready; iris still serves.
            assert h.is_server_ready() and g.is_server_ready()
            assert requests.get(server.http_url + "/v2/health/ready", timeout=10).status_code == 200
            assert g.is_model_ready("iris")
            wait_versions(server, "add_sub", ready=set(), unloaded={"1"})

            # Unload iris over gRPC (unload_dependents is accepted); the server stays ready.
            g.unload_model("iris", unload_dependents=True)
            assert not g.is_model_ready("iris")
            assert h.is_server_ready() and g.is_server_ready()
            states = {(e["name"], e["version"]): (e["state"], e["reason"]) for e in grpc_index(server)}
            assert states[("add_sub", "1")] == ("UNAVAILABLE", "unloaded"), states
            assert states[("iris", "1")][0] in ("UNLOADING", "UNAVAILABLE"), states
            wait_versions(server, "iris", ready=set(), unloaded={"1"})

            # An unloaded model loads again (over gRPC this time) and serves.
            g.load_model("add_sub")
            assert h.is_model_ready("add_sub")
            infer_add_sub(g, grpcclient, *add_sub_data(4))
            infer_add_sub(h, httpclient, *add_sub_data(5))

            # A model that is not in the repository: 400 / INVALID_ARGUMENT naming it.
            r = http_post(server, "/v2/repository/models/no_such_model/load")
            assert r.status_code == 400, r.text
            assert "no_such_model" in r.json()["error"], r.text
            with pytest.raises(InferenceServerException) as err:
                g.load_model("no_such_model")
            assert "no_such_model" in str(err.value), err.value
            assert "INVALID_ARGUMENT" in str(err.value.status()), err.value.status()
            r = http_post(server, "/v2/repository/models/no_such_model/unload")
            assert r.status_code == 400 and "no_such_model" in r.json()["error"], r.text
            # A failed load of an unknown name leaves the index as it was.
            assert "no_such_model" not in {e["name"] for e in index_entries(server)}
            assert h.is_server_ready()
        finally:
            h.close()
            g.close()


def test_load_and_unload_are_refused_outside_explicit_mode(tmp_path):
    repo = make_repo(tmp_path, "add_sub")
    with serving("none-mode", [repo], ["--model-control-mode", "none"]) as server:
        h, g = http_client(server), grpc_client(server)
        try:
            for action in ("load", "unload"):
                r = http_post(server, f"/v2/repository/models/add_sub/{action}")
                assert r.status_code == 501, r.text
                error = r.json()["error"]
                assert "'none'" in error and "explicit" in error and "add_sub" in error, error
            for call in (lambda: h.load_model("add_sub"), lambda: h.unload_model("add_sub")):
                with pytest.raises(InferenceServerException) as err:
                    call()
                assert "'none'" in str(err.value), err.value
            for call in (lambda: g.load_model("add_sub"), lambda: g.unload_model("add_sub")):
                with pytest.raises(InferenceServerException) as err:
                    call()
                assert "UNIMPLEMENTED" in str(err.value.status()), err.value.status()
                assert "'none'" in str(err.value) and "explicit" in str(err.value), err.value
            # Nothing changed: add_sub (loaded at start-up) still serves.
            assert h.is_model_ready("add_sub")
            infer_add_sub(g, grpcclient, *add_sub_data(6))
        finally:
            h.close()
            g.close()


# ---------------------------------------------------------------------------------------
# 2. reloads under traffic: new versions swap in atomically, old ones retire after draining
# ---------------------------------------------------------------------------------------

def test_new_version_replaces_the_old_and_reloads_under_traffic_lose_nothing(tmp_path):
    repo = make_repo(tmp_path, "add_sub")
    model = repo / "add_sub"
    config_text = (model / "config.pbtxt").read_text()
    # The example config has no version_policy: Triton's default, the latest version only.
    assert "version_policy" not in config_text
    with serving("reload", [repo], explicit("add_sub")) as server:
        h, g = http_client(server), grpc_client(server)
        try:
            assert versions_in_state(server, "add_sub", "READY") == {"1"}

            # Version 2 appears: the load serves it, version 1 is retired once drained.
            shutil.copytree(model / "1", model / "2")
            h.load_model("add_sub")
            assert h.is_model_ready("add_sub", "2")
            infer_add_sub(h, httpclient, *add_sub_data(7), version="2")
            infer_add_sub(g, grpcclient, *add_sub_data(8))  # newest: 2
            rows = wait_versions(server, "add_sub", ready={"2"}, unloaded={"1"})
            assert set(rows) == {"1", "2"}, rows
            assert not h.is_model_ready("add_sub", "1")
            with pytest.raises(InferenceServerException) as err:
                infer_add_sub(g, grpcclient, *add_sub_data(9), version="1")
            assert "version 1" in str(err.value) or "unloaded" in str(err.value), err.value

            # A load with nothing changed keeps the serving version as it is: the same loaded
            # model, its statistics carried on (a version loaded anew starts from zero).
            served_before = version_inference_count(server, "add_sub", "2")
            assert served_before >= 2
            g.load_model("add_sub")
            h.load_model("add_sub")
            assert versions_in_state(server, "add_sub", "READY") == {"2"}
            assert model_index(server, "add_sub")["2"]["reason"] == "", model_index(server, "add_sub")
            assert version_inference_count(server, "add_sub", "2") == served_before

            # ~20 reloads while HTTP and gRPC clients send requests without pause: adding a
            # version, removing the newest one, and editing the configuration, over both
            # protocols; not one request may fail.
            versions = [2]
            batch = 8
            with Traffic(server) as traffic:
                for step in range(20):
                    kind = step % 3
                    if kind == 0:
                        new = max(versions) + 1
                        shutil.copytree(model / str(max(versions)), model / str(new))
                        versions.append(new)
                    elif kind == 1 and len(versions) > 1:
                        shutil.rmtree(model / str(max(versions)))
                        versions.remove(max(versions))
                    else:
                        batch = 4 if batch == 8 else 8
                        (model / "config.pbtxt").write_text(
                            config_text.replace("max_batch_size: 8", f"max_batch_size: {batch}"))
                    (h if step % 2 == 0 else g).load_model("add_sub")
                    newest = str(max(versions))
                    ready = versions_in_state(server, "add_sub", "READY")
                    assert ready == {newest}, (step, ready, model_index(server, "add_sub"))
                    cfg = h.get_model_config("add_sub")
                    assert cfg["max_batch_size"] == batch, cfg
                    time.sleep(0.1)
                time.sleep(0.3)
            traffic.check()
            rows = wait_versions(server, "add_sub", ready={str(max(versions))})
            for v, e in rows.items():
                if v != str(max(versions)):
                    assert e["state"] in ("UNAVAILABLE", "UNLOADING"), rows
        finally:
            h.close()
            g.close()


def test_a_version_retired_by_a_reload_keeps_the_server_ready(tmp_path):
    repo = make_repo(tmp_path, "add_sub")
    model = repo / "add_sub"
    with serving("retire-ready", [repo], explicit("add_sub")) as server:
        h = http_client(server)
        try:
            assert h.is_server_ready()
            shutil.copytree(model / "1", model / "2")
            h.load_model("add_sub")
            wait_versions(server, "add_sub", ready={"2"}, unloaded={"1"})
            assert h.is_model_ready("add_sub")
            r = requests.get(server.http_url + "/v2/health/ready", timeout=10)
            assert r.status_code == 200, (r.status_code, model_index(server, "add_sub"))
            assert h.is_server_ready()
        finally:
            h.close()


# ---------------------------------------------------------------------------------------
# 3. unload with requests in flight
# ---------------------------------------------------------------------------------------

def _pending(server: ServerProcess, model: str) -> int:
    """Requests accepted for `model` and not yet answered (the Prometheus gauge)."""
    text = requests.get(server.metrics_url, timeout=10).text
    m = re.search(r'^oxserve_inference_pending_request_count\{[^}]*model="' + re.escape(model)
                  + r'"[^}]*\}\s+(\S+)$', text, re.MULTILINE)
    return int(float(m.group(1))) if m else 0


def test_unload_lets_requests_in_flight_finish(tmp_path):
    repo = make_repo(tmp_path, "slow_delay", source=SCHEDULING)
    with serving("unload-in-flight", [repo], explicit("slow_delay")) as server:
        row = model_index(server, "slow_delay").get("1", {})
        if row.get("state") != "READY":
            server.fail(f"slow_delay did not load (is $OXSERVE_BIN built with --features testkit?): {row}")
        xs = [np.array([[i, i + 0.5, -i, 1.0]], dtype=np.float32) for i in range(6)]

        def over_http(x):
            r = requests.post(f"{server.http_url}/v2/models/slow_delay/infer", timeout=60, json={
                "inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": x.flatten().tolist()}]})
            assert r.status_code == 200, r.text
            return np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 4)

        def over_grpc(x):
            c = grpc_client(server)
            try:
                inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
                inp.set_data_from_numpy(x)
                return c.infer("slow_delay", [inp], client_timeout=60).as_numpy("OUTPUT0")
            finally:
                c.close()

        # 6 requests of 300 ms each on one instance: ~1.8 s of work in flight and queued.
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(over_http if i % 2 == 0 else over_grpc, x) for i, x in enumerate(xs)]
            wait_for(server, "6 slow_delay requests in flight", lambda: _pending(server, "slow_delay") >= 6,
                     timeout_s=10, interval_s=0.005)
            g = grpc_client(server)
            try:
                g.unload_model("slow_delay")
                # Out of service at once: new requests fail, the server stays ready, and the
                # index shows the version UNLOADING while its requests finish.
                assert not g.is_model_ready("slow_delay")
                assert g.is_server_ready()
                assert model_index(server, "slow_delay")["1"]["state"] == "UNLOADING"
                with pytest.raises(InferenceServerException) as err:
                    over_grpc(xs[0])
                assert "slow_delay" in str(err.value), err.value
                # Every request in flight or queued at the unload completes, with its output.
                for x, f in zip(xs, futures):
                    np.testing.assert_array_equal(f.result(timeout=60), x)
            finally:
                g.close()
        wait_versions(server, "slow_delay", ready=set(), unloaded={"1"}, timeout_s=10)
        r = requests.post(f"{server.http_url}/v2/models/slow_delay/infer", timeout=30, json={
            "inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
        assert r.status_code != 200 and "slow_delay" in r.json()["error"], r.text
        assert requests.get(server.http_url + "/v2/health/ready", timeout=10).status_code == 200


# ---------------------------------------------------------------------------------------
# 4. a corrupt new version: the load fails, the old version keeps serving
# ---------------------------------------------------------------------------------------

def test_corrupt_new_version_fails_and_the_old_one_keeps_serving(tmp_path):
    repo = make_repo(tmp_path, "add_sub")
    model = repo / "add_sub"
    with serving("corrupt", [repo], explicit("add_sub")) as server:
        (model / "2").mkdir()
        shutil.copyfile(BROKEN / "truncated" / "1" / "model.onnx", model / "2" / "model.onnx")
        h, g = http_client(server), grpc_client(server)
        try:
            with Traffic(server) as traffic:
                r = http_post(server, "/v2/repository/models/add_sub/load")
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert "add_sub" in error and "version 2" in error, error
                with pytest.raises(InferenceServerException) as err:
                    g.load_model("add_sub")
                assert "version 2" in str(err.value), err.value
                time.sleep(0.5)
            traffic.check()
            assert h.is_model_ready("add_sub") and h.is_model_ready("add_sub", "1")
            infer_add_sub(h, httpclient, *add_sub_data(10), version="1")
            rows = model_index(server, "add_sub")
            assert rows["1"]["state"] == "READY", rows
            assert rows["1"]["reason"].startswith("the reload failed, the previous load keeps serving"), rows
            assert "version 2" in rows["1"]["reason"], rows
            assert rows.get("2", {}).get("state") == "UNAVAILABLE", rows
            assert h.is_server_ready()
        finally:
            h.close()
            g.close()


def test_corrupt_version_of_a_served_version_keeps_the_old_files_serving(tmp_path):
    """The same version's files replaced by a corrupt model: the reload fails naming the
    version, the version loaded before keeps serving, and the index says why."""
    repo = make_repo(tmp_path, "add_sub")
    model = repo / "add_sub"
    with serving("corrupt-same", [repo], explicit("add_sub")) as server:
        h = http_client(server)
        try:
            with Traffic(server) as traffic:
                shutil.copyfile(BROKEN / "truncated" / "1" / "model.onnx", model / "1" / "model.onnx")
                r = http_post(server, "/v2/repository/models/add_sub/load")
                assert r.status_code == 400, r.text
                assert "add_sub" in r.json()["error"] and "version 1" in r.json()["error"], r.text
                time.sleep(0.5)
            traffic.check()
            rows = model_index(server, "add_sub")
            assert rows["1"]["state"] == "READY", rows
            assert rows["1"]["reason"].startswith("the reload failed, the previous load keeps serving"), rows
            infer_add_sub(h, httpclient, *add_sub_data(11))
            # Good files again: the reload succeeds and the reason goes.
            shutil.copyfile(ADD_SUB_ONNX, model / "1" / "model.onnx")
            h.load_model("add_sub")
            assert model_index(server, "add_sub")["1"] == {
                "name": "add_sub", "version": "1", "state": "READY", "reason": ""}
        finally:
            h.close()


# ---------------------------------------------------------------------------------------
# 5. load overrides: configuration and files
# ---------------------------------------------------------------------------------------

def test_load_with_config_override_and_uploaded_files(tmp_path, monkeypatch):
    repo = make_repo(tmp_path, "add_sub")
    # The server's temporary directory (where uploaded files go) is one this test can inspect.
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(server_tmp))
    with serving("overrides", [repo], explicit("add_sub")) as server:
        h, g = http_client(server), grpc_client(server)
        try:
            assert h.get_model_config("add_sub")["max_batch_size"] == 8
            # A configuration override: smaller batches, two instances.
            cfg = add_sub_config(max_batch_size=2,
                                 instance_group=[{"name": "two", "count": 2, "kind": "KIND_CPU"}])
            h.load_model("add_sub", config=json.dumps(cfg))
            shown = h.get_model_config("add_sub")
            assert shown["max_batch_size"] == 2, shown
            assert [grp["count"] for grp in shown["instance_group"]] == [2], shown
            infer_add_sub(h, httpclient, *add_sub_data(12, rows=2))
            with pytest.raises(InferenceServerException) as err:
                infer_add_sub(g, grpcclient, *add_sub_data(13, rows=3))
            assert "batch" in str(err.value).lower(), err.value
            # Over gRPC, the other way.
            g.load_model("add_sub", config=json.dumps(add_sub_config(max_batch_size=4)))
            assert g.get_model_config("add_sub").config.max_batch_size == 4
            infer_add_sub(g, grpcclient, *add_sub_data(14, rows=4))
            # A configuration naming another model is refused.
            r = http_post(server, "/v2/repository/models/add_sub/load",
                          {"parameters": {"config": json.dumps(add_sub_config(name="other"))}})
            assert r.status_code == 400 and "other" in r.json()["error"], r.text
            assert h.get_model_config("add_sub")["max_batch_size"] == 4

            onnx = ADD_SUB_ONNX.read_bytes()
            # Files for a model the repository does not have: over gRPC (raw bytes) ...
            g.load_model("uploaded", config=json.dumps(add_sub_config(name="uploaded")),
                         files={"file:1/model.onnx": onnx})
            assert h.is_model_ready("uploaded")
            infer_add_sub(h, httpclient, *add_sub_data(15, rows=2), model="uploaded")
            infer_add_sub(g, grpcclient, *add_sub_data(16), model="uploaded")
            # ... and over HTTP (base64 in the JSON body).
            r = http_post(server, "/v2/repository/models/uploaded_http/load", {"parameters": {
                "config": json.dumps(add_sub_config(name="uploaded_http", max_batch_size=3)),
                "file:1/model.onnx": base64.b64encode(onnx).decode()}})
            assert r.status_code == 200, r.text
            infer_add_sub(g, grpcclient, *add_sub_data(17, rows=3), model="uploaded_http")
            assert h.get_model_config("uploaded_http")["max_batch_size"] == 3
            names = {e["name"]: e["state"] for e in index_entries(server) if e.get("version") == "1"}
            assert names == {"add_sub": "READY", "uploaded": "READY", "uploaded_http": "READY"}, names
            assert not (repo / "uploaded").exists() and not (repo / "uploaded_http").exists()
            # Files without a configuration are refused.
            r = http_post(server, "/v2/repository/models/nocfg/load",
                          {"parameters": {"file:1/model.onnx": base64.b64encode(onnx).decode()}})
            assert r.status_code == 400 and "config" in r.json()["error"], r.text

            # Paths that leave the model directory: 400, nothing written anywhere.
            loads_before = sorted(p.name for p in server_tmp.iterdir())
            outside = tmp_path / "outside.onnx"
            for path in ("../x", "../../x", "1/../../../x", str(outside)):
                r = http_post(server, "/v2/repository/models/escape/load", {"parameters": {
                    "config": json.dumps(add_sub_config(name="escape")),
                    "file:1/model.onnx": base64.b64encode(onnx).decode(),
                    f"file:{path}": base64.b64encode(b"escaped").decode()}})
                assert r.status_code == 400, (path, r.text)
                assert f"file:{path}" in r.json()["error"], (path, r.text)
            with pytest.raises(InferenceServerException) as err:
                g.load_model("escape", config=json.dumps(add_sub_config(name="escape")),
                             files={"file:../../x": b"escaped"})
            assert "INVALID_ARGUMENT" in str(err.value.status()), err.value
            assert not outside.exists()
            assert not (server_tmp / "x").exists() and not (tmp_path / "x").exists()
            written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"escaped"]
            assert written == [], written
            # The refused loads left no temporary directories behind.
            assert sorted(p.name for p in server_tmp.iterdir()) == loads_before
            assert "escape" not in {e["name"] for e in index_entries(server)}
            assert h.is_server_ready()
        finally:
            h.close()
            g.close()


# ---------------------------------------------------------------------------------------
# 6. poll mode
# ---------------------------------------------------------------------------------------

POLL_ARGS = ["--model-control-mode", "poll", "--repository-poll-secs", "1"]


def test_poll_mode_never_loads_a_half_copied_model_and_follows_removals(tmp_path):
    repo = make_repo(tmp_path, "iris")
    with serving("poll", [repo], POLL_ARGS) as server:
        # Watch the index the whole time the model is being copied.
        seen: list[dict] = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.extend(e for e in index_entries(server) if e["name"] == "add_sub")
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            # Copied slowly: config.pbtxt first (with every version served), then the model
            # file in 8 pieces, 0.4 s apart (~3 s, three scans or more).
            target = repo / "add_sub"
            (target / "1").mkdir(parents=True)
            config = (EXAMPLES / "add_sub" / "config.pbtxt").read_text() + "version_policy: { all: {} }\n"
            (target / "config.pbtxt").write_text(config)
            onnx = ADD_SUB_ONNX.read_bytes()
            pieces = 8
            step = -(-len(onnx) // pieces)
            with open(target / "1" / "model.onnx", "wb") as f:
                for i in range(pieces):
                    f.write(onnx[i * step:(i + 1) * step])
                    f.flush()
                    time.sleep(0.4)
            copied = list(seen)
        finally:
            stop.set()
            watcher.join(timeout=10)
        bad = [e for e in copied if e.get("state") not in ("", None)]
        assert not bad, f"the half-copied model was loaded: {bad[:3]}"
        assert copied, "the index never listed the model being copied"
        # Stable now: loaded within a few scans.
        wait_versions(server, "add_sub", ready={"1"}, timeout_s=10)
        h, g = http_client(server), grpc_client(server)
        try:
            infer_add_sub(h, httpclient, *add_sub_data(18, rows=2))

            # A second version appears (its policy serves all versions): both serve.
            shutil.copytree(target / "1", target / "2")
            wait_versions(server, "add_sub", ready={"1", "2"}, timeout_s=10)
            infer_add_sub(g, grpcclient, *add_sub_data(19), version="2")
            infer_add_sub(g, grpcclient, *add_sub_data(20), version="1")

            # Its directory removed: version 2 is unloaded, version 1 serves on.
            shutil.rmtree(target / "2")
            wait_versions(server, "add_sub", ready={"1"}, unloaded={"2"}, timeout_s=10)
            assert not h.is_model_ready("add_sub", "2")
            infer_add_sub(h, httpclient, *add_sub_data(21))

            # The model directory removed: the model is unloaded; the server stays ready.
            shutil.rmtree(target)
            wait_for(server, "add_sub unloaded after its directory went",
                     lambda: not g.is_model_ready("add_sub")
                     and all(e["state"] == "UNAVAILABLE" for e in model_index(server, "add_sub").values()),
                     timeout_s=10)
            with pytest.raises(InferenceServerException):
                infer_add_sub(h, httpclient, *add_sub_data(22))
            assert h.is_server_ready() and g.is_model_ready("iris")
            # Load requests stay refused in poll mode.
            r = http_post(server, "/v2/repository/models/iris/load")
            assert r.status_code == 501 and "'poll'" in r.json()["error"], r.text
        finally:
            h.close()
            g.close()


# ---------------------------------------------------------------------------------------
# 7. the tritonserver command line
# ---------------------------------------------------------------------------------------

class TritonServerProcess(ServerProcess):
    """The binary started through a link named `tritonserver`, with Triton's command line."""

    def __init__(self, name: str, link: Path, args: list[str], ready_path: str = "/v2/health/ready"):
        super().__init__(name, [], args, ready_path)
        self.link = link

    def command(self, binary: str) -> list[str]:
        return [str(self.link), "--http-address=127.0.0.1", "--http-port=0", "--grpc-port=0",
                "--metrics-port=0"] + self.tls_args + self.extra_args


def tritonserver_link(tmp_path: Path) -> Path:
    link = tmp_path / "bin" / "tritonserver"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(oxserve_bin())
    return link


def run_tritonserver(link: Path, args: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
    return subprocess.run([str(link), "--http-address=127.0.0.1", "--http-port=0", "--grpc-port=0",
                           "--metrics-port=0", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout_s)


def test_tritonserver_command_line(tmp_path):
    link = tritonserver_link(tmp_path)
    repo = make_repo(tmp_path, "add_sub", "iris")
    server = TritonServerProcess("tritonserver", link, [
        f"--model-repository={repo}", "--model-control-mode=explicit", "--load-model=add_sub"]).start()
    try:
        h = http_client(server)
        try:
            assert h.is_server_ready() and h.is_model_ready("add_sub") and not h.is_model_ready("iris")
            infer_add_sub(h, httpclient, *add_sub_data(23, rows=2))
            states = {e["name"]: e.get("state", "") for e in h.get_model_repository_index()}
            assert states == {"add_sub": "READY", "iris": ""}, states
            h.load_model("iris")  # explicit mode: load requests work
            assert h.is_model_ready("iris")
        finally:
            h.close()
    finally:
        server.stop_and_check()

    # A Triton flag oxserve does not honour: exit code 2 and the note naming the docs.
    out = run_tritonserver(link, [f"--model-repository={repo}", "--log-verbose=1"])
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "--log-verbose" in out.stderr and DOCS_NOTE in out.stderr, out.stderr[-2000:]
    assert '"listening"' not in out.stdout


def test_tritonserver_exits_on_a_broken_model_unless_told_not_to(tmp_path):
    link = tritonserver_link(tmp_path)
    repo = make_repo(tmp_path, "good", "truncated", source=BROKEN)
    # Triton's default --exit-on-error=true: a model that fails to load stops the server.
    out = run_tritonserver(link, [f"--model-repository={repo}"])
    assert out.returncode != 0, (out.returncode, out.stderr[-2000:])
    assert "truncated" in out.stderr, out.stderr[-2000:]
    # --exit-on-error=false: the good model serves, the broken one is in the index.
    server = TritonServerProcess("tritonserver-keep-going", link, [
        f"--model-repository={repo}", "--exit-on-error=false"], ready_path="/v2/models/good/ready").start()
    try:
        h = http_client(server)
        try:
            infer_add_sub(h, httpclient, *add_sub_data(24), model="good")
            states = {e["name"]: e["state"] for e in h.get_model_repository_index()}
            assert states == {"good": "READY", "truncated": "UNAVAILABLE"}, states
            time.sleep(0.5)
            assert server.alive()
        finally:
            h.close()
    finally:
        server.stop_and_check()


# ---------------------------------------------------------------------------------------
# 8. readiness while a version loads in the background
# ---------------------------------------------------------------------------------------

SLOW_WARMUP = """model_warmup [ { name: "slow" batch_size: 1
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]
"""


@pytest.mark.parametrize("ready_while_loading", [False, True])
def test_readiness_while_a_version_loads(tmp_path, ready_while_loading):
    """slow_delay's warmup runs one 300 ms execution per load: while version 2 loads it is
    LOADING; a strict server is unready then (Triton's behaviour), one started with
    --ready-while-loading stays ready; the model itself stays ready throughout (version 1)."""
    repo = make_repo(tmp_path, "slow_delay", source=SCHEDULING)
    model = repo / "slow_delay"
    config = model / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all: {} }\n" + SLOW_WARMUP)
    args = explicit("slow_delay") + ["--ready-while-loading", str(ready_while_loading).lower()]
    with serving("ready-while-loading", [repo], args) as server:
        h = http_client(server)
        try:
            shutil.copytree(model / "1", model / "2")
            loader = threading.Thread(target=lambda: h.load_model("slow_delay"))
            loader.start()
            wait_for(server, "version 2 LOADING",
                     lambda: model_index(server, "slow_delay").get("2", {}).get("state") == "LOADING")
            ready = requests.get(server.http_url + "/v2/health/ready", timeout=10).status_code
            model_ready = requests.get(server.http_url + "/v2/models/slow_delay/versions/1/ready",
                                       timeout=10).status_code
            loader.join(timeout=30)
            assert model_ready == 200
            assert ready == (200 if ready_while_loading else 503)
            assert model_index(server, "slow_delay")["2"]["state"] == "READY"
            assert requests.get(server.http_url + "/v2/health/ready", timeout=10).status_code == 200
        finally:
            h.close()


# ---------------------------------------------------------------------------------------
# 9. a change of instance count only is applied in place
# ---------------------------------------------------------------------------------------

def test_an_instance_count_change_is_applied_in_place(tmp_path):
    """Only the instance count differs: new instances start over the model already in
    memory (the log says so) and the version's statistics carry on; any other change loads
    the model again (its statistics start over)."""
    repo = make_repo(tmp_path, "add_sub")
    config = repo / "add_sub" / "config.pbtxt"
    original = config.read_text()
    config.write_text(original + "instance_group [ { count: 1 kind: KIND_CPU } ]\n")
    with serving("rescale", [repo], explicit("add_sub")) as server:
        h = http_client(server)
        try:
            for i in range(3):
                infer_add_sub(h, httpclient, *add_sub_data(i))
            assert version_inference_count(server, "add_sub", "1") == 3
            config.write_text(original + "instance_group [ { count: 3 kind: KIND_CPU } ]\n")
            with Traffic(server) as traffic:
                h.load_model("add_sub")
                time.sleep(0.3)
            traffic.check()
            log = server.stderr_path.read_text(errors="replace")
            assert "instance count changed: applied in place" in log, log[-2000:]
            cfg = h.get_model_config("add_sub")
            assert [g["count"] for g in cfg["instance_group"]] == [3], cfg
            # The statistics carried on: the 3 requests above plus the traffic's.
            assert version_inference_count(server, "add_sub", "1") >= 3 + sum(traffic.ok.values())
            # Another change (max_batch_size) is a real reload: fresh statistics.
            config.write_text(original.replace("max_batch_size: 8", "max_batch_size: 4")
                              + "instance_group [ { count: 3 kind: KIND_CPU } ]\n")
            h.load_model("add_sub")
            assert version_inference_count(server, "add_sub", "1") == 0
            infer_add_sub(h, httpclient, *add_sub_data(9))
        finally:
            h.close()
