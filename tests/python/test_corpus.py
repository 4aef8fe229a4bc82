"""Fidelity corpus: every model of scripts/make_corpus.py served through both engines
(ONNX Runtime and tract) over KServe v2, compared with Python onnxruntime's outputs on the same
fixed inputs.

Two servers: one serves tests/fixtures/corpus/onnxruntime/ (every config says
`backend: "onnxruntime"`), the other tests/fixtures/corpus/tract/ (`backend: "tract"`), with
the same model names. Transports: gRPC and HTTP with binary tensors for every case, HTTP JSON
too where every tensor has a JSON form (not FP16/BF16).

Tolerances, per output tensor, with `scale = max|reference|`:

- FP32 / FP64: |got - ref| <= 1e-5 * (|ref| + scale), i.e. relative 1e-5, measured against the
  tensor's magnitude as well as the element's. Engines sum dot products and convolutions in
  different orders (tract's kernels vs ONNX Runtime's MLAS, which also folds BatchNormalization
  into the convolution weights and fuses LayerNormalization and GELU), so every element carries
  a rounding error proportional to the terms it sums, not to its own value: an element that
  cancels to almost zero (there are such in the transformer's hidden state) would otherwise
  need a relative precision no float32 engine has. A wrong value still fails by orders of
  magnitude. (ONNX Runtime in the server matches Python onnxruntime bit for bit; tract stays
  below 5e-6 of scale on this corpus.)
- FP16: |got - ref| <= 2**-9 * (|ref| + scale): two units in the last place of FP16's
  11-bit significand. Engines differ in whether a FP16 MatMul accumulates in FP16 or FP32 and
  where it rounds, which moves results by an ulp or so.
- int8 QDQ model (FP32 output): |got - ref| <= 1e-5 * (|ref| + scale) + h_scale * max|W2|
  (0.04 * 1.27). The model re-quantizes its hidden activation; an engine that runs Q/DQ pairs
  as integer kernels (ONNX Runtime) and one that computes in float (tract) may round an
  activation that falls on a quantization boundary to neighbouring steps, which moves the
  output by one activation step times one weight.
- Integers, BOOL, BYTES, BF16 (an Identity and an exact Cast): exact.

Models tract cannot run (BF16 tensors) must fail at load with the reason, not at request time.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from _corpus import ENGINES, NP_TO_WIRE, Case, as_bytes, assert_close, case_named, cases, ensure_corpus, infer
from _server import ServerProcess

JSON_CASES = {"mlp", "transformer_s7", "strings", "int8_qdq"}


def _start(name: str, engine: str) -> ServerProcess:
    ensure_corpus()
    # tract cannot load every model, so readiness is polled on one that loads everywhere.
    return ServerProcess(
        name, [f"tests/fixtures/corpus/{engine}"], ready_path="/v2/models/mlp/ready"
    ).start()


@pytest.fixture(scope="module")
def corpus_servers():
    servers = {}
    try:
        for engine in ENGINES:
            servers[engine] = _start(f"corpus-{engine}", engine)
        yield servers
    finally:
        for server in servers.values():
            server.stop_and_check()


def _params():
    for case in cases():
        for engine in ENGINES:
            if engine == "tract" and case.tract_load_failure:
                continue
            transports = ["grpc", "http_binary"] + (["http_json"] if case.case in JSON_CASES else [])
            for transport in transports:
                yield pytest.param(case, engine, transport, id=f"{case.case}-{engine}-{transport}")


@pytest.mark.parametrize("case,engine,transport", list(_params()))
def test_outputs_match_python_onnxruntime(corpus_servers, case: Case, engine: str, transport: str):
    feeds, expected = case.load()
    got = infer(corpus_servers[engine], transport, case.model, feeds, list(expected))
    for name, want in expected.items():
        assert got[name] is not None, f"output {name} missing"
        assert_close(name, case, got[name], want)


def test_every_corpus_model_is_covered():
    models = {c.model for c in cases()}
    assert models == {"mlp", "cnn", "transformer", "strings", "fp16", "int8_qdq", "multi_io", "bf16"}
    # The transformer is exercised at two sequence lengths through the same loaded model.
    assert len([c for c in cases() if c.model == "transformer"]) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_config_shows_the_engine_and_why(corpus_servers, engine):
    r = requests.get(f"{corpus_servers[engine].http_url}/v2/models/cnn/config", timeout=30)
    assert r.status_code == 200, r.text
    cfg = r.json()
    assert cfg["backend"] == engine
    assert cfg["platform"] == "onnxruntime_onnx"
    reason = cfg["parameters"]["oxserve_backend_reason"]["string_value"]
    assert f'config.pbtxt sets backend "{engine}"' in reason, reason
    # Auto-completed from the model file by the engine's own inspection.
    assert cfg["max_batch_size"] == 32
    assert [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]] == [
        ("image", "TYPE_FP32", [3, 224, 224])
    ]
    assert [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]] == [("logits", "TYPE_FP32", [10])]


def test_both_engines_auto_complete_the_same_metadata(corpus_servers):
    """ONNX Runtime reads inputs and outputs from a session, tract from the protobuf: the
    configurations they complete must agree (except models tract cannot run)."""
    for case in cases():
        if case.tract_load_failure:
            continue
        metas = []
        for engine in ENGINES:
            r = requests.get(f"{corpus_servers[engine].http_url}/v2/models/{case.model}", timeout=30)
            assert r.status_code == 200, (engine, r.text)
            meta = r.json()
            metas.append((meta["inputs"], meta["outputs"]))
        assert metas[0] == metas[1], case.model


def test_a_model_tract_cannot_run_fails_at_load(corpus_servers):
    for engine, state in (("onnxruntime", "READY"), ("tract", "UNAVAILABLE")):
        r = requests.post(f"{corpus_servers[engine].http_url}/v2/repository/index", timeout=30)
        assert r.status_code == 200, r.text
        entry = next(e for e in r.json() if e["name"] == "bf16")
        assert entry["state"] == state, entry
        if state == "UNAVAILABLE":
            assert "BF16" in entry["reason"] and "tract cannot run" in entry["reason"], entry
    # Not a request-time surprise: the model is simply not ready.
    r = requests.get(f"{corpus_servers['tract'].http_url}/v2/models/bf16/ready", timeout=30)
    assert r.status_code != 200


@pytest.mark.parametrize("engine", ENGINES)
def test_transformer_takes_any_sequence_length_in_one_batch_shape(corpus_servers, engine):
    """Dynamic shapes: the same loaded model answers several sequence lengths in a row."""
    for name in ("transformer_s19", "transformer_s7", "transformer_s19"):
        case = case_named(name)
        feeds, expected = case.load()
        got = infer(corpus_servers[engine], "grpc", case.model, feeds, ["pooled"])
        assert_close("pooled", case, got["pooled"], expected["pooled"])


@pytest.mark.parametrize("engine", ENGINES)
def test_bool_bytes_other_than_0_and_1_are_rejected(corpus_servers, engine):
    """A BOOL element is one byte, 0 or 1; any other byte is a 400, on every engine."""
    feeds, _ = case_named("multi_io").load()
    header = {"inputs": [], "outputs": [{"name": "unmasked", "parameters": {"binary_data": True}}]}
    body = b""
    for name, arr in feeds.items():
        raw = arr.tobytes()
        if name == "mask":
            raw = b"\x02" + raw[1:]
        header["inputs"].append({
            "name": name, "shape": list(arr.shape), "datatype": NP_TO_WIRE[arr.dtype],
            "parameters": {"binary_data_size": len(raw)},
        })
        body += raw
    head = json.dumps(header).encode()
    r = requests.post(
        f"{corpus_servers[engine].http_url}/v2/models/multi_io/infer",
        data=head + body,
        headers={"Inference-Header-Content-Length": str(len(head))},
        timeout=30,
    )
    assert r.status_code == 400, (r.status_code, r.text)
    assert "BOOL" in r.json()["error"], r.text
    # The server keeps serving the same model.
    case = case_named("multi_io")
    feeds, expected = case.load()
    got = infer(corpus_servers[engine], "grpc", case.model, feeds, ["unmasked"])
    assert_close("unmasked", case, got["unmasked"], expected["unmasked"])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("engine", ENGINES)
def test_shrinking_shared_memory_under_inference_fails_the_request_not_the_server(corpus_servers, engine, protocol):
    """Fixed-size inputs in shared memory reach the engine as views of the client's mapping,
    without a copy. A client that truncates its object while the engine reads it gets an error
    for that request (the server maps zeros over the region instead of dying of SIGBUS); every
    request that succeeds carries the right answer, and the server keeps serving."""
    server = corpus_servers[engine]
    case = case_named("cnn")
    feeds, expected = case.load()
    image = np.ascontiguousarray(np.repeat(feeds["image"], 8, axis=0))
    want = np.repeat(expected["logits"], 8, axis=0)
    m = grpcclient if protocol == "grpc" else httpclient

    def connect():
        if protocol == "grpc":
            return grpcclient.InferenceServerClient(url=server.grpc_host)
        return httpclient.InferenceServerClient(url=server.http_host, network_timeout=120.0)

    client = connect()
    rng = np.random.default_rng(7)
    outcomes = {"answered": 0, "shrunk before": 0, "shrunk during": 0}
    try:
        for round_ in range(24):
            tag = uuid.uuid4().hex[:12]
            name, key = f"race_{tag}", f"/oxserve_race_{tag}"
            handle = shm.create_shared_memory_region(name, key, image.nbytes)
            try:
                shm.set_shared_memory_region(handle, [image])
                client.register_system_shared_memory(name, key, image.nbytes)
                inp = m.InferInput("image", list(image.shape), "FP32")
                inp.set_shared_memory(name, image.nbytes)
                out = m.InferRequestedOutput("logits", binary_data=True) if protocol == "http" else None
                done = []
                # Its own client: tritonclient's HTTP client belongs to the thread that made it.
                call = threading.Thread(target=lambda: done.append(_infer_or_error(connect, inp, out)))
                call.start()
                time.sleep(rng.uniform(0, 0.015))
                os.truncate(f"/dev/shm/{key.lstrip('/')}", 0)
                call.join(timeout=120)
                result = done[0]
                if isinstance(result, Exception):
                    assert isinstance(result, InferenceServerException), repr(result)
                    message = result.message()
                    if "register the region again" in message:
                        outcomes["shrunk during"] += 1
                    else:
                        assert "smaller than the registered region" in message, message
                        outcomes["shrunk before"] += 1
                else:
                    assert_close("logits", case, result.as_numpy("logits"), want)
                    outcomes["answered"] += 1
                client.unregister_system_shared_memory(name)
            finally:
                shm.destroy_shared_memory_region(handle)
        print(f"{engine} over {protocol}: {outcomes}")
        got = infer(server, protocol if protocol == "grpc" else "http_binary", case.model, feeds, ["logits"])
        assert_close("logits", case, got["logits"], expected["logits"])
    finally:
        client.close()


def _infer_or_error(connect, inp, out):
    client = connect()
    try:
        if out is None:
            return client.infer("cnn", [inp], client_timeout=120.0)
        return client.infer("cnn", [inp], outputs=[out])
    except Exception as e:  # noqa: BLE001 - the test tells the server's errors from the rest
        return e
    finally:
        client.close()
