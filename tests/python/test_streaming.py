"""Triton's streaming inference (gRPC ModelStreamInfer) with the published clients:
tritonclient.grpc's start_stream / async_stream_infer (callbacks), tritonclient.grpc.aio's
stream_infer (an async generator), and the generated stub for the raw messages.

Every request on a stream is answered on it, in the order sent, with its id; a failed request
is answered with its error (error_message) and the stream goes on; closing the stream with
requests in flight leaves the server serving."""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from _models import add_sub_inputs

TIMEOUT_S = 30


def add_sub_request(client_module, batch: int, seed: int, shape: list[int] | None = None):
    data = add_sub_inputs(batch, seed)
    inputs = []
    for name, array in data.items():
        inp = client_module.InferInput(name, shape or list(array.shape), "FP32")
        if shape is None:
            inp.set_data_from_numpy(array)
        else:
            # A shape that does not match the data: the server must refuse this request only.
            inp._raw_content = array.tobytes()
            inp._input.ClearField("contents")
        inputs.append(inp)
    outputs = [client_module.InferRequestedOutput("OUTPUT0"), client_module.InferRequestedOutput("OUTPUT1")]
    return data, inputs, outputs


def check_add_sub(result, data) -> None:
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), data["INPUT0"] + data["INPUT1"], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), data["INPUT0"] - data["INPUT1"], rtol=1e-6)


def drain(answers: queue.Queue, count: int) -> list:
    out = []
    for _ in range(count):
        out.append(answers.get(timeout=TIMEOUT_S))
    return out


def test_stream_answers_every_request_in_order(server):
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        sent = {}
        for i in range(40):
            data, inputs, outputs = add_sub_request(grpcclient, 1 + i % 3, seed=i)
            sent[f"r{i}"] = data
            client.async_stream_infer("add_sub", inputs, outputs=outputs, request_id=f"r{i}")
        got = drain(answers, 40)
    finally:
        client.stop_stream()
        client.close()
    assert [error for _, error in got] == [None] * 40, [e for _, e in got if e][:3]
    ids = [result.get_response().id for result, _ in got]
    assert ids == [f"r{i}" for i in range(40)], ids
    for result, _ in got:
        response = result.get_response()
        assert response.model_name == "add_sub" and response.model_version == "1", response
        check_add_sub(result, sent[response.id])


def test_stream_failures_are_answered_and_the_stream_goes_on(server):
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        good, inputs, outputs = add_sub_request(grpcclient, 2, seed=7)
        client.async_stream_infer("add_sub", inputs, outputs=outputs, request_id="good-1")
        client.async_stream_infer("no_such_model", inputs, outputs=outputs, request_id="unknown")
        _, bad_inputs, _ = add_sub_request(grpcclient, 2, seed=8, shape=[2, 15])
        client.async_stream_infer("add_sub", bad_inputs, outputs=outputs, request_id="bad-shape")
        client.async_stream_infer("add_sub", inputs, model_version="99", request_id="bad-version")
        client.async_stream_infer("add_sub", inputs, outputs=outputs, request_id="good-2")
        got = drain(answers, 5)
    finally:
        client.stop_stream()
        client.close()
    (r1, e1), (_, e_unknown), (_, e_shape), (_, e_version), (r2, e2) = got
    assert e1 is None and e2 is None, (e1, e2)
    check_add_sub(r1, good)
    check_add_sub(r2, good)
    assert r1.get_response().id == "good-1" and r2.get_response().id == "good-2"
    for error, words in ((e_unknown, "no_such_model"), (e_shape, "INPUT0"), (e_version, "99")):
        assert isinstance(error, InferenceServerException), error
        assert words in error.message(), error.message()


def raw_requests(models: list[str], prefix: str):
    """ModelInferRequests for the generated stub: add_sub's inputs (typed contents) addressed to
    each model in turn, with ids prefix0, prefix1, ..."""
    data = add_sub_inputs(1, 3)
    for i, model in enumerate(models):
        req = service_pb2.ModelInferRequest(model_name=model, id=f"{prefix}{i}")
        for name, array in data.items():
            t = req.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
            t.contents.fp32_contents.extend(array.ravel().tolist())
        yield req


def test_stream_errors_carry_the_request_id_on_the_raw_stream(server):
    """The generated stub: each answer is a ModelStreamInferResponse; a failure has a non-empty
    error_message and names the request (id, model) it answers."""
    channel = grpc.insecure_channel(server.grpc_host)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    data = add_sub_inputs(1, 3)
    try:
        answers = list(stub.ModelStreamInfer(raw_requests(["add_sub", "missing", "add_sub"], "q"),
                                             timeout=TIMEOUT_S))
    finally:
        channel.close()
    assert [a.infer_response.id for a in answers] == ["q0", "q1", "q2"], answers
    assert [bool(a.error_message) for a in answers] == [False, True, False], answers
    assert answers[1].infer_response.model_name == "missing"
    assert "missing" in answers[1].error_message
    out = np.frombuffer(answers[0].infer_response.raw_output_contents[0], dtype=np.float32)
    np.testing.assert_allclose(out, (data["INPUT0"] + data["INPUT1"]).ravel(), rtol=1e-6)


def test_aio_stream_infer(server):
    async def run() -> list:
        client = aioclient.InferenceServerClient(url=server.grpc_host)
        sent = {}

        async def requests():
            for i in range(10):
                data, inputs, outputs = add_sub_request(aioclient, 1, seed=100 + i)
                sent[f"a{i}"] = data
                yield {"model_name": "add_sub", "inputs": inputs, "outputs": outputs,
                       "request_id": f"a{i}"}

        got = []
        try:
            async for result, error in client.stream_infer(inputs_iterator=requests()):
                assert error is None, error
                got.append((result.get_response().id, result, sent))
        finally:
            await client.close()
        return got

    got = asyncio.run(asyncio.wait_for(run(), TIMEOUT_S))
    assert [g[0] for g in got] == [f"a{i}" for i in range(10)]
    for rid, result, sent in got:
        check_add_sub(result, sent[rid])


def test_closing_a_stream_with_requests_in_flight_leaves_the_server_serving(server):
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    client.start_stream(callback=lambda result, error: None)
    for i in range(50):
        data, inputs, outputs = add_sub_request(grpcclient, 4, seed=200 + i)
        client.async_stream_infer("add_sub", inputs, outputs=outputs, request_id=f"c{i}")
    client.stop_stream(cancel_requests=True)
    client.close()
    # A new stream and a plain call both work.
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    try:
        data, inputs, outputs = add_sub_request(grpcclient, 1, seed=300)
        check_add_sub(client.infer("add_sub", inputs, outputs=outputs), data)
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("add_sub", inputs, outputs=outputs, request_id="after")
        (result, error), = drain(answers, 1)
        assert error is None, error
        check_add_sub(result, data)
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_stream_requests(server, compression):
    """tritonclient compresses stream requests when asked (compression_algorithm)."""
    client = grpcclient.InferenceServerClient(url=server.grpc_host)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)),
                        compression_algorithm=compression)
    try:
        data, inputs, outputs = add_sub_request(grpcclient, 3, seed=400)
        client.async_stream_infer("add_sub", inputs, outputs=outputs, request_id="z")
        (result, error), = drain(answers, 1)
    finally:
        client.stop_stream()
        client.close()
    assert error is None, error
    check_add_sub(result, data)


def test_triton_grpc_error_header_ends_the_stream_with_the_status(server):
    """Triton's `triton_grpc_error: true` header: the first failed request ends the stream with
    its gRPC status (here NOT_FOUND for an unknown model) instead of an error_message."""
    channel = grpc.insecure_channel(server.grpc_host)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    got = []
    try:
        with pytest.raises(grpc.RpcError) as e:
            for answer in stub.ModelStreamInfer(raw_requests(["add_sub", "missing", "add_sub"], "e"),
                                                timeout=TIMEOUT_S,
                                                metadata=[("triton_grpc_error", "true")]):
                got.append(answer)
    finally:
        channel.close()
    assert [a.infer_response.id for a in got] == ["e0"] and not got[0].error_message, got
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value
    assert "missing" in e.value.details()


def test_a_long_stream_holds_only_what_is_in_flight():
    """The in-flight byte budget charges a stream's messages as they arrive and gives each
    message's share back once it is answered: a stream carrying many times the budget (here
    1,000 requests, ~3 MiB charged in all, through a 1 MiB budget) is never refused."""
    from _server import ServerProcess

    server = ServerProcess("stream-budget", ["examples/models"],
                           ["--max-inflight-bytes", str(1 << 20)], tls_args=[], api_key="")
    server.start()
    try:
        client = grpcclient.InferenceServerClient(url=server.grpc_host)
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for i in range(1000):
                data, inputs, outputs = add_sub_request(grpcclient, 8, seed=i % 7)
                client.async_stream_infer("add_sub", inputs, outputs=outputs, request_id=str(i))
                if i % 50 == 49:
                    # Keep the client at most 50 ahead, as a real one paced by answers is.
                    for result, error in drain(answers, 50):
                        assert error is None, (i, error)
        finally:
            client.stop_stream()
            client.close()
    finally:
        server.stop()
