"""TF Serving's gRPC API (`tensorflow.serving.PredictionService` and `ModelService`) on oxserve's
gRPC port, with the real client: the PyPI `tensorflow-serving-api` stubs, requests built with
Python TensorFlow (`tf.make_tensor_proto`) or by hand (`tensor_content`, the typed `*_val`
fields) and responses read with `tf.make_ndarray`.

Fixtures and references: scripts/make_tf_models.py (see tests/python/_tf.py: where they come
from, the skip when the TensorFlow venv or C library is missing, the tolerance rules). The same
server layout as tests/python/test_tfserving_rest.py (the REST API over the same models):

- every fixture SavedModel in TF Serving's layout, with no config.pbtxt (auto-completed: Triton's
  max_batch_size 4 for models whose tensors all have a leading -1, so longer references are
  sent in parts of at most 4 rows);
- two_sig with both versions and a config.pbtxt: `oxserve_auto_batching: "false"` (any batch
  size, as in TF Serving), `version_policy: { all: {} }`, labels stable -> 1 and canary -> 2;
- the ONNX example add_sub (INPUT0/INPUT1 FP32 [-1, 16] -> OUTPUT0 = sum, OUTPUT1 = difference),
  served through the same API with a `serving_default` signature.

What is checked, per TF Serving's protos and its server's code (model_servers/
prediction_service_impl.cc, servables/tensorflow/predict_util.cc, classifier.cc, regressor.cc,
multi_inference.cc, get_model_metadata_impl.cc, get_model_status_impl.cc, model_service_impl.cc,
server_core.cc):

1. Predict on every predict signature of references.json, with inputs from make_tensor_proto,
   from hand-made tensor_content and from the typed value fields; short value lists (the last
   value repeats), scalars, output_filter, the response's model_spec, strings with non-ASCII and
   non-UTF-8 bytes;
2. versions (ModelSpec.version) and labels (ModelSpec.version_label);
3. Classify, Regress (ExampleList and ExampleListWithContext) and MultiInference;
4. GetModelMetadata (SignatureDefMap against signatures.json) and GetModelStatus;
5. errors: gRPC codes and TF Serving's messages, each followed by a good request; requests
   compressed with gzip or deflate;
6. HandleReloadConfigRequest on a second server (repository model `scalar`): listed models are
   added and removed, the repository's model stays; failed reloads are RPC errors;
7. the ONNX model through Predict, metadata and status.
"""

from __future__ import annotations

import math
import shutil
import time

import grpc
import numpy as np
import pytest

import _tf
from _models import add_sub_inputs
from _server import ROOT, ServerProcess

_SKIP = _tf.skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

import tensorflow as tf  # noqa: E402  (after the skip: TensorFlow is what may be missing)
from tensorflow.core.example import example_pb2, feature_pb2  # noqa: E402
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402

MODELS = _tf.models_dir()
REFERENCES = _tf.references()
SIGNATURES = _tf.signatures()
DEFAULT = _tf.DEFAULT_SIGNATURE
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
AUTO_MAX_BATCH_SIZE = 4
TWO_SIG_CONFIG = """\
parameters { key: "oxserve_auto_batching" value: { string_value: "false" } }
version_policy: { all: {} }
version_labels { key: "stable" value: 1 }
version_labels { key: "canary" value: 2 }
"""
LABELS = {"stable": "1", "canary": "2"}
SIGNATURE_NOT_FOUND = 'Serving signature name: "nope" not found in signature def'
TIMEOUT_S = 60
# How long a model taken off the list by a reload may take to go.
UNLOAD_WAIT_S = 3.0
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
UNLOADING = get_model_status_pb2.ModelVersionStatus.UNLOADING
END = get_model_status_pb2.ModelVersionStatus.END
Code = grpc.StatusCode


# ---------------------------------------------------------------------------------------------
# Servers and stubs


class Stubs:
    """The TF Serving stubs on one channel to a server's gRPC port."""

    def __init__(self, server: ServerProcess):
        self.channel = grpc.insecure_channel(
            server.grpc_host,
            options=[("grpc.max_receive_message_length", 256 << 20),
                     ("grpc.max_send_message_length", 256 << 20)],
        )
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def predict(self, request):
        return self.prediction.Predict(request, timeout=TIMEOUT_S)

    def classify(self, request):
        return self.prediction.Classify(request, timeout=TIMEOUT_S)

    def regress(self, request):
        return self.prediction.Regress(request, timeout=TIMEOUT_S)

    def multi_inference(self, request):
        return self.prediction.MultiInference(request, timeout=TIMEOUT_S)

    def metadata(self, request):
        return self.prediction.GetModelMetadata(request, timeout=TIMEOUT_S)

    def status(self, request):
        return self.model.GetModelStatus(request, timeout=TIMEOUT_S)

    def reload(self, request):
        return self.model.HandleReloadConfigRequest(request, timeout=120)

    def close(self):
        self.channel.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("tfserving-grpc")
    for model in sorted(REFERENCES):
        shutil.copytree(MODELS / model, repo / model)
    (repo / "two_sig" / "config.pbtxt").write_text(TWO_SIG_CONFIG)
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", repo / "add_sub")
    srv = ServerProcess("tfserving-grpc", [str(repo)]).start()
    try:
        yield srv
    finally:
        srv.stop_and_check()


@pytest.fixture(scope="module")
def stubs(server):
    s = Stubs(server)
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# Requests


def model_spec(model: str, version: str | int | None = None, label: str | None = None,
               signature: str | None = None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=model)
    if version is not None:
        spec.version.value = int(version)
    if label is not None:
        spec.version_label = label
    if signature is not None:
        spec.signature_name = signature
    return spec


def predict_request(spec: model_pb2.ModelSpec | None, inputs: dict[str, tensor_pb2.TensorProto],
                    output_filter: tuple[str, ...] | list[str] = ()) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    if spec is not None:
        request.model_spec.CopyFrom(spec)
    for key, proto in inputs.items():
        request.inputs[key].CopyFrom(proto)
    request.output_filter.extend(output_filter)
    return request


def shape_proto(shape) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape])


def dtype_code(name: str) -> int:
    return types_pb2.DataType.Value(name)


# The typed value field TensorFlow reads for each dtype (tensorflow/core/framework/tensor.proto).
TYPED_FIELD = {
    "DT_FLOAT": "float_val",
    "DT_DOUBLE": "double_val",
    "DT_INT8": "int_val",
    "DT_INT16": "int_val",
    "DT_INT32": "int_val",
    "DT_UINT8": "int_val",
    "DT_UINT16": "int_val",
    "DT_INT64": "int64_val",
    "DT_UINT32": "uint32_val",
    "DT_UINT64": "uint64_val",
    "DT_BOOL": "bool_val",
    "DT_STRING": "string_val",
    "DT_HALF": "half_val",
    "DT_BFLOAT16": "half_val",
}


def typed_values(arr: np.ndarray, dtype: str) -> list:
    flat = arr.reshape(-1)
    if dtype in ("DT_HALF", "DT_BFLOAT16"):
        # The 16-bit pattern of each value, in an int32 (tensor.proto's half_val).
        return flat.view(np.uint16).astype(np.int32).tolist()
    if dtype == "DT_STRING":
        return [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat]
    if dtype == "DT_BOOL":
        return [bool(v) for v in flat]
    return flat.tolist()


def typed_proto(arr: np.ndarray, dtype: str, values: list | None = None,
                shape=None) -> tensor_pb2.TensorProto:
    """A TensorProto built by hand with the typed value field (float_val, int64_val, ...);
    `values` (default: all of `arr`) and `shape` (default: arr's) can be given apart."""
    proto = tensor_pb2.TensorProto(dtype=dtype_code(dtype))
    proto.tensor_shape.CopyFrom(shape_proto(arr.shape if shape is None else shape))
    getattr(proto, TYPED_FIELD[dtype]).extend(typed_values(arr, dtype) if values is None else values)
    return proto


def content_proto(arr: np.ndarray, dtype: str, shape=None) -> tensor_pb2.TensorProto:
    """A TensorProto built by hand with tensor_content (raw little-endian bytes)."""
    proto = tensor_pb2.TensorProto(dtype=dtype_code(dtype))
    proto.tensor_shape.CopyFrom(shape_proto(arr.shape if shape is None else shape))
    proto.tensor_content = np.ascontiguousarray(arr).tobytes()
    return proto


def make_proto(arr: np.ndarray, dtype: str, encoding: str) -> tensor_pb2.TensorProto:
    if encoding == "make_tensor_proto":
        proto = tf.make_tensor_proto(arr, dtype=tf.dtypes.as_dtype(dtype_code(dtype)))
        assert proto.dtype == dtype_code(dtype), proto
        return proto
    if encoding == "tensor_content":
        assert dtype != "DT_STRING"
        return content_proto(arr, dtype)
    assert encoding == "typed"
    return typed_proto(arr, dtype)


def to_array(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A response tensor as numpy, through TensorFlow's own reader."""
    arr = tf.make_ndarray(proto)
    if proto.dtype == types_pb2.DT_STRING:
        out = np.empty(arr.shape, dtype=object)
        out.reshape(-1)[:] = [bytes(v) for v in arr.reshape(-1)]
        return out
    return arr


def assert_output(name: str, proto: tensor_pb2.TensorProto, want: np.ndarray, dtype: str) -> np.ndarray:
    assert proto.dtype == dtype_code(dtype), (name, types_pb2.DataType.Name(proto.dtype), dtype)
    assert [d.size for d in proto.tensor_shape.dim] == list(want.shape), (name, proto.tensor_shape)
    have = to_array(proto)
    _tf.assert_matches(name, have, want)
    return have


# ---------------------------------------------------------------------------------------------
# References


def latest(model: str) -> str:
    return max(REFERENCES[model], key=int)


def max_rows(model: str, version: str) -> int | None:
    """The most rows one request may carry: two_sig is unbatched (any), other batched models
    take the auto-completed 4."""
    if model != "two_sig" and _tf.model_is_batched(model, version):
        return AUTO_MAX_BATCH_SIZE
    return None


def reference_parts(model: str, version: str, sig: str):
    """(inputs, outputs) as numpy, in parts of at most max_rows rows."""
    ref = REFERENCES[model][version][sig]
    inputs = {k: _tf.to_numpy(t) for k, t in ref["inputs"].items()}
    outputs = {k: _tf.to_numpy(t) for k, t in ref["outputs"].items()}
    limit = max_rows(model, version)
    if limit is None or any(a.ndim == 0 for a in inputs.values()):
        return [(inputs, outputs)]
    n = next(iter(inputs.values())).shape[0]
    return [({k: a[s:s + limit] for k, a in inputs.items()}, {k: a[s:s + limit] for k, a in outputs.items()})
            for s in range(0, n, limit)]


def check_predict(stubs: Stubs, model: str, version: str, sig: str, encoding: str,
                  spec: model_pb2.ModelSpec | None = None, answered_version: str | None = None) -> dict:
    """Runs a references.json entry through Predict with inputs encoded as `encoding`, checks
    every output against Python TensorFlow's and the response's model_spec."""
    ref = REFERENCES[model][version][sig]
    if spec is None:
        spec = model_spec(model, None if version == latest(model) else version,
                          signature=None if sig == DEFAULT else sig)
    got: dict[str, list[np.ndarray]] = {}
    for inputs, outputs in reference_parts(model, version, sig):
        protos = {k: make_proto(a, ref["inputs"][k]["dtype"], encoding) for k, a in inputs.items()}
        response = stubs.predict(predict_request(spec, protos))
        assert response.model_spec.name == spec.name, response.model_spec
        assert response.model_spec.version.value == int(answered_version or version), response.model_spec
        assert response.model_spec.signature_name == sig, response.model_spec
        assert sorted(response.outputs) == sorted(outputs), (sorted(response.outputs), sorted(outputs))
        for key, want in outputs.items():
            have = assert_output(f"{model}/{version}/{sig}/{key} ({encoding})", response.outputs[key],
                                 want, ref["outputs"][key]["dtype"])
            got.setdefault(key, []).append(have)
    return {k: (np.concatenate(v) if len(v) > 1 else v[0]) for k, v in got.items()}


def _predict_params():
    for model, versions in sorted(REFERENCES.items()):
        for version, sigs in sorted(versions.items()):
            for sig, ref in sorted(sigs.items()):
                if ref["method"] != PREDICT_METHOD:
                    continue
                strings = any(t["dtype"] == "DT_STRING" for t in ref["inputs"].values())
                for encoding in ("make_tensor_proto", "tensor_content", "typed"):
                    if encoding == "tensor_content" and strings:
                        continue  # DT_STRING has no tensor_content form
                    yield pytest.param(model, version, sig, encoding, id=f"{model}-v{version}-{sig}-{encoding}")


# ---------------------------------------------------------------------------------------------
# 1. Predict


@pytest.mark.parametrize("model,version,sig,encoding", list(_predict_params()))
def test_predict_matches_references(stubs, model, version, sig, encoding):
    check_predict(stubs, model, version, sig, encoding)


def test_make_tensor_proto_uses_tensor_content(stubs):
    """make_tensor_proto's default for numeric numpy arrays is tensor_content (what most clients
    send); the typed fields are what hand-written and older clients send."""
    ref = REFERENCES["two_sig"]["2"][DEFAULT]
    x = _tf.to_numpy(ref["inputs"]["x"])
    proto = tf.make_tensor_proto(x)
    assert proto.tensor_content and not proto.float_val
    response = stubs.predict(predict_request(model_spec("two_sig"), {"x": proto}))
    for key, tensor in ref["outputs"].items():
        assert_output(key, response.outputs[key], _tf.to_numpy(tensor), tensor["dtype"])


def test_explicit_default_signature(stubs):
    """signature_name "serving_default" is the default; an empty one answers with its name."""
    check_predict(stubs, "two_sig", "2", DEFAULT, "typed", spec=model_spec("two_sig", signature=DEFAULT))
    check_predict(stubs, "mlp", "1", DEFAULT, "make_tensor_proto", spec=model_spec("mlp", signature=""))
    check_predict(stubs, "keras_mlp", "1", "serve", "typed", spec=model_spec("keras_mlp", signature="serve"))


def test_large_batch_unbatched_model(stubs):
    """two_sig's config turns auto-batching off: 9 rows answer, as in TF Serving."""
    ref = REFERENCES["two_sig"]["2"][DEFAULT]
    x = np.concatenate([_tf.to_numpy(ref["inputs"]["x"])] * 3)
    response = stubs.predict(predict_request(model_spec("two_sig"), {"x": tf.make_tensor_proto(x)}))
    for key, tensor in ref["outputs"].items():
        want = np.concatenate([_tf.to_numpy(tensor)] * 3)
        assert_output(key, response.outputs[key], want, tensor["dtype"])


def _two_sig_outputs(stubs, x: np.ndarray) -> dict[str, np.ndarray]:
    response = stubs.predict(predict_request(model_spec("two_sig"), {"x": content_proto(x, "DT_FLOAT")}))
    return {k: to_array(v) for k, v in response.outputs.items()}


def test_short_value_lists_repeat_the_last_value(stubs):
    """TensorFlow's rule for typed fields shorter than the shape: the last value repeats (one
    value fills the whole tensor); no values at all means zeros."""
    x = np.array([[1.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    want = _two_sig_outputs(stubs, x)
    response = stubs.predict(predict_request(
        model_spec("two_sig"), {"x": typed_proto(x, "DT_FLOAT", values=[1.0, 2.0])}))
    for key, arr in want.items():
        _tf.assert_matches(key, to_array(response.outputs[key]), arr)

    ones = np.ones((3, 4), np.float32)
    want = _two_sig_outputs(stubs, ones)
    response = stubs.predict(predict_request(model_spec("two_sig"), {"x": typed_proto(ones, "DT_FLOAT", values=[1.0])}))
    for key, arr in want.items():
        _tf.assert_matches(key, to_array(response.outputs[key]), arr)

    zeros = np.zeros((2, 4), np.float32)
    want = _two_sig_outputs(stubs, zeros)
    response = stubs.predict(predict_request(model_spec("two_sig"), {"x": typed_proto(zeros, "DT_FLOAT", values=[])}))
    for key, arr in want.items():
        _tf.assert_matches(key, to_array(response.outputs[key]), arr)

    # int64_val on the `double` signature: [3, 7] for shape [2, 2] is [[3, 7], [7, 7]].
    a = np.zeros((2, 2), np.int64)
    response = stubs.predict(predict_request(model_spec("two_sig", signature="double"),
                                             {"a": typed_proto(a, "DT_INT64", values=[3, 7])}))
    np.testing.assert_array_equal(to_array(response.outputs["doubled"]), np.array([[6, 14], [14, 14]], np.int64))

    # half_val and bool_val repeat too.
    half = np.full((2, 4), 1.5, np.float16)
    response = stubs.predict(predict_request(model_spec("half"), {"x": typed_proto(
        half, "DT_HALF", values=[int(np.float16(1.5).view(np.uint16))])}))
    _tf.assert_matches("y", to_array(response.outputs["y"]), half * 2)
    _tf.assert_matches("y32", to_array(response.outputs["y32"]), half.astype(np.float32))


def test_scalar_shapes(stubs):
    """The `scalar` model (x f32[] -> y = 3x, f32[]): rank-0 tensors in and out, with an empty
    tensor_shape, with no tensor_shape at all (TensorFlow reads that as a scalar too), and by
    tensor_content."""
    ref = REFERENCES["scalar"]["1"][DEFAULT]
    x = float(_tf.to_numpy(ref["inputs"]["x"]))
    want = _tf.to_numpy(ref["outputs"]["y"])
    assert want.shape == ()
    no_shape = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[x])
    assert not no_shape.HasField("tensor_shape")
    for proto in (tf.make_tensor_proto(np.float32(x)), tf.make_tensor_proto(x, dtype=tf.float32), no_shape,
                  content_proto(np.array(x, np.float32), "DT_FLOAT")):
        response = stubs.predict(predict_request(model_spec("scalar"), {"x": proto}))
        assert response.model_spec.name == "scalar" and response.model_spec.version.value == 1
        y = response.outputs["y"]
        assert list(y.tensor_shape.dim) == [] and not y.tensor_shape.unknown_rank, y
        assert_output("y", y, want, "DT_FLOAT")
    response = stubs.predict(predict_request(model_spec("scalar"), {"x": tf.make_tensor_proto(np.float32(-2.5))}))
    assert float(to_array(response.outputs["y"])) == -7.5


def test_output_filter(stubs):
    ref = REFERENCES["two_sig"]["2"][DEFAULT]
    x = tf.make_tensor_proto(_tf.to_numpy(ref["inputs"]["x"]))
    for wanted in (["total"], ["y"], ["y", "total"], ["total", "y"]):
        response = stubs.predict(predict_request(model_spec("two_sig"), {"x": x}, output_filter=wanted))
        assert sorted(response.outputs) == sorted(wanted), (wanted, sorted(response.outputs))
        for key in wanted:
            tensor = ref["outputs"][key]
            assert_output(key, response.outputs[key], _tf.to_numpy(tensor), tensor["dtype"])
    # On another signature, version and model too.
    types = REFERENCES["types"]["1"][DEFAULT]
    inputs = {k: tf.make_tensor_proto(_tf.to_numpy(t)) for k, t in types["inputs"].items()}
    response = stubs.predict(predict_request(model_spec("types"), inputs, output_filter=["flag_out", "u8_out"]))
    assert sorted(response.outputs) == ["flag_out", "u8_out"]
    for key in ("flag_out", "u8_out"):
        tensor = types["outputs"][key]
        assert_output(key, response.outputs[key], _tf.to_numpy(tensor), tensor["dtype"])
    half = REFERENCES["half"]["1"][DEFAULT]
    response = stubs.predict(predict_request(model_spec("half"), {"x": tf.make_tensor_proto(
        _tf.to_numpy(half["inputs"]["x"]))}, output_filter=["y"]))
    assert list(response.outputs) == ["y"]
    assert_output("y", response.outputs["y"], _tf.to_numpy(half["outputs"]["y"]), "DT_HALF")


def _strings_expect(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """strings/1: length = bytes (int32), upper = ASCII letters upper-cased, other bytes kept."""
    upper = np.empty(len(items), dtype=object)
    upper[:] = [b.upper() for b in items]
    return np.array([len(b) for b in items], np.int32), upper


STRING_ITEMS = [
    [b"\xff\xfeab\x00c", "Grüße ✓ 日本".encode(), "emoji 😀 ok".encode(), b""],  # not UTF-8, NUL
    ["zürich".encode("latin-1"), b"\x80", 'say "NaN" \\ ok'.encode(), b"plain"],
]


@pytest.mark.parametrize("encoding", ["make_tensor_proto", "typed"])
def test_strings_non_ascii_bytes(stubs, encoding):
    """string_val carries arbitrary bytes: non-ASCII UTF-8, invalid UTF-8 and NUL come back
    byte for byte (at most 4 rows a request: strings is auto-completed with max_batch_size 4)."""
    for items in STRING_ITEMS:
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        response = stubs.predict(predict_request(model_spec("strings"), {"text": make_proto(arr, "DT_STRING", encoding)}))
        length, upper = _strings_expect(items)
        assert_output("length", response.outputs["length"], length, "DT_INT32")
        assert_output("upper", response.outputs["upper"], upper, "DT_STRING")
        assert list(response.outputs["upper"].string_val) == [b.upper() for b in items]


def test_float_special_values(stubs):
    """NaN and the infinities travel in tensor_content and float_val, both ways."""
    x = np.array([[math.nan, math.inf, -math.inf, 1.5], [0.25, -2.0, math.nan, 8.0]], np.float32)
    for proto in (tf.make_tensor_proto(x.astype(np.float16)), typed_proto(x.astype(np.float16), "DT_HALF")):
        response = stubs.predict(predict_request(model_spec("half"), {"x": proto}))
        np.testing.assert_array_equal(to_array(response.outputs["y32"]), x)
        np.testing.assert_array_equal(to_array(response.outputs["y"]), (x * 2).astype(np.float16))


# ---------------------------------------------------------------------------------------------
# 2. Versions and labels


def test_versions_differ_and_match_references(stubs):
    results = {}
    for version in ("1", "2"):
        for sig in (DEFAULT, "double"):
            for encoding in ("make_tensor_proto", "typed"):
                got = check_predict(stubs, "two_sig", version, sig, encoding,
                                    spec=model_spec("two_sig", version, signature=sig))
                if sig == DEFAULT:
                    results[version] = got
    for key in results["1"]:
        assert not np.allclose(results["1"][key], results["2"][key]), key
    # No version: the latest.
    check_predict(stubs, "two_sig", "2", DEFAULT, "typed", spec=model_spec("two_sig"))


def test_labels_map_to_versions(stubs):
    for label, version in LABELS.items():
        for sig in (DEFAULT, "double"):
            check_predict(stubs, "two_sig", version, sig, "make_tensor_proto",
                          spec=model_spec("two_sig", label=label, signature=sig))
        meta = stubs.metadata(metadata_request(model_spec("two_sig", label=label)))
        assert meta.model_spec.name == "two_sig" and meta.model_spec.version.value == int(version), meta.model_spec
        assert signature_defs(meta) == expected_signature_defs("two_sig", version)
        status = stubs.status(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec("two_sig", label=label)))
        assert (int(version), AVAILABLE) in [(s.version, s.state) for s in status.model_version_status], status


# ---------------------------------------------------------------------------------------------
# 3. Classify, Regress, MultiInference


def tf_example(features: dict) -> example_pb2.Example:
    example = example_pb2.Example()
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        example.features.feature[key].CopyFrom(feature_pb2.Feature(float_list=feature_pb2.FloatList(value=values)))
    return example


def example_list(examples: list[dict]) -> input_pb2.Input:
    return input_pb2.Input(example_list=input_pb2.ExampleList(examples=[tf_example(e) for e in examples]))


def example_list_with_context(examples: list[dict]) -> input_pb2.Input:
    """The examples split into a context and per-example features: the first example takes x1
    from the context, the others override it with their own (the example's feature wins)."""
    context = {"x1": examples[0]["x1"]}
    split = [{"x2": examples[0]["x2"]}] + [dict(e) for e in examples[1:]]
    return input_pb2.Input(example_list_with_context=input_pb2.ExampleListWithContext(
        examples=[tf_example(e) for e in split], context=tf_example(context)))


def _classify_reference():
    ref = REFERENCES["classify_regress"]["1"][DEFAULT]
    return ref["examples"], _tf.to_numpy(ref["outputs"]["classes"]), _tf.to_numpy(ref["outputs"]["scores"])


def _regress_reference():
    ref = REFERENCES["classify_regress"]["1"]["regress"]
    return ref["examples"], _tf.to_numpy(ref["outputs"]["outputs"])


def check_classification(result: classification_pb2.ClassificationResult, classes: np.ndarray,
                         scores: np.ndarray) -> None:
    assert len(result.classifications) == len(classes), result
    for i, per_example in enumerate(result.classifications):
        assert [c.label.encode() for c in per_example.classes] == list(classes[i]), (i, per_example)
    got = np.array([[c.score for c in row.classes] for row in result.classifications], np.float32)
    _tf.assert_matches("scores", got, scores)


def check_regression(result: regression_pb2.RegressionResult, outputs: np.ndarray) -> None:
    got = np.array([r.value for r in result.regressions], np.float32)
    _tf.assert_matches("outputs", got, outputs.reshape(-1))


def assert_spec(spec: model_pb2.ModelSpec, name: str, version: int, signature: str) -> None:
    assert (spec.name, spec.version.value, spec.signature_name) == (name, version, signature), spec


def test_classify(stubs):
    examples, classes, scores = _classify_reference()
    for spec in (model_spec("classify_regress"), model_spec("classify_regress", 1, signature=DEFAULT)):
        for make_input in (example_list, example_list_with_context):
            response = stubs.classify(classification_pb2.ClassificationRequest(
                model_spec=spec, input=make_input(examples)))
            assert_spec(response.model_spec, "classify_regress", 1, DEFAULT)
            check_classification(response.result, classes, scores)
    # One example alone answers its own row.
    response = stubs.classify(classification_pb2.ClassificationRequest(
        model_spec=model_spec("classify_regress"), input=example_list(examples[1:2])))
    check_classification(response.result, classes[1:2], scores[1:2])


def test_regress(stubs):
    examples, outputs = _regress_reference()
    for spec in (model_spec("classify_regress", signature="regress"),
                 model_spec("classify_regress", 1, signature="regress")):
        for make_input in (example_list, example_list_with_context):
            response = stubs.regress(regression_pb2.RegressionRequest(model_spec=spec, input=make_input(examples)))
            assert_spec(response.model_spec, "classify_regress", 1, "regress")
            check_regression(response.result, outputs)
    response = stubs.regress(regression_pb2.RegressionRequest(
        model_spec=model_spec("classify_regress", signature="regress"), input=example_list(examples[2:])))
    check_regression(response.result, outputs[2:])


def test_multi_inference(stubs):
    examples, classes, scores = _classify_reference()
    regress_examples, outputs = _regress_reference()
    assert regress_examples == examples, "the fixtures' classify and regress examples differ"
    for make_input in (example_list, example_list_with_context):
        request = inference_pb2.MultiInferenceRequest(
            tasks=[
                inference_pb2.InferenceTask(model_spec=model_spec("classify_regress", signature=DEFAULT),
                                            method_name=CLASSIFY_METHOD),
                inference_pb2.InferenceTask(model_spec=model_spec("classify_regress", signature="regress"),
                                            method_name=REGRESS_METHOD),
            ],
            input=make_input(examples),
        )
        response = stubs.multi_inference(request)
        assert len(response.results) == 2, response
        first, second = response.results
        assert first.WhichOneof("result") == "classification_result", first
        assert second.WhichOneof("result") == "regression_result", second
        assert_spec(first.model_spec, "classify_regress", 1, DEFAULT)
        assert_spec(second.model_spec, "classify_regress", 1, "regress")
        check_classification(first.classification_result, classes, scores)
        check_regression(second.regression_result, outputs)


# ---------------------------------------------------------------------------------------------
# 4. Metadata and status


def metadata_request(spec: model_pb2.ModelSpec | None,
                     fields=("signature_def",)) -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
    if spec is not None:
        request.model_spec.CopyFrom(spec)
    return request


def _tensor_info(info) -> dict:
    shape = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
    return {"name": info.name, "dtype": types_pb2.DataType.Name(info.dtype), "shape": shape}


def signature_defs(response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict:
    """The response's SignatureDefMap (an Any under "signature_def") in signatures.json's form."""
    assert list(response.metadata) == ["signature_def"], list(response.metadata)
    any_msg = response.metadata["signature_def"]
    assert any_msg.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap", any_msg.type_url
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert any_msg.Unpack(sig_map)
    return {
        name: {
            "method_name": sig.method_name,
            "inputs": {k: _tensor_info(v) for k, v in sig.inputs.items()},
            "outputs": {k: _tensor_info(v) for k, v in sig.outputs.items()},
        }
        for name, sig in sig_map.signature_def.items()
    }


def expected_signature_defs(model: str, version: str) -> dict:
    """signatures.json, less TensorFlow's internal `__saved_model_init_op`."""
    return {
        name: {"method_name": sig["method_name"], "inputs": sig["inputs"], "outputs": sig["outputs"]}
        for name, sig in _tf.served_signatures(model, version).items()
    }


@pytest.mark.parametrize("model", sorted(REFERENCES))
def test_metadata(stubs, model):
    for version, spec in [(latest(model), model_spec(model))] + [(v, model_spec(model, v)) for v in sorted(REFERENCES[model])]:
        response = stubs.metadata(metadata_request(spec))
        assert_spec(response.model_spec, model, int(version), "")
        assert signature_defs(response) == expected_signature_defs(model, version)
    assert "__saved_model_init_op" in SIGNATURES["scalar"]["1"]  # the fixture has what is left out


def status_of(response) -> list[tuple[int, int, int, str]]:
    return [(s.version, s.state, s.status.error_code, s.status.error_message) for s in response.model_version_status]


@pytest.mark.parametrize("model", sorted(REFERENCES))
def test_status(stubs, model):
    versions = [2, 1] if model == "two_sig" else [int(latest(model))]
    # Newest first, as TF Serving lists them (ServableStateMonitor's VersionMap, std::greater).
    response = stubs.status(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec(model)))
    assert status_of(response) == [(v, AVAILABLE, 0, "") for v in versions]
    for v in versions:
        response = stubs.status(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec(model, v)))
        assert status_of(response) == [(v, AVAILABLE, 0, "")]


# ---------------------------------------------------------------------------------------------
# 5. Errors, each followed by a good request


def expect_rpc_error(call, request, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    message = err.details() or ""
    for word in words:
        assert word in message, (word, message)
    return message


def assert_still_serving(server, stubs) -> None:
    assert server.alive()
    check_predict(stubs, "two_sig", "2", DEFAULT, "make_tensor_proto")
    check_predict(stubs, "two_sig", "2", "double", "typed")


X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)


def _x(**kw) -> dict:
    return {"x": tf.make_tensor_proto(X, **kw)}


def _huge(dtype: str, shape: list[int], values: list) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype_code(dtype))
    proto.tensor_shape.CopyFrom(shape_proto(shape))
    getattr(proto, TYPED_FIELD[dtype]).extend(values)
    return proto


def _bad_content() -> tensor_pb2.TensorProto:
    proto = content_proto(X, "DT_FLOAT")
    proto.tensor_content = proto.tensor_content[:-1]  # 15 bytes for 4 floats
    return proto


def _negative_dim() -> tensor_pb2.TensorProto:
    proto = typed_proto(X, "DT_FLOAT")
    proto.tensor_shape.dim[0].size = -1
    return proto


def _string_content() -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_content=b"abcd")
    proto.tensor_shape.CopyFrom(shape_proto([1]))
    return proto


PREDICT_ERRORS = {
    # name -> (ModelSpec or None, inputs, output_filter, code, words in the message)
    "unknown_model": (lambda: model_spec("nope"), _x, (), Code.NOT_FOUND,
                      ("Servable not found for request: Latest(nope)",)),
    "unknown_version": (lambda: model_spec("two_sig", 7), _x, (), Code.NOT_FOUND,
                        ("Servable not found for request: Specific(two_sig, 7)",)),
    # ServerCore::ServableRequestFromModelSpec: any version number is a Specific request.
    "negative_version": (lambda: model_spec("two_sig", -1), _x, (), Code.NOT_FOUND,
                         ("Servable not found for request: Specific(two_sig, -1)",)),
    "version_zero": (lambda: model_spec("two_sig", 0), _x, (), Code.NOT_FOUND,
                     ("Servable not found for request: Specific(two_sig, 0)",)),
    "empty_model_name": (lambda: model_pb2.ModelSpec(name=""), _x, (), Code.INVALID_ARGUMENT,
                         ("ModelSpec has no name specified.",)),
    # A version_label that is set, even to "", is looked up as a label.
    "empty_label": (lambda: model_spec("two_sig", label=""), _x, (), Code.INVALID_ARGUMENT,
                    ("Unrecognized servable version label: ",)),
    "unknown_version_of_unknown_model": (lambda: model_spec("nope", 3), _x, (), Code.NOT_FOUND,
                                         ("Servable not found for request: Specific(nope, 3)",)),
    "unknown_label": (lambda: model_spec("two_sig", label="x"), _x, (), Code.INVALID_ARGUMENT,
                      ("Unrecognized servable version label: x",)),
    # TF Serving resolves a label before it looks for the servable.
    "unknown_model_with_label": (lambda: model_spec("nope", label="x"), _x, (), Code.INVALID_ARGUMENT,
                                 ("Unrecognized servable version label: x",)),
    "unknown_signature": (lambda: model_spec("two_sig", signature="nope"), _x, (), Code.INVALID_ARGUMENT,
                          (SIGNATURE_NOT_FOUND,)),
    "missing_model_spec": (lambda: None, _x, (), Code.INVALID_ARGUMENT, ("Missing ModelSpec",)),
    "wrong_dtype_double_for_float": (lambda: model_spec("two_sig"), lambda: {"x": tf.make_tensor_proto(X.astype(np.float64))},
                                     (), Code.INVALID_ARGUMENT, ()),
    "wrong_dtype_float_for_int64": (lambda: model_spec("two_sig", signature="double"),
                                    lambda: {"a": tf.make_tensor_proto(np.array([[1.5, 2.0]], np.float32))},
                                    (), Code.INVALID_ARGUMENT, ()),
    "wrong_dtype_int_for_string": (lambda: model_spec("strings"),
                                   lambda: {"text": tf.make_tensor_proto(np.array([7], np.int32))},
                                   (), Code.INVALID_ARGUMENT, ()),
    "wrong_shape_columns": (lambda: model_spec("two_sig"), lambda: {"x": tf.make_tensor_proto(np.ones((1, 5), np.float32))},
                            (), Code.INVALID_ARGUMENT, ()),
    "wrong_shape_rank": (lambda: model_spec("two_sig"), lambda: {"x": tf.make_tensor_proto(np.ones((4,), np.float32))},
                         (), Code.INVALID_ARGUMENT, ()),
    "missing_input": (lambda: model_spec("types"), lambda: {"i8": tf.make_tensor_proto(np.array([[1, 2]], np.int8))},
                      (), Code.INVALID_ARGUMENT, ("input size does not match signature",)),
    "no_inputs": (lambda: model_spec("two_sig"), lambda: {}, (), Code.INVALID_ARGUMENT,
                  ("input size does not match signature",)),
    "extra_input": (lambda: model_spec("two_sig"), lambda: {**_x(), "bogus": tf.make_tensor_proto(X)}, (),
                    Code.INVALID_ARGUMENT, ("input size does not match signature", "bogus")),
    "input_of_another_signature": (lambda: model_spec("two_sig"),
                                   lambda: {"a": tf.make_tensor_proto(np.array([[1, 2]], np.int64))}, (),
                                   Code.INVALID_ARGUMENT, ("input size does not match signature",)),
    "unknown_output_filter": (lambda: model_spec("two_sig"), _x, ("bogus",), Code.INVALID_ARGUMENT,
                              ("output tensor alias not found in signature: bogus "
                               "Outputs expected to be in the set {total,y}.",)),
    "duplicate_output_filter": (lambda: model_spec("two_sig"), _x, ("y", "y"), Code.INVALID_ARGUMENT,
                                ("duplicate output tensor alias: y",)),
    "tensor_content_too_short": (lambda: model_spec("two_sig"), lambda: {"x": _bad_content()}, (),
                                 Code.INVALID_ARGUMENT, ("x",)),
    "tensor_content_too_long": (lambda: model_spec("two_sig"),
                                lambda: {"x": content_proto(np.ones((2, 4), np.float32), "DT_FLOAT", shape=[1, 4])},
                                (), Code.INVALID_ARGUMENT, ("x",)),
    "too_many_values": (lambda: model_spec("two_sig"),
                        lambda: {"x": typed_proto(X, "DT_FLOAT", values=[1.0] * 5)}, (), Code.INVALID_ARGUMENT, ("x",)),
    "huge_shape_one_float": (lambda: model_spec("two_sig"), lambda: {"x": _huge("DT_FLOAT", [1 << 40, 4], [1.0])}, (),
                             Code.INVALID_ARGUMENT, ("x",)),
    "huge_shape_one_string": (lambda: model_spec("strings"), lambda: {"text": _huge("DT_STRING", [1 << 40], [b"a"])}, (),
                              Code.INVALID_ARGUMENT, ("text",)),
    "huge_shape_no_values": (lambda: model_spec("two_sig"), lambda: {"x": _huge("DT_FLOAT", [1 << 28, 4], [])}, (),
                             Code.INVALID_ARGUMENT, ("x",)),
    "shape_overflows_int64": (lambda: model_spec("two_sig"),
                              lambda: {"x": _huge("DT_FLOAT", [1 << 62, 1 << 62, 4], [1.0])}, (),
                              Code.INVALID_ARGUMENT, ()),
    "negative_dim": (lambda: model_spec("two_sig"), lambda: {"x": _negative_dim()}, (), Code.INVALID_ARGUMENT, ()),
    "string_in_tensor_content": (lambda: model_spec("strings"), lambda: {"text": _string_content()}, (),
                                 Code.INVALID_ARGUMENT, ()),
    "unsupported_dtype": (lambda: model_spec("two_sig"),
                          lambda: {"x": tensor_pb2.TensorProto(dtype=types_pb2.DT_COMPLEX64, tensor_shape=shape_proto([1, 4]))},
                          (), Code.INVALID_ARGUMENT, ()),
}


@pytest.mark.parametrize("case", sorted(PREDICT_ERRORS))
def test_predict_errors(server, stubs, case):
    spec, inputs, output_filter, code, words = PREDICT_ERRORS[case]
    expect_rpc_error(stubs.predict, predict_request(spec(), inputs(), output_filter), code, *words)
    assert_still_serving(server, stubs)


def _classify(spec, inp):
    return classification_pb2.ClassificationRequest(model_spec=spec, input=inp)


def _regress(spec, inp):
    return regression_pb2.RegressionRequest(model_spec=spec, input=inp)


ONE_EXAMPLE = [{"x1": 1.0, "x2": 2.0}]


def _task(signature: str, method: str, model: str = "classify_regress", version=None):
    return inference_pb2.InferenceTask(model_spec=model_spec(model, version, signature=signature), method_name=method)


def _multi(*tasks):
    return inference_pb2.MultiInferenceRequest(tasks=list(tasks), input=example_list(ONE_EXAMPLE))


OTHER_ERRORS = {
    # name -> (stub method name, request factory, code, words)
    "classify_unknown_model": ("classify", lambda: _classify(model_spec("nope"), example_list(ONE_EXAMPLE)),
                               Code.NOT_FOUND, ("Servable not found for request: Latest(nope)",)),
    "classify_unknown_signature": ("classify", lambda: _classify(model_spec("classify_regress", signature="nope"),
                                                                 example_list(ONE_EXAMPLE)),
                                   Code.INVALID_ARGUMENT, (SIGNATURE_NOT_FOUND,)),
    "classify_on_predict_signature": ("classify", lambda: _classify(model_spec("two_sig"), example_list(ONE_EXAMPLE)),
                                      Code.INVALID_ARGUMENT,
                                      ("Expected classification signature method_name to be tensorflow/serving/classify. "
                                       "Was: tensorflow/serving/predict",)),
    "classify_on_regress_signature": ("classify", lambda: _classify(model_spec("classify_regress", signature="regress"),
                                                                    example_list(ONE_EXAMPLE)),
                                      Code.INVALID_ARGUMENT, ("Expected classification signature method_name",)),
    "classify_empty_input": ("classify", lambda: _classify(model_spec("classify_regress"), input_pb2.Input()),
                             Code.INVALID_ARGUMENT, ("Input is empty.",)),
    "classify_no_examples": ("classify", lambda: _classify(model_spec("classify_regress"), example_list([])),
                             Code.INVALID_ARGUMENT, ("Input is empty.",)),
    "classify_missing_model_spec": ("classify", lambda: classification_pb2.ClassificationRequest(
        input=example_list(ONE_EXAMPLE)), Code.INVALID_ARGUMENT, ("Missing ModelSpec",)),
    "classify_missing_feature": ("classify", lambda: _classify(model_spec("classify_regress"), example_list([{"x1": 1.0}])),
                                 Code.INVALID_ARGUMENT, ("x2",)),
    "regress_on_classify_signature": ("regress", lambda: _regress(model_spec("classify_regress"), example_list(ONE_EXAMPLE)),
                                      Code.INVALID_ARGUMENT,
                                      ("Expected regression signature method_name to be tensorflow/serving/regress. "
                                       "Was: tensorflow/serving/classify",)),
    "regress_unknown_version": ("regress", lambda: _regress(model_spec("classify_regress", 9, signature="regress"),
                                                            example_list(ONE_EXAMPLE)),
                                Code.NOT_FOUND, ("Servable not found for request: Specific(classify_regress, 9)",)),
    "multi_no_tasks": ("multi_inference", lambda: _multi(), Code.INVALID_ARGUMENT, ("Tasks field is empty",)),
    "multi_two_models": ("multi_inference", lambda: _multi(_task(DEFAULT, CLASSIFY_METHOD),
                                                           _task("regress", REGRESS_METHOD, model="two_sig")),
                         Code.INVALID_ARGUMENT,
                         ("All ModelSpecs in a MultiInferenceRequest must access the same model name",)),
    "multi_duplicate_signature": ("multi_inference", lambda: _multi(_task("regress", REGRESS_METHOD),
                                                                    _task("regress", REGRESS_METHOD)),
                                  Code.INVALID_ARGUMENT, ("Duplicate evaluation of signature: regress",)),
    # An empty signature_name is serving_default (multi_inference.cc), also when looking for duplicates.
    "multi_default_signature_twice": ("multi_inference", lambda: _multi(_task("", CLASSIFY_METHOD),
                                                                        _task(DEFAULT, CLASSIFY_METHOD)),
                                      Code.INVALID_ARGUMENT, ("Duplicate evaluation of signature: serving_default",)),
    "multi_unknown_signature": ("multi_inference", lambda: _multi(_task("nope", REGRESS_METHOD)),
                                Code.INVALID_ARGUMENT, ("nope",)),
    # TF Serving: errors::Unimplemented (multi_inference.cc).
    "multi_unsupported_method": ("multi_inference", lambda: _multi(_task("predict", PREDICT_METHOD)),
                                 Code.UNIMPLEMENTED, ("Unsupported signature method_name: tensorflow/serving/predict",)),
    "metadata_unknown_model": ("metadata", lambda: metadata_request(model_spec("nope")), Code.NOT_FOUND,
                               ("Servable not found for request: Latest(nope)",)),
    "metadata_unknown_version": ("metadata", lambda: metadata_request(model_spec("two_sig", 7)), Code.NOT_FOUND,
                                 ("Servable not found for request: Specific(two_sig, 7)",)),
    "metadata_unknown_label": ("metadata", lambda: metadata_request(model_spec("two_sig", label="x")),
                               Code.INVALID_ARGUMENT, ("Unrecognized servable version label: x",)),
    "metadata_no_field": ("metadata", lambda: metadata_request(model_spec("two_sig"), fields=()), Code.INVALID_ARGUMENT,
                          ("GetModelMetadataRequest must specify at least one metadata_field",)),
    "metadata_unsupported_field": ("metadata", lambda: metadata_request(model_spec("two_sig"), fields=("signature_def", "foo")),
                                   Code.INVALID_ARGUMENT, ("Metadata field foo is not supported",)),
    "metadata_missing_model_spec": ("metadata", lambda: metadata_request(None), Code.INVALID_ARGUMENT, ("Missing ModelSpec",)),
    "status_unknown_model": ("status", lambda: get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec("nope")),
                             Code.NOT_FOUND, ("Could not find any versions of model nope",)),
    "status_unknown_version": ("status", lambda: get_model_status_pb2.GetModelStatusRequest(
        model_spec=model_spec("two_sig", 7)), Code.NOT_FOUND, ("Could not find version 7 of model two_sig",)),
    "status_unknown_label": ("status", lambda: get_model_status_pb2.GetModelStatusRequest(
        model_spec=model_spec("two_sig", label="x")), Code.INVALID_ARGUMENT, ("Unrecognized servable version label: x",)),
    "status_missing_model_spec": ("status", lambda: get_model_status_pb2.GetModelStatusRequest(),
                                  Code.INVALID_ARGUMENT, ("Missing ModelSpec",)),
}


@pytest.mark.parametrize("case", sorted(OTHER_ERRORS))
def test_other_errors(server, stubs, case):
    method, request, code, words = OTHER_ERRORS[case]
    expect_rpc_error(getattr(stubs, method), request(), code, *words)
    assert_still_serving(server, stubs)
    examples, classes, scores = _classify_reference()
    response = stubs.classify(_classify(model_spec("classify_regress"), example_list(examples)))
    check_classification(response.result, classes, scores)


def test_error_message_names_the_wrong_dtype(stubs):
    """A wrong dtype names the input and both types, so the client can tell what to fix."""
    message = expect_rpc_error(stubs.predict, predict_request(
        model_spec("two_sig"), {"x": tf.make_tensor_proto(X.astype(np.float64))}), Code.INVALID_ARGUMENT)
    lowered = message.lower()
    assert "x" in message and ("double" in lowered or "fp64" in lowered) and ("float" in lowered or "fp32" in lowered), message


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate],
                         ids=["gzip", "deflate"])
def test_compressed_requests(server, compression):
    """Clients may compress their messages with gzip or deflate (gRPC's built-in algorithms,
    which TF Serving's C++ gRPC server accepts on every service)."""
    channel = grpc.insecure_channel(server.grpc_host, compression=compression)
    try:
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        model = model_service_pb2_grpc.ModelServiceStub(channel)
        ref = REFERENCES["two_sig"]["2"][DEFAULT]
        response = prediction.Predict(predict_request(model_spec("two_sig"), {
            "x": tf.make_tensor_proto(_tf.to_numpy(ref["inputs"]["x"]))}), timeout=TIMEOUT_S)
        for key, tensor in ref["outputs"].items():
            assert_output(key, response.outputs[key], _tf.to_numpy(tensor), tensor["dtype"])
        meta = prediction.GetModelMetadata(metadata_request(model_spec("two_sig")), timeout=TIMEOUT_S)
        assert signature_defs(meta) == expected_signature_defs("two_sig", "2")
        status = model.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec("two_sig")),
                                      timeout=TIMEOUT_S)
        assert status_of(status) == [(2, AVAILABLE, 0, ""), (1, AVAILABLE, 0, "")]
    finally:
        channel.close()


# ---------------------------------------------------------------------------------------------
# 6. HandleReloadConfigRequest


@pytest.fixture(scope="module")
def reload_server(tmp_path_factory):
    """A server whose repository holds only `scalar` (model A); models B come from reloads."""
    repo = tmp_path_factory.mktemp("tfserving-reload")
    shutil.copytree(MODELS / "scalar", repo / "scalar")
    broken = tmp_path_factory.mktemp("tfserving-broken-model")
    (broken / "1").mkdir()
    (broken / "1" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    srv = ServerProcess("tfserving-reload", [str(repo)]).start()
    srv.broken_model_path = str(broken)
    try:
        yield srv
    finally:
        srv.stop_and_check()


@pytest.fixture(scope="module")
def reload_stubs(reload_server):
    s = Stubs(reload_server)
    yield s
    s.close()


def model_config(name: str, base_path, platform: str | None = "tensorflow", all_versions: bool = False):
    config = model_server_config_pb2.ModelConfig(name=name, base_path=str(base_path))
    if platform is not None:
        config.model_platform = platform
    if all_versions:
        config.model_version_policy.all.SetInParent()
    return config


def reload_request(*configs) -> model_management_pb2.ReloadConfigRequest:
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.SetInParent()  # an empty list is a list (unloads every listed model)
    request.config.model_config_list.config.extend(configs)
    return request


def reload_ok(stubs: Stubs, *configs) -> None:
    response = stubs.reload(reload_request(*configs))
    assert response.status.error_code == 0 and response.status.error_message == "", response


def assert_scalar_serves(stubs: Stubs) -> None:
    """Model A, from the repository: unaffected by every reload."""
    response = stubs.predict(predict_request(model_spec("scalar"), {"x": tf.make_tensor_proto(np.float32(2.0))}))
    assert float(to_array(response.outputs["y"])) == 6.0
    status = stubs.status(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec("scalar")))
    assert status_of(status) == [(1, AVAILABLE, 0, "")]


def assert_not_served(stubs: Stubs, name: str) -> None:
    """A model taken off the list: Predict is NOT_FOUND with TF Serving's message (after a
    moment: the reload unloads it once its requests are done, and TF Serving's manager too drops
    it on its next pass), and its status is NOT_FOUND or shows no AVAILABLE version."""
    deadline = time.monotonic() + UNLOAD_WAIT_S
    while True:
        try:
            stubs.predict(predict_request(model_spec(name), _x()))
            last = "answered"
        except grpc.RpcError as err:
            if err.code() == Code.NOT_FOUND:
                assert err.details() == f"Servable not found for request: Latest({name})", err.details()
                break
            last = f"{err.code()} {err.details()!r}"
        if time.monotonic() > deadline:
            pytest.fail(f"Predict on the removed model {name!r}: {last} {UNLOAD_WAIT_S} s after the reload; "
                        f"expected NOT_FOUND 'Servable not found for request: Latest({name})'")
        time.sleep(0.05)
    try:
        status = stubs.status(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec(name)))
    except grpc.RpcError as err:
        assert err.code() == Code.NOT_FOUND, (err.code(), err.details())
    else:
        # TF Serving keeps the versions it unloaded on purpose as END with an OK status (a clean
        # unload is no error); UNLOADING while the unload finishes.
        for entry in status.model_version_status:
            assert entry.state in (END, UNLOADING) and entry.status.error_code == 0, status


def test_reload_adds_and_removes_listed_models(reload_stubs):
    stubs = reload_stubs
    assert_scalar_serves(stubs)
    assert_not_served(stubs, "b")
    # B (two_sig under another name) listed: loaded before the answer, its latest version only
    # (TF Serving's default version policy), and unbatched (any batch size).
    reload_ok(stubs, model_config("b", MODELS / "two_sig"))
    status = stubs.status(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec("b")))
    assert status_of(status) == [(2, AVAILABLE, 0, "")]
    for sig in (DEFAULT, "double"):
        ref = REFERENCES["two_sig"]["2"][sig]
        inputs = {k: tf.make_tensor_proto(_tf.to_numpy(t)) for k, t in ref["inputs"].items()}
        response = stubs.predict(predict_request(model_spec("b", signature=sig), inputs))
        assert_spec(response.model_spec, "b", 2, sig)
        for key, tensor in ref["outputs"].items():
            assert_output(key, response.outputs[key], _tf.to_numpy(tensor), tensor["dtype"])
    meta = stubs.metadata(metadata_request(model_spec("b")))
    assert signature_defs(meta) == expected_signature_defs("two_sig", "2")
    assert_scalar_serves(stubs)
    # The same list again changes nothing.
    reload_ok(stubs, model_config("b", MODELS / "two_sig"))
    check_predict(stubs, "two_sig", "2", DEFAULT, "typed", spec=model_spec("b"))
    # An empty list unloads B; the repository's model stays.
    reload_ok(stubs)
    assert_not_served(stubs, "b")
    assert_scalar_serves(stubs)


def test_reload_version_policy_and_onnx(reload_stubs):
    """A listed model with `model_version_policy { all {} }` serves every version (newest first
    in its status); an ONNX model can be listed too (no model_platform)."""
    stubs = reload_stubs
    reload_ok(stubs, model_config("b", MODELS / "two_sig", all_versions=True),
              model_config("onnx", ROOT / "examples" / "models" / "add_sub", platform=None))
    status = stubs.status(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec("b")))
    assert status_of(status) == [(2, AVAILABLE, 0, ""), (1, AVAILABLE, 0, "")]
    for version in ("1", "2"):
        ref = REFERENCES["two_sig"][version][DEFAULT]
        response = stubs.predict(predict_request(model_spec("b", version), {
            "x": tf.make_tensor_proto(_tf.to_numpy(ref["inputs"]["x"]))}))
        assert_spec(response.model_spec, "b", int(version), DEFAULT)
        for key, tensor in ref["outputs"].items():
            assert_output(key, response.outputs[key], _tf.to_numpy(tensor), tensor["dtype"])
    check_add_sub(stubs, "onnx", 5, seed=9)
    # Dropping B keeps the ONNX model.
    reload_ok(stubs, model_config("onnx", ROOT / "examples" / "models" / "add_sub", platform=None))
    assert_not_served(stubs, "b")
    check_add_sub(stubs, "onnx", 2, seed=10)
    reload_ok(stubs)
    assert_not_served(stubs, "onnx")
    assert_scalar_serves(stubs)


def test_reload_failures(reload_server, reload_stubs):
    """A model that fails to load fails the reload with UNKNOWN ("N model(s) did not become
    available", ServerCore::WaitUntilModelsAvailable, returned as the RPC's status by
    ModelServiceImpl::HandleReloadConfigRequest); an unsupported platform is INVALID_ARGUMENT.
    The repository's model keeps serving, and a good reload works afterwards."""
    stubs = reload_stubs
    expect_rpc_error(stubs.reload, reload_request(model_config("b", MODELS / "two_sig", platform="pytorch")),
                     Code.INVALID_ARGUMENT, "pytorch")
    assert_scalar_serves(stubs)
    expect_rpc_error(stubs.reload, reload_request(model_config("broken", reload_server.broken_model_path)),
                     Code.UNKNOWN, "broken")
    assert_scalar_serves(stubs)
    reload_ok(stubs, model_config("b", MODELS / "two_sig"))
    check_predict(stubs, "two_sig", "2", DEFAULT, "typed", spec=model_spec("b"))
    reload_ok(stubs)
    assert_not_served(stubs, "b")


def test_reload_without_config(reload_stubs):
    """TF Serving's HandleReloadConfigRequest takes only a model_config_list: a request with no
    config at all is INVALID_ARGUMENT ("ServerModelConfig type not supported by
    HandleReloadConfigRequest. Only ModelConfigList is currently supported") and changes
    nothing; it is not an empty list (which unloads every listed model)."""
    stubs = reload_stubs
    reload_ok(stubs, model_config("b", MODELS / "two_sig"))
    try:
        request = model_management_pb2.ReloadConfigRequest()
        assert not request.HasField("config")
        expect_rpc_error(stubs.reload, request, Code.INVALID_ARGUMENT,
                         "Only ModelConfigList is currently supported")
        check_predict(stubs, "two_sig", "2", DEFAULT, "typed", spec=model_spec("b"))
        assert_scalar_serves(stubs)
    finally:
        reload_ok(stubs)


def test_reload_custom_model_config(reload_stubs):
    """A custom_model_config is INVALID_ARGUMENT too, and changes nothing."""
    stubs = reload_stubs
    reload_ok(stubs, model_config("b", MODELS / "two_sig"))
    try:
        request = model_management_pb2.ReloadConfigRequest()
        request.config.custom_model_config.type_url = "type.googleapis.com/example.Custom"
        expect_rpc_error(stubs.reload, request, Code.INVALID_ARGUMENT)
        check_predict(stubs, "two_sig", "2", DEFAULT, "typed", spec=model_spec("b"))
        assert_scalar_serves(stubs)
    finally:
        reload_ok(stubs)


# ---------------------------------------------------------------------------------------------
# 7. An ONNX model


def check_add_sub(stubs: Stubs, name: str, batch: int, seed: int, version=None, signature=None,
                  encoding: str = "make_tensor_proto") -> None:
    feeds = add_sub_inputs(batch, seed=seed)
    protos = {k: make_proto(v, "DT_FLOAT", encoding) for k, v in feeds.items()}
    response = stubs.predict(predict_request(model_spec(name, version, signature=signature), protos))
    assert_spec(response.model_spec, name, 1, DEFAULT)
    want = {"OUTPUT0": feeds["INPUT0"] + feeds["INPUT1"], "OUTPUT1": feeds["INPUT0"] - feeds["INPUT1"]}
    assert sorted(response.outputs) == sorted(want)
    for key, arr in want.items():
        assert_output(key, response.outputs[key], arr, "DT_FLOAT")


@pytest.mark.parametrize("encoding", ["make_tensor_proto", "tensor_content", "typed"])
def test_onnx_predict(stubs, encoding):
    check_add_sub(stubs, "add_sub", 1, seed=41, encoding=encoding)
    check_add_sub(stubs, "add_sub", 3, seed=43, version=1, signature=DEFAULT, encoding=encoding)
    check_add_sub(stubs, "add_sub", 8, seed=48, encoding=encoding)


def test_onnx_output_filter_metadata_status_errors(stubs):
    feeds = add_sub_inputs(2, seed=5)
    protos = {k: tf.make_tensor_proto(v) for k, v in feeds.items()}
    response = stubs.predict(predict_request(model_spec("add_sub"), protos, output_filter=["OUTPUT1"]))
    assert list(response.outputs) == ["OUTPUT1"]
    assert_output("OUTPUT1", response.outputs["OUTPUT1"], feeds["INPUT0"] - feeds["INPUT1"], "DT_FLOAT")

    meta = stubs.metadata(metadata_request(model_spec("add_sub")))
    assert_spec(meta.model_spec, "add_sub", 1, "")
    info = {n: {"name": n, "dtype": "DT_FLOAT", "shape": [-1, 16]} for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")}
    assert signature_defs(meta) == {DEFAULT: {
        "method_name": PREDICT_METHOD,
        "inputs": {k: info[k] for k in ("INPUT0", "INPUT1")},
        "outputs": {k: info[k] for k in ("OUTPUT0", "OUTPUT1")},
    }}
    status = stubs.status(get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec("add_sub")))
    assert status_of(status) == [(1, AVAILABLE, 0, "")]

    expect_rpc_error(stubs.predict, predict_request(model_spec("add_sub", signature="nope"), protos),
                     Code.INVALID_ARGUMENT, SIGNATURE_NOT_FOUND)
    expect_rpc_error(stubs.predict, predict_request(model_spec("add_sub"), {"INPUT0": protos["INPUT0"]}),
                     Code.INVALID_ARGUMENT, "input size does not match signature")
    expect_rpc_error(stubs.classify, _classify(model_spec("add_sub"), example_list(ONE_EXAMPLE)),
                     Code.INVALID_ARGUMENT, "Expected classification signature method_name")
    # More rows than the model's max_batch_size (8).
    big = add_sub_inputs(9, seed=6)
    expect_rpc_error(stubs.predict, predict_request(model_spec("add_sub"), {
        k: tf.make_tensor_proto(v) for k, v in big.items()}), Code.INVALID_ARGUMENT)
    check_add_sub(stubs, "add_sub", 2, seed=7)
