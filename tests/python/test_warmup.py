"""Triton's `model_warmup` (docs/model-repository.md): a version serves only after its warmup
samples ran through its own instances; a warmup that fails is a load that fails, with the
reason in the repository index, and over a live reload the previous version keeps serving.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _server import ROOT, ServerProcess

ADD_SUB = ROOT / "examples/models/add_sub"


def warmup_block(name: str, inputs: dict[str, str], batch_size: int = 1, count: int = 1) -> str:
    entries = " ".join(
        f'inputs {{ key: "{key}" value: {{ data_type: TYPE_FP32 dims: [ 16 ] {source} }} }}'
        for key, source in inputs.items()
    )
    return f'model_warmup [ {{ name: "{name}" batch_size: {batch_size} count: {count} {entries} }} ]\n'


def add_sub_with(repo: Path, name: str, warmup: str) -> Path:
    model = repo / name
    shutil.copytree(ADD_SUB, model)
    config = model / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "add_sub"', f'name: "{name}"') + warmup)
    return model


def infer_add_sub(client: httpclient.InferenceServerClient, model: str) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 2.0, dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer(model, inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


@pytest.fixture(scope="module")
def warmup_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("warmup-repo")
    add_sub_with(repo, "zero_warm", warmup_block("zeros", {"INPUT0": "zero_data: true", "INPUT1": "zero_data: true"},
                                                batch_size=4, count=3))
    add_sub_with(repo, "random_warm", warmup_block("random", {"INPUT0": "random_data: true",
                                                              "INPUT1": "random_data: true"}))
    model = add_sub_with(repo, "file_warm", warmup_block("file", {"INPUT0": 'input_data_file: "a.bin"',
                                                                  "INPUT1": 'input_data_file: "a.bin"'},
                                                        batch_size=2))
    (model / "warmup").mkdir()
    (model / "warmup/a.bin").write_bytes(struct.pack("<16f", *range(16)))
    add_sub_with(repo, "wrong_input", warmup_block("typo", {"INPUT0": "zero_data: true", "INPUT9": "zero_data: true"}))
    add_sub_with(repo, "missing_file", warmup_block("nofile", {"INPUT0": 'input_data_file: "gone.bin"',
                                                               "INPUT1": "zero_data: true"}))
    model = add_sub_with(repo, "short_file", warmup_block("short", {"INPUT0": 'input_data_file: "s.bin"',
                                                                    "INPUT1": "zero_data: true"}))
    (model / "warmup").mkdir()
    (model / "warmup/s.bin").write_bytes(b"\0" * 10)
    return repo


@pytest.fixture(scope="module")
def warmup_server(warmup_repo):
    server = ServerProcess("warmup", [str(warmup_repo)], ["--strict-readiness", "false"]).start()
    try:
        yield server
    finally:
        server.stop_and_check()


@pytest.mark.parametrize("model", ["zero_warm", "random_warm", "file_warm"])
def test_a_version_whose_warmup_runs_serves(warmup_server, model):
    index = warmup_server.repository_index()
    assert index[model]["state"] == "READY", index[model]
    infer_add_sub(httpclient.InferenceServerClient(warmup_server.http_host), model)


def test_warmup_executions_ran_on_the_instances(warmup_server):
    # count 3 at batch size 4: three executions before the version was published, beyond the
    # executions of the requests the statistics count as inferences.
    client = httpclient.InferenceServerClient(warmup_server.http_host)
    stats = client.get_inference_statistics("zero_warm")["model_stats"][0]
    requests_run = int(stats["inference_stats"]["success"]["count"])
    assert int(stats["execution_count"]) >= 3 + requests_run, stats


@pytest.mark.parametrize("model,reason", [
    ("wrong_input", "warmup 'typo' failed: unexpected inference input 'INPUT9'"),
    ("missing_file", "warmup 'nofile' failed: input 'INPUT0': cannot read"),
    ("short_file", "warmup 'short' failed: input 'INPUT0'"),
])
def test_a_failed_warmup_is_a_failed_load_with_the_reason(warmup_server, model, reason):
    entry = warmup_server.repository_index()[model]
    assert entry["state"] == "UNAVAILABLE", entry
    assert reason in entry["reason"], entry
    with pytest.raises(InferenceServerException):
        infer_add_sub(httpclient.InferenceServerClient(warmup_server.http_host), model)


def test_invalid_warmup_config_is_refused_with_the_rule(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    add_sub_with(repo, "too_big", warmup_block("big", {"INPUT0": "zero_data: true", "INPUT1": "zero_data: true"},
                                              batch_size=9))
    server = ServerProcess("warmup-invalid", [str(repo)], ["--strict-readiness", "false"]).start()
    try:
        entry = server.repository_index()["too_big"]
        assert entry["state"] == "UNAVAILABLE"
        assert "batch_size 9 must be between 1 and max_batch_size 8" in entry["reason"], entry
    finally:
        server.stop_and_check()


def test_a_reload_whose_warmup_fails_keeps_the_previous_version(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    model = add_sub_with(repo, "live", warmup_block("ok", {"INPUT0": "zero_data: true", "INPUT1": "zero_data: true"}))
    server = ServerProcess("warmup-reload", [str(repo)],
                           ["--model-control-mode", "explicit", "--load-model", "live"]).start()
    try:
        client = httpclient.InferenceServerClient(server.http_host)
        infer_add_sub(client, "live")
        config = model / "config.pbtxt"
        config.write_text(config.read_text().replace('key: "INPUT1"', 'key: "INPUT7"'))
        with pytest.raises(InferenceServerException, match="warmup 'ok' failed"):
            client.load_model("live")
        infer_add_sub(client, "live")
        entry = server.repository_index()["live"]
        assert entry["state"] == "READY", entry
        assert "the reload failed" in entry["reason"] and "warmup 'ok' failed" in entry["reason"], entry
    finally:
        server.stop_and_check()
