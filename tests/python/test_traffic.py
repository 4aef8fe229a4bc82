"""Traffic splits and shadow traffic (docs/model-repository.md, "Traffic splits and shadow
traffic"), through tritonclient HTTP and gRPC against the real binary: observed shares within
a stated tolerance of the weights, sticky routing by a header, a shadow candidate whose
divergence is zero when it is identical and exactly measured when it is not, and the run-time
traffic API.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from _server import ROOT, ServerProcess

A = np.arange(16, dtype=np.float32).reshape(1, 16)
B = np.full((1, 16), 3.0, dtype=np.float32)


def swapped_add_sub(path: Path) -> None:
    """add_sub's signature with the outputs swapped: OUTPUT0 = INPUT0 - INPUT1, OUTPUT1 =
    INPUT0 + INPUT1, so against add_sub every element differs by exactly 2 * INPUT1."""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [None, 16])
    y = helper.make_tensor_value_info("INPUT1", TensorProto.FLOAT, [None, 16])
    o0 = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [None, 16])
    o1 = helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, [None, 16])
    graph = helper.make_graph([helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
                               helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT1"])],
                              "swapped", [x, y], [o0, o1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def repo_with(tmp_path: Path, extra_config: str, swapped_v2: bool = False) -> Path:
    model = tmp_path / "repo" / "add_sub"
    shutil.copytree(ROOT / "examples/models/add_sub", model)
    if swapped_v2:
        swapped_add_sub(model / "2" / "model.onnx")
    else:
        shutil.copytree(model / "1", model / "2")
    config = model / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all: {} }\n" + extra_config)
    return tmp_path / "repo"


def inputs(module):
    ins = [module.InferInput("INPUT0", [1, 16], "FP32"), module.InferInput("INPUT1", [1, 16], "FP32")]
    ins[0].set_data_from_numpy(A)
    ins[1].set_data_from_numpy(B)
    return ins


def versions_of(client, module, n: int, headers=None, outputs=None) -> Counter:
    seen = Counter()
    for _ in range(n):
        # tritonclient.http adds its own headers to the dict it is given: a fresh one each time.
        result = client.infer("add_sub", inputs(module), headers=dict(headers) if headers else None,
                              outputs=outputs)
        response = result.get_response()
        seen[response["model_version"] if isinstance(response, dict) else response.model_version] += 1
    return seen


@pytest.fixture()
def serve():
    servers = []

    def start(repo: Path, name: str) -> ServerProcess:
        server = ServerProcess(name, [str(repo)]).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop_and_check()


def test_a_split_spreads_requests_by_weight_over_both_protocols(tmp_path, serve):
    server = serve(repo_with(tmp_path, 'traffic_split { weights { key: "1" value: 3 } '
                                       'weights { key: "2" value: 1 } }\n'), "split")
    h = httpclient.InferenceServerClient(server.http_host)
    g = grpcclient.InferenceServerClient(server.grpc_host)
    seen = versions_of(h, httpclient, 400) + versions_of(g, grpcclient, 400)
    # 800 draws at p = 0.75: sd 0.015; 4 sd = 0.06.
    share = seen["1"] / 800
    assert abs(share - 0.75) < 0.06, seen
    assert set(seen) == {"1", "2"}, seen
    # A request that names its version gets it, whatever the split.
    for version in ("1", "2"):
        named = h.infer("add_sub", inputs(httpclient), model_version=version)
        assert named.get_response()["model_version"] == version
    # The chosen version is in the metrics too.
    metrics = requests.get(server.metrics_url, timeout=30).text
    counts = {v: float(re.search(rf'oxserve_inference_request_success_total{{model="add_sub",version="{v}"}} (\S+)',
                                 metrics).group(1)) for v in ("1", "2")}
    assert counts["1"] >= seen["1"] and counts["2"] >= seen["2"], (counts, seen)


def test_a_sticky_split_keeps_each_user_on_one_version(tmp_path, serve):
    server = serve(repo_with(tmp_path, 'traffic_split { weights { key: "1" value: 1 } '
                                       'weights { key: "2" value: 1 } sticky_header: "x-user" }\n'), "sticky")
    h = httpclient.InferenceServerClient(server.http_host)
    g = grpcclient.InferenceServerClient(server.grpc_host)
    per_user = {}
    for user in range(60):
        headers = {"x-user": f"user-{user}"}
        seen = versions_of(h, httpclient, 3, headers=headers) + versions_of(g, grpcclient, 3, headers=headers)
        assert len(seen) == 1, (user, seen)  # one user, one version, over both protocols
        per_user[user] = next(iter(seen))
    shares = Counter(per_user.values())
    assert shares["1"] >= 15 and shares["2"] >= 15, shares  # 60 users at p = 0.5: 4 sd = 15.5
    # Without the header, each request is drawn again.
    assert set(versions_of(h, httpclient, 60)) == {"1", "2"}


def shadow_stats(server, version: str) -> dict:
    stats = requests.get(f"{server.http_url}/v2/models/add_sub/versions/{version}/stats", timeout=30).json()
    return stats["model_stats"][0].get("shadow") or {}


def wait_compared(server, version: str, n: int) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = shadow_stats(server, version)
        if stats.get("compared", 0) + stats.get("failed", 0) >= n:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"shadow comparisons did not arrive: {shadow_stats(server, version)}")


def test_an_identical_shadow_shows_no_divergence(tmp_path, serve):
    server = serve(repo_with(tmp_path, 'traffic_split { weights { key: "1" value: 1 } }\n'
                                       'shadow { version: "2" share: 1.0 }\n'), "shadow-same")
    h = httpclient.InferenceServerClient(server.http_host)
    g = grpcclient.InferenceServerClient(server.grpc_host)
    assert versions_of(h, httpclient, 20) + versions_of(g, grpcclient, 20) == Counter({"1": 40})
    classification = [httpclient.InferRequestedOutput("OUTPUT0", class_count=3)]
    assert versions_of(h, httpclient, 10, outputs=classification) == Counter({"1": 10})
    stats = wait_compared(server, "2", 50)
    assert stats["compared"] == 50 and stats["failed"] == 0, stats
    assert stats["max_abs_diff"] == 0 and stats["max_rel_diff"] == 0, stats
    assert stats["classified"] == 10 and stats["agreed"] == 10, stats
    assert stats["primary_version"] == "1", stats
    metrics = requests.get(server.metrics_url, timeout=30).text
    labels = 'model="add_sub",primary="1",candidate="2"'
    assert f'oxserve_shadow_requests_total{{{labels},outcome="compared"}} 50' in metrics, metrics
    assert f'oxserve_shadow_max_abs_diff_sum{{{labels}}} 0.0' in metrics, metrics
    assert f'oxserve_shadow_agreement_total{{{labels},agree="true"}} 10' in metrics, metrics
    # The shadow's answers are never returned; the client saw only version 1.


def test_a_different_shadow_shows_its_divergence(tmp_path, serve):
    server = serve(repo_with(tmp_path, 'traffic_split { weights { key: "1" value: 1 } }\n'
                                       'shadow { version: "2" share: 1.0 }\n', swapped_v2=True), "shadow-diff")
    h = httpclient.InferenceServerClient(server.http_host)
    result = h.infer("add_sub", inputs(httpclient))
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)  # the primary's answer
    for _ in range(9):
        h.infer("add_sub", inputs(httpclient))
    stats = wait_compared(server, "2", 10)
    # Every element differs by exactly 2 * INPUT1 = 6; relative: 6 / max(|a+b|, |a-b|).
    assert stats["max_abs_diff"] == 6.0, stats
    assert abs(stats["max_rel_diff"] - 2.0) < 1e-9, stats  # at a = 0: |3 - (-3)| / 3
    metrics = requests.get(server.metrics_url, timeout=30).text
    total = re.search(r'oxserve_shadow_max_abs_diff_sum\{model="add_sub",primary="1",candidate="2"\} (\S+)', metrics)
    assert total and float(total.group(1)) == 60.0, metrics


def test_traffic_changes_at_run_time(tmp_path, serve):
    server = serve(repo_with(tmp_path, ""), "traffic-api")
    url = f"{server.http_url}/v2/repository/models/add_sub/traffic"
    h = httpclient.InferenceServerClient(server.http_host)
    assert versions_of(h, httpclient, 10) == Counter({"2": 10})  # the default: the latest
    r = requests.post(url, json={"traffic_split": {"weights": {"1": 1}}}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["traffic_split"]["weights"] == {"1": 1} and r.json()["shadow"] is None
    assert versions_of(h, httpclient, 10) == Counter({"1": 10})
    r = requests.post(url, json={"shadow": {"version": "2", "share": 1.0}}, timeout=30)
    assert r.status_code == 200 and r.json()["traffic_split"]["weights"] == {"1": 1}, r.text
    versions_of(h, httpclient, 5)
    assert wait_compared(server, "2", 5)["compared"] == 5
    got = requests.get(f"{server.http_url}/v2/models/add_sub/traffic", timeout=30).json()
    assert got == {"traffic_split": {"weights": {"1": 1}}, "shadow": {"version": "2", "share": 1.0}}, got
    r = requests.post(url, json={"traffic_split": None, "shadow": None}, timeout=30)
    assert r.status_code == 200 and r.json() == {"traffic_split": None, "shadow": None}, r.text
    assert versions_of(h, httpclient, 5) == Counter({"2": 5})
    for bad in ({"traffic_split": {"weights": {"1": 0}}}, {"traffic_split": {"weights": {"a/b": 1}}},
                {"shadow": {"version": "2", "share": 1.5}}, {"colour": 1}):
        r = requests.post(url, json=bad, timeout=30)
        assert r.status_code == 400, (bad, r.text)


def test_invalid_traffic_in_the_config_is_refused(tmp_path):
    repo = repo_with(tmp_path, 'shadow { version: "2" share: 2.0 }\n')
    server = ServerProcess("traffic-invalid", [str(repo)], ["--strict-readiness", "false"]).start()
    try:
        entry = server.repository_index()["add_sub"]
        assert entry["state"] == "UNAVAILABLE" and "share 2 must be between 0 and 1" in entry["reason"], entry
    finally:
        server.stop_and_check()
