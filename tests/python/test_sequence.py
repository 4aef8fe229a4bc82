"""Triton's sequence batcher (`sequence_batching` in config.pbtxt), as Triton's clients see it.

Fixtures: tests/fixtures/sequence (written by scripts/make_sequence_models.py). Every model is
an accumulator in Triton's implicit-state style: the client sends only INPUT (plus the
`sequence_id` / `sequence_start` / `sequence_end` request parameters); the sequence batcher
feeds the control inputs START, END, READY (INT32 0/1) and CORRID (the correlation ID), and the
state INPUT_STATE (zeros at the start of a sequence, then the previous OUTPUT_STATE):

  OUTPUT = INPUT + INPUT_STATE * (1 - START), OUTPUT_STATE = OUTPUT, CORRID_OUT = CORRID,
  CONTROLS = [START, END, READY], SLOT (batched models) = the row index within the batch

  seq_direct   max_batch_size 4, 2 instances (8 batch slots), `direct {}`, idle limit 5 s
  seq_oldest   max_batch_size 4, 1 instance, `oldest { max_candidate_sequences: 8
               preferred_batch_size: [2] max_queue_delay_microseconds: 2000 }`
  seq_idle     like seq_direct with 1 instance and an idle limit of 300 ms
  seq_nobatch  max_batch_size 0, direct, string correlation IDs (CORRID TYPE_STRING)

Expected outputs are computed with Python onnxruntime running the fixture's ONNX file, the test
doing the sequence batcher's work by hand (START/END/READY/CORRID fed per request, OUTPUT_STATE
carried to INPUT_STATE, zeros at START) — never with oxserve's code.

Every test uses correlation IDs of its own (numeric ones above 2**32, so a 32-bit truncation
shows) and ends every sequence it starts, so no test waits on another's slots.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from _fixtures import ort_run
from _server import ROOT, ServerProcess

SEQUENCE_REPOSITORY = "tests/fixtures/sequence"
MODELS = ["seq_direct", "seq_idle", "seq_nobatch", "seq_oldest"]
BATCHED = {"seq_direct", "seq_oldest", "seq_idle"}
BATCHED_OUTPUTS = ["CONTROLS", "CORRID_OUT", "OUTPUT", "SLOT"]
NOBATCH_OUTPUTS = ["CONTROLS", "CORRID_OUT", "OUTPUT"]
MAX_BATCH_SIZE = 4
DIRECT_INSTANCES = 2
# The names the sequence batcher supplies: never model inputs / outputs to the client.
CONTROL_INPUTS = ["START", "END", "READY", "CORRID"]
STATE_INPUT, STATE_OUTPUT = "INPUT_STATE", "OUTPUT_STATE"
IDLE_LIMIT_S = 0.3  # seq_idle's max_sequence_idle_microseconds
TIMEOUT_S = 60.0
PROTOCOLS = ["http", "grpc"]

_ids = itertools.count(10**12 + 1)


def new_id() -> int:
    """A correlation ID no other test uses (above 2**32)."""
    return next(_ids)


# ---------------------------------------------------------------------------------------
# reference (onnxruntime on the fixture's ONNX file, sequence batcher done by hand)
# ---------------------------------------------------------------------------------------

def _ort(model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return ort_run(ROOT / SEQUENCE_REPOSITORY / model / "1" / "model.onnx", feeds)


class Reference:
    """One sequence run through onnxruntime: `step` feeds what Triton's sequence batcher would
    (START/END as sent, READY 1, CORRID the sequence's ID, INPUT_STATE the previous
    OUTPUT_STATE, zeros at the start) and returns every model output."""

    def __init__(self, model: str, corrid: int | str):
        self.model = model
        self.corrid = corrid
        self.batched = model in BATCHED
        self.shape = [1, 1] if self.batched else [1]
        self.state = np.zeros(self.shape, dtype=np.int32)

    def _i32(self, v: int) -> np.ndarray:
        return np.array(v, dtype=np.int32).reshape(self.shape)

    def step(self, value: int, start: bool, end: bool) -> dict[str, np.ndarray]:
        if start:
            self.state = np.zeros(self.shape, dtype=np.int32)  # initial_state: zero_data
        corrid = (np.array(self.corrid, dtype=np.uint64).reshape(self.shape) if self.batched
                  else np.array([self.corrid], dtype=object))
        out = _ort(self.model, {
            "INPUT": self._i32(value), "START": self._i32(int(start)), "END": self._i32(int(end)),
            "READY": self._i32(1), "CORRID": corrid, "INPUT_STATE": self.state,
        })
        self.state = out["OUTPUT_STATE"]
        return out


def reference_run(model: str, corrid, values: list[int]) -> list[dict[str, np.ndarray]]:
    ref = Reference(model, corrid)
    n = len(values)
    return [ref.step(v, i == 0, i == n - 1) for i, v in enumerate(values)]


def sequence_values(seed: int, n: int) -> list[int]:
    return [int(v) for v in np.random.default_rng(seed).integers(-50, 100, size=n)]


def check_step(model: str, corrid, got: dict[str, np.ndarray], expected: dict[str, np.ndarray],
               where: str) -> None:
    """`got` (one response) holds exactly the model's client-visible outputs, each equal to the
    reference step (SLOT: only its shape and range, the reference always runs a batch of 1)."""
    batched = model in BATCHED
    names = BATCHED_OUTPUTS if batched else NOBATCH_OUTPUTS
    assert sorted(got) == names, f"{where}: outputs {sorted(got)}, expected {names}"
    lead = [1] if batched else []
    out = got["OUTPUT"]
    assert out.dtype == np.int32 and list(out.shape) == lead + [1], (where, out.dtype, out.shape)
    np.testing.assert_array_equal(out, expected["OUTPUT"], err_msg=f"{where}: OUTPUT")
    controls = got["CONTROLS"]
    assert controls.dtype == np.int32 and list(controls.shape) == lead + [3], (where, controls)
    np.testing.assert_array_equal(controls, expected["CONTROLS"], err_msg=f"{where}: CONTROLS")
    corr = got["CORRID_OUT"]
    assert list(corr.shape) == lead + [1], (where, corr.shape)
    if batched:
        assert corr.dtype == np.uint64, (where, corr.dtype)
        assert int(corr.reshape(-1)[0]) == corrid, (where, corr, corrid)
        np.testing.assert_array_equal(corr, expected["CORRID_OUT"], err_msg=f"{where}: CORRID_OUT")
        slot = got["SLOT"]
        assert slot.dtype == np.int32 and list(slot.shape) == [1, 1], (where, slot)
        assert 0 <= int(slot[0, 0]) < MAX_BATCH_SIZE, (where, slot)
    else:
        value = corr.reshape(-1)[0]
        value = value.decode("utf-8") if isinstance(value, bytes) else value
        assert value == corrid, (where, corr, corrid)


# ---------------------------------------------------------------------------------------
# server and clients
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seq_server():
    """oxserve with tests/fixtures/sequence only (its own: statistics move by what we send)."""
    server = ServerProcess("sequence", [SEQUENCE_REPOSITORY]).start()
    try:
        yield server
    finally:
        server.stop_and_check()


def http_client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=server.http_host, network_timeout=TIMEOUT_S,
                                            connection_timeout=TIMEOUT_S)


def grpc_client(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=server.grpc_host)


def make_client(server: ServerProcess, protocol: str):
    return http_client(server) if protocol == "http" else grpc_client(server)


@pytest.fixture
def client(seq_server, protocol):
    c = make_client(seq_server, protocol)
    yield c
    c.close()


def _inputs(protocol: str, model: str, value: int, extra: dict[str, np.ndarray] | None = None,
            rows: int = 1) -> list:
    mod = httpclient if protocol == "http" else grpcclient
    shape = [rows, 1] if model in BATCHED else [1]
    arrays = {"INPUT": np.full(shape, value, dtype=np.int32), **(extra or {})}
    out = []
    for name, array in arrays.items():
        inp = mod.InferInput(name, list(array.shape), "INT32")
        inp.set_data_from_numpy(array)
        out.append(inp)
    return out


def send(client, protocol: str, model: str, value: int, seq_id, start: bool = False,
         end: bool = False, extra: dict[str, np.ndarray] | None = None,
         rows: int = 1) -> dict[str, np.ndarray]:
    """One request of a sequence; every output in the response by name."""
    result = client.infer(model, _inputs(protocol, model, value, extra, rows), sequence_id=seq_id,
                          sequence_start=start, sequence_end=end)
    response = result.get_response()
    if protocol == "http":
        names = [o["name"] for o in response["outputs"]]
        assert response["model_name"] == model, response
    else:
        names = [o.name for o in response.outputs]
        assert response.model_name == model, response
    assert len(names) == len(set(names)), f"duplicate outputs: {names}"
    return {n: result.as_numpy(n) for n in names}


def run_sequence(client, protocol: str, model: str, seq_id, values: list[int]) -> list[dict]:
    """Sends `values` as one whole sequence (START on the first, END on the last), checking
    every answer against the reference; returns the responses."""
    expected = reference_run(model, seq_id, values)
    got = []
    for i, v in enumerate(values):
        out = send(client, protocol, model, v, seq_id, start=i == 0, end=i == len(values) - 1)
        check_step(model, seq_id, out, expected[i], f"{model} seq {seq_id} step {i} ({protocol})")
        got.append(out)
    return got


# Triton's messages (triton-inference-server/core, src/sequence_batch_scheduler/:
# Sequencer::SetupSequenceRequest and SequenceBatchScheduler::Enqueue).
def no_corrid_message(model: str) -> str:
    return (f"inference request to model '{model}' must specify a non-zero or non-empty "
            "correlation ID")


def no_start_message(model: str, seq_id) -> str:
    return (f"inference request for sequence {seq_id} to model '{model}' must specify the START "
            "flag on the first request of the sequence")


def batch_size_message(model: str) -> str:
    return (f"inference request to model '{model}' must specify batch-size 1 due to requirements "
            "of sequence batcher")


def corrid_type_message(model: str, sent: str, expected: str) -> str:
    # InferenceRequest::ValidateCorrelationId (core 2025+); Triton prefixes "[request id: ...] ".
    return (f"sequence batching control 'CORRID' data-type is '{sent}', but model '{model}' "
            f"expects '{expected}'")


def expect_invalid(protocol: str, call, *substrings: str) -> str:
    """`call()` must fail with 400 (HTTP) / INVALID_ARGUMENT (gRPC) and a message holding every
    one of `substrings`; returns the message."""
    with pytest.raises(InferenceServerException) as e:
        call()
    message = e.value.message() or ""
    status = str(e.value.status())
    wanted = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    assert status == wanted, (status, message)
    for s in substrings:
        assert s in message, (s, message)
    return message


# ---------------------------------------------------------------------------------------
# loading, metadata, config
# ---------------------------------------------------------------------------------------

def test_every_model_ready(seq_server):
    index = seq_server.repository_index()
    assert sorted(index) == MODELS, index
    for name in MODELS:
        assert index[name]["state"] == "READY", index[name]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metadata_shows_only_client_tensors(seq_server, protocol, client):
    """The control inputs and the state are the sequence batcher's: the model's metadata lists
    INPUT alone as an input, and no OUTPUT_STATE among the outputs."""
    for model, outputs in [("seq_direct", BATCHED_OUTPUTS), ("seq_nobatch", NOBATCH_OUTPUTS)]:
        if protocol == "http":
            r = requests.get(f"{seq_server.http_url}/v2/models/{model}", timeout=30)
            assert r.status_code == 200, r.text
            meta = r.json()
            assert meta == client.get_model_metadata(model), meta
        else:
            meta = client.get_model_metadata(model, as_json=True)
        batch = [-1] if model in BATCHED else []
        assert [i["name"] for i in meta["inputs"]] == ["INPUT"], meta
        assert meta["inputs"][0]["datatype"] == "INT32", meta
        assert [int(d) for d in meta["inputs"][0]["shape"]] == batch + [1], meta
        assert sorted(o["name"] for o in meta["outputs"]) == outputs, meta
        names = {i["name"] for i in meta["inputs"]} | {o["name"] for o in meta["outputs"]}
        assert not names & {*CONTROL_INPUTS, STATE_INPUT, STATE_OUTPUT}, meta


def _check_sequence_config(config: dict, model: str, idle_us: int, strategy: str,
                           corrid_type: str) -> None:
    assert config["name"] == model, config
    assert [i["name"] for i in config["input"]] == ["INPUT"], config["input"]
    assert STATE_OUTPUT not in [o["name"] for o in config["output"]], config["output"]
    sb = config.get("sequence_batching")
    assert sb, f"no sequence_batching in {config}"
    assert int(sb["max_sequence_idle_microseconds"]) == idle_us, sb
    assert strategy in sb, sb
    controls = {c["name"]: c["control"] for c in sb["control_input"]}
    assert sorted(controls) == sorted(CONTROL_INPUTS), sb
    for name, kind in [("START", "CONTROL_SEQUENCE_START"), ("END", "CONTROL_SEQUENCE_END"),
                       ("READY", "CONTROL_SEQUENCE_READY")]:
        assert len(controls[name]) == 1, controls[name]
        # proto3 JSON may leave out an enum at its default (CONTROL_SEQUENCE_START is 0):
        # tritonclient.grpc's as_json does; Triton's and oxserve's HTTP answers print it.
        assert controls[name][0].get("kind", "CONTROL_SEQUENCE_START") == kind, controls[name]
        assert [int(x) for x in controls[name][0]["int32_false_true"]] == [0, 1], controls[name]
    assert controls["CORRID"][0]["kind"] == "CONTROL_SEQUENCE_CORRID", controls["CORRID"]
    assert controls["CORRID"][0]["data_type"] == corrid_type, controls["CORRID"]
    assert len(sb["state"]) == 1, sb
    state = sb["state"][0]
    assert state["input_name"] == STATE_INPUT and state["output_name"] == STATE_OUTPUT, state
    assert state["data_type"] == "TYPE_INT32", state
    assert [int(d) for d in state["dims"]] == [1], state
    assert len(state["initial_state"]) == 1, state  # a repeated field in Triton's proto
    initial = state["initial_state"][0]
    assert initial["name"] == "zeros" and initial["zero_data"] is True, initial
    assert initial["data_type"] == "TYPE_INT32", initial


def test_config_holds_sequence_batching_http(seq_server):
    r = requests.get(f"{seq_server.http_url}/v2/models/seq_direct/config", timeout=30)
    assert r.status_code == 200, r.text
    config = r.json()
    _check_sequence_config(config, "seq_direct", 5_000_000, "direct", "TYPE_UINT64")
    assert int(config["max_batch_size"]) == MAX_BATCH_SIZE, config
    # Over HTTP every field is printed, defaults included (as Triton does).
    kinds = {c["name"]: c["control"][0].get("kind")
             for c in config["sequence_batching"]["control_input"]}
    assert kinds["START"] == "CONTROL_SEQUENCE_START", kinds
    r = requests.get(f"{seq_server.http_url}/v2/models/seq_oldest/config", timeout=30)
    assert r.status_code == 200, r.text
    oldest = r.json()["sequence_batching"]["oldest"]
    assert int(oldest["max_candidate_sequences"]) == 8, oldest
    assert [int(x) for x in oldest["preferred_batch_size"]] == [2], oldest
    assert int(oldest["max_queue_delay_microseconds"]) == 2000, oldest
    r = requests.get(f"{seq_server.http_url}/v2/models/seq_nobatch/config", timeout=30)
    assert r.status_code == 200, r.text
    _check_sequence_config(r.json(), "seq_nobatch", 5_000_000, "direct", "TYPE_STRING")


def test_config_holds_sequence_batching_grpc(seq_server):
    c = grpc_client(seq_server)
    try:
        config = c.get_model_config("seq_direct").config
        sb = config.sequence_batching
        assert sb.WhichOneof("strategy_choice") == "direct", sb
        assert sb.max_sequence_idle_microseconds == 5_000_000, sb
        assert [ci.name for ci in sb.control_input] == CONTROL_INPUTS, sb
        assert [s.input_name for s in sb.state] == [STATE_INPUT], sb
        _check_sequence_config(c.get_model_config("seq_direct", as_json=True)["config"],
                               "seq_direct", 5_000_000, "direct", "TYPE_UINT64")
        idle = c.get_model_config("seq_idle").config.sequence_batching
        assert idle.max_sequence_idle_microseconds == 300_000, idle
        oldest = c.get_model_config("seq_oldest").config.sequence_batching
        assert oldest.WhichOneof("strategy_choice") == "oldest", oldest
        assert oldest.oldest.max_candidate_sequences == 8, oldest
    finally:
        c.close()


# ---------------------------------------------------------------------------------------
# one sequence
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["seq_direct", "seq_oldest"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_sequence(client, protocol, model):
    """[5, 2, 7, 1], START on the first, END on the last: the running sum (the reference's and
    the one written here agree), the control rows, and the correlation ID echoed."""
    seq_id = new_id()
    got = run_sequence(client, protocol, model, seq_id, [5, 2, 7, 1])
    assert [int(g["OUTPUT"][0, 0]) for g in got] == [5, 7, 14, 15]
    assert [g["CONTROLS"][0].tolist() for g in got] == [[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]
    assert all(int(g["CORRID_OUT"][0, 0]) == seq_id for g in got)
    if model == "seq_direct":
        assert len({int(g["SLOT"][0, 0]) for g in got}) == 1, [g["SLOT"] for g in got]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_start_and_end_in_one_request(client, protocol):
    """A one-request sequence (START and END together) answers INPUT, CONTROLS [1,1,1]."""
    seq_id = new_id()
    (got,) = run_sequence(client, protocol, "seq_direct", seq_id, [42])
    assert int(got["OUTPUT"][0, 0]) == 42 and got["CONTROLS"][0].tolist() == [1, 1, 1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_string_sequence_ids(client, protocol):
    """seq_nobatch takes string correlation IDs (CORRID TYPE_STRING); CORRID_OUT echoes it."""
    seq_id = f"user-42-{protocol}"
    got = run_sequence(client, protocol, "seq_nobatch", seq_id, [5, 2, 7, 1])
    assert [int(g["OUTPUT"][0]) for g in got] == [5, 7, 14, 15]
    for g in got:
        echoed = [v.decode() if isinstance(v, bytes) else v for v in g["CORRID_OUT"].tolist()]
        assert echoed == [seq_id], g["CORRID_OUT"]
    # The same ID again once that sequence ended: a new sequence, the sum starts over.
    run_sequence(client, protocol, "seq_nobatch", seq_id, [3, 4])


# ---------------------------------------------------------------------------------------
# several sequences at once
# ---------------------------------------------------------------------------------------

def _run_concurrent(server: ServerProcess, protocol: str, model: str, n_seq: int, n_steps: int,
                    lockstep: bool, seed: int) -> dict[int, list[dict]]:
    """`n_seq` sequences of `n_steps`, one thread (and client) each. With `lockstep` every
    sequence sends step k only once all have had their answer to step k-1, so the sequences
    interleave request by request; without, all start together and run freely. Returns the
    responses by sequence ID (every one checked against that sequence's reference)."""
    ids = [new_id() for _ in range(n_seq)]
    values = {sid: sequence_values(seed + i, n_steps) for i, sid in enumerate(ids)}
    expected = {sid: reference_run(model, sid, values[sid]) for sid in ids}
    barrier = threading.Barrier(n_seq, timeout=TIMEOUT_S)
    failures: list[str] = []
    lock = threading.Lock()

    def run(sid: int) -> list[dict]:
        c = make_client(server, protocol)
        got = []
        try:
            for k, v in enumerate(values[sid]):
                if lockstep or k == 0:
                    barrier.wait()
                out = send(c, protocol, model, v, sid, start=k == 0, end=k == n_steps - 1)
                check_step(model, sid, out, expected[sid][k], f"{model} seq {sid} step {k} ({protocol})")
                got.append(out)
        except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
            barrier.abort()
            with lock:
                failures.append(f"seq {sid} step {len(got)}: {type(e).__name__}: {e}")
        finally:
            c.close()
        return got

    with ThreadPoolExecutor(max_workers=n_seq) as pool:
        results = dict(zip(ids, pool.map(run, ids)))
    real = [f for f in failures if "BrokenBarrierError" not in f]
    assert not failures, f"{len(failures)} failures, first: {(real or failures)[:5]}"
    assert all(len(r) == n_steps for r in results.values()), {k: len(v) for k, v in results.items()}
    return results


@pytest.mark.parametrize("model", ["seq_direct", "seq_oldest"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_interleaved_sequences(seq_server, protocol, model):
    """6 sequences x 8 steps, interleaved request by request from 6 threads: each sequence's
    outputs equal its own reference; in seq_direct a sequence keeps its batch slot (SLOT, the
    row it is given in every batch) for its whole life."""
    results = _run_concurrent(seq_server, protocol, model, n_seq=6, n_steps=8, lockstep=True,
                              seed=100)
    if model == "seq_direct":
        for sid, got in results.items():
            slots = [int(g["SLOT"][0, 0]) for g in got]
            assert len(set(slots)) == 1, f"sequence {sid} moved between slots: {slots}"


@pytest.mark.parametrize("model", ["seq_direct", "seq_oldest"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_more_sequences_than_slots(seq_server, protocol, model):
    """12 sequences started at once: more than seq_direct's 8 batch slots (2 instances x
    max_batch_size 4) and seq_oldest's 8 candidate sequences. The extra ones wait for a slot,
    none fails, every one is correct and ends; a new sequence afterwards still gets a slot."""
    n_seq = DIRECT_INSTANCES * MAX_BATCH_SIZE + 4  # 12
    results = _run_concurrent(seq_server, protocol, model, n_seq=n_seq, n_steps=5, lockstep=False,
                              seed=200)
    if model == "seq_direct":
        for sid, got in results.items():
            slots = [int(g["SLOT"][0, 0]) for g in got]
            assert len(set(slots)) == 1, f"sequence {sid} moved between slots: {slots}"
    c = make_client(seq_server, protocol)
    try:
        run_sequence(c, protocol, model, new_id(), [1, 2, 3])
    finally:
        c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_direct_slot_is_the_batch_row(client, protocol):
    """Direct strategy, as Triton builds its batches: a new sequence takes the lowest free slot,
    and a batch holds rows 0..(highest busy slot), idle slots padded with null requests, so a
    sequence's row is its slot even when a lower slot is empty. On seq_idle (one instance, 4
    slots; every step here is far quicker than its 300 ms idle limit): A, B, C started one
    after another take slots 0, 1, 2; after A ends, B and C keep rows 1 and 2, and a new
    sequence D takes slot 0 again."""
    model = "seq_idle"
    ids = {name: new_id() for name in "ABCD"}
    refs = {name: Reference(model, sid) for name, sid in ids.items()}

    def step(name: str, value: int, start: bool = False, end: bool = False) -> int:
        out = send(client, protocol, model, value, ids[name], start=start, end=end)
        check_step(model, ids[name], out, refs[name].step(value, start, end), f"{name} {value}")
        return int(out["SLOT"][0, 0])

    assert [step("A", 1, start=True), step("B", 2, start=True), step("C", 3, start=True)] == [0, 1, 2]
    assert step("A", 4, end=True) == 0
    assert [step("B", 5), step("C", 6)] == [1, 2]
    assert step("D", 7, start=True) == 0
    assert [step("B", 8, end=True), step("C", 9, end=True), step("D", 10, end=True)] == [1, 2, 0]


def test_grpc_stream_interleaved_sequences(seq_server):
    """Three sequences interleaved on one gRPC stream (every request sent before any answer is
    read): every answer comes back, correct, and each sequence's answers in its request order,
    each sequence on one batch slot. One refused request in the middle (an unknown ID without
    START) comes back as an error on the stream (Triton: the response's error_message) with
    Triton's message, and the stream goes on."""
    n_steps = 5
    ids = [new_id() for _ in range(3)]
    stray = new_id()
    values = {sid: sequence_values(300 + i, n_steps) for i, sid in enumerate(ids)}
    expected = {sid: reference_run("seq_direct", sid, values[sid]) for sid in ids}
    answers: queue.Queue = queue.Queue()

    def callback(result, error):
        answers.put((result, error))

    c = grpc_client(seq_server)
    received: dict[int, list[tuple[int, dict]]] = {sid: [] for sid in ids}
    errors: list[str] = []
    try:
        c.start_stream(callback=callback)
        for k in range(n_steps):
            for sid in ids:
                c.async_stream_infer(
                    "seq_direct", _inputs("grpc", "seq_direct", values[sid][k]),
                    request_id=f"{sid}:{k}", sequence_id=sid, sequence_start=k == 0,
                    sequence_end=k == n_steps - 1)
            if k == 2:
                c.async_stream_infer("seq_direct", _inputs("grpc", "seq_direct", 1),
                                     request_id=f"{stray}:0", sequence_id=stray)
        for _ in range(n_steps * len(ids) + 1):
            try:
                result, error = answers.get(timeout=TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"stream: answers missing after {TIMEOUT_S:.0f} s: {received}, "
                            f"errors {errors}")
            if error is not None:
                errors.append(error.message() if hasattr(error, "message") else str(error))
                continue
            response = result.get_response()
            sid, k = (int(x) for x in response.id.split(":"))
            assert sid in received, f"answer for {response.id!r}"
            names = [o.name for o in response.outputs]
            received[sid].append((k, {n: result.as_numpy(n) for n in names}))
    finally:
        c.stop_stream()
        c.close()
    assert len(errors) == 1 and no_start_message("seq_direct", stray) in errors[0], errors
    for sid in ids:
        steps = [k for k, _ in received[sid]]
        assert steps == list(range(n_steps)), f"sequence {sid}: answers in order {steps}"
        for k, got in received[sid]:
            check_step("seq_direct", sid, got, expected[sid][k], f"stream seq {sid} step {k}")
        slots = {int(got["SLOT"][0, 0]) for _, got in received[sid]}
        assert len(slots) == 1, f"sequence {sid} moved between slots: {slots}"
    assert answers.empty(), "more answers than requests"


# ---------------------------------------------------------------------------------------
# bad requests
# ---------------------------------------------------------------------------------------

def _raw_zero_id(server: ServerProcess, protocol: str):
    """A call sending `sequence_id` 0 explicitly (tritonclient leaves 0 out), with START and END."""
    if protocol == "http":
        def call():
            body = {"parameters": {"sequence_id": 0, "sequence_start": True, "sequence_end": True},
                    "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "INT32", "data": [5]}]}
            r = requests.post(f"{server.http_url}/v2/models/seq_direct/infer", json=body, timeout=30)
            if r.status_code != 200:
                raise InferenceServerException(r.json().get("error", r.text), str(r.status_code))
        return call

    def call():
        request = service_pb2.ModelInferRequest(model_name="seq_direct")
        request.parameters["sequence_id"].int64_param = 0
        request.parameters["sequence_start"].bool_param = True
        request.parameters["sequence_end"].bool_param = True
        tensor = request.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
        tensor.contents.int_contents.append(5)
        channel = grpc.insecure_channel(server.grpc_host)
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as e:
            raise InferenceServerException(e.details(), str(e.code())) from None
        finally:
            channel.close()
    return call


BAD_CASES = ["no_sequence_id", "sequence_id_zero", "no_start", "after_end", "batch_of_two",
             "start_as_input", "state_as_input"]


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_request_is_invalid_argument(seq_server, client, protocol, case):
    """Each refused with 400 / INVALID_ARGUMENT and a message saying why; the server answers a
    good sequence on the same model afterwards:

      no_sequence_id     START and END set, no correlation ID
      sequence_id_zero   correlation ID 0 sent explicitly (0 means "none" in Triton)
      no_start           the first request of a new correlation ID without START
      after_end          a request without START to an ID whose sequence has ended
      batch_of_two       INPUT [2,1]: the sequence batcher takes batch size 1 only
      start_as_input     START sent as a client input (the sequence batcher's, not the client's)
      state_as_input     INPUT_STATE sent as a client input

    The messages are Triton's for the sequence cases (see no_corrid_message and the others);
    an extra input has to be named in quotes, as both of Triton's forms do ("unexpected
    inference input 'START' for model ..." and "expected 1 inputs but got 2 inputs ... Got
    input(s) ['INPUT','START'] ...").
    """
    model = "seq_direct"
    seq_id = new_id()
    one = np.ones([1, 1], dtype=np.int32)
    if case == "no_sequence_id":
        expect_invalid(protocol, lambda: send(client, protocol, model, 5, 0, start=True, end=True),
                       no_corrid_message(model))
    elif case == "sequence_id_zero":
        expect_invalid(protocol, _raw_zero_id(seq_server, protocol), no_corrid_message(model))
    elif case == "no_start":
        expect_invalid(protocol, lambda: send(client, protocol, model, 5, seq_id),
                       no_start_message(model, seq_id))
    elif case == "after_end":
        run_sequence(client, protocol, model, seq_id, [5, 2])
        expect_invalid(protocol, lambda: send(client, protocol, model, 7, seq_id),
                       no_start_message(model, seq_id))
        expect_invalid(protocol, lambda: send(client, protocol, model, 7, seq_id, end=True),
                       no_start_message(model, seq_id))
    elif case == "batch_of_two":
        expect_invalid(protocol, lambda: send(client, protocol, model, 5, seq_id, start=True, rows=2),
                       batch_size_message(model))
    elif case == "start_as_input":
        expect_invalid(protocol, lambda: send(client, protocol, model, 5, seq_id, start=True,
                                              extra={"START": one}), "'START'")
    elif case == "state_as_input":
        expect_invalid(protocol, lambda: send(client, protocol, model, 5, seq_id, start=True,
                                              extra={STATE_INPUT: one * 100}), f"'{STATE_INPUT}'")
    else:
        raise AssertionError(case)
    # The refused request started nothing: a good sequence with that same ID, then a new one.
    run_sequence(client, protocol, model, seq_id, [3, 4, 5])
    run_sequence(client, protocol, model, new_id(), [1, 2])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_corrid_type_mismatch(client, protocol):
    """A correlation ID of the other type than the CORRID control's data_type is refused
    (400 / INVALID_ARGUMENT), as Triton's InferenceRequest::ValidateCorrelationId does (core
    2025+): a string ID to seq_direct (TYPE_UINT64), an integer ID to seq_nobatch (TYPE_STRING).
    Both models answer good sequences afterwards."""
    expect_invalid(protocol, lambda: send(client, protocol, "seq_direct", 5, f"str-{new_id()}",
                                          start=True, end=True),
                   corrid_type_message("seq_direct", "BYTES", "UINT64"))
    expect_invalid(protocol, lambda: send(client, protocol, "seq_nobatch", 5, new_id(),
                                          start=True, end=True),
                   corrid_type_message("seq_nobatch", "UINT64", "BYTES"))
    run_sequence(client, protocol, "seq_direct", new_id(), [1, 2])
    run_sequence(client, protocol, "seq_nobatch", f"user-{new_id()}", [1, 2])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_id_to_string_corrid_model(client, protocol):
    """No correlation ID at all to seq_nobatch (CORRID TYPE_STRING). In Triton a missing ID is
    the integer 0, and ValidateCorrelationId (run in Normalize) comes before the scheduler's
    "non-zero or non-empty" check, so the answer is the data-type message, not that one."""
    expect_invalid(protocol, lambda: send(client, protocol, "seq_nobatch", 5, 0, start=True, end=True),
                   corrid_type_message("seq_nobatch", "UINT64", "BYTES"))
    run_sequence(client, protocol, "seq_nobatch", f"user-{new_id()}", [1, 2])


# ---------------------------------------------------------------------------------------
# sequence lifetime
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_idle_sequence_is_released(client, protocol):
    """seq_idle ends a sequence idle for more than 300 ms: after 1 s without a request the next
    one (no START) is refused as for an unknown sequence; a new START with the same ID works
    and the sum starts over from the initial (zero) state."""
    model = "seq_idle"
    seq_id = new_id()
    first = send(client, protocol, model, 5, seq_id, start=True)
    check_step(model, seq_id, first, reference_run(model, seq_id, [5, 0])[0], "idle: first")
    time.sleep(max(1.0, 3 * IDLE_LIMIT_S))
    expect_invalid(protocol, lambda: send(client, protocol, model, 2, seq_id),
                   no_start_message(model, seq_id))
    got = run_sequence(client, protocol, model, seq_id, [3, 4])
    assert [int(g["OUTPUT"][0, 0]) for g in got] == [3, 7]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_restart_live_sequence(client, protocol):
    """START again on a live correlation ID (its sequence not ended). Triton accepts it: no
    error, only a logged warning ("... has a conflict. The previous sequence did not end before
    this sequence start. Previous sequence will be terminated early."); the request joins the
    sequence's own slot with START=1 and the slot's implicit state is re-initialised (core
    SequenceBatchScheduler::Enqueue and SequenceBatch::UpdateImplicitState; Triton's QA
    test_no_sequence_end). So: the new START answers INPUT alone, the sum continues from there
    on the same batch slot, and END ends it."""
    model = "seq_direct"
    seq_id = new_id()
    first = Reference(model, seq_id)
    for i, v in enumerate([5, 2]):
        out = send(client, protocol, model, v, seq_id, start=i == 0)
        check_step(model, seq_id, out, first.step(v, i == 0, False), f"first run step {i}")
        assert int(out["OUTPUT"][0, 0]) == [5, 7][i]
    slot = int(out["SLOT"][0, 0])
    expected = reference_run(model, seq_id, [10, 3, 1])
    after = []
    for i, v in enumerate([10, 3, 1]):
        out = send(client, protocol, model, v, seq_id, start=i == 0, end=i == 2)
        check_step(model, seq_id, out, expected[i], f"restart step {i}")
        after.append(out)
    assert [int(g["OUTPUT"][0, 0]) for g in after] == [10, 13, 14]
    assert after[0]["CONTROLS"][0].tolist() == [1, 0, 1]
    assert {int(g["SLOT"][0, 0]) for g in after} == {slot}, [g["SLOT"] for g in after]


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------

def _stats(client, model: str) -> dict:
    rows = [s for s in client.get_inference_statistics(model)["model_stats"]
            if s["name"] == model and s["version"] == "1"]
    assert len(rows) == 1, f"{model}: {rows}"
    return rows[0]


def test_statistics_count_every_request(seq_server):
    """seq_direct's inference_count (and success count) grows by the number of requests sent
    (every request is one inference of batch size 1); the sequences run one at a time, so no
    batch is padded with idle slots."""
    h, g = http_client(seq_server), grpc_client(seq_server)
    try:
        before = _stats(h, "seq_direct")
        run_sequence(h, "http", "seq_direct", new_id(), [1, 2, 3, 4])
        run_sequence(g, "grpc", "seq_direct", new_id(), [5, 6, 7])
        run_sequence(h, "http", "seq_direct", new_id(), [8])
        after = _stats(h, "seq_direct")
        sent = 8
        grew = int(after["inference_count"]) - int(before["inference_count"])
        assert grew == sent, (before, after)
        ok = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
        assert ok == sent, (before, after)
        stat = g.get_inference_statistics("seq_direct", "1").model_stats[0]
        assert stat.inference_count >= int(after["inference_count"]), stat
    finally:
        h.close()
        g.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_asyncio_clients_run_interleaved_sequences(seq_server, protocol):
    """tritonclient's asyncio clients (http.aio, grpc.aio): three sequences interleaved step by
    step from one event loop, every answer against the onnxruntime reference, then a request
    without START refused with Triton's message."""
    import asyncio

    import tritonclient.grpc.aio as grpcaio
    import tritonclient.http.aio as httpaio

    model = "seq_direct"
    seqs = {new_id(): sequence_values(seed, 5) for seed in (21, 22, 23)}
    expected = {s: reference_run(model, s, values) for s, values in seqs.items()}

    async def main() -> None:
        client = (httpaio.InferenceServerClient(seq_server.http_host) if protocol == "http"
                  else grpcaio.InferenceServerClient(seq_server.grpc_host))
        try:
            for step in range(5):
                calls = [client.infer(model, _inputs(protocol, model, values[step]), sequence_id=s,
                                      sequence_start=step == 0, sequence_end=step == 4)
                         for s, values in seqs.items()]
                for s, result in zip(seqs, await asyncio.gather(*calls)):
                    got = {n: result.as_numpy(n) for n in BATCHED_OUTPUTS}
                    check_step(model, s, got, expected[s][step], f"aio {protocol} seq {s} step {step}")
            stray = new_id()
            with pytest.raises(InferenceServerException) as refused:
                await client.infer(model, _inputs(protocol, model, 1), sequence_id=stray)
            assert no_start_message(model, stray) in str(refused.value), str(refused.value)
        finally:
            await client.close()

    asyncio.run(main())
