"""Bad input never crashes the server and always gets the right status and a clear message.

Each case is one row: an id, the request, the expected status (HTTP code or gRPC StatusCode)
and substrings of which at least one must appear in the error message (case-insensitive;
an empty tuple only requires a non-empty message). HTTP error bodies must be exactly
`{"error": "<non-empty message>"}` (Triton's shape). After every case the server must still be
live.

HTTP requests are sent raw with `requests`, so malformed bodies and headers can be sent; gRPC
requests go through the generated stubs that tritonclient ships (service_pb2_grpc): mostly
ModelInfer, plus the metadata, config, statistics and shared-memory RPCs (a case's request is
then built with `rpc(method, request)`). The shared-memory cases misuse one registered 64-byte
region (the `bad_region` fixture) or name regions and objects that do not exist. A case the
server is known to answer wrongly carries a strict xfail mark saying what it answers.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from _server import LIMITED_MAX_INPUT_SIZE

# ---------------------------------------------------------------------------------------
# request builders
# ---------------------------------------------------------------------------------------

INFER = "/v2/models/add_sub/infer"


def seq(n: int) -> list[float]:
    return [float(i) for i in range(n)]


def jin(name: str = "INPUT0", shape=(1, 16), datatype: str = "FP32", data=None, **extra) -> dict:
    """One JSON input tensor (add_sub-shaped by default)."""
    n = int(np.prod(shape)) if all(isinstance(d, int) and 0 <= d < 2**31 for d in shape) else 0
    t = {"name": name, "shape": list(shape), "datatype": datatype}
    t["data"] = seq(n) if data is None else data
    t.update(extra)
    return t


def add_sub(inputs=None, **extra) -> dict:
    req = {"inputs": inputs if inputs is not None else [jin("INPUT0"), jin("INPUT1")]}
    req.update(extra)
    return req


def jbody(obj) -> bytes:
    return json.dumps(obj).encode()


def f32(n: int, start: float = 0.0) -> bytes:
    return np.arange(start, start + n, dtype=np.float32).tobytes()


def bin_in(name: str, size: int, shape=(1, 16), datatype: str = "FP32") -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype,
            "parameters": {"binary_data_size": size}}


def binary(header: dict, *chunks: bytes, header_len=None):
    """Triton binary tensor body: JSON header, then tensor bytes; returns (body, headers)."""
    h = jbody(header)
    hl = str(len(h)) if header_len is None else str(header_len)
    return h + b"".join(chunks), {"Inference-Header-Content-Length": hl,
                                  "Content-Type": "application/octet-stream"}


def bytes_elem(s: bytes) -> bytes:
    return struct.pack("<I", len(s)) + s


@dataclass
class HttpCase:
    id: str
    make: Callable[[], tuple]  # -> (body bytes | iterator | None, extra headers dict)
    status: int
    message: tuple = ()
    method: str = "POST"
    path: str = INFER
    server: str = "main"  # "main" or "limited" (--http-max-input-size 4096)


def j(obj, **headers):
    return lambda: (jbody(obj), headers)


def raw(body: bytes, **headers):
    return lambda: (body, headers)


def gz_bomb() -> tuple:
    # ~1 MB of JSON whitespace compresses to ~1 KiB: under the 4096-byte limit on the wire,
    # far over it once decompressed.
    body = gzip.compress(b'{"inputs": [' + b" " * 1_000_000 + b"]}", compresslevel=9)
    assert len(body) < LIMITED_MAX_INPUT_SIZE, len(body)
    return body, {"Content-Encoding": "gzip"}


def over_limit_chunked() -> tuple:
    payload = jbody(add_sub()) + b" " * 2 * LIMITED_MAX_INPUT_SIZE
    # A generator body makes `requests` use chunked transfer encoding (no Content-Length),
    # so the limit must be enforced while reading, not just from the header.
    return iter([payload[i:i + 1024] for i in range(0, len(payload), 1024)]), {}


VALID_HEADER_2 = {"inputs": [bin_in("INPUT0", 64), bin_in("INPUT1", 64)]}

HTTP_CASES = [
    # JSON nested deeper than serde_json's 128 levels, in a tensor's data and in the request.
    HttpCase("json_nested_too_deep_data",
             raw(b'{"inputs":[{"name":"INPUT0","shape":[1,16],"datatype":"FP32","data":'
                 + b"[" * 5000 + b"]" * 5000 + b"}]}"),
             400, ("INPUT0", "nested deeper than 128 levels")),
    HttpCase("json_nested_too_deep_request",
             raw(b'{"parameters":{"x":' + b"[" * 5000 + b"]" * 5000 + b'},"inputs":[]}'),
             400, ("nested deeper than 128 levels",)),
    # --- JSON syntax / structure
    HttpCase("malformed_json", raw(b'{"inputs": ['), 400),
    HttpCase("json_not_object", raw(b"[1, 2, 3]"), 400),
    HttpCase("json_trailing_garbage", raw(jbody(add_sub()) + b"xyz"), 400),
    HttpCase("empty_body", raw(b""), 400),
    HttpCase("inputs_not_array", j({"inputs": jin("INPUT0")}), 400),
    HttpCase("missing_data", j(add_sub([{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32"},
                                        jin("INPUT1")])), 400, ("INPUT0", "data")),
    # --- datatypes
    HttpCase("wrong_datatype_name", j(add_sub([jin("INPUT0", datatype="FLOAT32"), jin("INPUT1")])),
             400, ("FLOAT32", "datatype", "data type")),
    HttpCase("dtype_not_matching_model",
             j(add_sub([jin("INPUT0", datatype="INT32", data=list(range(16))), jin("INPUT1")])),
             400, ("INT32", "FP32", "datatype", "data type")),
    HttpCase("bytes_into_fp32",
             j(add_sub([jin("INPUT0", datatype="BYTES", data=["a"] * 16), jin("INPUT1")])),
             400, ("BYTES", "FP32", "datatype", "data type")),
    HttpCase("string_in_fp32_data", j(add_sub([jin("INPUT0", data=["x"] * 16), jin("INPUT1")])), 400),
    HttpCase("fp16_in_json", j({"inputs": [jin("INPUT0", shape=(1, 4), datatype="FP16", data=[1.0] * 4)]}),
             400, ("FP16", "JSON", "binary"), path="/v2/models/fp16_double/infer"),
    HttpCase("bytes_element_not_string", j({"inputs": [jin("INPUT0", shape=(1, 1), datatype="BYTES", data=[5])]}),
             400, path="/v2/models/string_identity/infer"),
    HttpCase("int8_out_of_range",
             j({"inputs": [jin("INPUT0", shape=(1, 4), datatype="INT8", data=[1, 2, 300, 4])]}),
             400, ("300", "INT8", "range"), path="/v2/models/int8_identity/infer", server="limited"),
    HttpCase("int8_fractional",
             j({"inputs": [jin("INPUT0", shape=(1, 4), datatype="INT8", data=[1, 2.5, 3, 4])]}),
             400, path="/v2/models/int8_identity/infer", server="limited"),
    HttpCase("int64_out_of_range",
             j({"inputs": [jin("A", shape=(3,), datatype="INT64", data=[2**63, 0, 0]),
                           jin("B", shape=(3,), datatype="FP64", data=[0.0, 0.0, 0.0])]}),
             400, path="/v2/models/mixed_types/infer"),
    HttpCase("fp64_out_of_range",
             raw(b'{"inputs": [{"name": "A", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]},'
                 b' {"name": "B", "shape": [3], "datatype": "FP64", "data": [1e400, 0, 0]}]}'),
             400, path="/v2/models/mixed_types/infer"),
    # --- shapes and element counts
    HttpCase("wrong_shape", j(add_sub([jin("INPUT0", shape=(1, 15)), jin("INPUT1")])), 400, ("shape",)),
    # Triton reads dim 0 as the batch size, so this can be reported as a batch-size error.
    HttpCase("wrong_rank_no_batch_dim", j(add_sub([jin("INPUT0", shape=(16,)), jin("INPUT1")])), 400, ("shape", "batch")),
    HttpCase("element_count_not_matching_shape",
             j(add_sub([jin("INPUT0", data=seq(15)), jin("INPUT1")])),
             400, ("shape", "element", "size", "count", "expected")),
    HttpCase("shape_product_overflows", j(add_sub([jin("INPUT0", shape=(2**62, 2**62), data=[]), jin("INPUT1")])), 400),
    HttpCase("shape_dim_over_u64", j(add_sub([jin("INPUT0", shape=(2**64, 16), data=[]), jin("INPUT1")])), 400),
    HttpCase("negative_dim", j(add_sub([jin("INPUT0", shape=(-1, 16), data=seq(16)), jin("INPUT1")])), 400),
    HttpCase("shape_not_integers", j(add_sub([jin("INPUT0", shape=("1", "16"), data=seq(16)), jin("INPUT1")])), 400),
    HttpCase("batch_over_max_batch_size",
             j(add_sub([jin("INPUT0", shape=(9, 16)), jin("INPUT1", shape=(9, 16))])),
             400, ("batch", "max_batch_size", "9")),
    # --- names
    HttpCase("unknown_model", j(add_sub()), 404, ("no_such_model",), path="/v2/models/no_such_model/infer"),
    HttpCase("unknown_version", j(add_sub()), 404, ("version", "7"), path="/v2/models/add_sub/versions/7/infer"),
    HttpCase("unknown_input", j(add_sub([jin("INPUT0"), jin("INPUT1"), jin("BOGUS")])), 400, ("BOGUS",)),
    HttpCase("unknown_requested_output", j(add_sub(outputs=[{"name": "BOGUS_OUT"}])), 400, ("BOGUS_OUT",)),
    HttpCase("missing_input", j(add_sub([jin("INPUT0")])), 400, ("INPUT1",)),
    HttpCase("duplicate_input", j(add_sub([jin("INPUT0"), jin("INPUT0"), jin("INPUT1")])), 400, ("INPUT0", "duplicate")),
    # --- classification
    HttpCase("classification_on_bytes_output",
             j({"inputs": [jin("INPUT0", shape=(1, 1), datatype="BYTES", data=["a"])],
                "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 1}}]}),
             400, ("classification", "BYTES"), path="/v2/models/string_identity/infer"),
    # --- binary tensor extension
    HttpCase("binary_size_past_end_of_body", lambda: binary(VALID_HEADER_2, f32(16), f32(8)), 400),
    HttpCase("binary_section_longer_than_claimed",
             lambda: binary(VALID_HEADER_2, f32(16), f32(16), b"\x00" * 8), 400),
    HttpCase("binary_size_not_matching_shape",
             lambda: binary({"inputs": [bin_in("INPUT0", 60), bin_in("INPUT1", 64)]}, f32(15), f32(16)), 400),
    HttpCase("header_length_past_body",
             lambda: binary(VALID_HEADER_2, f32(16), f32(16), header_len=10_000), 400),
    HttpCase("header_length_not_a_number",
             lambda: binary(VALID_HEADER_2, f32(16), f32(16), header_len="abc"), 400),
    HttpCase("header_length_negative",
             lambda: binary(VALID_HEADER_2, f32(16), f32(16), header_len=-5), 400),
    HttpCase("binary_data_without_header_length",
             lambda: (jbody(VALID_HEADER_2) + f32(16) + f32(16), {}), 400),
    HttpCase("raw_binary_request_with_two_inputs",
             lambda: (f32(16) + f32(16), {"Inference-Header-Content-Length": "0"}), 400),
    HttpCase("bytes_bad_length_prefix",
             lambda: binary({"inputs": [bin_in("INPUT0", 7, shape=(1, 1), datatype="BYTES")]},
                            struct.pack("<I", 100) + b"abc"),
             400, path="/v2/models/string_identity/infer"),
    HttpCase("bytes_truncated_length_prefix",
             lambda: binary({"inputs": [bin_in("INPUT0", 2, shape=(1, 1), datatype="BYTES")]}, b"\x01\x00"),
             400, path="/v2/models/string_identity/infer"),
    HttpCase("bytes_fewer_elements_than_shape",
             lambda: binary({"inputs": [bin_in("INPUT0", 7, shape=(2, 1), datatype="BYTES")]}, bytes_elem(b"abc")),
             400, path="/v2/models/string_identity/infer"),
    # --- content encoding
    HttpCase("content_encoding_br_unsupported", j(add_sub(), **{"Content-Encoding": "br"}), 400, ("br", "encoding")),
    HttpCase("corrupt_gzip",
             raw(gzip.compress(jbody(add_sub()))[:20] + b"garbage" * 10, **{"Content-Encoding": "gzip"}), 400),
    HttpCase("gzip_header_on_plain_body", j(add_sub(), **{"Content-Encoding": "gzip"}), 400),
    HttpCase("corrupt_deflate", raw(b"\x78\x9c" + b"not deflate data", **{"Content-Encoding": "deflate"}), 400),
    # --- routes and methods
    HttpCase("get_on_infer_url", lambda: (None, {}), 405, method="GET"),
    HttpCase("unknown_route_get", lambda: (None, {}), 404, method="GET", path="/v2/no/such/route"),
    HttpCase("unknown_route_post", j(add_sub()), 404, path="/definitely/not/a/route"),
    # --- body size limit (server started with --http-max-input-size 4096)
    HttpCase("body_over_limit",
             lambda: (jbody(add_sub()) + b" " * 2 * LIMITED_MAX_INPUT_SIZE, {}), 413, server="limited"),
    HttpCase("body_over_limit_chunked", over_limit_chunked, 413, server="limited"),
    HttpCase("gzip_bomb_over_limit", gz_bomb, 413, server="limited"),
]


def check_error_body(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        pytest.fail(f"HTTP {resp.status_code}: error body is not JSON: {resp.content[:300]!r}")
    assert isinstance(body, dict) and set(body) == {"error"}, f"error body is not {{\"error\": ...}}: {body!r}"
    ctype = resp.headers.get("Content-Type", "")
    assert ctype.split(";")[0].strip() == "application/json", f"error Content-Type {ctype!r}"
    msg = body["error"]
    assert isinstance(msg, str) and msg.strip(), f"empty error message: {body!r}"
    return msg


def check_message(msg: str, expected: tuple) -> None:
    if expected:
        low = msg.lower()
        assert any(s.lower() in low for s in expected), \
            f"message {msg!r} mentions none of {expected!r}"


def assert_http_live(srv) -> None:
    assert srv.alive(), "server process died"
    r = requests.get(srv.http_url + "/v2/health/live", timeout=10)
    assert r.status_code == 200, f"/v2/health/live -> {r.status_code} after the bad request"


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_http_bad_input(request, case: HttpCase):
    srv = request.getfixturevalue("server" if case.server == "main" else "limited_server")
    body, headers = case.make()
    resp = requests.request(case.method, srv.http_url + case.path, data=body, headers=headers, timeout=30)
    assert resp.status_code == case.status, \
        f"{case.id}: HTTP {resp.status_code} {resp.content[:300]!r}, want {case.status}"
    msg = check_error_body(resp)
    check_message(msg, case.message)
    assert_http_live(srv)


def test_limited_server_still_serves_small_requests(limited_server):
    """The 413 cases are about size: a normal request on the same server succeeds."""
    r = requests.post(limited_server.http_url + INFER, data=jbody(add_sub()), timeout=30)
    assert r.status_code == 200, r.text
    r = requests.post(limited_server.http_url + INFER, data=gzip.compress(jbody(add_sub())),
                      headers={"Content-Encoding": "gzip"}, timeout=30)
    assert r.status_code == 200, r.text


def test_grpc_message_over_limit_is_resource_exhausted(limited_server):
    """A gRPC message over --http-max-input-size is refused with RESOURCE_EXHAUSTED, as gRPC
    core and Triton answer it (tonic's own answer would be OUT_OF_RANGE), through the published
    tritonclient as well as a raw stub; a normal request on the same server still succeeds."""
    big = grpc_add_sub(batch=8)  # 2 x 8 x 16 FP32 = 1 KiB of raw contents
    big.parameters["padding"].string_param = "x" * (2 * LIMITED_MAX_INPUT_SIZE)
    channel = grpc.insecure_channel(limited_server.grpc_host)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(big, timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
        assert e.value.details(), "empty gRPC error message"
        out = stub.ModelInfer(grpc_add_sub(), timeout=30)
        assert len(out.raw_output_contents) == 2
    finally:
        channel.close()

    client = grpcclient.InferenceServerClient(limited_server.grpc_host)
    x = np.zeros((8, 256), dtype=np.float32)  # 8 KiB per input, over the 4 KiB limit
    inputs = [grpcclient.InferInput(n, [8, 256], "FP32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        client.infer("add_sub", inputs)
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", (e.value.status(), e.value.message())
    assert client.is_server_live()


NON_NUMERIC_VERSIONS = ["abc", "1x", "1.0"]


def test_non_numeric_version_is_400_everywhere(server):
    """Triton's URL regex only matches numeric versions (so it answers 404 "no such route");
    oxserve answers 400 / INVALID_ARGUMENT ("not a number"), which is defensible too. This pins
    that choice so it stays consistent: for every non-numeric version, for inference, metadata
    and readiness alike, with a JSON error naming the version, and the same over gRPC."""
    for v in NON_NUMERIC_VERSIONS:
        base = f"{server.http_url}/v2/models/add_sub/versions/{v}"
        for method, url, body in [("POST", base + "/infer", jbody(add_sub())), ("GET", base, None),
                                  ("GET", base + "/ready", None)]:
            r = requests.request(method, url, data=body, timeout=30)
            assert r.status_code == 400, (method, url, r.status_code, r.text)
            check_message(check_error_body(r), (v,))
    channel = grpc.insecure_channel(server.grpc_host)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        for v in NON_NUMERIC_VERSIONS:
            req = grpc_add_sub()
            req.model_version = v
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (v, e.value.code(), e.value.details())
            check_message(e.value.details(), (v,))
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="add_sub", version=v), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (v, e.value.code(), e.value.details())
    finally:
        channel.close()
    assert_http_live(server)


# ---------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------

def grpc_add_sub(batch: int = 1, raw: bool = True, names=("INPUT0", "INPUT1")) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for i, name in enumerate(names):
        t = req.inputs.add(name=name, datatype="FP32", shape=[batch, 16])
        if raw:
            req.raw_input_contents.append(f32(16 * batch, start=i))
        else:
            t.contents.fp32_contents.extend(seq(16 * batch))
    return req


def g_unknown_model():
    req = grpc_add_sub()
    req.model_name = "no_such_model"
    return req


def g_unknown_version():
    req = grpc_add_sub()
    req.model_version = "7"
    return req


def g_shape(shape):
    def make():
        req = grpc_add_sub()
        del req.inputs[0].shape[:]
        req.inputs[0].shape.extend(shape)
        return req
    return make


def g_raw_count_mismatch():
    req = grpc_add_sub()
    del req.raw_input_contents[1]
    return req


def g_raw_plus_typed():
    req = grpc_add_sub()
    req.inputs[0].contents.fp32_contents.extend(seq(16))
    return req


def g_unknown_input():
    req = grpc_add_sub(names=("INPUT0", "INPUT1", "BOGUS"))
    return req


def g_unknown_output():
    req = grpc_add_sub()
    req.outputs.add(name="BOGUS_OUT")
    return req


def g_missing_input():
    return grpc_add_sub(names=("INPUT0",))


def g_duplicate_input():
    return grpc_add_sub(names=("INPUT0", "INPUT0", "INPUT1"))


def g_datatype(datatype):
    def make():
        req = grpc_add_sub()
        req.inputs[0].datatype = datatype
        return req
    return make


def g_raw_size_mismatch():
    req = grpc_add_sub()
    req.raw_input_contents[0] = f32(15)
    return req


def g_typed_count_mismatch():
    req = grpc_add_sub(raw=False)
    del req.inputs[0].contents.fp32_contents[-1]
    return req


def g_typed_wrong_field():
    req = grpc_add_sub(raw=False)
    req.inputs[0].contents.ClearField("fp32_contents")
    req.inputs[0].contents.int_contents.extend(range(16))
    return req


def g_no_contents():
    req = grpc_add_sub(raw=False)
    req.inputs[0].ClearField("contents")
    return req


def g_batch_too_large():
    return grpc_add_sub(batch=9)


def g_bytes_bad_prefix():
    req = service_pb2.ModelInferRequest(model_name="string_identity")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(struct.pack("<I", 100) + b"abc")
    return req


def g_fp16_typed():
    req = service_pb2.ModelInferRequest(model_name="fp16_double")
    t = req.inputs.add(name="INPUT0", datatype="FP16", shape=[1, 4])
    t.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    return req


def g_classification_bytes():
    req = service_pb2.ModelInferRequest(model_name="string_identity")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(bytes_elem(b"abc"))
    out = req.outputs.add(name="OUTPUT0")
    out.parameters["classification"].int64_param = 1
    return req


def g_int64_into_fp32():
    req = grpc_add_sub(raw=False)
    req.inputs[0].datatype = "INT64"
    req.inputs[0].contents.ClearField("fp32_contents")
    req.inputs[0].contents.int64_contents.extend(range(16))
    return req


def g_raw_extra_contents():
    req = grpc_add_sub()
    req.raw_input_contents.append(f32(16))
    return req


def g_raw(index: int, data: bytes):
    def make():
        req = grpc_add_sub()
        req.raw_input_contents[index] = data
        return req
    return make


def g_typed_too_many():
    req = grpc_add_sub(raw=False)
    req.inputs[0].contents.fp32_contents.append(16.0)
    return req


def g_typed_bytes_field_for_fp32():
    req = grpc_add_sub(raw=False)
    req.inputs[0].contents.ClearField("fp32_contents")
    req.inputs[0].contents.bytes_contents.extend([b"abcd"] * 16)
    return req


def g_typed_two_fields():
    req = grpc_add_sub(raw=False)
    req.inputs[0].contents.int_contents.extend(range(16))
    return req


def g_model(name: str = "add_sub", version: str = ""):
    def make():
        req = grpc_add_sub()
        req.model_name = name
        req.model_version = version
        return req
    return make


def string_request(*raw_chunks: bytes, shape=(1, 1)) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="string_identity")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=list(shape))
    req.raw_input_contents.extend(raw_chunks)
    return req


def g_bytes_typed_count_mismatch():
    req = service_pb2.ModelInferRequest(model_name="string_identity")
    t = req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 1])
    t.contents.bytes_contents.extend([b"a", b"b"])
    return req


def set_param(params, key: str, value) -> None:
    """Sets one InferParameter by the Python type of `value` (bool before int: bool is an int)."""
    if isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    elif isinstance(value, float):
        params[key].double_param = value
    elif isinstance(value, str):
        params[key].string_param = value
    elif value is None:
        params[key].CopyFrom(service_pb2.InferParameter())  # no value in the oneof
    else:
        raise TypeError(value)


def g_output_params(output: str = "OUTPUT0", **params):
    def make():
        req = grpc_add_sub()
        out = req.outputs.add(name=output)
        for k, v in params.items():
            set_param(out.parameters, k, v)
        return req
    return make


def g_request_params(**params):
    def make():
        req = grpc_add_sub()
        for k, v in params.items():
            set_param(req.parameters, k, v)
        return req
    return make


BAD_REGION = "bad_input_region"  # registered by the `bad_region` fixture, 64 bytes
BAD_REGION_SIZE = 64


def g_input_shm(with_raw: bool = False, **params):
    """INPUT0 read from shared memory (its raw contents dropped unless `with_raw`)."""
    def make():
        req = grpc_add_sub()
        if not with_raw:
            del req.raw_input_contents[0]
        for k, v in params.items():
            set_param(req.inputs[0].parameters, k, v)
        return req
    return make


def g_duplicate_output():
    req = grpc_add_sub()
    req.outputs.add(name="OUTPUT0")
    req.outputs.add(name="OUTPUT0")
    return req


def g_empty_input_name():
    req = grpc_add_sub()
    req.inputs[0].name = ""
    return req


def g_fp16_raw_wrong_size():
    req = service_pb2.ModelInferRequest(model_name="fp16_double")
    req.inputs.add(name="INPUT0", datatype="FP16", shape=[1, 4])
    req.raw_input_contents.append(f32(4))  # 16 bytes, FP16 [1, 4] is 8
    return req


def g_mixed_types_wrong_dtype():
    req = service_pb2.ModelInferRequest(model_name="mixed_types")
    a = req.inputs.add(name="A", datatype="INT64", shape=[3])
    a.contents.int64_contents.extend([1, 2, 3])
    b = req.inputs.add(name="B", datatype="FP32", shape=[3])
    b.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    return req


def g_reshape_shape_instead_of_dims():
    req = service_pb2.ModelInferRequest(model_name="reshape_model")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2, 2])
    req.raw_input_contents.append(f32(4))
    return req


def g_iris_wrong_width():
    req = service_pb2.ModelInferRequest(model_name="iris")
    req.inputs.add(name="features", datatype="FP32", shape=[1, 5])
    req.raw_input_contents.append(f32(5))
    return req


# Requests of the other RPCs: (method name on the stub, request message).
def rpc(method: str, request):
    return lambda: (method, request)


SHM_KEY_MISSING = "/oxserve_bad_input_no_such_object"


@dataclass
class GrpcCase:
    id: str
    make: Callable[[], object]  # -> ModelInferRequest, or (stub method name, request) via rpc()
    code: grpc.StatusCode
    message: tuple = field(default=())
    marks: tuple = field(default=())


INVALID = grpc.StatusCode.INVALID_ARGUMENT

GRPC_CASES = [
    GrpcCase("unknown_model", g_unknown_model, grpc.StatusCode.NOT_FOUND, ("no_such_model",)),
    GrpcCase("unknown_version", g_unknown_version, grpc.StatusCode.NOT_FOUND, ("version", "7")),
    GrpcCase("negative_dim", g_shape([-1, 16]), INVALID),
    GrpcCase("negative_dim_large", g_shape([1, -16]), INVALID),
    GrpcCase("shape_product_overflows", g_shape([2**62, 2**62]), INVALID),
    GrpcCase("shape_int64_max", g_shape([2**63 - 1, 16]), INVALID),
    GrpcCase("wrong_shape", g_shape([1, 15]), INVALID, ("shape",)),
    GrpcCase("raw_count_not_matching_inputs", g_raw_count_mismatch, INVALID),
    GrpcCase("raw_plus_typed_contents", g_raw_plus_typed, INVALID),
    GrpcCase("unknown_input", g_unknown_input, INVALID, ("BOGUS",)),
    GrpcCase("unknown_requested_output", g_unknown_output, INVALID, ("BOGUS_OUT",)),
    GrpcCase("missing_input", g_missing_input, INVALID, ("INPUT1",)),
    GrpcCase("duplicate_input", g_duplicate_input, INVALID, ("INPUT0", "duplicate")),
    GrpcCase("wrong_datatype_name", g_datatype("FLOAT32"), INVALID, ("FLOAT32", "datatype", "data type")),
    GrpcCase("dtype_not_matching_model", g_datatype("INT32"), INVALID, ("INT32", "FP32", "datatype", "data type")),
    GrpcCase("typed_dtype_not_matching_model", g_int64_into_fp32, INVALID, ("INT64", "FP32", "datatype", "data type")),
    GrpcCase("raw_size_not_matching_shape", g_raw_size_mismatch, INVALID),
    GrpcCase("typed_count_not_matching_shape", g_typed_count_mismatch, INVALID),
    GrpcCase("typed_contents_wrong_field", g_typed_wrong_field, INVALID),
    GrpcCase("no_contents", g_no_contents, INVALID, ("INPUT0",)),
    GrpcCase("batch_over_max_batch_size", g_batch_too_large, INVALID, ("batch", "max_batch_size", "9")),
    GrpcCase("bytes_bad_length_prefix", g_bytes_bad_prefix, INVALID),
    GrpcCase("fp16_in_typed_contents", g_fp16_typed, INVALID),
    GrpcCase("classification_on_bytes_output", g_classification_bytes, INVALID, ("classification", "BYTES")),
    # --- raw_input_contents: count and size
    GrpcCase("raw_contents_more_than_inputs", g_raw_extra_contents, INVALID, ("raw",)),
    GrpcCase("raw_size_too_large", g_raw(0, f32(17)), INVALID, ("INPUT0",)),
    GrpcCase("raw_size_not_multiple_of_element", g_raw(1, f32(16)[:-1]), INVALID, ("INPUT1",)),
    GrpcCase("raw_contents_empty", g_raw(0, b""), INVALID, ("INPUT0",)),
    GrpcCase("fp16_raw_wrong_size", g_fp16_raw_wrong_size, INVALID, ("INPUT0",)),
    # --- typed contents
    GrpcCase("typed_count_too_many", g_typed_too_many, INVALID, ("INPUT0",)),
    GrpcCase("typed_bytes_contents_for_fp32", g_typed_bytes_field_for_fp32, INVALID, ("INPUT0",)),
    GrpcCase("typed_contents_two_fields", g_typed_two_fields, INVALID, ("INPUT0",)),
    GrpcCase("typed_fp32_for_fp64_input", g_mixed_types_wrong_dtype, INVALID, ("FP32", "FP64", "datatype", "data type")),
    # --- datatypes and shapes
    GrpcCase("empty_datatype", g_datatype(""), INVALID, ("datatype", "data type")),
    GrpcCase("lowercase_datatype", g_datatype("fp32"), INVALID, ("fp32", "datatype", "data type")),
    GrpcCase("empty_shape", g_shape([]), INVALID, ("shape", "batch")),
    GrpcCase("rank_too_high", g_shape([1, 16, 1]), INVALID, ("shape",)),
    GrpcCase("dim_int64_min", g_shape([1, -2**63]), INVALID, ("negative",)),
    GrpcCase("reshape_shape_instead_of_dims", g_reshape_shape_instead_of_dims, INVALID, ("shape",)),
    GrpcCase("iris_wrong_feature_count", g_iris_wrong_width, INVALID, ("shape",)),
    # --- BYTES
    GrpcCase("bytes_truncated_length_prefix", lambda: string_request(b"\x01\x00"), INVALID, ("INPUT0",)),
    GrpcCase("bytes_fewer_elements_than_shape",
             lambda: string_request(bytes_elem(b"abc"), shape=(2, 1)), INVALID, ("INPUT0",)),
    GrpcCase("bytes_trailing_garbage", lambda: string_request(bytes_elem(b"abc") + b"\xff\xff"), INVALID,
             ("INPUT0",)),
    GrpcCase("bytes_typed_count_not_matching_shape", g_bytes_typed_count_mismatch, INVALID, ("INPUT0",)),
    # --- model names and versions
    GrpcCase("empty_model_name", g_model(""), grpc.StatusCode.NOT_FOUND, ("model",)),
    GrpcCase("non_numeric_version", g_model(version="abc"), INVALID, ("abc",)),
    GrpcCase("negative_version", g_model(version="-1"), INVALID, ("-1",)),
    GrpcCase("version_over_u64", g_model(version=str(2**64)), INVALID, (str(2**64),)),
    # --- names of inputs and outputs
    GrpcCase("empty_input_name", g_empty_input_name, INVALID, ("input",)),
    GrpcCase("duplicate_output", g_duplicate_output, INVALID, ("OUTPUT0", "duplicate")),
    GrpcCase("input_name_as_output", g_output_params("INPUT0"), INVALID, ("INPUT0",)),
    # --- request and output parameters
    GrpcCase("classification_string", g_output_params(classification="two"), INVALID, ("classification",)),
    GrpcCase("classification_negative", g_output_params(classification=-1), INVALID, ("classification",)),
    GrpcCase("classification_bool", g_output_params(classification=True), INVALID, ("classification",)),
    GrpcCase("classification_no_value", g_output_params(classification=None), INVALID, ("classification",)),
    GrpcCase("binary_data_int", g_output_params(binary_data=1), INVALID, ("binary_data",)),
    GrpcCase("binary_data_output_string", g_request_params(binary_data_output="yes"), INVALID,
             ("binary_data_output",)),
    # --- shared-memory parameters (BAD_REGION is a registered 64-byte region)
    GrpcCase("shm_input_unknown_region",
             g_input_shm(shared_memory_region="no_such_region", shared_memory_byte_size=64),
             grpc.StatusCode.NOT_FOUND, ("no_such_region",)),
    GrpcCase("shm_output_unknown_region",
             g_output_params(shared_memory_region="no_such_region", shared_memory_byte_size=64),
             grpc.StatusCode.NOT_FOUND, ("no_such_region",)),
    GrpcCase("shm_region_not_a_string",
             g_input_shm(shared_memory_region=5, shared_memory_byte_size=64), INVALID, ("shared_memory_region",)),
    GrpcCase("shm_byte_size_string",
             g_input_shm(shared_memory_region=BAD_REGION, shared_memory_byte_size="64"), INVALID,
             ("shared_memory_byte_size",)),
    GrpcCase("shm_byte_size_missing", g_input_shm(shared_memory_region=BAD_REGION), INVALID,
             ("shared_memory_byte_size",)),
    GrpcCase("shm_offset_negative",
             g_input_shm(shared_memory_region=BAD_REGION, shared_memory_byte_size=64, shared_memory_offset=-4),
             INVALID, ("shared_memory_offset",)),
    GrpcCase("shm_offset_double",
             g_input_shm(shared_memory_region=BAD_REGION, shared_memory_byte_size=64, shared_memory_offset=0.5),
             INVALID, ("shared_memory_offset",)),
    GrpcCase("shm_offset_without_region", g_input_shm(with_raw=True, shared_memory_offset=0), INVALID,
             ("shared_memory_region",)),
    GrpcCase("shm_offset_past_region_end",
             g_input_shm(shared_memory_region=BAD_REGION, shared_memory_byte_size=64, shared_memory_offset=128),
             INVALID, ("offset", "size", "region")),
    GrpcCase("shm_byte_size_over_region",
             g_input_shm(shared_memory_region=BAD_REGION, shared_memory_byte_size=2**40), INVALID,
             ("size", "region")),
    GrpcCase("shm_byte_size_not_matching_shape",
             g_input_shm(shared_memory_region=BAD_REGION, shared_memory_byte_size=32), INVALID, ("INPUT0",)),
    GrpcCase("shm_input_and_raw_contents",
             g_input_shm(with_raw=True, shared_memory_region=BAD_REGION, shared_memory_byte_size=64), INVALID,
             ("raw_input_contents", "shared memory")),
    GrpcCase("shm_output_with_classification",
             g_output_params(shared_memory_region=BAD_REGION, shared_memory_byte_size=64, classification=1),
             INVALID, ("classification", "shared memory")),
    # --- the other RPCs
    GrpcCase("metadata_unknown_model", rpc("ModelMetadata", service_pb2.ModelMetadataRequest(name="no_such_model")),
             grpc.StatusCode.NOT_FOUND, ("no_such_model",)),
    GrpcCase("metadata_unknown_version",
             rpc("ModelMetadata", service_pb2.ModelMetadataRequest(name="add_sub", version="7")),
             grpc.StatusCode.NOT_FOUND, ("7", "version")),
    GrpcCase("ready_non_numeric_version",
             rpc("ModelReady", service_pb2.ModelReadyRequest(name="add_sub", version="abc")), INVALID, ("abc",)),
    GrpcCase("config_unknown_model", rpc("ModelConfig", service_pb2.ModelConfigRequest(name="no_such_model")),
             grpc.StatusCode.NOT_FOUND, ("no_such_model",)),
    GrpcCase("config_unknown_version",
             rpc("ModelConfig", service_pb2.ModelConfigRequest(name="add_sub", version="7")),
             grpc.StatusCode.NOT_FOUND, ("7", "version")),
    GrpcCase("statistics_unknown_model",
             rpc("ModelStatistics", service_pb2.ModelStatisticsRequest(name="no_such_model")),
             grpc.StatusCode.NOT_FOUND, ("no_such_model",)),
    GrpcCase("statistics_unknown_version",
             rpc("ModelStatistics", service_pb2.ModelStatisticsRequest(name="add_sub", version="7")),
             grpc.StatusCode.NOT_FOUND, ("7", "version")),
    GrpcCase("shm_register_missing_object",
             rpc("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
                 name="r_missing", key=SHM_KEY_MISSING, offset=0, byte_size=64)),
             INVALID, ("oxserve_bad_input_no_such_object",)),
    GrpcCase("shm_register_key_outside_prefix",
             rpc("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
                 name="r_outside", key="/not_ours_bad_input", offset=0, byte_size=64)),
             grpc.StatusCode.PERMISSION_DENIED, ("not_ours_bad_input", "prefix")),
    GrpcCase("shm_register_empty_name",
             rpc("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
                 name="", key="/oxserve_bad_input_region", offset=0, byte_size=64)),
             INVALID, ("name",)),
    GrpcCase("shm_register_duplicate_name",
             rpc("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
                 name=BAD_REGION, key="/oxserve_bad_input_region", offset=0, byte_size=64)),
             INVALID, (BAD_REGION, "already")),
    GrpcCase("shm_register_past_object_end",
             rpc("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
                 name="r_past_end", key="/oxserve_bad_input_region", offset=32, byte_size=64)),
             INVALID, ("size", "offset")),
    GrpcCase("shm_register_huge_byte_size",
             rpc("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
                 name="r_huge", key="/oxserve_bad_input_region", offset=0, byte_size=2**63)),
             INVALID, ("size",)),
    GrpcCase("shm_register_offset_overflow",
             rpc("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
                 name="r_overflow", key="/oxserve_bad_input_region", offset=2**64 - 8, byte_size=64)),
             INVALID, ("offset", "size")),
    GrpcCase("shm_status_unknown_region",
             rpc("SystemSharedMemoryStatus", service_pb2.SystemSharedMemoryStatusRequest(name="no_such_region")),
             grpc.StatusCode.NOT_FOUND, ("no_such_region",)),
    # No CUDA shared memory here: registering is refused with the reason, a named region is
    # NOT_FOUND, as the HTTP endpoints answer.
    GrpcCase("cuda_shm_register_unsupported",
             rpc("CudaSharedMemoryRegister", service_pb2.CudaSharedMemoryRegisterRequest(
                 name="cuda_region", raw_handle=b"handle", device_id=0, byte_size=64)),
             grpc.StatusCode.UNIMPLEMENTED, ("cuda_region", "CUDA")),
    GrpcCase("cuda_shm_status_unknown_region",
             rpc("CudaSharedMemoryStatus", service_pb2.CudaSharedMemoryStatusRequest(name="no_such_region")),
             grpc.StatusCode.NOT_FOUND, ("no_such_region",)),
    GrpcCase("repository_load_unsupported",
             rpc("RepositoryModelLoad", service_pb2.RepositoryModelLoadRequest(model_name="add_sub")),
             grpc.StatusCode.UNIMPLEMENTED, ("add_sub", "load", "model control mode 'none'")),
]


@pytest.fixture(scope="module")
def grpc_stub(server):
    channel = grpc.insecure_channel(server.grpc_host)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def bad_region(grpc_stub):
    """A 64-byte shared-memory object registered as BAD_REGION, for the cases that misuse a
    region that does exist."""
    key = "/oxserve_bad_input_region"
    handle = shm.create_shared_memory_region(BAD_REGION, key, BAD_REGION_SIZE)
    try:
        grpc_stub.SystemSharedMemoryRegister(service_pb2.SystemSharedMemoryRegisterRequest(
            name=BAD_REGION, key=key, offset=0, byte_size=BAD_REGION_SIZE), timeout=30)
        yield BAD_REGION
        grpc_stub.SystemSharedMemoryUnregister(
            service_pb2.SystemSharedMemoryUnregisterRequest(name=BAD_REGION), timeout=30)
    finally:
        shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in GRPC_CASES])
def test_grpc_bad_input(server, grpc_stub, bad_region, case: GrpcCase):
    made = case.make()
    method, request = made if isinstance(made, tuple) else ("ModelInfer", made)
    with pytest.raises(grpc.RpcError) as e:
        getattr(grpc_stub, method)(request, timeout=30)
    err = e.value
    assert err.code() == case.code, f"{case.id}: {err.code()} ({err.details()!r}), want {case.code}"
    assert err.details() and err.details().strip(), "empty gRPC error message"
    check_message(err.details(), case.message)
    assert grpc_stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
    assert_http_live(server)


def test_matrix_size():
    assert len(HTTP_CASES) >= 50, len(HTTP_CASES)
    assert len(GRPC_CASES) >= 50, len(GRPC_CASES)
    ids = [c.id for c in HTTP_CASES] + [f"grpc-{c.id}" for c in GRPC_CASES]
    assert len(ids) == len(set(ids))
