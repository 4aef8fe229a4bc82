"""SIGTERM drains: requests in flight when the signal arrives complete successfully, and the
process exits with code 0.

"In flight" is made deterministic without sleeps: each request's headers and most of its body
are sent before SIGTERM and the last bytes after it, so the server is necessarily still inside
those requests when it receives the signal. A later complete request answered by the server
proves the earlier connections were accepted (the accept queue is FIFO). Concurrent HTTP and
gRPC load runs across the signal too: anything it gets back must be a correct answer or a
clean refusal (503 / UNAVAILABLE / connection refused), never a wrong answer or a 500.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import requests
import tritonclient.grpc as grpcclient

from _server import ServerProcess

N_PARTIAL = 4
TAIL_BYTES = 7


def _body(i: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    x0 = np.arange(16, dtype=np.float32).reshape(1, 16) + i
    x1 = np.full((1, 16), float(i), dtype=np.float32)
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": x0.reshape(-1).tolist()},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": x1.reshape(-1).tolist()},
    ]}).encode()
    return body, x0, x1


class Load(threading.Thread):
    """Sends requests in a loop until told to stop or the server refuses connections."""

    def __init__(self, srv: ServerProcess, protocol: str):
        super().__init__(daemon=True, name=f"load-{protocol}")
        self.srv, self.protocol = srv, protocol
        self.ok = 0
        self.refused = 0
        self.bad: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        body, x0, x1 = _body(1)
        if self.protocol == "http":
            session = requests.Session()
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    r = session.post(self.srv.http_url + "/v2/models/add_sub/infer", data=body, timeout=30)
                except requests.ConnectionError:
                    self.refused += 1
                    break
                if r.status_code == 200:
                    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
                    if out["OUTPUT0"] != (x0 + x1).reshape(-1).tolist():
                        self.bad.append(f"wrong answer {out}")
                    self.ok += 1
                elif r.status_code == 503:
                    self.refused += 1
                else:
                    self.bad.append(f"HTTP {r.status_code} {r.text[:200]}")
            session.close()
        else:
            client = grpcclient.InferenceServerClient(url=self.srv.grpc_host)
            inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
                      grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
            inputs[0].set_data_from_numpy(x0)
            inputs[1].set_data_from_numpy(x1)
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    result = client.infer("add_sub", inputs, client_timeout=30)
                except Exception as e:  # tritonclient wraps grpc.RpcError
                    status = getattr(e, "status", lambda: "")()
                    if status in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"):
                        self.refused += 1
                        break
                    self.bad.append(f"gRPC error {status}: {e}")
                    break
                if not np.array_equal(result.as_numpy("OUTPUT0"), x0 + x1):
                    self.bad.append("wrong gRPC answer")
                self.ok += 1
            client.close()


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _shutdown_observed(srv: ServerProcess) -> bool:
    if not srv.alive():
        return True
    try:
        return requests.get(srv.http_url + "/v2/health/ready", timeout=1).status_code != 200
    except requests.RequestException:
        return True  # listener closed


def test_sigterm_completes_in_flight_requests_and_exits_zero():
    srv = ServerProcess("shutdown", ["examples/models"]).start()
    conns = []
    loads = []
    try:
        # 1. Requests caught mid-body.
        for i in range(N_PARTIAL):
            body, x0, x1 = _body(i)
            conn = srv.http_connection(30)
            conn.putrequest("POST", "/v2/models/add_sub/infer")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            conn.send(body[:-TAIL_BYTES])
            conns.append((conn, body, x0, x1))
        # A complete request answered after them: the partial connections were accepted.
        r = requests.get(srv.http_url + "/v2/health/live", timeout=10)
        assert r.status_code == 200

        # 2. Load across the signal.
        loads = [Load(srv, "http"), Load(srv, "grpc")]
        for t in loads:
            t.start()
        assert _wait_for(lambda: all(t.ok >= 5 or t.bad for t in loads), 30), \
            [(t.name, t.ok, t.bad) for t in loads]

        # 3. SIGTERM while the partial requests are in flight.
        srv.send_sigterm()
        # Give the server the chance to act on the signal before the bodies complete: wait
        # (bounded) until it is visibly shutting down (not ready, or not accepting).
        _wait_for(lambda: _shutdown_observed(srv), 5)
        for t in loads:
            t.stop.set()

        # 4. Finish the bodies: each request must complete successfully.
        for conn, body, x0, x1 in conns:
            conn.send(body[-TAIL_BYTES:])
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, f"in-flight request got HTTP {resp.status}: {data[:300]!r}"
            out = {o["name"]: o["data"] for o in json.loads(data)["outputs"]}
            assert out["OUTPUT0"] == (x0 + x1).reshape(-1).tolist()
            assert out["OUTPUT1"] == (x0 - x1).reshape(-1).tolist()
            conn.close()

        for t in loads:
            t.join(timeout=60)
            assert not t.bad, f"{t.name}: {t.bad[:5]}"
            assert t.ok >= 5, (t.name, t.ok)

        code = srv.wait_exit()
        if code != 0:
            srv.fail(f"exit code {code} after SIGTERM, expected 0")
        srv.remove_logs()
    finally:
        for conn, *_ in conns:
            conn.close()
        for t in loads:
            t.stop.set()
        srv._kill()


def test_sigterm_when_idle_exits_zero():
    srv = ServerProcess("shutdown-idle", ["examples/models"]).start()
    try:
        srv.stop_and_check()
    finally:
        srv._kill()


def _grpc_unavailable_after_exit(srv: ServerProcess) -> None:
    channel = grpc.insecure_channel(srv.grpc_host)
    try:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=2)
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        else:
            raise AssertionError("gRPC still answering after the process exited")
    finally:
        channel.close()


def test_ports_closed_after_exit():
    srv = ServerProcess("shutdown-ports", ["examples/models"]).start()
    try:
        srv.stop_and_check()
        try:
            requests.get(srv.http_url + "/v2/health/live", timeout=2)
        except requests.ConnectionError:
            pass
        else:
            raise AssertionError("HTTP still answering after the process exited")
        _grpc_unavailable_after_exit(srv)
    finally:
        srv._kill()
