"""Triton ensembles (`platform: "ensemble"`), as Triton's clients see them.

Fixtures: tests/fixtures/ensemble (written by scripts/make_ensemble_models.py):

  ens_pre       RAW [N,4] -> SCALED = (RAW - MEAN) / STD
  ens_classify  X [N,4] -> LOGITS [N,3] = X @ W + B
  ens_post      LOGITS [N,3] -> PROBS = softmax, LABEL INT64 [N,1] = argmax (keepdims)
  ens_pipeline  RAW -> ens_pre -> `scaled` -> ens_classify -> `logits` -> ens_post -> PROBS, LABEL
                (ensemble tensor names differ from the step models' tensor names, so the
                input_map / output_map are really applied)
  ens_fanout    RAW feeds two ens_pre steps (one -> `scaled` -> ens_classify -> LOGITS ->
                ens_post -> PROBS, LABEL; the other -> SCALED); LOGITS is both an ensemble
                output and a later step's input; the steps are listed out of dataflow order

and tests/fixtures/ensemble_broken (served together with the good repository by a second
server, readiness polled on ens_pipeline since strict readiness may stay non-200):

  ens_bad_step  a step names `ens_missing`, which does not exist: the server may refuse to load
                the ensemble (UNAVAILABLE, reason naming ens_missing; Triton does this) or fail
                its requests with a message naming ens_missing; both are accepted
  ens_invalid   declares an ensemble output ORPHAN that no step produces: UNAVAILABLE, the
                reason names ORPHAN

Expected outputs are computed with Python onnxruntime running the three step models' ONNX files
one after another (never with oxserve's code).
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from _fixtures import ort_run
from _server import ROOT, ServerProcess

ENSEMBLE_REPOSITORY = "tests/fixtures/ensemble"
BROKEN_REPOSITORY = "tests/fixtures/ensemble_broken"
STEP_MODELS = ["ens_pre", "ens_classify", "ens_post"]
ENSEMBLES = ["ens_pipeline", "ens_fanout"]
ALL_GOOD = sorted(STEP_MODELS + ENSEMBLES)
RTOL = 1e-5
# (x - mean) / std can be near 0; an engine may divide as a multiply by the reciprocal.
ATOL = 1e-6
TIMEOUT_S = 60.0

# Output name -> (datatype, dims without the batch dimension).
PIPELINE_OUTPUTS = {"PROBS": ("FP32", [3]), "LABEL": ("INT64", [1])}
FANOUT_OUTPUTS = {"SCALED": ("FP32", [4]), "LOGITS": ("FP32", [3]),
                  "PROBS": ("FP32", [3]), "LABEL": ("INT64", [1])}
OUTPUTS = {"ens_pipeline": PIPELINE_OUTPUTS, "ens_fanout": FANOUT_OUTPUTS}

# ens_pipeline's ensemble_scheduling, as written in its config.pbtxt:
# (model_name, model_version, input_map, output_map) per step.
PIPELINE_STEPS = [
    ("ens_pre", -1, {"RAW": "RAW"}, {"SCALED": "scaled"}),
    ("ens_classify", -1, {"X": "scaled"}, {"LOGITS": "logits"}),
    ("ens_post", -1, {"LOGITS": "logits"}, {"PROBS": "PROBS", "LABEL": "LABEL"}),
]


# ---------------------------------------------------------------------------------------
# reference (onnxruntime on the step models, one after another)
# ---------------------------------------------------------------------------------------

def _ort(model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return ort_run(ROOT / ENSEMBLE_REPOSITORY / model / "1" / "model.onnx", feeds)


def reference(raw: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of the composition for `raw` [N,4]: SCALED, LOGITS, PROBS, LABEL."""
    scaled = _ort("ens_pre", {"RAW": raw})["SCALED"]
    logits = _ort("ens_classify", {"X": scaled})["LOGITS"]
    post = _ort("ens_post", {"LOGITS": logits})
    return {"SCALED": scaled, "LOGITS": logits, "PROBS": post["PROBS"], "LABEL": post["LABEL"]}


@functools.lru_cache(maxsize=None)
def _raw_cached(batch: int, seed: int) -> np.ndarray:
    """`batch` rows of iris-like features whose two largest logits differ by at least 1e-3, so
    every engine's argmax agrees (rows too close to a tie are drawn again; deterministic)."""
    r = np.random.default_rng(seed)
    mean = np.array([5.8, 3.0, 3.7, 1.2])
    spread = np.array([1.2, 0.6, 2.6, 1.1])
    rows = []
    while len(rows) < batch:
        row = r.normal(mean, spread).astype(np.float32).reshape(1, 4)
        top = np.sort(reference(row)["LOGITS"][0])
        if top[-1] - top[-2] >= 1e-3:
            rows.append(row)
    out = np.concatenate(rows, axis=0)
    out.setflags(write=False)
    return out


def raw_rows(batch: int, seed: int) -> np.ndarray:
    return np.array(_raw_cached(batch, seed))


def check_outputs(model: str, raw: np.ndarray, got: dict[str, np.ndarray],
                  names: list[str] | None = None) -> None:
    """`got` holds exactly `names` (default: every output of `model`), each equal to the
    reference: floats within RTOL (ATOL), LABEL exactly (INT64)."""
    names = sorted(OUTPUTS[model]) if names is None else sorted(names)
    assert sorted(got) == names, f"{model}: outputs {sorted(got)}, expected {names}"
    expected = reference(raw)
    batch = raw.shape[0]
    for name in names:
        datatype, dims = OUTPUTS[model][name]
        value = got[name]
        assert value is not None, f"{model}: {name} missing"
        assert list(value.shape) == [batch, *dims], f"{model}: {name} shape {value.shape}"
        if datatype == "INT64":
            assert value.dtype == np.int64, f"{model}: {name} dtype {value.dtype}"
            np.testing.assert_array_equal(value, expected[name], err_msg=f"{model}: {name}")
        else:
            assert value.dtype == np.float32, f"{model}: {name} dtype {value.dtype}"
            np.testing.assert_allclose(value, expected[name], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{model}: {name}")


# ---------------------------------------------------------------------------------------
# servers and clients
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ens_server():
    """oxserve with tests/fixtures/ensemble only (its own: statistics move by what we send)."""
    server = ServerProcess("ensemble", [ENSEMBLE_REPOSITORY]).start()
    try:
        yield server
    finally:
        server.stop_and_check()


@pytest.fixture(scope="module")
def ens_broken_server():
    """oxserve with the good ensemble repository and tests/fixtures/ensemble_broken; strict
    readiness may stay non-200, so readiness is polled through ens_pipeline."""
    server = ServerProcess("ensemble-broken", [ENSEMBLE_REPOSITORY, BROKEN_REPOSITORY],
                           ready_path="/v2/models/ens_pipeline/ready").start()
    try:
        yield server
    finally:
        server.stop_and_check()


def http_client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=server.http_host, network_timeout=TIMEOUT_S)


def grpc_client(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=server.grpc_host)


@pytest.fixture
def hclient(ens_server):
    c = http_client(ens_server)
    yield c
    c.close()


@pytest.fixture
def gclient(ens_server):
    c = grpc_client(ens_server)
    yield c
    c.close()


def infer(client, protocol: str, model: str, raw: np.ndarray, outputs: list[str] | None = None,
          binary: bool = True) -> dict[str, np.ndarray]:
    """One request with `raw` as RAW; returns every output in the response by name (all of the
    model's when `outputs` is None, else only those requested)."""
    mod = httpclient if protocol == "http" else grpcclient
    inp = mod.InferInput("RAW", list(raw.shape), "FP32")
    if protocol == "http":
        inp.set_data_from_numpy(raw, binary_data=binary)
        requested = None if outputs is None else [
            httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs]
    else:
        inp.set_data_from_numpy(raw)
        requested = None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]
    result = client.infer(model, [inp], outputs=requested)
    response = result.get_response()
    if protocol == "http":
        names = [o["name"] for o in response["outputs"]]
        assert response["model_name"] == model, response
    else:
        names = [o.name for o in response.outputs]
        assert response.model_name == model, response
    assert len(names) == len(set(names)), f"duplicate outputs: {names}"
    return {n: result.as_numpy(n) for n in names}


# ---------------------------------------------------------------------------------------
# loading, metadata, config
# ---------------------------------------------------------------------------------------

def test_every_model_ready(ens_server, hclient, gclient):
    index = ens_server.repository_index()
    assert sorted(index) == ALL_GOOD, index
    for name in ALL_GOOD:
        assert index[name]["state"] == "READY" and index[name]["version"] == "1", index[name]
        assert hclient.is_model_ready(name) is True, name
        assert gclient.is_model_ready(name) is True, name
    assert hclient.is_server_ready() is True


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ENSEMBLES)
def test_ensemble_metadata(ens_server, protocol, model):
    if protocol == "http":
        client = http_client(ens_server)
        get = client.get_model_metadata
    else:
        client = grpc_client(ens_server)
        get = lambda m: client.get_model_metadata(m, as_json=True)  # noqa: E731
    try:
        meta = get(model)
    finally:
        client.close()
    assert meta["name"] == model, meta
    assert meta["platform"] == "ensemble", meta
    assert meta["versions"] == ["1"], meta
    got_in = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert got_in == {"RAW": ("FP32", [-1, 4])}, meta
    got_out = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    assert got_out == {n: (dt, [-1, *dims]) for n, (dt, dims) in OUTPUTS[model].items()}, meta


def _check_pipeline_config(config: dict) -> None:
    """`config`: the ModelConfig as JSON (HTTP body, or gRPC's as_json)."""
    assert config["name"] == "ens_pipeline", config
    assert config["platform"] == "ensemble", config
    assert int(config["max_batch_size"]) == 8, config
    inputs = {t["name"]: (t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]}
    assert inputs == {"RAW": ("TYPE_FP32", [4])}, config
    outputs = {t["name"]: (t["data_type"], [int(d) for d in t["dims"]]) for t in config["output"]}
    assert outputs == {"PROBS": ("TYPE_FP32", [3]), "LABEL": ("TYPE_INT64", [1])}, config
    steps = config["ensemble_scheduling"]["step"]
    # int64 model_version: a JSON number in Triton's HTTP body, a string in protobuf's JSON.
    got = [(s["model_name"], int(s["model_version"]), dict(s["input_map"]), dict(s["output_map"]))
           for s in steps]
    assert got == PIPELINE_STEPS, config


def test_ensemble_config_http(ens_server, hclient):
    r = requests.get(f"{ens_server.http_url}/v2/models/ens_pipeline/config", timeout=30)
    assert r.status_code == 200, r.text
    _check_pipeline_config(r.json())
    _check_pipeline_config(hclient.get_model_config("ens_pipeline"))


def test_ensemble_config_grpc(gclient):
    config = gclient.get_model_config("ens_pipeline").config
    assert config.platform == "ensemble"
    got = [(s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
           for s in config.ensemble_scheduling.step]
    assert got == PIPELINE_STEPS, config
    _check_pipeline_config(gclient.get_model_config("ens_pipeline", as_json=True)["config"])


# ---------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [5, 1])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_pipeline_http(hclient, batch, binary):
    raw = raw_rows(batch, seed=10 + batch)
    check_outputs("ens_pipeline", raw, infer(hclient, "http", "ens_pipeline", raw, binary=binary))


@pytest.mark.parametrize("batch", [5, 1])
def test_pipeline_grpc(gclient, batch):
    raw = raw_rows(batch, seed=20 + batch)
    check_outputs("ens_pipeline", raw, infer(gclient, "grpc", "ens_pipeline", raw))


def test_pipeline_max_batch(gclient, hclient):
    raw = raw_rows(8, seed=28)
    check_outputs("ens_pipeline", raw, infer(gclient, "grpc", "ens_pipeline", raw))
    check_outputs("ens_pipeline", raw, infer(hclient, "http", "ens_pipeline", raw))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_pipeline_only_requested_outputs(ens_server, protocol, hclient, gclient):
    """Only the requested ensemble outputs come back (as for any Triton model)."""
    client = hclient if protocol == "http" else gclient
    raw = raw_rows(3, seed=30)
    check_outputs("ens_pipeline", raw, infer(client, protocol, "ens_pipeline", raw, ["LABEL"]), ["LABEL"])
    check_outputs("ens_pipeline", raw, infer(client, protocol, "ens_pipeline", raw, ["PROBS"]), ["PROBS"])


@pytest.mark.parametrize("batch", [5, 1])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fanout(hclient, gclient, protocol, batch):
    """RAW feeds two steps; the intermediate LOGITS is also an output; steps listed out of order."""
    client = hclient if protocol == "http" else gclient
    raw = raw_rows(batch, seed=40 + batch)
    check_outputs("ens_fanout", raw, infer(client, protocol, "ens_fanout", raw))
    check_outputs("ens_fanout", raw, infer(client, protocol, "ens_fanout", raw, ["LOGITS", "SCALED"]),
                  ["LOGITS", "SCALED"])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_aio_pipeline(ens_server, protocol):
    raw = raw_rows(4, seed=50)

    # conftest.py's TLS and API-key switches patch only the sync clients: do it by hand here.
    tls = ens_server.http_url.startswith("https://")
    ca = os.environ.get("REQUESTS_CA_BUNDLE")
    headers = {"authorization": f"Bearer {ens_server.api_key}"} if ens_server.api_key else None

    async def run() -> dict[str, np.ndarray]:
        if protocol == "http":
            kwargs = dict(ssl=True, ssl_context=ssl.create_default_context(cafile=ca)) if tls else {}
            client = httpaio.InferenceServerClient(url=ens_server.http_host, **kwargs)
            inp = httpaio.InferInput("RAW", list(raw.shape), "FP32")
        else:
            kwargs = dict(ssl=True, root_certificates=ca) if tls else {}
            client = grpcaio.InferenceServerClient(url=ens_server.grpc_host, **kwargs)
            inp = grpcaio.InferInput("RAW", list(raw.shape), "FP32")
        inp.set_data_from_numpy(raw)
        try:
            result = await client.infer("ens_pipeline", [inp], headers=headers)
        finally:
            await client.close()
        return {n: result.as_numpy(n) for n in PIPELINE_OUTPUTS}

    check_outputs("ens_pipeline", raw, asyncio.run(asyncio.wait_for(run(), TIMEOUT_S)))


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------

def _stats(client, model: str) -> dict:
    rows = [s for s in client.get_inference_statistics(model)["model_stats"]
            if s["name"] == model and s["version"] == "1"]
    assert len(rows) == 1, f"{model}: {rows}"
    return rows[0]


def _successes(stat: dict) -> int:
    return int(stat["inference_stats"]["success"]["count"])


def test_statistics_count_every_step(hclient, gclient):
    """After N ensemble requests each step model's success count grew by N (one step request
    per ensemble request; inference_count by the rows sent), and the ensemble's by N too."""
    models = ["ens_pipeline", *STEP_MODELS]
    before = {m: _stats(hclient, m) for m in models}
    batches = [1, 3, 5, 2, 8, 1]
    for i, batch in enumerate(batches):
        raw = raw_rows(batch, seed=60 + i)
        client, protocol = (hclient, "http") if i % 2 == 0 else (gclient, "grpc")
        check_outputs("ens_pipeline", raw, infer(client, protocol, "ens_pipeline", raw))
    after = {m: _stats(hclient, m) for m in models}
    n = len(batches)
    for m in models:
        assert _successes(after[m]) - _successes(before[m]) == n, (m, before[m], after[m])
        fails = int(after[m]["inference_stats"]["fail"]["count"]) - int(before[m]["inference_stats"]["fail"]["count"])
        assert fails == 0, (m, after[m])
    for m in STEP_MODELS:
        grew = int(after[m]["inference_count"]) - int(before[m]["inference_count"])
        assert grew == sum(batches), (m, before[m], after[m])
    # gRPC reads the same counters.
    g = gclient.get_inference_statistics("ens_pipeline", "1").model_stats[0]
    assert g.inference_stats.success.count >= _successes(after["ens_pipeline"])


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------

def test_wrong_shape_is_400_naming_the_input(ens_server, hclient):
    """RAW [5,3] (dims [4] expected) is refused before any step runs."""
    before = _successes(_stats(hclient, "ens_pre")), int(_stats(hclient, "ens_pre")["inference_stats"]["fail"]["count"])
    body = {"inputs": [{"name": "RAW", "shape": [5, 3], "datatype": "FP32",
                        "data": [float(i) for i in range(15)]}]}
    r = requests.post(f"{ens_server.http_url}/v2/models/ens_pipeline/infer", json=body, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text)
    assert "error" in r.json(), r.text
    assert "RAW" in r.json()["error"], r.text

    raw = np.zeros((5, 3), dtype=np.float32)
    inp = httpclient.InferInput("RAW", [5, 3], "FP32")
    inp.set_data_from_numpy(raw)
    with pytest.raises(InferenceServerException) as e:
        hclient.infer("ens_pipeline", [inp])
    assert "RAW" in e.value.message(), e.value.message()

    g = grpc_client(ens_server)
    try:
        inp = grpcclient.InferInput("RAW", [5, 3], "FP32")
        inp.set_data_from_numpy(raw)
        with pytest.raises(InferenceServerException) as e:
            g.infer("ens_pipeline", [inp])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", (e.value.status(), e.value.message())
        assert "RAW" in e.value.message(), e.value.message()
    finally:
        g.close()
    after = _successes(_stats(hclient, "ens_pre")), int(_stats(hclient, "ens_pre")["inference_stats"]["fail"]["count"])
    assert after == before, "a request the ensemble refuses must not reach its steps"


def test_missing_input_and_too_large_batch(ens_server):
    url = f"{ens_server.http_url}/v2/models/ens_pipeline/infer"
    r = requests.post(url, json={"inputs": []}, timeout=30)
    assert r.status_code == 400 and "RAW" in r.text, (r.status_code, r.text)
    body = {"inputs": [{"name": "RAW", "shape": [9, 4], "datatype": "FP32", "data": [0.0] * 36}]}
    r = requests.post(url, json=body, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text)


# ---------------------------------------------------------------------------------------
# broken ensembles (second server)
# ---------------------------------------------------------------------------------------

def _infer_error(server: ServerProcess, model: str) -> list[str]:
    """Sends one valid RAW [1,4] request to `model` over HTTP and gRPC; both must fail. Returns
    the two error messages."""
    raw = raw_rows(1, seed=90)
    messages = []
    body = {"inputs": [{"name": "RAW", "shape": [1, 4], "datatype": "FP32",
                        "data": [float(x) for x in raw.ravel()]}]}
    r = requests.post(f"{server.http_url}/v2/models/{model}/infer", json=body, timeout=30)
    assert r.status_code >= 400, (model, r.status_code, r.text)
    assert "error" in r.json(), r.text
    messages.append(r.json()["error"])
    g = grpc_client(server)
    try:
        inp = grpcclient.InferInput("RAW", [1, 4], "FP32")
        inp.set_data_from_numpy(raw)
        with pytest.raises(InferenceServerException) as e:
            g.infer(model, [inp])
        messages.append(e.value.message())
    finally:
        g.close()
    return messages


def test_broken_repository_keeps_the_good_models(ens_broken_server):
    index = ens_broken_server.repository_index()
    for name in ALL_GOOD:
        assert index[name]["state"] == "READY", index[name]
    assert "ens_missing" not in index, index
    c = http_client(ens_broken_server)
    try:
        raw = raw_rows(2, seed=80)
        check_outputs("ens_pipeline", raw, infer(c, "http", "ens_pipeline", raw))
    finally:
        c.close()


def test_invalid_ensemble_is_unavailable_naming_the_tensor(ens_broken_server):
    entry = ens_broken_server.repository_index()["ens_invalid"]
    assert entry["state"] == "UNAVAILABLE", entry
    assert "ORPHAN" in entry.get("reason", ""), entry
    c = http_client(ens_broken_server)
    try:
        assert c.is_model_ready("ens_invalid") is False
    finally:
        c.close()
    _infer_error(ens_broken_server, "ens_invalid")


def test_bad_step_names_the_missing_model(ens_broken_server):
    """Either refused at load (UNAVAILABLE, the reason names ens_missing), or READY with every
    request failing with a message that names ens_missing."""
    entry = ens_broken_server.repository_index()["ens_bad_step"]
    messages = _infer_error(ens_broken_server, "ens_bad_step")
    if entry["state"] == "UNAVAILABLE":
        assert "ens_missing" in entry.get("reason", ""), entry
    else:
        assert entry["state"] == "READY", entry
        for message in messages:
            assert "ens_missing" in message, messages


# ---------------------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------------------

THREADS = 16
REQUESTS_PER_THREAD = 20


def test_concurrent_load_all_correct(ens_server):
    """16 threads x 20 requests: HTTP and gRPC, both ensembles, batch sizes 1..8, and (every
    fourth thread) direct requests to a step model mixed in; every answer is checked."""
    failures: list[str] = []
    lock = threading.Lock()

    def run(thread: int) -> int:
        protocol = "http" if thread % 2 == 0 else "grpc"
        client = http_client(ens_server) if protocol == "http" else grpc_client(ens_server)
        done = 0
        try:
            for i in range(REQUESTS_PER_THREAD):
                batch = (thread + i) % 8 + 1
                raw = raw_rows(batch, seed=1000 + (thread * REQUESTS_PER_THREAD + i) % 24)
                try:
                    if thread % 4 == 3:
                        # A step model called directly while the ensembles use it.
                        mod = httpclient if protocol == "http" else grpcclient
                        scaled = reference(raw)["SCALED"]
                        inp = mod.InferInput("X", list(scaled.shape), "FP32")
                        inp.set_data_from_numpy(scaled)
                        got = client.infer("ens_classify", [inp]).as_numpy("LOGITS")
                        np.testing.assert_allclose(got, reference(raw)["LOGITS"], rtol=RTOL, atol=ATOL)
                    else:
                        model = ENSEMBLES[(thread // 2 + i) % 2]
                        check_outputs(model, raw, infer(client, protocol, model, raw))
                    done += 1
                except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
                    with lock:
                        failures.append(f"thread {thread} request {i} ({protocol}): {type(e).__name__}: {e}")
        finally:
            client.close()
        return done

    # Inputs and references are computed before the load starts.
    for k in range(24):
        for b in range(1, 9):
            raw_rows(b, seed=1000 + k)
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        done = list(pool.map(run, range(THREADS)))
    assert not failures, f"{len(failures)} failures, first: {failures[:5]}"
    assert sum(done) == THREADS * REQUESTS_PER_THREAD, done
    assert ens_server.alive()
