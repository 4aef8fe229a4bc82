"""TF Serving's REST API (`/v1/models/...`) on oxserve's HTTP port, with plain HTTP clients
(`requests`, `http.client`), as TF Serving's own documentation uses curl.

Fixtures and references: scripts/make_tf_models.py (see _tf.py: where they come from, the skip
when the TensorFlow venv or C library is missing, the tolerance rules). One server for the
module, on a temporary repository holding:

- every fixture SavedModel in TF Serving's layout (`<model>/<version>/saved_model.pb`), with no
  config.pbtxt, so oxserve auto-completes it (Triton's max_batch_size 4 for models whose
  tensors all have a leading -1: longer references are sent in parts of at most 4 rows);
- two_sig with both versions and a config.pbtxt setting only the parameter
  `oxserve_auto_batching: "false"` (unbatched: any batch size, as in TF Serving),
  `version_policy: { all: {} }` and the labels stable -> 1 and canary -> 2;
- the ONNX example add_sub (INPUT0/INPUT1 FP32 [16] batched -> OUTPUT0 = sum, OUTPUT1 =
  difference), which answers through the same API with a `serving_default` signature.

What is checked, per TF Serving's REST API documentation and its server's code
(tensorflow_serving/model_servers/http_rest_api_handler.cc, util/json_tensor.cc):

1. row (`instances` -> `predictions`) and columnar (`inputs` -> `outputs`) predict for every
   predict signature of references.json, each format answering in its own shape;
2. strings: non-ASCII text, `{"b64": ...}` inputs, non-UTF-8 outputs as `{"b64": ...}`;
3. classify and regress from JSON examples, with and without `context`;
4. versions and labels: `/versions/V` and `/labels/L`;
5. the status and metadata JSON (metadata against signatures.json, less TensorFlow's internal
   `__saved_model_init_op`);
6. the error statuses and messages, each followed by a good request;
7. NaN / Infinity / -Infinity, bare in requests and responses (Python's json accepts them);
8. an ONNX model through predict, metadata and status.
"""

from __future__ import annotations

import base64
import json
import math
import shutil

import ml_dtypes
import numpy as np
import pytest
import requests

import _tf
from _models import add_sub_inputs, ort_run
from _server import ROOT, ServerProcess

_SKIP = _tf.skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

MODELS = _tf.models_dir()
REFERENCES = _tf.references()
SIGNATURES = _tf.signatures()
DEFAULT = _tf.DEFAULT_SIGNATURE
PREDICT_METHOD = "tensorflow/serving/predict"
# Triton's max_batch_size for an auto-completed batched SavedModel (no config.pbtxt).
AUTO_MAX_BATCH_SIZE = 4
# Keeps two_sig unbatched, so requests of any batch size reach it as in TF Serving. (An
# explicit `max_batch_size: 0` cannot do this: it is proto3's default, indistinguishable from
# leaving batching unsaid, which auto-completes to 4 as in Triton.)
TWO_SIG_CONFIG = """\
parameters { key: "oxserve_auto_batching" value: { string_value: "false" } }
version_policy: { all: {} }
version_labels { key: "stable" value: 1 }
version_labels { key: "canary" value: 2 }
"""
LABELS = {"stable": "1", "canary": "2"}
SIGNATURE_NOT_FOUND = 'Serving signature name: "nope" not found in signature def'


# ---------------------------------------------------------------------------------------------
# Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("tfserving-rest")
    for model in sorted(REFERENCES):
        shutil.copytree(MODELS / model, repo / model)
    (repo / "two_sig" / "config.pbtxt").write_text(TWO_SIG_CONFIG)
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", repo / "add_sub")
    srv = ServerProcess("tfserving-rest", [str(repo)]).start()
    try:
        yield srv
    finally:
        srv.stop_and_check()


# ---------------------------------------------------------------------------------------------
# HTTP


class Reply:
    """One HTTP answer: status, the body parsed with Python's json (NaN and Infinity allowed),
    and the raw text."""

    def __init__(self, response: requests.Response):
        self.status = response.status_code
        self.text = response.text
        self.content_type = response.headers.get("content-type", "")
        try:
            self.body = json.loads(self.text)
        except ValueError:
            self.body = None

    def __repr__(self) -> str:
        return f"HTTP {self.status} {self.text[:2000]!r}"


def post(server, path: str, body) -> Reply:
    """POSTs `body` (a dict, written with bare NaN/Infinity as Python's json does, or raw
    text/bytes) to `path`."""
    data = json.dumps(body) if isinstance(body, (dict, list)) else body
    if isinstance(data, str):
        data = data.encode("utf-8")
    r = requests.post(server.http_url + path, data=data, headers={"content-type": "application/json"},
                      timeout=60, **server.requests_kwargs)
    return Reply(r)


def get(server, path: str) -> Reply:
    return Reply(requests.get(server.http_url + path, timeout=60, **server.requests_kwargs))


def ok(reply: Reply) -> dict:
    assert reply.status == 200, reply
    assert reply.content_type.startswith("application/json"), (reply.content_type, reply)
    assert isinstance(reply.body, dict), reply
    return reply.body


def expect_error(reply: Reply, status: int, *words: str) -> str:
    """A TF Serving error: the status, `{"error": "..."}` and the words in the message."""
    assert reply.status == status, reply
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply
    message = reply.body["error"]
    assert isinstance(message, str) and message, reply
    for word in words:
        assert word in message, (word, message)
    return message


def model_path(model: str, version: str | None = None, label: str | None = None) -> str:
    path = f"/v1/models/{model}"
    if version is not None:
        path += f"/versions/{version}"
    if label is not None:
        path += f"/labels/{label}"
    return path


# ---------------------------------------------------------------------------------------------
# JSON tensors


def nest(flat: list, shape: list[int]):
    """A flat row-major list as nested lists of `shape` (a bare value for shape [])."""
    if not shape:
        assert len(flat) == 1, (flat, shape)
        return flat[0]
    if len(shape) == 1:
        assert len(flat) == shape[0], (len(flat), shape)
        return list(flat)
    step = math.prod(shape[1:])
    return [nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def json_shape(value) -> list[int]:
    if isinstance(value, list):
        if not value:
            return [0]
        inner = json_shape(value[0])
        for item in value[1:]:
            assert json_shape(item) == inner, f"ragged JSON tensor: {value!r}"
        return [len(value), *inner]
    return []


def flatten(value) -> list:
    if isinstance(value, list):
        return [leaf for item in value for leaf in flatten(item)]
    return [value]


def _leaf(value, dtype: str):
    """One JSON element, checked to be of the JSON type TF Serving writes for `dtype`."""
    if dtype == "DT_STRING":
        if is_b64(value):
            return base64.b64decode(value["b64"], validate=True)
        assert isinstance(value, str), (dtype, value)
        return value.encode("utf-8")
    if dtype == "DT_BOOL":
        assert isinstance(value, bool), (dtype, value)
        return value
    if dtype in ("DT_FLOAT", "DT_DOUBLE", "DT_HALF", "DT_BFLOAT16"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (dtype, value)
        return float(value)
    assert isinstance(value, int) and not isinstance(value, bool), (dtype, value)
    return value


def from_json(value, dtype: str) -> np.ndarray:
    """A JSON tensor from a response as the numpy array _tf.to_numpy makes of a reference."""
    shape = json_shape(value)
    data = [_leaf(v, dtype) for v in flatten(value)]
    if dtype == "DT_STRING":
        arr = np.empty(len(data), dtype=object)
        arr[:] = data
    elif dtype == "DT_BFLOAT16":
        arr = np.array(data, dtype=np.float32).astype(ml_dtypes.bfloat16)
    else:
        arr = np.array(data, dtype=_tf.DTYPES[dtype][0])
    return arr.reshape(shape)


def ref_json(tensor: dict):
    """A references.json tensor as the JSON value a TF Serving client sends."""
    return nest(tensor["data"], tensor["shape"])


def rows_of(tensor: dict, start: int, stop: int) -> dict:
    """Rows [start, stop) of a references.json tensor, in its own form."""
    per_row = math.prod(tensor["shape"][1:])
    return {"dtype": tensor["dtype"], "shape": [stop - start, *tensor["shape"][1:]],
            "data": tensor["data"][start * per_row:stop * per_row]}


def latest(model: str) -> str:
    return max(REFERENCES[model], key=int)


def max_rows(model: str, version: str) -> int | None:
    """The most rows one request may carry: two_sig is unbatched (any), other batched models
    take the auto-completed 4."""
    if model != "two_sig" and _tf.model_is_batched(model, version):
        return AUTO_MAX_BATCH_SIZE
    return None


def predict_body(fmt: str, sig: str, inputs: dict[str, dict], named_single: bool = True,
                 send_default_name: bool = False) -> dict:
    """A predict body in TF Serving's row or columnar format from references.json tensors."""
    body: dict = {}
    if sig != DEFAULT or send_default_name:
        body["signature_name"] = sig
    if fmt == "row":
        batch = {t["shape"][0] for t in inputs.values()}
        assert len(batch) == 1, batch
        n = batch.pop()
        if len(inputs) == 1:
            (tensor,) = inputs.values()
            body["instances"] = ref_json(tensor)
        else:
            columns = {k: ref_json(t) for k, t in inputs.items()}
            body["instances"] = [{k: columns[k][i] for k in columns} for i in range(n)]
    else:
        if len(inputs) == 1 and not named_single:
            (tensor,) = inputs.values()
            body["inputs"] = ref_json(tensor)
        else:
            body["inputs"] = {k: ref_json(t) for k, t in inputs.items()}
    return body


def predict_outputs(fmt: str, body: dict, outputs: dict[str, dict]) -> dict[str, np.ndarray]:
    """The outputs of a predict response, checked to be in the request's format: row ->
    `predictions` (one output: a list of per-row values; several: a list of objects), columnar
    -> `outputs` (one output: the value; several: an object)."""
    keys = sorted(outputs)
    if fmt == "row":
        assert set(body) == {"predictions"}, body
        preds = body["predictions"]
        assert isinstance(preds, list) and preds, body
        if len(keys) == 1:
            assert not any(isinstance(p, dict) and not is_b64(p) for p in preds), preds
            return {keys[0]: from_json(preds, outputs[keys[0]]["dtype"])}
        got = {}
        for p in preds:
            assert isinstance(p, dict) and sorted(p) == keys, (p, keys)
        for k in keys:
            got[k] = from_json([p[k] for p in preds], outputs[k]["dtype"])
        return got
    assert set(body) == {"outputs"}, body
    out = body["outputs"]
    if len(keys) == 1:
        assert not (isinstance(out, dict) and not is_b64(out)), out
        return {keys[0]: from_json(out, outputs[keys[0]]["dtype"])}
    assert isinstance(out, dict) and sorted(out) == keys, (out, keys)
    return {k: from_json(out[k], outputs[k]["dtype"]) for k in keys}


def check_predict(server, model: str, version: str, sig: str, fmt: str, path: str | None = None,
                  named_single: bool = True, send_default_name: bool = False) -> dict[str, np.ndarray]:
    """Runs a references.json entry through `path:predict` (default: the model's path, with
    the version when it is not the latest) in `fmt`, in parts where the model takes at most 4
    rows, and compares every output with Python TensorFlow's."""
    ref = REFERENCES[model][version][sig]
    if path is None:
        path = model_path(model, None if version == latest(model) else version)
    inputs, outputs = ref["inputs"], ref["outputs"]
    ranks = {len(t["shape"]) for t in inputs.values()}
    limit = max_rows(model, version)
    if 0 in ranks or limit is None:
        parts = [(inputs, outputs)]
    else:
        n = next(iter(inputs.values()))["shape"][0]
        parts = []
        for start in range(0, n, limit):
            stop = min(n, start + limit)
            parts.append(({k: rows_of(t, start, stop) for k, t in inputs.items()},
                          {k: rows_of(t, start, stop) for k, t in outputs.items()}))
    got_parts = []
    for part_in, part_out in parts:
        body = predict_body(fmt, sig, part_in, named_single, send_default_name)
        reply = post(server, path + ":predict", body)
        got_parts.append(predict_outputs(fmt, ok(reply), part_out))
    got = {k: (np.concatenate([p[k] for p in got_parts]) if len(got_parts) > 1 else got_parts[0][k])
           for k in outputs}
    for key, tensor in outputs.items():
        _tf.assert_matches(f"{model}/{version}/{sig}/{key} ({fmt})", got[key], _tf.to_numpy(tensor))
    return got


def assert_still_serving(server) -> None:
    """A good request after an error: two_sig's reference answers, both formats."""
    assert server.alive()
    check_predict(server, "two_sig", "2", DEFAULT, "row")
    check_predict(server, "two_sig", "2", "double", "columnar")


# ---------------------------------------------------------------------------------------------
# 1. Every predict signature of references.json, row and columnar


def _predict_params():
    for model, versions in sorted(REFERENCES.items()):
        for version, sigs in sorted(versions.items()):
            for sig, ref in sorted(sigs.items()):
                if ref["method"] != PREDICT_METHOD:
                    continue
                for fmt in ("row", "columnar"):
                    if fmt == "row" and any(not t["shape"] for t in ref["inputs"].values()):
                        continue  # a scalar (rank-0) input has no rows
                    yield pytest.param(model, version, sig, fmt, id=f"{model}-v{version}-{sig}-{fmt}")


@pytest.mark.parametrize("model,version,sig,fmt", list(_predict_params()))
def test_predict_matches_references(server, model, version, sig, fmt):
    check_predict(server, model, version, sig, fmt)


def test_predict_single_input_forms(server):
    """A single-input signature takes a bare value or a named object in `inputs`, and an
    explicit `signature_name: "serving_default"` is the default."""
    check_predict(server, "mlp", "1", DEFAULT, "columnar", named_single=False)
    check_predict(server, "mlp", "1", DEFAULT, "columnar", named_single=True, send_default_name=True)
    check_predict(server, "two_sig", "2", "double", "columnar", named_single=False)
    check_predict(server, "two_sig", "2", DEFAULT, "row", send_default_name=True)
    check_predict(server, "scalar", "1", DEFAULT, "columnar", named_single=False)


def test_predict_large_batch_unbatched_model(server):
    """two_sig's config turns auto-batching off: a request of 9 rows answers, as in TF Serving."""
    ref = REFERENCES["two_sig"]["2"][DEFAULT]
    x = ref_json(ref["inputs"]["x"]) * 3
    for fmt, body in (("row", {"instances": x}), ("columnar", {"inputs": {"x": x}})):
        got = predict_outputs(fmt, ok(post(server, "/v1/models/two_sig:predict", body)), ref["outputs"])
        for key, tensor in ref["outputs"].items():
            want = _tf.to_numpy(tensor)
            _tf.assert_matches(key, got[key], np.concatenate([want] * 3))


# ---------------------------------------------------------------------------------------------
# 2. Strings


def _strings_expect(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """strings/1: length = UTF-8 bytes (int32), upper = ASCII letters upper-cased."""
    upper = np.empty(len(items), dtype=object)
    upper[:] = [b.upper() for b in items]
    return np.array([len(b) for b in items], np.int32), upper


STRING_OUTPUTS = {"length": {"dtype": "DT_INT32"}, "upper": {"dtype": "DT_STRING"}}


# (request value, bytes it stands for, the `upper` output as JSON)
STRING_ITEMS = [
    ({"b64": base64.b64encode(b"\xff\xfeab\x00c").decode()}, b"\xff\xfeab\x00c",  # not UTF-8
     {"b64": base64.b64encode(b"\xff\xfeAB\x00C").decode()}),
    ("Grüße ✓ 日本", "Grüße ✓ 日本".encode(), "GRüßE ✓ 日本"),  # non-ASCII text
    ("emoji 😀 ok", "emoji 😀 ok".encode(), "EMOJI 😀 OK"),  # outside the BMP (a surrogate pair escaped)
    ({"b64": base64.b64encode("zürich".encode()).decode()}, "zürich".encode(), "ZüRICH"),  # UTF-8 as b64
    ('say "NaN", -Infinity \\ ok', b'say "NaN", -Infinity \\ ok', 'SAY "NAN", -INFINITY \\ OK'),  # literals in a string
    ("", b"", ""),
]


@pytest.mark.parametrize("escaped", [True, False], ids=["ascii-escaped", "raw-utf8"])
@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_strings_text_and_b64(server, fmt, escaped):
    """Text (sent \\u-escaped or as raw UTF-8) and {"b64": ...} inputs, a b64 object first in
    the list; text comes back as text, bytes that are not UTF-8 as {"b64": ...}. At most 4
    rows a request (strings is auto-completed with max_batch_size 4)."""
    for items in (STRING_ITEMS[:4], STRING_ITEMS[4:]):
        values = [v for v, _, _ in items]
        raw = [b for _, b, _ in items]
        body = {"instances": values} if fmt == "row" else {"inputs": {"text": values}}
        reply = post(server, "/v1/models/strings:predict", json.dumps(body, ensure_ascii=escaped))
        got = predict_outputs(fmt, ok(reply), STRING_OUTPUTS)
        length, upper = _strings_expect(raw)
        _tf.assert_matches("length", got["length"], length)
        _tf.assert_matches("upper", got["upper"], upper)
        column = ([p["upper"] for p in reply.body["predictions"]] if fmt == "row"
                  else reply.body["outputs"]["upper"])
        assert column == [want for _, _, want in items], column


# ---------------------------------------------------------------------------------------------
# 3. Classify and regress


def _classify_reference():
    ref = REFERENCES["classify_regress"]["1"][DEFAULT]
    classes = _tf.to_numpy(ref["outputs"]["classes"])
    scores = _tf.to_numpy(ref["outputs"]["scores"])
    return ref["examples"], classes, scores


def _check_classify(body: dict, classes: np.ndarray, scores: np.ndarray) -> None:
    assert set(body) == {"results"}, body
    results = body["results"]
    assert isinstance(results, list) and len(results) == len(classes), body
    for i, per_example in enumerate(results):
        assert isinstance(per_example, list) and len(per_example) == classes.shape[1], per_example
        for j, pair in enumerate(per_example):
            assert isinstance(pair, list) and len(pair) == 2, pair
            label, score = pair
            assert label == classes[i, j].decode(), (i, j, pair)
            assert isinstance(score, float), pair
    got = np.array([[pair[1] for pair in row] for row in results], np.float32)
    _tf.assert_matches("scores", got, scores)


def _check_regress(body: dict, outputs: np.ndarray) -> None:
    assert set(body) == {"results"}, body
    results = body["results"]
    assert isinstance(results, list) and all(isinstance(v, float) for v in results), body
    _tf.assert_matches("outputs", np.array(results, np.float32), outputs.reshape(-1))


def _with_context(examples: list[dict]) -> tuple[dict, list[dict]]:
    """The examples split into a context and per-example features: the first example takes x1
    from the context, the others override it with their own (the example's feature wins)."""
    context = {"x1": examples[0]["x1"]}
    split = [{"x2": examples[0]["x2"]}] + [dict(e) for e in examples[1:]]
    return context, split


def test_classify(server):
    examples, classes, scores = _classify_reference()
    for path, extra in (("/v1/models/classify_regress:classify", {}),
                        ("/v1/models/classify_regress/versions/1:classify", {"signature_name": DEFAULT})):
        _check_classify(ok(post(server, path, {**extra, "examples": examples})), classes, scores)
    context, split = _with_context(examples)
    body = ok(post(server, "/v1/models/classify_regress:classify", {"context": context, "examples": split}))
    _check_classify(body, classes, scores)


def test_regress(server):
    ref = REFERENCES["classify_regress"]["1"]["regress"]
    examples, outputs = ref["examples"], _tf.to_numpy(ref["outputs"]["outputs"])
    body = ok(post(server, "/v1/models/classify_regress:regress",
                   {"signature_name": "regress", "examples": examples}))
    _check_regress(body, outputs)
    context, split = _with_context(examples)
    body = ok(post(server, "/v1/models/classify_regress/versions/1:regress",
                   {"signature_name": "regress", "context": context, "examples": split}))
    _check_regress(body, outputs)
    # One example alone answers its own row.
    body = ok(post(server, "/v1/models/classify_regress:regress",
                   {"signature_name": "regress", "examples": examples[2:]}))
    _check_regress(body, outputs[2:])


# ---------------------------------------------------------------------------------------------
# 4. Versions and labels


def test_versions_differ_and_match_references(server):
    results = {}
    for version in ("1", "2"):
        for sig in (DEFAULT, "double"):
            for fmt in ("row", "columnar"):
                got = check_predict(server, "two_sig", version, sig, fmt,
                                    path=model_path("two_sig", version))
                if sig == DEFAULT:
                    results[version] = got
    for key in results["1"]:
        assert not np.allclose(results["1"][key], results["2"][key]), key
    # No version: the latest.
    check_predict(server, "two_sig", "2", DEFAULT, "row", path="/v1/models/two_sig")


def test_labels_map_to_versions(server):
    for label, version in LABELS.items():
        for fmt in ("row", "columnar"):
            check_predict(server, "two_sig", version, DEFAULT, fmt, path=model_path("two_sig", label=label))
        check_predict(server, "two_sig", version, "double", "row", path=model_path("two_sig", label=label))
        meta = ok(get(server, model_path("two_sig", label=label) + "/metadata"))
        assert meta["model_spec"] == {"name": "two_sig", "signature_name": "", "version": version}, meta
        assert meta["metadata"]["signature_def"]["signature_def"] == expected_signature_defs("two_sig", version)
        # Status by label: at least the labelled version, available (TF Serving itself lists
        # every version of the model here; oxserve narrows it to the label's).
        status = ok(get(server, model_path("two_sig", label=label)))
        entries = status["model_version_status"]
        assert status_entry(version) in entries, status


# ---------------------------------------------------------------------------------------------
# 5. Status and metadata


def status_entry(version: str) -> dict:
    return {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}


def _tensor_info(t: dict) -> dict:
    if t["shape"] is None:
        shape = {"dim": [], "unknown_rank": True}
    else:
        shape = {"dim": [{"size": str(d), "name": ""} for d in t["shape"]], "unknown_rank": False}
    return {"dtype": t["dtype"], "tensor_shape": shape, "name": t["name"]}


def expected_signature_defs(model: str, version: str) -> dict:
    """signatures.json as GetModelMetadata's JSON prints it, less `__saved_model_init_op`."""
    return {
        name: {
            "inputs": {k: _tensor_info(t) for k, t in sig["inputs"].items()},
            "outputs": {k: _tensor_info(t) for k, t in sig["outputs"].items()},
            "method_name": sig["method_name"],
            "defaults": {},
        }
        for name, sig in _tf.served_signatures(model, version).items()
    }


def expected_metadata(model: str, version: str) -> dict:
    return {
        "model_spec": {"name": model, "signature_name": "", "version": version},
        "metadata": {"signature_def": {"signature_def": expected_signature_defs(model, version)}},
    }


@pytest.mark.parametrize("model", sorted(REFERENCES))
def test_status(server, model):
    versions = ["2", "1"] if model == "two_sig" else [latest(model)]
    # TF Serving lists a model's versions newest first (ServableStateMonitor::VersionMap is
    # ordered by std::greater).
    want = {"model_version_status": [status_entry(v) for v in versions]}
    assert ok(get(server, f"/v1/models/{model}")) == want
    for version in versions:
        assert ok(get(server, model_path(model, version))) == {"model_version_status": [status_entry(version)]}


@pytest.mark.parametrize("model", sorted(REFERENCES))
def test_metadata(server, model):
    version = latest(model)
    assert ok(get(server, f"/v1/models/{model}/metadata")) == expected_metadata(model, version)
    for v in sorted(REFERENCES[model]):
        assert ok(get(server, model_path(model, v) + "/metadata")) == expected_metadata(model, v)


# ---------------------------------------------------------------------------------------------
# 6. Errors, each followed by a good request

X_ROWS = [[1.0, 2.0, 3.0, 4.0]]


def _types_body(**replace) -> dict:
    """types/1's reference inputs (columnar) with some replaced."""
    inputs = {k: ref_json(t) for k, t in REFERENCES["types"]["1"][DEFAULT]["inputs"].items()}
    return {"inputs": {**inputs, **replace}}

# name -> (method, path, body, status, words in the message)
ERRORS = {
    "unknown_model_predict": ("POST", "/v1/models/nope:predict", {"instances": X_ROWS}, 404,
                              ("Servable not found for request: Latest(nope)",)),
    "unknown_model_classify": ("POST", "/v1/models/nope:classify", {"examples": [{"x1": 1.0}]}, 404,
                               ("Servable not found for request: Latest(nope)",)),
    "unknown_model_status": ("GET", "/v1/models/nope", None, 404,
                             ("Could not find any versions of model nope",)),
    "unknown_model_metadata": ("GET", "/v1/models/nope/metadata", None, 404,
                               ("Servable not found for request: Latest(nope)",)),
    "unknown_version_predict": ("POST", "/v1/models/two_sig/versions/7:predict", {"instances": X_ROWS}, 404,
                                ("Servable not found for request: Specific(two_sig, 7)",)),
    "unknown_version_status": ("GET", "/v1/models/two_sig/versions/7", None, 404,
                               ("Could not find version 7 of model two_sig",)),
    "unknown_version_metadata": ("GET", "/v1/models/two_sig/versions/7/metadata", None, 404,
                                 ("Specific(two_sig, 7)",)),
    "unknown_label_predict": ("POST", "/v1/models/two_sig/labels/x:predict", {"instances": X_ROWS}, 400,
                              ("Unrecognized servable version label: x",)),
    "unknown_label_metadata": ("GET", "/v1/models/two_sig/labels/x/metadata", None, 400,
                               ("Unrecognized servable version label: x",)),
    "unknown_signature_predict": ("POST", "/v1/models/two_sig:predict",
                                  {"signature_name": "nope", "instances": X_ROWS}, 400, (SIGNATURE_NOT_FOUND,)),
    "unknown_signature_classify": ("POST", "/v1/models/classify_regress:classify",
                                   {"signature_name": "nope", "examples": [{"x1": 1.0, "x2": 2.0}]}, 400,
                                   (SIGNATURE_NOT_FOUND,)),
    "instances_and_inputs": ("POST", "/v1/models/two_sig:predict", {"instances": X_ROWS, "inputs": X_ROWS}, 400,
                             ("only one of 'inputs' or 'instances'",)),
    "neither_instances_nor_inputs": ("POST", "/v1/models/two_sig:predict", {"signature_name": DEFAULT}, 400,
                                     ("Missing 'inputs' or 'instances' key",)),
    "empty_instances": ("POST", "/v1/models/two_sig:predict", {"instances": []}, 400, ()),
    "ragged_instances": ("POST", "/v1/models/two_sig:predict", {"instances": [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]]},
                         400, ()),
    "ragged_named_instances": ("POST", "/v1/models/classify_regress:predict",
                               {"signature_name": "predict",
                                "instances": [{"x1": 1.0, "x2": 2.0}, {"x1": [1.0, 2.0], "x2": 2.0}]}, 400, ()),
    "ragged_inputs": ("POST", "/v1/models/two_sig:predict", {"inputs": {"x": [[1.0, 2.0, 3.0, 4.0], [1.0]]}},
                      400, ()),
    "wrong_dtype_string_for_float": ("POST", "/v1/models/two_sig:predict", {"instances": [["a", 2.0, 3.0, 4.0]]},
                                     400, ("is not of expected type",)),
    "wrong_dtype_float_for_int64": ("POST", "/v1/models/two_sig:predict",
                                    {"signature_name": "double", "inputs": [[1.5, 2]]}, 400,
                                    ("is not of expected type",)),
    "wrong_dtype_number_for_string": ("POST", "/v1/models/strings:predict", {"instances": [7]}, 400,
                                      ("is not of expected type",)),
    "bad_base64": ("POST", "/v1/models/strings:predict", {"instances": [{"b64": "!!not base64!!"}]}, 400,
                   ("base64",)),
    "classify_on_predict_signature": ("POST", "/v1/models/two_sig:classify", {"examples": [{"x1": 1.0}]}, 400,
                                      ("Expected classification signature method_name",)),
    "classify_on_regress_signature": ("POST", "/v1/models/classify_regress:classify",
                                      {"signature_name": "regress", "examples": [{"x1": 1.0, "x2": 2.0}]}, 400,
                                      ("Expected classification signature method_name",)),
    "regress_on_classify_signature": ("POST", "/v1/models/classify_regress:regress",
                                      {"examples": [{"x1": 1.0, "x2": 2.0}]}, 400,
                                      ("Expected regression signature method_name",)),
    "missing_input_columnar": ("POST", "/v1/models/types:predict", {"inputs": {"i8": [[1, 2]]}}, 400,
                               ("input size does not match signature",)),
    "missing_input_row": ("POST", "/v1/models/classify_regress:predict",
                          {"signature_name": "predict", "instances": [{"x1": 1.0}]}, 400,
                          ("input size does not match signature",)),
    "extra_input_columnar": ("POST", "/v1/models/two_sig:predict",
                             {"inputs": {"x": X_ROWS, "bogus": [1.0]}}, 400, ("bogus",)),
    "extra_input_row": ("POST", "/v1/models/two_sig:predict",
                        {"instances": [{"x": X_ROWS[0], "bogus": 1.0}]}, 400, ("bogus",)),
    "malformed_json": ("POST", "/v1/models/two_sig:predict", '{"instances": [[1, 2, 3, 4]', 400,
                       ("JSON Parse error",)),
    "not_an_object": ("POST", "/v1/models/two_sig:predict", "[[1, 2, 3, 4]]", 400, ()),
    "empty_body": ("POST", "/v1/models/two_sig:predict", "", 400, ()),
    "unknown_verb": ("POST", "/v1/models/two_sig:explode", {"instances": X_ROWS}, 400, ("Malformed request",)),
    "get_on_predict": ("GET", "/v1/models/two_sig:predict", None, 400, ("Malformed request",)),
    "post_without_verb": ("POST", "/v1/models/two_sig", {"instances": X_ROWS}, 400, ("Malformed request",)),
    # TF Serving resolves a label before it looks for the servable (ServerCore::
    # GetModelVersionForLabel): an unknown model's label is an unknown label.
    "unknown_model_with_label": ("POST", "/v1/models/nope/labels/x:predict", {"instances": X_ROWS}, 400,
                                 ("Unrecognized servable version label: x",)),
    "version_not_a_number": ("GET", "/v1/models/two_sig/versions/abc", None, 400, ()),
    "signature_name_not_a_string": ("POST", "/v1/models/two_sig:predict",
                                    {"signature_name": 5, "instances": X_ROWS}, 400, ()),
    "plain_instances_for_several_inputs": ("POST", "/v1/models/types:predict", {"instances": [[1, 2]]}, 400, ()),
    "plain_inputs_for_several_inputs": ("POST", "/v1/models/types:predict", {"inputs": [[1, 2]]}, 400, ()),
    "objects_then_list_instances": ("POST", "/v1/models/two_sig:predict",
                                    {"instances": [{"x": X_ROWS[0]}, X_ROWS[0]]}, 400, ()),
    "uint8_out_of_range": ("POST", "/v1/models/types:predict", _types_body(u8=[[0, 300], [1, 2]]), 400,
                           ("is not of expected type",)),
    "int8_out_of_range": ("POST", "/v1/models/types:predict", _types_body(i8=[[-129, 0], [1, 2]]), 400,
                          ("is not of expected type",)),
    "bool_from_number": ("POST", "/v1/models/types:predict", _types_body(flag=[[1, 0], [0, 1]]), 400,
                         ("is not of expected type",)),
    "examples_missing": ("POST", "/v1/models/classify_regress:classify", {"context": {"x1": 1.0}}, 400, ()),
    "examples_empty": ("POST", "/v1/models/classify_regress:classify", {"examples": []}, 400, ()),
    "example_not_an_object": ("POST", "/v1/models/classify_regress:regress",
                              {"signature_name": "regress", "examples": [[1.0, 2.0]]}, 400, ()),
    # An integer feature is int64; the model parses x1 as float (TensorFlow's own error).
    "example_int_for_float_feature": ("POST", "/v1/models/classify_regress:classify",
                                      {"examples": [{"x1": 5, "x2": 3.5}]}, 400, ("x1",)),
    "example_missing_feature": ("POST", "/v1/models/classify_regress:classify",
                                {"examples": [{"x1": 5.0}]}, 400, ("x2",)),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors(server, case):
    method, path, body, status, words = ERRORS[case]
    reply = post(server, path, body) if method == "POST" else get(server, path)
    expect_error(reply, status, *words)
    assert_still_serving(server)


def test_unknown_label_status(server):
    expect_error(get(server, "/v1/models/two_sig/labels/x"), 400, "Unrecognized servable version label: x")
    assert ok(get(server, "/v1/models/two_sig/versions/2")) == {"model_version_status": [status_entry("2")]}


def test_gzip_request_body(server):
    """A gzip-compressed body (Content-Encoding: gzip), as TF Serving's HTTP server takes."""
    import gzip

    ref = REFERENCES["two_sig"]["2"][DEFAULT]
    body = json.dumps({"instances": ref_json(ref["inputs"]["x"])}).encode()
    r = requests.post(server.http_url + "/v1/models/two_sig:predict", data=gzip.compress(body),
                      headers={"content-type": "application/json", "content-encoding": "gzip"},
                      timeout=60, **server.requests_kwargs)
    got = predict_outputs("row", ok(Reply(r)), ref["outputs"])
    for key, tensor in ref["outputs"].items():
        _tf.assert_matches(key, got[key], _tf.to_numpy(tensor))


def test_malformed_json_over_http_client(server):
    """A raw http.client request with a body cut short, then a good one on a new connection."""
    conn = server.http_connection(timeout=30)
    try:
        payload = b'{"instances": [[1.0, 2.0, 3.0, 4.0]], "signature_name": '
        conn.request("POST", "/v1/models/two_sig:predict", body=payload,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        assert resp.status == 400, (resp.status, text)
        assert "JSON Parse error" in json.loads(text)["error"], text
    finally:
        conn.close()
    conn = server.http_connection(timeout=30)
    try:
        # No Content-Type at all (TF Serving does not look at it).
        conn.request("POST", "/v1/models/two_sig:predict",
                     body=json.dumps({"signature_name": "double", "instances": [[1, 2], [3, -4]]}))
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        assert resp.status == 200, (resp.status, text)
        assert json.loads(text) == {"predictions": [[2, 4], [6, -8]]}, text
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# 7. NaN and Infinity


def _special(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if v == math.inf else ("-inf" if v == -math.inf else "finite"))


@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_nan_and_infinity_round_trip(server, fmt):
    # half: y32 = cast(x), y = 2x in fp16.
    x = [[math.nan, math.inf, -math.inf, 1.5], [0.25, -2.0, math.nan, 8.0]]
    body = {"instances": x} if fmt == "row" else {"inputs": x}
    reply = post(server, "/v1/models/half:predict", body)
    # Written bare, as TF Serving does (not quoted strings, not null).
    for literal in ("NaN", "Infinity", "-Infinity"):
        assert literal in reply.text, reply
    assert '"NaN"' not in reply.text and "null" not in reply.text, reply
    got = predict_outputs(fmt, ok(reply), {"y": {"dtype": "DT_HALF"}, "y32": {"dtype": "DT_FLOAT"}})
    want32 = np.array(x, np.float32)
    np.testing.assert_array_equal(got["y32"], want32)
    np.testing.assert_array_equal(got["y"], (want32 * 2).astype(np.float16))

    # two_sig is linear: a NaN in a row makes that row's outputs NaN, the other rows unchanged.
    ref = REFERENCES["two_sig"]["2"][DEFAULT]
    rows = ref_json(ref["inputs"]["x"])
    rows[1] = [math.nan, *rows[1][1:]]
    body = {"instances": rows} if fmt == "row" else {"inputs": {"x": rows}}
    got = predict_outputs(fmt, ok(post(server, "/v1/models/two_sig:predict", body)), ref["outputs"])
    y, total = _tf.to_numpy(ref["outputs"]["y"]), _tf.to_numpy(ref["outputs"]["total"])
    assert np.isnan(got["y"][1]).all() and np.isnan(got["total"][1]), got
    for i in (0, 2):
        _tf.assert_matches("y", got["y"][i], y[i])
        _tf.assert_matches("total", got["total"][i:i + 1], total[i:i + 1])

    # float64: 2x keeps NaN and the infinities; 2 * 1e308 overflows to Infinity.
    types = REFERENCES["types"]["1"][DEFAULT]
    inputs = {k: ref_json(t) for k, t in types["inputs"].items()}
    inputs["f64"] = [[math.nan, math.inf], [-math.inf, 1e308]]
    if fmt == "row":
        body = {"instances": [{k: v[i] for k, v in inputs.items()} for i in range(2)]}
    else:
        body = {"inputs": inputs}
    got = predict_outputs(fmt, ok(post(server, "/v1/models/types:predict", body)), types["outputs"])
    assert [_special(v) for v in got["f64_out"].ravel()] == ["nan", "inf", "-inf", "inf"], got["f64_out"]
    for key, tensor in types["outputs"].items():
        if key != "f64_out":
            _tf.assert_matches(key, got[key], _tf.to_numpy(tensor))


def _output_leaves(body: dict) -> list:
    """Every element of a predict response's `predictions` / `outputs`."""
    def walk(v):
        if isinstance(v, dict):
            return [leaf for item in v.values() for leaf in walk(item)]
        if isinstance(v, list):
            return [leaf for item in v for leaf in walk(item)]
        return [v]
    (key,) = body
    return walk(body[key])


def test_float_outputs_are_json_floats(server):
    """Float outputs are JSON floats even when whole or large: TF Serving writes 6.0, not 6, and
    1e+38, not 100000000000000000000000000000000000000 (json_tensor.cc WriteDecimal adds ".0"
    to whole numbers so that lists do not mix integers and decimals), so Python's json and
    numpy read them back as floats."""
    cases = [
        ("/v1/models/scalar:predict", {"inputs": 2.0}),
        ("/v1/models/half:predict", {"inputs": [[1.0, 2.0, -3.0, 4.0]]}),
        ("/v1/models/half:predict", {"instances": [[1.0, 2.0, -3.0, 4.0]]}),
        ("/v1/models/two_sig:predict", {"instances": [[1e38, 1e38, 1e38, 1e38]]}),
        ("/v1/models/classify_regress:predict", {"signature_name": "predict", "inputs": {"x1": [0.0], "x2": [0.0]}}),
        ("/v1/models/add_sub:predict", {"inputs": {"INPUT0": [[1.0] * 16], "INPUT1": [[2.0] * 16]}}),
    ]
    for path, body in cases:
        reply = post(server, path, body)
        leaves = _output_leaves(ok(reply))
        assert leaves and all(isinstance(v, float) for v in leaves), (path, body, reply)
    # Integer outputs stay integers.
    reply = post(server, "/v1/models/two_sig:predict", {"signature_name": "double", "inputs": [[1, 2]]})
    assert ok(reply) == {"outputs": [[2, 4]]} and all(type(v) is int for v in _output_leaves(reply.body)), reply


def test_classify_regress_non_finite(server):
    """NaN / Infinity / -Infinity in features are float features (TF Serving parses them as
    numbers, json_tensor.cc AddValueToFeature), and non-finite results are written as bare
    NaN / Infinity / -Infinity (WriteDecimal), never null. The expected values are what Python
    TensorFlow gives for the same tf.Examples on classify_regress/1."""
    def regress(body: dict) -> list[str]:
        reply = post(server, "/v1/models/classify_regress:regress", {"signature_name": "regress", **body})
        results = ok(reply)["results"]
        assert "null" not in reply.text and all(isinstance(v, float) for v in results), reply
        return [_special(v) for v in results]

    def classify(body: dict) -> list[list[str]]:
        reply = post(server, "/v1/models/classify_regress:classify", body)
        results = ok(reply)["results"]
        assert "null" not in reply.text, reply
        out = []
        for per_example in results:
            assert [pair[0] for pair in per_example] == ["setosa", "versicolor", "virginica"], reply
            assert all(isinstance(pair[1], float) for pair in per_example), reply
            out.append([_special(pair[1]) for pair in per_example])
        return out

    # NaN in a feature: NaN out; Infinity from the context: -Infinity out.
    assert regress({"examples": [{"x1": math.nan, "x2": 1.0}]}) == ["nan"]
    assert regress({"context": {"x2": math.inf}, "examples": [{"x1": 1.0}]}) == ["-inf"]
    assert classify({"examples": [{"x1": -math.inf, "x2": 0.5}]}) == [["finite", "nan", "nan"]]
    # Finite features that overflow float32 in the model: infinite regressions, NaN scores
    # (softmax of infinite logits).
    huge = [{"x1": 3.4e38, "x2": -3.4e38}, {"x1": -3.4e38, "x2": 3.4e38}]
    assert regress({"examples": huge}) == ["inf", "-inf"]
    assert classify({"examples": huge}) == [["nan", "finite", "finite"], ["finite", "nan", "nan"]]


# ---------------------------------------------------------------------------------------------
# 8. An ONNX model through the same API


def _add_sub_check(reply_body: dict, fmt: str, feeds: dict[str, np.ndarray]) -> None:
    outputs = {"OUTPUT0": {"dtype": "DT_FLOAT"}, "OUTPUT1": {"dtype": "DT_FLOAT"}}
    got = predict_outputs(fmt, reply_body, outputs)
    for name, want in ort_run("add_sub", feeds).items():
        _tf.assert_matches(name, got[name], want)


@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_onnx_predict(server, fmt):
    for batch, path, extra in ((1, "/v1/models/add_sub:predict", {}),
                               (3, "/v1/models/add_sub/versions/1:predict", {"signature_name": DEFAULT})):
        feeds = add_sub_inputs(batch, seed=40 + batch)
        lists = {k: v.tolist() for k, v in feeds.items()}
        if fmt == "row":
            body = {**extra, "instances": [{k: lists[k][i] for k in lists} for i in range(batch)]}
        else:
            body = {**extra, "inputs": lists}
        _add_sub_check(ok(post(server, path, body)), fmt, feeds)


def test_onnx_metadata_and_status(server):
    dims = {"dim": [{"size": "-1", "name": ""}, {"size": "16", "name": ""}], "unknown_rank": False}
    info = {name: {"dtype": "DT_FLOAT", "tensor_shape": dims, "name": name}
            for name in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")}
    want = {
        "model_spec": {"name": "add_sub", "signature_name": "", "version": "1"},
        "metadata": {"signature_def": {"signature_def": {DEFAULT: {
            "inputs": {k: info[k] for k in ("INPUT0", "INPUT1")},
            "outputs": {k: info[k] for k in ("OUTPUT0", "OUTPUT1")},
            "method_name": PREDICT_METHOD,
            "defaults": {},
        }}}},
    }
    assert ok(get(server, "/v1/models/add_sub/metadata")) == want
    assert ok(get(server, "/v1/models/add_sub/versions/1/metadata")) == want
    assert ok(get(server, "/v1/models/add_sub")) == {"model_version_status": [status_entry("1")]}
    # Errors name the ONNX model as they would a SavedModel.
    expect_error(post(server, "/v1/models/add_sub:predict", {"signature_name": "nope", "instances": [1.0]}),
                 400, SIGNATURE_NOT_FOUND)
    expect_error(post(server, "/v1/models/add_sub:predict", {"inputs": {"INPUT0": [[1.0] * 16]}}),
                 400, "input size does not match signature")
    expect_error(post(server, "/v1/models/add_sub:classify", {"examples": [{"a": 1.0}]}),
                 400, "Expected classification signature method_name")
    feeds = add_sub_inputs(2, seed=5)
    _add_sub_check(ok(post(server, "/v1/models/add_sub:predict",
                           {"inputs": {k: v.tolist() for k, v in feeds.items()}})), "columnar", feeds)
