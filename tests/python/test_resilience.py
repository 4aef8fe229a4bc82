"""Instance failure, start-up and configuration honesty, through the real binary.

- A model whose engine panics in one execution (`testkit` fault `panic_on_executions`) fails
  that request with 500 / INTERNAL naming the model and the failed instance; the instance is
  re-created and the next requests succeed.
- A model that panics in every execution fails three requests (the restart limit: 3 failures
  within 60 s), then is UNAVAILABLE with the reason in the repository index (HTTP and gRPC) and
  in model readiness; requests queued behind it are answered, never left waiting, and the
  other models keep serving.
- A load that panics, and configurations with fields oxserve cannot honour (`model_warmup`,
  `allow_ragged_batch`, `KIND_MODEL`), leave just that model UNAVAILABLE with the reason.
- A `--model-repository` that does not exist or is not a directory stops the start with a
  clear message and a non-zero exit (Triton's behaviour).

Needs a binary built with `--features testkit` (scripts/test.sh builds it that way).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from _server import ROOT, ServerProcess, oxserve_bin

IO = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}],
      "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]}]}


def config(name: str, extra: str = "", input_extra: str = "") -> str:
    return f"""# written by tests/python/test_resilience.py
name: "{name}"
backend: "testkit"
default_model_filename: "model.json"
max_batch_size: 1
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] {input_extra} }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
{extra}
"""


ONE_CPU = "instance_group [ { count: 1 kind: KIND_CPU } ]"
WARMUP = """instance_group [ { count: 1 kind: KIND_CPU } ]
model_warmup [ { name: "zeros" batch_size: 1
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]"""

# name -> (model.json extras, config.pbtxt extra, input extra)
MODELS = {
    "good": ({}, ONE_CPU, ""),
    "flaky": ({"panic_on_executions": [2]}, ONE_CPU, ""),
    "crashing": ({"op": "panic", "delay_ms": 100}, ONE_CPU, ""),
    "load_panics": ({"panic_in_load": True}, ONE_CPU, ""),
    "creation_panics": ({"panic_on_instance_creations": [1]}, ONE_CPU, ""),
    # Its first execution, the warmup's, panics: the warmup fails and so does the load.
    "warmup_panics": ({"panic_on_executions": [1]}, WARMUP, ""),
    "ragged": ({}, ONE_CPU, "allow_ragged_batch: true"),
    "kind_model": ({}, "instance_group [ { count: 1 kind: KIND_MODEL } ]", ""),
}

# Models that must never load, with a piece of the reason the index must show.
NEVER_LOAD = {
    "load_panics": "panicked while loading the model",
    "creation_panics": "panicked while being created",
    "warmup_panics": "warmup 'zeros' failed",
    "ragged": "allow_ragged_batch is not supported",
    "kind_model": "KIND_MODEL is not supported",
}


@pytest.fixture(scope="module")
def server():
    tmp = Path(tempfile.mkdtemp(prefix="oxserve-resilience-"))
    try:
        for name, (faults, extra, input_extra) in MODELS.items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "1" / "model.json").write_text(json.dumps({**IO, **faults}))
            (tmp / name / "config.pbtxt").write_text(config(name, extra, input_extra))
        # Strict readiness keeps the server not ready (some models never load): wait for
        # the models that do load instead.
        proc = ServerProcess("resilience", [str(tmp)], ready_path="/v2/models/crashing/ready").start()
        try:
            index = proc.repository_index()
            for name in ("good", "flaky", "crashing"):
                if index.get(name, {}).get("state") != "READY":
                    proc.fail(f"testkit model {name} did not load (built with --features testkit?): "
                              f"{index.get(name)}")
            yield proc
        finally:
            proc.stop_and_check()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def body(tag: float) -> dict:
    return {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32",
                        "data": [tag, tag + 1, tag + 2, tag + 3]}]}


def infer(server: ServerProcess, model: str, tag: float = 1.0) -> requests.Response:
    return requests.post(f"{server.http_url}/v2/models/{model}/infer", json=body(tag), timeout=30)


def test_a_panic_fails_its_request_and_the_instance_is_recreated(server):
    first = infer(server, "flaky", 1.0)
    assert first.status_code == 200, first.text
    assert first.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    # Execution 2 panics inside the engine.
    failed = infer(server, "flaky", 2.0)
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert "'flaky'" in error and "instance failed" in error, error
    # The instance was re-created from the loaded model: serving continues, over gRPC too.
    c = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        x = np.array([[5, 6, 7, 8]], dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("flaky", [inp]).as_numpy("OUTPUT0"), x)
        assert c.is_model_ready("flaky")
    finally:
        c.close()
    assert server.repository_index()["flaky"]["state"] == "READY"
    assert server.alive()


def test_repeated_panics_make_the_version_unavailable_and_nothing_waits(server):
    # Six requests at once on a one-instance model that panics in every execution: three
    # fail as the instance breaks (restart limit 3), the others are answered as unavailable.
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: infer(server, "crashing", float(i)), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [500, 500, 500, 503, 503, 503], [(a.status_code, a.text) for a in answers]
    for a in answers:
        assert "'crashing'" in a.json()["error"], a.text

    entry = server.repository_index()["crashing"]
    assert entry["state"] == "UNAVAILABLE", entry
    assert "restart limit" in entry["reason"] and "panics" in entry["reason"], entry
    base = server.http_url
    assert requests.get(f"{base}/v2/models/crashing/ready", timeout=10).status_code == 503
    assert requests.get(f"{base}/v2/models/crashing/versions/1/ready", timeout=10).status_code == 503
    later = infer(server, "crashing")
    assert later.status_code == 503 and "restart limit" in later.json()["error"], later.text

    c = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        index = {m.name: m for m in c.get_model_repository_index().models}
        assert index["crashing"].state == "UNAVAILABLE"
        assert "restart limit" in index["crashing"].reason
        assert not c.is_model_ready("crashing")
        assert c.is_server_ready() is False  # strict readiness: a model is not ready
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        with pytest.raises(InferenceServerException) as e:
            c.infer("crashing", [inp])
        assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
    finally:
        c.close()
    # The rest of the repository serves.
    assert infer(server, "good", 3.0).status_code == 200
    assert requests.get(f"{base}/v2/health/live", timeout=10).status_code == 200


def test_panicking_loads_and_rejected_fields_are_unavailable_with_the_reason(server):
    index = server.repository_index()
    for name, reason in NEVER_LOAD.items():
        assert index[name]["state"] == "UNAVAILABLE", index[name]
        assert reason in index[name]["reason"], index[name]
        r = infer(server, name)
        assert r.status_code == 503, (name, r.text)
        assert requests.get(f"{server.http_url}/v2/models/{name}/ready", timeout=10).status_code == 503
    c = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        grpc_index = {m.name: m.reason for m in c.get_model_repository_index().models}
        for name, reason in NEVER_LOAD.items():
            assert reason in grpc_index[name], grpc_index[name]
        x = np.array([[1, 2, 3, 4]], dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("good", [inp]).as_numpy("OUTPUT0"), x)
    finally:
        c.close()


def run_serve(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
    return subprocess.run([oxserve_bin(), "serve", *args, "--http-port", "0", "--grpc-port", "0",
                           "--host", "127.0.0.1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_repository_that_cannot_be_read_stops_the_start(tmp_path):
    missing = tmp_path / "no-such-repository"
    out = run_serve("--model-repository", "examples/models", "--model-repository", str(missing))
    assert out.returncode != 0
    assert out.stdout == "", "no listening line: the server never started"
    assert f"cannot read model repository {missing}" in out.stderr, out.stderr
    assert "No such file or directory" in out.stderr, out.stderr

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("not a repository")
    out = run_serve("--model-repository", str(not_a_dir))
    assert out.returncode != 0 and out.stdout == ""
    assert "Not a directory" in out.stderr, out.stderr

    if os.geteuid() != 0:  # root reads any directory
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0)
        try:
            out = run_serve("--model-repository", str(locked))
            assert out.returncode != 0 and out.stdout == ""
            assert "Permission denied" in out.stderr, out.stderr
        finally:
            locked.chmod(0o755)
