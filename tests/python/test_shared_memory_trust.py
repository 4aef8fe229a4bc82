"""Shared memory without trust (docs/security.md, "Shared memory").

1. A client rewrites its INT64 index tensor (a Gather model) and its BOOL tensor (a Not model)
   in a tight loop, from another process, while thousands of requests read them, on both
   engines (ONNX Runtime and tract) over HTTP and gRPC. Non-float inputs are private copies
   checked on the copy, so the server never crashes, and every answer is either the exact
   answer for the valid state of the tensor or a clear 400 / INVALID_ARGUMENT.
2. Registration is an administrative act: a key outside --shared-memory-prefix is refused with
   403 / PERMISSION_DENIED and the reason, and so is a client that is not on the loopback
   interface unless --allow-remote-shared-memory says otherwise.

The models are generated here with the `onnx` package (no committed binaries).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from _server import ServerProcess

ENGINES = ("onnxruntime", "tract")
# Elements of the index / BOOL tensors, and of Gather's data.
K = 1024
DATA_LEN = 8
# An index no engine may read: every byte-level mix of it with a valid index (0..7) is out of
# range too (top byte 0x00 or 0x7f: never negative; any high byte set or a low byte of 0xf0:
# at least 240), so a torn read cannot turn it into another valid index.
BAD_INDEX = 0x7FFF_FFFF_FFFF_FFF0
# Per engine, model and protocol: at most this many requests, for at most this many seconds.
MAX_REQUESTS = 1500
MAX_SECONDS = 4.0
CLIENT_THREADS = 4

# The rewriting client: maps the object and flips one element at a time between its valid
# value and an invalid one, as fast as it can, until SIGTERM (or a time limit). Prints the
# number of flips on exit.
REWRITER = r"""
import mmap, signal, sys, time
import numpy as np
path, good_file, bad_value, dtype, seconds = sys.argv[1:6]
good = np.load(good_file)
with open(path, "r+b") as f:
    m = mmap.mmap(f.fileno(), good.nbytes)
view = np.frombuffer(m, dtype=dtype, count=good.size)
bad = view.dtype.type(int(bad_value))
flips = 0
def stop(*_):
    print(flips, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
end = time.monotonic() + float(seconds)
while time.monotonic() < end:
    for j in range(good.size):
        view[j] = bad
        view[j] = good[j]
    flips += good.size
stop()
"""


def _model(name: str, engine: str, graph: onnx.GraphProto, root: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="oxserve tests/python/test_shared_memory_trust.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory = root / f"{name}_{engine}"
    (directory / "1").mkdir(parents=True)
    onnx.save(model, directory / "1" / "model.onnx")
    (directory / "config.pbtxt").write_text(
        f'name: "{name}_{engine}"\nbackend: "{engine}"\nmax_batch_size: 0\n')


def make_repository(root: Path) -> None:
    gather = helper.make_graph(
        [helper.make_node("Gather", ["data", "indices"], ["out"], axis=0)], "gather",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [DATA_LEN]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, [K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [K])])
    negate = helper.make_graph(
        [helper.make_node("Not", ["b"], ["y"])], "not",
        [helper.make_tensor_value_info("b", TensorProto.BOOL, [K])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, [K])])
    for engine in ENGINES:
        _model("gather", engine, gather, root)
        _model("not", engine, negate, root)


def local_address() -> str | None:
    """A non-loopback IPv4 address of this host, if it has one."""
    for target in ("192.0.2.1", "10.255.255.255", "198.51.100.1"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((target, 9))
            ip = s.getsockname()[0]
        except OSError:
            continue
        finally:
            s.close()
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    return None


class AnyHostServer(ServerProcess):
    """A server listening on every interface (the harness binds 127.0.0.1 otherwise)."""

    def command(self, binary):
        cmd = super().command(binary)
        cmd[cmd.index("--host") + 1] = "0.0.0.0"
        return cmd


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust_models")
    make_repository(root)
    return root


@pytest.fixture(scope="module")
def trust_server(repository):
    # tract's bounds-check panics (caught, answered as 400) would each print a symbolized
    # backtrace, which takes seconds in a debug build: the server runs without.
    saved = os.environ.pop("RUST_BACKTRACE", None)
    try:
        server = ServerProcess("shm-trust", [str(repository)]).start()
    finally:
        if saved is not None:
            os.environ["RUST_BACKTRACE"] = saved
    try:
        yield server
    finally:
        server.stop_and_check()


def connect(server, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(url=server.http_host, network_timeout=60.0)
    return grpcclient.InferenceServerClient(url=server.grpc_host)


class Case:
    """One model's inputs, the valid state of its rewritten tensor, and the expected answer."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "gather":
            self.good = (np.arange(K, dtype=np.int64) * 5) % DATA_LEN
            self.bad = BAD_INDEX
            self.data = (100.0 + np.arange(DATA_LEN)).astype(np.float32)
            self.expected = self.data[self.good]
            self.wire, self.output, self.input = "INT64", "out", "indices"
        else:
            self.good = (np.arange(K) % 3 == 0).astype(np.uint8)
            self.bad = 2
            self.expected = (1 - self.good).astype(np.uint8)
            self.wire, self.output, self.input = "BOOL", "y", "b"

    def request(self, protocol, region):
        m = httpclient if protocol == "http" else grpcclient
        inputs = []
        if self.kind == "gather":
            data = m.InferInput("data", [DATA_LEN], "FP32")
            data.set_data_from_numpy(self.data)
            inputs.append(data)
        x = m.InferInput(self.input, [K], self.wire)
        x.set_shared_memory(region, self.good.nbytes)
        inputs.append(x)
        outputs = [m.InferRequestedOutput(self.output, binary_data=True)] if protocol == "http" else None
        return inputs, outputs

    def check(self, result) -> None:
        got = result.as_numpy(self.output)
        if self.kind == "gather":
            # Exactly the gather of the valid indices: nothing read out of range.
            np.testing.assert_array_equal(got, self.expected)
        else:
            # Exactly Not of the valid bytes, and only 0/1 bytes.
            np.testing.assert_array_equal(got.view(np.uint8), self.expected)


def is_clear_rejection(e: InferenceServerException, protocol: str, case: Case) -> bool:
    status = str(e.status())
    message = e.message() or ""
    if protocol == "http" and status != "400":
        return False
    if protocol == "grpc" and "INVALID_ARGUMENT" not in status:
        return False
    if case.kind == "gather":
        return "out of" in message or "bounds" in message or "range" in message or "invalid" in message.lower()
    return "BOOL element" in message and "not 0 or 1" in message


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("kind", ["gather", "not"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_client_rewriting_its_tensors_during_inference_gets_answers_or_400s(
        trust_server, tmp_path, engine, kind, protocol):
    case = Case(kind)
    tag = uuid.uuid4().hex[:12]
    name, key = f"trust_{tag}", f"/oxserve_trust_{tag}"
    handle = shm.create_shared_memory_region(name, key, case.good.nbytes)
    admin = connect(trust_server, protocol)
    rewriter = None
    try:
        shm.set_shared_memory_region(handle, [case.good])
        admin.register_system_shared_memory(name, key, case.good.nbytes)
        np.save(tmp_path / "good.npy", case.good)
        rewriter = subprocess.Popen(
            [sys.executable, "-c", REWRITER, f"/dev/shm/{key.lstrip('/')}", str(tmp_path / "good.npy"),
             str(case.bad), case.good.dtype.name, "60"],
            stdout=subprocess.PIPE, text=True)
        assert rewriter.stdout.readline().strip() == "ready"

        model = f"{kind}_{engine}"
        outcomes = {"answered": 0, "rejected": 0, "tract bounds panic": 0}
        problems: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + MAX_SECONDS
        budget = [MAX_REQUESTS]

        def worker():
            client = connect(trust_server, protocol)
            try:
                while time.monotonic() < deadline:
                    with lock:
                        if budget[0] == 0:
                            return
                        budget[0] -= 1
                    inputs, outputs = case.request(protocol, name)
                    try:
                        result = client.infer(model, inputs, outputs=outputs)
                    except InferenceServerException as e:
                        with lock:
                            if is_clear_rejection(e, protocol, case):
                                outcomes["rejected"] += 1
                            else:
                                problems.append(f"{e.status()}: {e.message()}")
                        continue
                    try:
                        case.check(result)
                    except AssertionError as e:
                        with lock:
                            problems.append(f"wrong answer: {str(e)[:300]}")
                        continue
                    with lock:
                        outcomes["answered"] += 1
            except Exception as e:  # noqa: BLE001 - a dead server shows up here
                with lock:
                    problems.append(repr(e)[:300])
            finally:
                client.close()

        threads = [threading.Thread(target=worker) for _ in range(CLIENT_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        rewriter.terminate()
        flips = int(rewriter.communicate(timeout=30)[0].strip() or 0)
        rewriter = None
        print(f"{engine} {kind} over {protocol}: {outcomes}, {flips} rewrites")

        assert trust_server.alive(), "the server died"
        assert not problems, f"{len(problems)} bad outcomes, e.g. {problems[:3]}"
        assert flips > 10_000, "the rewriter barely ran"
        # tract's caught panics are slow in a debug build: fewer requests there.
        assert sum(outcomes.values()) >= 10, outcomes
        # Both outcomes are expected: the tensor is valid most of the time and caught mid-rewrite
        # some of the time.
        assert outcomes["answered"] > 0, outcomes

        # Left alone, the region answers correctly.
        inputs, outputs = case.request(protocol, name)
        case.check(admin.infer(model, inputs, outputs=outputs))
    finally:
        if rewriter is not None:
            rewriter.kill()
            rewriter.wait()
        admin.unregister_system_shared_memory()
        admin.close()
        shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_bool_byte_other_than_0_or_1_is_a_clear_400(trust_server, engine):
    tag = uuid.uuid4().hex[:12]
    name, key = f"bool_{tag}", f"/oxserve_trust_{tag}"
    bad = np.zeros(K, dtype=np.uint8)
    bad[7] = 2
    handle = shm.create_shared_memory_region(name, key, K)
    http = connect(trust_server, "http")
    grpc = connect(trust_server, "grpc")
    try:
        shm.set_shared_memory_region(handle, [bad])
        http.register_system_shared_memory(name, key, K)
        for m, client, status in ((httpclient, http, "400"), (grpcclient, grpc, "StatusCode.INVALID_ARGUMENT")):
            x = m.InferInput("b", [K], "BOOL")
            x.set_shared_memory(name, K)
            with pytest.raises(InferenceServerException) as info:
                client.infer(f"not_{engine}", [x])
            assert str(info.value.status()) == status, info.value
            assert "input 'b': BOOL element 7 is 2, not 0 or 1" in info.value.message(), info.value
        # The same over the binary tensor extension, without shared memory.
        r = requests.post(
            f"{trust_server.http_url}/v2/models/not_{engine}/infer",
            data=b'{"inputs":[{"name":"b","shape":[%d],"datatype":"BOOL","parameters":{"binary_data_size":%d}}]}'
                 % (K, K) + bad.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(
                b'{"inputs":[{"name":"b","shape":[%d],"datatype":"BOOL","parameters":{"binary_data_size":%d}}]}'
                % (K, K)))},
            timeout=30)
        assert r.status_code == 400 and "BOOL element 7 is 2" in r.json()["error"], r.text
    finally:
        http.unregister_system_shared_memory()
        http.close()
        grpc.close()
        shm.destroy_shared_memory_region(handle)


def expect_refused(call, protocol, *fragments):
    with pytest.raises(InferenceServerException) as info:
        call()
    status = str(info.value.status())
    assert status == ("403" if protocol == "http" else "StatusCode.PERMISSION_DENIED"), info.value
    for fragment in fragments:
        assert fragment in info.value.message(), info.value
    return info.value.message()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_registration_outside_the_prefix_is_refused(trust_server, protocol):
    # An object that exists and that the server could open: refused for its name alone.
    tag = uuid.uuid4().hex[:12]
    name, key = f"outside_{tag}", f"/input_simple_{tag}"
    handle = shm.create_shared_memory_region(name, key, 64)
    client = connect(trust_server, protocol)
    try:
        expect_refused(lambda: client.register_system_shared_memory(name, key, 64), protocol,
                       f"'{key}' is outside the prefix", "--shared-memory-prefix", "/oxserve")
        status = client.get_system_shared_memory_status()
        assert (status == [] if protocol == "http" else len(status.regions) == 0), status
    finally:
        client.close()
        shm.destroy_shared_memory_region(handle)


def test_the_prefix_is_configurable_and_empty_means_any_name(repository):
    tag = uuid.uuid4().hex[:12]
    server = ServerProcess("shm-prefix", [str(repository)],
                           ["--shared-memory-prefix", "/team_a_"]).start()
    handles = [shm.create_shared_memory_region(f"r{i}_{tag}", key, 64)
               for i, key in enumerate((f"/team_a_{tag}", f"/oxserve_{tag}"))]
    client = connect(server, "http")
    try:
        client.register_system_shared_memory(f"r0_{tag}", f"/team_a_{tag}", 64)
        expect_refused(lambda: client.register_system_shared_memory(f"r1_{tag}", f"/oxserve_{tag}", 64),
                       "http", "'/team_a_...'")
        client.unregister_system_shared_memory()
    finally:
        client.close()
        server.stop_and_check()
    # Triton's behaviour: any name (still only from loopback).
    server = ServerProcess("shm-any", [str(repository)], ["--shared-memory-prefix", ""]).start()
    client = connect(server, "grpc")
    try:
        client.register_system_shared_memory(f"r1_{tag}", f"/oxserve_{tag}", 64)
        client.register_system_shared_memory(f"r0_{tag}", f"/team_a_{tag}", 64)
        client.unregister_system_shared_memory()
    finally:
        client.close()
        server.stop_and_check()
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("allow_remote", [False, True])
def test_registration_from_a_non_loopback_address(repository, allow_remote):
    ip = local_address()
    if ip is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    args = ["--allow-remote-shared-memory", "true"] if allow_remote else []
    server = AnyHostServer("shm-remote", [str(repository)], args).start()
    tag = uuid.uuid4().hex[:12]
    name, key = f"remote_{tag}", f"/oxserve_remote_{tag}"
    handle = shm.create_shared_memory_region(name, key, 64)
    http_port = server.http_addr.rsplit(":", 1)[1]
    grpc_port = server.grpc_addr.rsplit(":", 1)[1]
    remote = {"http": httpclient.InferenceServerClient(url=f"{ip}:{http_port}"),
              "grpc": grpcclient.InferenceServerClient(url=f"{ip}:{grpc_port}")}
    local = httpclient.InferenceServerClient(url=f"127.0.0.1:{http_port}")
    try:
        for protocol, client in remote.items():
            if allow_remote:
                client.register_system_shared_memory(name, key, 64)
                client.unregister_system_shared_memory(name)
            else:
                expect_refused(lambda c=client: c.register_system_shared_memory(name, key, 64),
                               protocol, f"not from {ip}", "--allow-remote-shared-memory")
        # The same client on the loopback interface may.
        local.register_system_shared_memory(name, key, 64)
        local.unregister_system_shared_memory()
    finally:
        for client in (*remote.values(), local):
            client.close()
        server.stop_and_check()
        shm.destroy_shared_memory_region(handle)
