"""Triton's system shared-memory extension, driven by tritonclient's own shared-memory utilities
(tritonclient.utils.shared_memory) over HTTP and gRPC, as in Triton's simple_*_shm_client
examples: inputs read from and outputs written to /dev/shm regions, region status and
unregistration, and every misuse answered with a clear error while the server keeps serving."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from _models import STRINGS, add_sub_inputs, ort_run

PROTOCOLS = ["http", "grpc"]


def make_client(server, protocol):
    if protocol == "http":
        return httpclient.InferenceServerClient(url=server.http_host, network_timeout=30.0)
    return grpcclient.InferenceServerClient(url=server.grpc_host)


def module(protocol):
    return httpclient if protocol == "http" else grpcclient


@pytest.fixture(params=PROTOCOLS)
def protocol(request):
    return request.param


@pytest.fixture
def client(server, protocol):
    c = make_client(server, protocol)
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def regions():
    """Creates shared-memory objects (unique keys) and destroys them after the test."""
    made = []

    def create(byte_size):
        tag = uuid.uuid4().hex[:12]
        handle = shm.create_shared_memory_region(f"r_{tag}", f"/oxserve_test_{tag}", byte_size)
        made.append(handle)
        return handle, f"r_{tag}", f"/oxserve_test_{tag}"

    yield create
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def region_names(client, protocol):
    status = client.get_system_shared_memory_status()
    if protocol == "http":
        return {r["name"]: r for r in status}
    return {name: {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for name, r in status.regions.items()}


def test_inputs_and_outputs_in_shared_memory(client, protocol, regions):
    feeds = add_sub_inputs(batch=4, seed=31)
    expected = ort_run("add_sub", feeds)
    nbytes = feeds["INPUT0"].nbytes
    in_handle, in_name, in_key = regions(2 * nbytes)
    out_handle, out_name, out_key = regions(2 * nbytes)
    shm.set_shared_memory_region(in_handle, [feeds["INPUT0"], feeds["INPUT1"]])
    client.register_system_shared_memory(in_name, in_key, 2 * nbytes)
    client.register_system_shared_memory(out_name, out_key, 2 * nbytes)

    status = region_names(client, protocol)
    assert status[in_name]["key"] == in_key and int(status[in_name]["byte_size"]) == 2 * nbytes
    assert int(status[out_name]["offset"]) == 0

    m = module(protocol)
    inputs = [m.InferInput("INPUT0", [4, 16], "FP32"), m.InferInput("INPUT1", [4, 16], "FP32")]
    inputs[0].set_shared_memory(in_name, nbytes)
    inputs[1].set_shared_memory(in_name, nbytes, offset=nbytes)
    outputs = [m.InferRequestedOutput("OUTPUT0"), m.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory(out_name, nbytes)
    outputs[1].set_shared_memory(out_name, nbytes, offset=nbytes)
    result = client.infer("add_sub", inputs, outputs=outputs)

    out0 = shm.get_contents_as_numpy(out_handle, np.float32, [4, 16])
    out1 = shm.get_contents_as_numpy(out_handle, np.float32, [4, 16], offset=nbytes)
    np.testing.assert_allclose(out0, expected["OUTPUT0"], rtol=1e-6)
    np.testing.assert_allclose(out1, expected["OUTPUT1"], rtol=1e-6)

    # The response says where each output went (Triton's parameters), with no data.
    meta = result.get_output("OUTPUT1")
    params = meta["parameters"] if protocol == "http" else {
        k: (v.string_param or v.int64_param) for k, v in meta.parameters.items()}
    assert params["shared_memory_region"] == out_name
    assert int(params["shared_memory_byte_size"]) == nbytes
    assert int(params["shared_memory_offset"]) == nbytes

    client.unregister_system_shared_memory(in_name)
    assert in_name not in region_names(client, protocol)
    client.unregister_system_shared_memory()
    assert region_names(client, protocol) == {}


def test_mixing_shared_memory_and_inline_tensors(client, protocol, regions):
    """One input and one output in shared memory, the others in the message: over gRPC the
    raw_output_contents entries must still line up with the outputs."""
    feeds = add_sub_inputs(batch=2, seed=32)
    expected = ort_run("add_sub", feeds)
    nbytes = feeds["INPUT0"].nbytes
    in_handle, in_name, in_key = regions(nbytes)
    out_handle, out_name, out_key = regions(nbytes)
    shm.set_shared_memory_region(in_handle, [feeds["INPUT1"]])
    client.register_system_shared_memory(in_name, in_key, nbytes)
    client.register_system_shared_memory(out_name, out_key, nbytes)

    m = module(protocol)
    x0 = m.InferInput("INPUT0", [2, 16], "FP32")
    x0.set_data_from_numpy(feeds["INPUT0"])
    x1 = m.InferInput("INPUT1", [2, 16], "FP32")
    x1.set_shared_memory(in_name, nbytes)
    o0 = m.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory(out_name, nbytes)
    o1 = m.InferRequestedOutput("OUTPUT1")
    result = client.infer("add_sub", [x0, x1], outputs=[o0, o1])

    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), expected["OUTPUT1"], rtol=1e-6)
    np.testing.assert_allclose(shm.get_contents_as_numpy(out_handle, np.float32, [2, 16]),
                               expected["OUTPUT0"], rtol=1e-6)


def test_bytes_tensors_in_shared_memory(client, protocol, regions):
    data = np.array([[s.encode()] for s in STRINGS], dtype=np.object_)
    wire = serialize_byte_tensor(data)
    size = len(wire.item())  # one object element: the whole length-prefixed byte string
    in_handle, in_name, in_key = regions(size)
    out_handle, out_name, out_key = regions(size)
    shm.set_shared_memory_region(in_handle, [wire])
    client.register_system_shared_memory(in_name, in_key, size)
    client.register_system_shared_memory(out_name, out_key, size)

    m = module(protocol)
    x = m.InferInput("INPUT0", list(data.shape), "BYTES")
    x.set_shared_memory(in_name, size)
    out = m.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory(out_name, size)
    client.infer("string_identity", [x], outputs=[out])
    got = shm.get_contents_as_numpy(out_handle, np.object_, list(data.shape))
    assert [row[0] for row in got.tolist()] == [s.encode() for s in STRINGS]


def test_regions_are_shared_by_http_and_grpc(server, regions):
    feeds = add_sub_inputs(batch=1, seed=33)
    nbytes = feeds["INPUT0"].nbytes
    handle, name, key = regions(2 * nbytes)
    shm.set_shared_memory_region(handle, [feeds["INPUT0"], feeds["INPUT1"]])
    http = make_client(server, "http")
    grpc = make_client(server, "grpc")
    try:
        http.register_system_shared_memory(name, key, 2 * nbytes)
        x0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        x0.set_shared_memory(name, nbytes)
        x1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        x1.set_shared_memory(name, nbytes, offset=nbytes)
        result = grpc.infer("add_sub", [x0, x1])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"],
                                   rtol=1e-6)
        grpc.unregister_system_shared_memory(name)
        assert http.get_system_shared_memory_status() == []
    finally:
        http.unregister_system_shared_memory()
        http.close()
        grpc.close()


def expect_error(call, *fragments):
    with pytest.raises(InferenceServerException) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def add_sub_shm_request(protocol, region, nbytes, batch, offset0=0):
    m = module(protocol)
    inputs = [m.InferInput("INPUT0", [batch, 16], "FP32"), m.InferInput("INPUT1", [batch, 16], "FP32")]
    inputs[0].set_shared_memory(region, nbytes, offset=offset0)
    inputs[1].set_shared_memory(region, nbytes, offset=offset0)
    return inputs


def test_misuse_is_a_clear_error_and_the_server_keeps_serving(client, protocol, regions):
    feeds = add_sub_inputs(batch=2, seed=34)
    nbytes = feeds["INPUT0"].nbytes
    handle, name, key = regions(nbytes)
    shm.set_shared_memory_region(handle, [feeds["INPUT0"]])

    # Registration: unknown key, a range past the end of the object, a name used twice.
    expect_error(lambda: client.register_system_shared_memory("x", "/oxserve_no_such_key", 64),
                 "Unable to open shared memory region")
    expect_error(lambda: client.register_system_shared_memory("x", key, nbytes, offset=8),
                 "invalid args")
    client.register_system_shared_memory(name, key, nbytes)
    expect_error(lambda: client.register_system_shared_memory(name, key, nbytes), "already in manager")
    expect_error(lambda: client.get_system_shared_memory_status("nope"), "Unable to find")

    # Requests: unknown region, a range outside the region, a wrong byte size for the shape,
    # an output region too small for the result.
    m = module(protocol)
    expect_error(lambda: client.infer("add_sub", add_sub_shm_request(protocol, "nope", nbytes, 2)),
                 "Unable to find shared memory region: 'nope'")
    expect_error(lambda: client.infer("add_sub", add_sub_shm_request(protocol, name, nbytes, 2, 8)),
                 "Invalid offset + byte size")
    if protocol == "http":
        # Triton's QA (L0_shared_memory, over HTTP: gRPC's int64 parameters cannot carry these):
        # an offset near 2**64 is an invalid offset, and an offset plus size that overflows is
        # named as such, not a malformed number.
        expect_error(lambda: client.infer("add_sub", add_sub_shm_request(protocol, name, nbytes, 2, 2**64 - 32)),
                     "Invalid offset for shared memory region")
        expect_error(lambda: client.infer("add_sub", add_sub_shm_request(protocol, name, 2**64 - 8, 2, 16)),
                     "Integer overflow detected: byte_size ")
    expect_error(lambda: client.infer("add_sub", add_sub_shm_request(protocol, name, nbytes // 2, 2)),
                 "INPUT0")
    out = m.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory(name, 16)
    expect_error(lambda: client.infer("add_sub", add_sub_shm_request(protocol, name, nbytes, 2),
                                      outputs=[out]),
                 "should be at least")

    # The client shrinks the object behind a registered region: an error, not a crash.
    os.truncate(f"/dev/shm/{key.lstrip('/')}", 8)
    expect_error(lambda: client.infer("add_sub", add_sub_shm_request(protocol, name, nbytes, 2)),
                 "smaller than the registered region")

    # Still serving, in-band data as before.
    x = [m.InferInput("INPUT0", [2, 16], "FP32"), m.InferInput("INPUT1", [2, 16], "FP32")]
    x[0].set_data_from_numpy(feeds["INPUT0"])
    x[1].set_data_from_numpy(feeds["INPUT1"])
    result = client.infer("add_sub", x)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), feeds["INPUT0"] - feeds["INPUT1"], rtol=1e-6)


def test_cuda_shared_memory_is_refused_over_http(server):
    client = make_client(server, "http")
    try:
        assert client.get_cuda_shared_memory_status() == []
        expect_error(lambda: client.register_cuda_shared_memory("g", b"\0" * 64, 0, 64), "CUDA")
    finally:
        client.close()
