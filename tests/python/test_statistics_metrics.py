"""Triton's statistics extension and the Prometheus metrics endpoint, as users see them.

Statistics are read with the published clients (tritonclient.http and tritonclient.grpc
`get_inference_statistics`); /metrics is parsed with the Prometheus Python client's parsers
(Prometheus text 0.0.4 by default, strict OpenMetrics when asked for). Every check compares a
reading after a known amount of traffic with one before it, on a server of this module's own,
so that the figures moved by exactly what was sent.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from _models import add_sub_inputs, iris_inputs
from _server import ServerProcess

REPOSITORIES = ["examples/models"]
DURATION_KEYS = {"count", "ns"}
INFERENCE_STATS_KEYS = {
    "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
    "cache_hit", "cache_miss",
}
ADD_SUB = {"model": "add_sub", "version": "1"}
IRIS = {"model": "iris", "version": "1"}


def _start(name: str, extra_args: list[str] | None = None):
    server = ServerProcess(name, REPOSITORIES, extra_args).start()
    try:
        yield server
    finally:
        server.stop_and_check()


@pytest.fixture(scope="module")
def stats_server():
    """A server of this module's own: no other test's traffic moves its counters."""
    yield from _start("stats")


@pytest.fixture
def http_client(stats_server):
    c = httpclient.InferenceServerClient(url=stats_server.http_host, network_timeout=30.0)
    yield c
    c.close()


@pytest.fixture
def grpc_client(stats_server):
    c = grpcclient.InferenceServerClient(url=stats_server.grpc_host)
    yield c
    c.close()


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def infer_add_sub_http(client, batch: int, seed: int = 1):
    data = add_sub_inputs(batch, seed)
    inputs = []
    for name, array in data.items():
        inp = httpclient.InferInput(name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer("add_sub", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), data["INPUT0"] + data["INPUT1"], rtol=1e-6)


def infer_add_sub_grpc(client, batch: int, seed: int = 1):
    data = add_sub_inputs(batch, seed)
    inputs = []
    for name, array in data.items():
        inp = grpcclient.InferInput(name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer("add_sub", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), data["INPUT0"] - data["INPUT1"], rtol=1e-6)


def ready_versions(server: ServerProcess) -> set[tuple[str, str]]:
    """(model, version) of every ready version, from the repository index."""
    resp = requests.post(f"{server.http_url}/v2/repository/index", json={"ready": True}, timeout=10)
    assert resp.status_code == 200, resp.text
    return {(m["name"], m["version"]) for m in resp.json()}


def one_stat(response: dict, name: str = "add_sub", version: str = "1") -> dict:
    rows = [s for s in response["model_stats"] if s["name"] == name and s["version"] == version]
    assert len(rows) == 1, f"expected one entry for {name}/{version}: {response}"
    return rows[0]


def http_stat(client, name: str = "add_sub", version: str = "1") -> dict:
    return one_stat(client.get_inference_statistics(name, version), name, version)


def batch_counts(stat: dict) -> dict[int, int]:
    """batch size → executions (compute_infer.count)."""
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stat.get("batch_stats", [])}


def delta(after: dict, before: dict, *path: str) -> int:
    a, b = after, before
    for key in path:
        a, b = a[key], b[key]
    return int(a) - int(b)


def scrape(server: ServerProcess, openmetrics: bool = False) -> tuple[dict, dict, requests.Response]:
    """{(sample name, labels): value} and {family name: type} of one /metrics scrape."""
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    resp = requests.get(server.metrics_url, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text[:500]
    parser = parse_openmetrics if openmetrics else parse_prometheus
    samples, types = {}, {}
    for family in parser(resp.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types, resp


def value(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not in the scrape; have: " + ", ".join(
        sorted({n for n, _ in samples})
    )
    return samples[key]


def value_or_zero(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def bucket(samples: dict, name: str, le: float, **labels) -> float:
    """A histogram bucket by its bound (written "2" in Prometheus text, "2.0" in OpenMetrics)."""
    found = [v for (n, lab), v in samples.items()
             if n == name and {k: x for k, x in lab if k != "le"} == labels
             and float(dict(lab).get("le", "nan")) == le]
    assert len(found) == 1, f"bucket le={le} of {name}{labels}: {found}"
    return found[0]


# ---------------------------------------------------------------------------------------
# statistics extension
# ---------------------------------------------------------------------------------------

def test_http_statistics_shape_is_tritons(http_client, stats_server):
    infer_add_sub_http(http_client, 1)
    stat = http_stat(http_client)
    assert {"name", "version", "last_inference", "inference_count", "execution_count",
            "inference_stats", "batch_stats"} <= set(stat)
    assert set(stat["inference_stats"]) == INFERENCE_STATS_KEYS
    for key, d in stat["inference_stats"].items():
        assert set(d) == DURATION_KEYS, key
        assert all(isinstance(d[k], int) and d[k] >= 0 for k in DURATION_KEYS), (key, d)
    assert stat["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    assert stat["inference_stats"]["cache_miss"] == {"count": 0, "ns": 0}
    for b in stat["batch_stats"]:
        assert set(b) == {"batch_size", "compute_input", "compute_infer", "compute_output"}
        assert isinstance(b["batch_size"], int)
    for key in ("last_inference", "inference_count", "execution_count"):
        assert isinstance(stat[key], int), key
    # The raw body as well: plain JSON numbers, not strings.
    raw = requests.get(f"{stats_server.http_url}/v2/models/add_sub/versions/1/stats", timeout=10)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    assert one_stat(raw.json()) == http_stat(http_client)


def test_http_statistics_count_exactly_what_was_sent(http_client):
    before = http_stat(http_client)
    iris_before = http_stat(http_client, "iris")
    t0_ms = int(time.time() * 1000)
    for seed in range(4):
        infer_add_sub_http(http_client, 1, seed)
    infer_add_sub_http(http_client, 3)
    t1_ms = int(time.time() * 1000)
    after = http_stat(http_client)

    # A batch of 3 counts 3 inferences and one execution.
    assert delta(after, before, "inference_count") == 4 + 3
    assert delta(after, before, "execution_count") == 5
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert delta(after, before, "inference_stats", key, "count") == 5, key
    assert delta(after, before, "inference_stats", "fail", "count") == 0
    assert delta(after, before, "inference_stats", "success", "ns") > 0
    assert delta(after, before, "inference_stats", "compute_infer", "ns") > 0
    # The whole request includes its execution.
    assert (delta(after, before, "inference_stats", "success", "ns")
            >= delta(after, before, "inference_stats", "compute_infer", "ns"))
    assert t0_ms - 1000 <= after["last_inference"] <= t1_ms + 1000

    grown = {size: n - batch_counts(before).get(size, 0) for size, n in batch_counts(after).items()}
    assert {size: n for size, n in grown.items() if n} == {1: 4, 3: 1}
    for b in after["batch_stats"]:
        if b["batch_size"] == 3:
            assert b["compute_infer"]["ns"] > 0
            assert b["compute_input"]["count"] == b["compute_infer"]["count"] == b["compute_output"]["count"]

    # Other models did not move.
    assert http_stat(http_client, "iris") == iris_before


def test_failed_request_counts_in_fail(http_client, stats_server):
    before = http_stat(http_client)
    metrics_before, _, _ = scrape(stats_server)
    bad = httpclient.InferInput("INPUT0", [1, 15], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 15), dtype=np.float32))
    good = httpclient.InferInput("INPUT1", [1, 16], "FP32")
    good.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        http_client.infer("add_sub", [bad, good])
    assert e.value.status() == "400"
    after = http_stat(http_client)
    assert delta(after, before, "inference_stats", "fail", "count") == 1
    assert delta(after, before, "inference_stats", "fail", "ns") > 0
    assert delta(after, before, "inference_stats", "success", "count") == 0
    assert delta(after, before, "inference_count") == 0
    assert delta(after, before, "execution_count") == 0

    metrics_after, _, _ = scrape(stats_server)
    name = "oxserve_inference_request_failure_total"
    assert (value(metrics_after, name, reason="OTHER", **ADD_SUB)
            - value_or_zero(metrics_before, name, reason="OTHER", **ADD_SUB)) == 1
    assert (value(metrics_after, "oxserve_inference_request_success_total", **ADD_SUB)
            == value(metrics_before, "oxserve_inference_request_success_total", **ADD_SUB))


def test_statistics_scopes_over_http(http_client, stats_server):
    every = http_client.get_inference_statistics()
    names = [(s["name"], s["version"]) for s in every["model_stats"]]
    assert len(names) == len(set(names))
    assert set(names) == ready_versions(stats_server) >= {("add_sub", "1"), ("iris", "1")}
    one_model = http_client.get_inference_statistics("add_sub")
    assert [(s["name"], s["version"]) for s in one_model["model_stats"]] == [("add_sub", "1")]

    base = stats_server.http_url
    for path, status in [
        ("/v2/models/no_such_model/stats", 404),
        ("/v2/models/add_sub/versions/9/stats", 404),
        ("/v2/models/no_such_model/versions/1/stats", 404),
        ("/v2/models/add_sub/versions/x/stats", 400),
    ]:
        resp = requests.get(base + path, timeout=10)
        assert resp.status_code == status, (path, resp.status_code, resp.text)
        body = resp.json()
        assert isinstance(body.get("error"), str) and body["error"], (path, body)
    assert requests.post(base + "/v2/models/stats", timeout=10).status_code == 405
    with pytest.raises(InferenceServerException) as e:
        http_client.get_inference_statistics("no_such_model")
    assert e.value.status() == "404"


def test_grpc_statistics_match_triton_messages(grpc_client, http_client, stats_server):
    before = grpc_client.get_inference_statistics("add_sub", "1")
    assert [(s.name, s.version) for s in before.model_stats] == [("add_sub", "1")]
    for seed in range(2):
        infer_add_sub_grpc(grpc_client, 1, seed)
    infer_add_sub_grpc(grpc_client, 3)
    infer_add_sub_grpc(grpc_client, 5)
    after = grpc_client.get_inference_statistics("add_sub", "1")
    b, a = before.model_stats[0], after.model_stats[0]
    assert a.inference_count - b.inference_count == 2 + 3 + 5
    assert a.execution_count - b.execution_count == 4
    assert a.inference_stats.success.count - b.inference_stats.success.count == 4
    assert a.inference_stats.fail.count == b.inference_stats.fail.count
    assert a.inference_stats.queue.count - b.inference_stats.queue.count == 4
    assert a.inference_stats.compute_infer.ns > b.inference_stats.compute_infer.ns
    assert a.last_inference >= b.last_inference > 0
    grown = {x.batch_size: x.compute_infer.count for x in a.batch_stats}
    for x in b.batch_stats:
        grown[x.batch_size] -= x.compute_infer.count
    assert {size: n for size, n in grown.items() if n} == {1: 2, 3: 1, 5: 1}

    # The same figures over both protocols.
    http = http_stat(http_client)
    assert (http["inference_count"], http["execution_count"]) == (a.inference_count, a.execution_count)
    assert http["inference_stats"]["success"]["ns"] == a.inference_stats.success.ns

    # as_json goes through protobuf's JSON mapping of Triton's messages.
    js = grpc_client.get_inference_statistics("add_sub", as_json=True)
    assert js["model_stats"][0]["name"] == "add_sub"
    assert int(js["model_stats"][0]["inference_count"]) == a.inference_count

    every = grpc_client.get_inference_statistics()
    assert {(s.name, s.version) for s in every.model_stats} == ready_versions(stats_server)


def test_grpc_statistics_errors(grpc_client):
    for model, version, code in [
        ("no_such_model", "", "StatusCode.NOT_FOUND"),
        ("add_sub", "9", "StatusCode.NOT_FOUND"),
        ("add_sub", "x", "StatusCode.INVALID_ARGUMENT"),
    ]:
        with pytest.raises(InferenceServerException) as e:
            grpc_client.get_inference_statistics(model, version)
        assert e.value.status() == code, (model, version, e.value)


# ---------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------

DOCUMENTED = {
    "oxserve_inference_request_success": "counter",
    "oxserve_inference_request_failure": "counter",
    "oxserve_inference_count": "counter",
    "oxserve_inference_exec_count": "counter",
    "oxserve_inference_pending_request_count": "gauge",
    "oxserve_inference_request_duration_seconds": "histogram",
    "oxserve_inference_queue_duration_seconds": "histogram",
    "oxserve_inference_compute_duration_seconds": "histogram",
    "oxserve_inference_batch_size": "histogram",
    "oxserve_model_load_duration_seconds": "gauge",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
    "process_threads": "gauge",
}


def test_metrics_listener_is_announced(stats_server, server):
    for s in (stats_server, server):
        host, _, port = s.metrics_addr.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        assert s.metrics_addr not in (s.http_addr, s.grpc_addr)
        assert requests.get(s.metrics_url, timeout=10).status_code == 200
    assert requests.get(f"http://{stats_server.metrics_addr}/v2", timeout=10).status_code == 404
    # /metrics belongs to the metrics port only, as in Triton.
    assert requests.get(f"{stats_server.http_url}/metrics", timeout=10).status_code == 404


def test_metrics_names_types_and_labels(stats_server, http_client):
    infer_add_sub_http(http_client, 1)
    # A failure too, so the failure family has a sample (families without one are not listed).
    with pytest.raises(InferenceServerException):
        http_client.infer("add_sub", [httpclient.InferInput("INPUT0", [1, 16], "FP32")
                                      .set_data_from_numpy(np.zeros((1, 16), np.float32))])
    samples, types, resp = scrape(stats_server)
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    for family, kind in DOCUMENTED.items():
        assert types.get(family) == kind, (family, types.get(family))
    names = {name for name, _ in samples}
    for name in ("oxserve_inference_request_success_total", "oxserve_inference_count_total",
                 "oxserve_inference_exec_count_total", "oxserve_inference_pending_request_count",
                 "oxserve_inference_request_duration_seconds_bucket",
                 "oxserve_model_load_duration_seconds", "process_cpu_seconds_total"):
        assert name in names, name
    # Per model version, with exactly the documented labels (the server's own families, such
    # as the in-flight budget and the access guard's refusals, are not per model).
    for (name, labels) in samples:
        if name.startswith(("oxserve_inference_", "oxserve_model_")):
            keys = {k for k, _ in labels} - {"le"}
            expected = {"model", "version", "reason"} if "failure" in name else {"model", "version"}
            assert keys == expected, (name, dict(labels))
    assert value(samples, "oxserve_model_load_duration_seconds", **ADD_SUB) > 0
    assert value(samples, "oxserve_model_load_duration_seconds", **IRIS) > 0
    assert value(samples, "oxserve_inference_pending_request_count", **ADD_SUB) == 0

    now = time.time()
    assert now - 3600 < value(samples, "process_start_time_seconds") <= now + 1
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "process_resident_memory_bytes") > 1 << 20
    assert value(samples, "process_open_fds") >= 3
    assert value(samples, "process_threads") >= 2


def test_metrics_move_by_what_was_sent(stats_server, http_client, grpc_client):
    before, _, _ = scrape(stats_server)
    infer_add_sub_http(http_client, 1)
    infer_add_sub_http(http_client, 2)
    infer_add_sub_grpc(grpc_client, 4)
    data = iris_inputs(2)
    inp = httpclient.InferInput("features", [2, 4], "FP32")
    inp.set_data_from_numpy(data["features"])
    http_client.infer("iris", [inp])
    after, _, _ = scrape(stats_server)

    def grew(name, labels=ADD_SUB):
        return value(after, name, **labels) - value_or_zero(before, name, **labels)

    assert grew("oxserve_inference_request_success_total") == 3
    assert grew("oxserve_inference_count_total") == 1 + 2 + 4
    assert grew("oxserve_inference_exec_count_total") == 3
    assert grew("oxserve_inference_request_duration_seconds_count") == 3
    assert grew("oxserve_inference_request_duration_seconds_sum") > 0
    assert grew("oxserve_inference_queue_duration_seconds_count") == 3
    assert grew("oxserve_inference_compute_duration_seconds_count") == 3
    assert grew("oxserve_inference_batch_size_count") == 3
    assert grew("oxserve_inference_batch_size_sum") == 1 + 2 + 4
    # Histogram buckets are cumulative: batches of 1, 2 and 4 rows.
    for le, n in [(float("inf"), 3), (4.0, 3), (2.0, 2), (1.0, 1)]:
        assert (bucket(after, "oxserve_inference_batch_size_bucket", le, **ADD_SUB)
                - bucket(before, "oxserve_inference_batch_size_bucket", le, **ADD_SUB)) == n, le
    assert value(after, "oxserve_inference_pending_request_count", **ADD_SUB) == 0
    assert grew("oxserve_inference_request_success_total", IRIS) == 1
    assert grew("oxserve_inference_count_total", IRIS) == 2
    assert value(after, "process_cpu_seconds_total") >= value(before, "process_cpu_seconds_total")


def test_openmetrics_on_request(stats_server, http_client):
    infer_add_sub_http(http_client, 1)
    samples, types, resp = scrape(stats_server, openmetrics=True)
    assert resp.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert resp.text.endswith("# EOF\n") and resp.text.count("# EOF") == 1
    for family, kind in DOCUMENTED.items():
        assert types.get(family) == kind, (family, types.get(family))
    assert value(samples, "oxserve_inference_request_success_total", **ADD_SUB) >= 1


@pytest.fixture(scope="module")
def no_metrics_server():
    yield from _start("no-metrics", ["--allow-metrics", "false"])


def test_allow_metrics_false(no_metrics_server):
    assert "metrics" not in no_metrics_server.listening
    assert no_metrics_server.metrics_addr == ""
    # Statistics do not depend on the metrics endpoint.
    resp = requests.get(f"{no_metrics_server.http_url}/v2/models/stats", timeout=10)
    assert resp.status_code == 200
    assert ({(s["name"], s["version"]) for s in resp.json()["model_stats"]}
            == ready_versions(no_metrics_server))


def test_grpc_unknown_model_is_not_found_code(stats_server):
    """The raw gRPC status code, not only tritonclient's rendering of it."""
    with grpc.insecure_channel(stats_server.grpc_host) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="no_such_model"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        ok = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="iris", version="1"), timeout=10)
        assert [(s.name, s.version) for s in ok.model_stats] == [("iris", "1")]
