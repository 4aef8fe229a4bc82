"""The scheduler end to end, through the real server and the published clients.

- Dynamic batching keeps every client's rows its own: many parallel clients send distinct
  inputs of 1-3 rows to add_sub with `dynamic_batching { max_queue_delay_microseconds: 2000 }`
  over HTTP (binary tensors) and gRPC; each checks its exact outputs, and the statistics
  extension shows that batches of more than one request actually ran.
- Queue policies on deliberately slow `testkit` models (tests/fixtures/scheduling, one
  instance, 300 ms per request): a full queue answers 429 + Retry-After / RESOURCE_EXHAUSTED;
  a queue timeout answers 504 / DEADLINE_EXCEEDED without running the model; DELAY still runs;
  a request's own `timeout` parameter counts when the policy allows it; a high-priority request
  overtakes queued low-priority ones.

Nothing sleeps a fixed time: concurrent requests are released together from a barrier, and
where order matters the test waits for the server's pending-request gauge to show the earlier
requests queued. The testkit models need a binary built with `--features testkit`
(scripts/test.sh builds it that way).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _server import ROOT, ServerProcess

DELAY_S = 0.3  # delay_ms of the slow testkit models
TESTKIT_MODELS = ["slow_queue", "slow_reject", "slow_override", "slow_delay", "slow_priority", "failing"]
BATCHED = "add_sub_batched"
BATCHED_CONFIG = f"""# add_sub with dynamic batching (written by tests/python/test_scheduler.py)
name: "{BATCHED}"
max_batch_size: 8
input [
  {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }},
  {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }},
  {{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""
THREADS = 32
REQUESTS_PER_THREAD = 20


@pytest.fixture(scope="module")
def sched_server():
    """tests/fixtures/scheduling (testkit models) plus a temporary repository holding the
    example add_sub model under a dynamic-batching configuration."""
    tmp = Path(tempfile.mkdtemp(prefix="oxserve-sched-"))
    try:
        (tmp / BATCHED / "1").mkdir(parents=True)
        shutil.copyfile(ROOT / "examples/models/add_sub/1/model.onnx", tmp / BATCHED / "1/model.onnx")
        (tmp / BATCHED / "config.pbtxt").write_text(BATCHED_CONFIG)
        server = ServerProcess(
            "scheduling", ["tests/fixtures/scheduling", str(tmp)],
            ready_path=f"/v2/models/{BATCHED}/ready",
        ).start()
        try:
            index = requests.post(f"{server.http_url}/v2/repository/index", json={}, timeout=10).json()
            states = {e["name"]: e for e in index}
            not_ready = {m: states.get(m, {}) for m in TESTKIT_MODELS
                         if states.get(m, {}).get("state") != "READY"}
            if not_ready:
                server.fail(
                    "testkit models did not load (is $OXSERVE_BIN built with `--features testkit`?): "
                    + "; ".join(f"{m}: {e.get('reason', 'not listed')}" for m, e in not_ready.items())
                )
            yield server
        finally:
            server.stop_and_check()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def row(tag: float) -> np.ndarray:
    """A distinct [1, 4] FP32 input for the slow models."""
    return np.array([[tag, tag + 0.25, -tag, 1.0]], dtype=np.float32)


def v2_body(x: np.ndarray, parameters: dict | None = None) -> dict:
    body = {"inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.flatten().tolist()}]}
    if parameters:
        body["parameters"] = parameters
    return body


def post_slow(server: ServerProcess, model: str, x: np.ndarray, parameters: dict | None = None):
    """POST a KServe v2 JSON request; returns (response, monotonic completion time)."""
    resp = requests.post(f"{server.http_url}/v2/models/{model}/infer", json=v2_body(x, parameters),
                         timeout=30)
    return resp, time.monotonic()


def grpc_slow(server: ServerProcess, model: str, x: np.ndarray, **kwargs):
    """One gRPC request with tritonclient; returns (result or exception, completion time)."""
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            outcome = client.infer(model, [inp], client_timeout=30, **kwargs)
        except InferenceServerException as e:
            outcome = e
        return outcome, time.monotonic()
    finally:
        client.close()


def together(calls):
    """Runs the callables on threads released at the same moment; returns their results."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def check_echo_http(resp: requests.Response, x: np.ndarray) -> None:
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    assert out["name"] == "OUTPUT0" and out["shape"] == list(x.shape)
    np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32).reshape(x.shape), x)


def check_echo_grpc(outcome, x: np.ndarray) -> None:
    assert not isinstance(outcome, Exception), f"expected success, got {outcome}"
    np.testing.assert_array_equal(outcome.as_numpy("OUTPUT0"), x)


def grpc_code(outcome) -> str:
    assert isinstance(outcome, InferenceServerException), f"expected an error, got a result"
    return outcome.status()


def stats(server: ServerProcess, model: str) -> dict:
    resp = requests.get(f"{server.http_url}/v2/models/{model}/stats", timeout=10)
    assert resp.status_code == 200, f"GET /v2/models/{model}/stats: {resp.status_code} {resp.text[:300]}"
    entries = resp.json()["model_stats"]
    assert len(entries) == 1, entries
    return entries[0]


def pending(server: ServerProcess, model: str) -> int:
    """Requests the server has accepted for `model` and not yet answered (Prometheus gauge)."""
    text = requests.get(server.metrics_url, timeout=10).text
    pattern = (r'^oxserve_inference_pending_request_count\{[^}]*model="' + re.escape(model)
               + r'"[^}]*\}\s+(\S+)$')
    m = re.search(pattern, text, re.MULTILINE)
    return int(float(m.group(1))) if m else 0


def wait_pending(server: ServerProcess, model: str, n: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := pending(server, model)) < n:
        if time.monotonic() > deadline:
            server.fail(f"{model}: {got} pending requests after {timeout_s} s, expected {n}")
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------
# (a) many parallel clients, batching on: everyone gets exactly their own rows
# ---------------------------------------------------------------------------------------

def distinct_inputs(thread: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    rows = 1 + (thread + i) % 3
    rng = np.random.default_rng(thread * 1000 + i)
    a = (thread * 1000 + i + np.arange(rows * 16, dtype=np.float32).reshape(rows, 16) / 4).astype(np.float32)
    b = rng.standard_normal((rows, 16)).astype(np.float32)
    return a, b


def http_worker(server: ServerProcess, thread: int) -> int:
    client = httpclient.InferenceServerClient(url=server.http_host, network_timeout=60.0)
    try:
        for i in range(REQUESTS_PER_THREAD):
            a, b = distinct_inputs(thread, i)
            inputs = [httpclient.InferInput("INPUT0", list(a.shape), "FP32"),
                      httpclient.InferInput("INPUT1", list(b.shape), "FP32")]
            inputs[0].set_data_from_numpy(a, binary_data=True)
            inputs[1].set_data_from_numpy(b, binary_data=True)
            outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                       httpclient.InferRequestedOutput("OUTPUT1", binary_data=True)]
            result = client.infer(BATCHED, inputs, outputs=outputs, request_id=f"{thread}-{i}")
            assert result.get_response()["id"] == f"{thread}-{i}"
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        return REQUESTS_PER_THREAD
    finally:
        client.close()


def grpc_worker(server: ServerProcess, thread: int) -> int:
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        for i in range(REQUESTS_PER_THREAD):
            a, b = distinct_inputs(thread, i)
            inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
                      grpcclient.InferInput("INPUT1", list(b.shape), "FP32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer(BATCHED, inputs, request_id=f"{thread}-{i}", client_timeout=60)
            assert result.get_response().id == f"{thread}-{i}"
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        return REQUESTS_PER_THREAD
    finally:
        client.close()


@pytest.mark.parametrize("worker", [http_worker, grpc_worker], ids=["http", "grpc"])
def test_parallel_clients_get_exactly_their_own_outputs(sched_server, worker):
    before = stats(sched_server, BATCHED)
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        done = sum(pool.map(lambda t: worker(sched_server, t), range(THREADS)))
    assert done == THREADS * REQUESTS_PER_THREAD
    after = stats(sched_server, BATCHED)

    requests_sent = THREADS * REQUESTS_PER_THREAD
    rows_sent = sum(distinct_inputs(t, i)[0].shape[0]
                    for t in range(THREADS) for i in range(REQUESTS_PER_THREAD))
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] \
        == requests_sent
    assert after["inference_count"] - before["inference_count"] == rows_sent
    executions = after["execution_count"] - before["execution_count"]
    # Batching merged requests: fewer engine runs than requests, and some ran with more rows
    # than any single request has (3).
    assert executions < requests_sent, f"{executions} executions for {requests_sent} requests"

    def by_size(s):
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in s["batch_stats"]}

    grew = {size: n - by_size(before).get(size, 0) for size, n in by_size(after).items()}
    assert any(size > 3 and n > 0 for size, n in grew.items()), f"batch sizes run: {grew}"
    assert max(size for size, n in grew.items() if n > 0) <= 8


# ---------------------------------------------------------------------------------------
# (b) queue full
# ---------------------------------------------------------------------------------------

# One runs, two wait (max_queue_size 2), the rest must be refused. At least the two that fit
# the queue succeed; a third does only when the instance has already taken the first request
# off the queue when the others arrive, which a loaded machine does not guarantee.
CONCURRENT = 8


def test_queue_full_http_429_with_retry_after(sched_server):
    xs = [row(i) for i in range(CONCURRENT)]
    before = stats(sched_server, "slow_queue")
    results = together([lambda x=x: post_slow(sched_server, "slow_queue", x) for x in xs])
    ok = [(r, x) for (r, _), x in zip(results, xs) if r.status_code == 200]
    refused = [r for r, _ in results if r.status_code != 200]
    assert len(ok) >= 2, [r.status_code for r, _ in results]
    assert refused, "no request was refused with a full queue"
    for r in refused:
        assert r.status_code == 429, (r.status_code, r.text)
        assert r.headers.get("Retry-After", "").isdigit(), dict(r.headers)
        assert "error" in r.json()
    for r, x in ok:
        check_echo_http(r, x)
    # Refused requests never ran.
    after = stats(sched_server, "slow_queue")
    assert after["execution_count"] - before["execution_count"] == len(ok)


def test_queue_full_grpc_resource_exhausted(sched_server):
    xs = [row(100 + i) for i in range(CONCURRENT)]
    results = together([lambda x=x: grpc_slow(sched_server, "slow_queue", x) for x in xs])
    ok = [(o, x) for (o, _), x in zip(results, xs) if not isinstance(o, Exception)]
    refused = [o for o, _ in results if isinstance(o, Exception)]
    assert len(ok) >= 2 and refused, [str(o)[:80] for o, _ in results]
    for o in refused:
        assert grpc_code(o) == str(grpc.StatusCode.RESOURCE_EXHAUSTED), o
    for o, x in ok:
        check_echo_grpc(o, x)


# ---------------------------------------------------------------------------------------
# (c) queue timeouts
# ---------------------------------------------------------------------------------------

def test_queue_timeout_reject_http_504_and_model_never_runs(sched_server):
    # Two at once on one 300 ms instance: the one that waits passes its 100 ms timeout.
    xs = [row(200), row(201)]
    before = stats(sched_server, "slow_reject")
    results = together([lambda x=x: post_slow(sched_server, "slow_reject", x) for x in xs])
    codes = sorted(r.status_code for r, _ in results)
    assert codes == [200, 504], [(r.status_code, r.text) for r, _ in results]
    for (r, _), x in zip(results, xs):
        if r.status_code == 200:
            check_echo_http(r, x)
        else:
            assert "timed out" in r.json()["error"]
    after = stats(sched_server, "slow_reject")
    assert after["execution_count"] - before["execution_count"] == 1
    assert after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 1


def test_queue_timeout_reject_grpc_deadline_exceeded(sched_server):
    xs = [row(210), row(211)]
    results = together([lambda x=x: grpc_slow(sched_server, "slow_reject", x) for x in xs])
    ok = [(o, x) for (o, _), x in zip(results, xs) if not isinstance(o, Exception)]
    failed = [o for o, _ in results if isinstance(o, Exception)]
    assert len(ok) == 1 and len(failed) == 1, [str(o)[:80] for o, _ in results]
    assert grpc_code(failed[0]) == str(grpc.StatusCode.DEADLINE_EXCEEDED)
    check_echo_grpc(*ok[0])


def test_request_timeout_parameter_overrides_when_allowed(sched_server):
    # slow_override has no default timeout: two requests without one both run...
    started = time.monotonic()
    plain = together([lambda i=i: post_slow(sched_server, "slow_override", row(300 + i)) for i in range(2)])
    assert [r.status_code for r, _ in plain] == [200, 200]
    assert max(t for _, t in plain) - started >= 2 * DELAY_S * 0.95
    # ...while with `timeout` (µs) 100 ms the one that has to wait is rejected.
    timed = together([
        lambda i=i: post_slow(sched_server, "slow_override", row(310 + i), {"timeout": 100_000})
        for i in range(2)
    ])
    assert sorted(r.status_code for r, _ in timed) == [200, 504], [r.text for r, _ in timed]
    # Over gRPC tritonclient sends the same parameter from `timeout=`.
    grpc_timed = together([
        lambda i=i: grpc_slow(sched_server, "slow_override", row(320 + i), timeout=100_000)
        for i in range(2)
    ])
    failed = [o for o, _ in grpc_timed if isinstance(o, Exception)]
    assert len(failed) == 1 and grpc_code(failed[0]) == str(grpc.StatusCode.DEADLINE_EXCEEDED)


def test_request_timeout_parameter_is_ignored_when_not_allowed(sched_server):
    # slow_queue (REJECT, no default timeout) does not allow overrides: a 1 µs `timeout`
    # changes nothing, so the request that waits a whole execution still runs.
    xs = [row(400), row(401)]
    results = together([
        lambda x=x: post_slow(sched_server, "slow_queue", x, {"timeout": 1}) for x in xs
    ])
    for (r, _), x in zip(results, xs):
        check_echo_http(r, x)


def test_queue_timeout_delay_still_runs(sched_server):
    xs = [row(500), row(501), row(502)]
    started = time.monotonic()
    before = stats(sched_server, "slow_delay")
    results = together([lambda x=x: post_slow(sched_server, "slow_delay", x) for x in xs])
    for (r, _), x in zip(results, xs):
        check_echo_http(r, x)
    # The last one waited two executions, far past its 100 ms timeout, and still ran.
    assert max(t for _, t in results) - started >= 3 * DELAY_S * 0.95
    after = stats(sched_server, "slow_delay")
    assert after["execution_count"] - before["execution_count"] == 3


# ---------------------------------------------------------------------------------------
# (d) priorities
# ---------------------------------------------------------------------------------------

def test_high_priority_overtakes_queued_low_priority(sched_server):
    model = "slow_priority"
    assert pending(sched_server, model) == 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        # The instance becomes busy...
        busy = pool.submit(post_slow, sched_server, model, row(600))
        wait_pending(sched_server, model, 1)
        # ...two default (low, level 2) requests queue behind it...
        low = [pool.submit(post_slow, sched_server, model, row(601 + i)) for i in range(2)]
        wait_pending(sched_server, model, 3)
        # ...then a level-1 request arrives last and must run next.
        high = pool.submit(post_slow, sched_server, model, row(610), {"priority": 1})
        (r_busy, t_busy), (r_high, t_high) = busy.result(), high.result()
        lows = [f.result() for f in low]
    check_echo_http(r_busy, row(600))
    check_echo_http(r_high, row(610))
    for i, (r, _) in enumerate(lows):
        check_echo_http(r, row(601 + i))
    assert t_high < min(t for _, t in lows), (
        f"high finished {t_high - t_busy:.3f} s after the busy one; lows at "
        f"{[round(t - t_busy, 3) for _, t in lows]}"
    )


def test_high_priority_overtakes_over_grpc(sched_server):
    model = "slow_priority"
    with ThreadPoolExecutor(max_workers=3) as pool:
        busy = pool.submit(grpc_slow, sched_server, model, row(700))
        wait_pending(sched_server, model, 1)
        low = pool.submit(grpc_slow, sched_server, model, row(701))
        wait_pending(sched_server, model, 2)
        high = pool.submit(grpc_slow, sched_server, model, row(702), priority=1)
        (o_high, t_high), (o_low, t_low) = high.result(), low.result()
        busy.result()
    check_echo_grpc(o_high, row(702))
    check_echo_grpc(o_low, row(701))
    assert t_high < t_low


def test_unknown_priority_level_is_invalid(sched_server):
    resp, _ = post_slow(sched_server, "slow_priority", row(800), {"priority": 3})
    assert resp.status_code == 400, resp.text


# ---------------------------------------------------------------------------------------
# a failing backend
# ---------------------------------------------------------------------------------------

def test_backend_failure_is_500_and_the_server_keeps_serving(sched_server):
    resp, _ = post_slow(sched_server, "failing", row(900))
    assert resp.status_code == 500, resp.text
    assert "error" in resp.json()
    outcome, _ = grpc_slow(sched_server, "failing", row(901))
    assert grpc_code(outcome) == str(grpc.StatusCode.INTERNAL)
    ok, _ = post_slow(sched_server, "slow_delay", row(902))
    check_echo_http(ok, row(902))


def test_failures_are_logged_with_the_request_id(sched_server):
    """The id a client sends (or the one the server assigns and answers with) is on the log
    lines about its request, over HTTP and gRPC, so a reported failure can be found."""
    resp = requests.post(f"{sched_server.http_url}/v2/models/failing/infer", json=v2_body(row(910)),
                         headers={"x-request-id": "http-req-910"}, timeout=30)
    assert resp.status_code == 500, resp.text
    assert resp.headers["x-request-id"] == "http-req-910"
    assigned = requests.post(f"{sched_server.http_url}/v2/models/failing/infer", json=v2_body(row(911)),
                             timeout=30).headers["x-request-id"]
    client = grpcclient.InferenceServerClient(url=sched_server.grpc_host)
    try:
        x = row(912)
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException):
            client.infer("failing", [inp], headers={"x-request-id": "grpc-req-912"}, client_timeout=30)
    finally:
        client.close()
    # The front-end's "inference failed" line, and the line the engine itself writes on its
    # instance thread while running the request ("failing by design", the testkit's stand-in
    # for an engine reporting an error).
    for rid in ("http-req-910", assigned, "grpc-req-912"):
        for what in ("inference failed", "failing by design"):
            deadline = time.monotonic() + 10
            while True:
                lines = [l for l in sched_server.stderr_path.read_text(errors="replace").splitlines()
                         if re.search(rf'id[=":]+{re.escape(rid)}[}}"]', l) and what in l]
                if lines or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert lines, f"no '{what}' line about request {rid}:\n{sched_server.stderr_tail()}"
