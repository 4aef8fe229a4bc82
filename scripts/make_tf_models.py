#!/usr/bin/env python3
"""Generate the TensorFlow SavedModel fixtures for oxserve's TensorFlow engine and its
TF Serving compatibility tests, with reference outputs computed by Python TensorFlow.

    scripts/setup-tensorflow.sh
    $HOME/.cache/oxserve/venv-tf/bin/python scripts/make_tf_models.py [--out DIR] [--if-needed]

The default output directory is

    ${OXSERVE_CACHE:-$HOME/.cache/oxserve}/tf-models/<first 16 hex digits of sha256(this file)>

so editing this script yields a fresh directory. The directory is printed as the last line on
stdout (progress goes to stderr). With --if-needed nothing is generated when `<out>/.complete`
exists. The tree is built in a temporary sibling directory and renamed into place, with
`.complete` already inside, so a reader never sees a half-written repository.

Layout (TF Serving's model base paths, numeric versions):

    <out>/<model>/<version>/saved_model.pb, variables/
    <out>/references.json   {model: {version: {signature: {"method", "inputs", "outputs"}}}}
                            each tensor {"dtype": "DT_*", "shape": [...], "data": [flat, row-major]};
                            DT_STRING elements are UTF-8 text, or {"b64": ...} when the bytes are
                            not UTF-8 (serialized tf.Examples are always {"b64": ...});
                            DT_HALF / DT_BFLOAT16 data are plain JSON numbers.
                            Classify/regress signatures also carry "examples": the tf.Example
                            features as JSON objects ({"x1": 5.0, "x2": 3.5}), the same examples
                            that "inputs" holds serialized.
    <out>/signatures.json   {model: {version: {signature: {"method_name", "inputs", "outputs"}}}}
                            each key {"name": "serving_default_x:0", "dtype": "DT_FLOAT",
                            "shape": [-1, 4] (-1 = unknown dim, null = unknown rank)}, read from
                            the MetaGraphDef tagged "serve" in saved_model.pb: what
                            `saved_model_cli show --all` prints and TF Serving's GetModelMetadata
                            returns (including `__saved_model_init_op` where the model has one).

Models:

    two_sig/1, two_sig/2  tf.Module; serving_default: x f32[-1,4] -> y f32[-1,3] (x@W+b), total f32[-1]
                          (row sums of y); double: a i64[-1,2] -> doubled i64[-1,2]. The versions
                          differ in W and b.
    keras_mlp/1           Keras 3 functional model (Input "features" [8] -> Dense 16 relu -> Dense 3
                          softmax) exported with model.export(): serving_default and serve,
                          output key output_0.
    strings/1             text str[-1] -> length i32[-1] (tf.strings.length: bytes),
                          upper str[-1] (tf.strings.upper: ASCII letters only).
    classify_regress/1    TF1 graph + SavedModelBuilder: serving_default = classify
                          (inputs: serialized tf.Example with float x1, x2 -> classes str[-1,3],
                          scores f32[-1,3]); regress (inputs -> outputs f32[-1,1]);
                          predict (x1, x2 f32[-1] -> score f32[-1]).
    half/1                serving_default: x f16[-1,4] -> y f16 (x*2), y32 f32 (cast);
                          bf16: b bf16[-1,2] -> out bf16 (b+1).
    types/1               i8 i16 i32 u8 u16 f64 bool, all [-1,2] -> <key>_out (ints +1, f64 *2,
                          bool logical_not).
    scalar/1              x f32[] -> y f32[] (x*3).
    mlp/1                 bench: x f32[-1,64] -> 256 relu -> 256 relu -> y f32[-1,10].
    cnn/1                 bench: image f32[-1,32,32,3] (NHWC) -> conv3x3x16 relu -> maxpool 2 ->
                          conv3x3x32 relu -> global average pool -> logits f32[-1,10].

Deterministic: weights and inputs come from fixed numpy seeds (TF and Keras are seeded too), so
references.json and signatures.json are identical between runs. Each reference output is also
checked here against an independent numpy computation.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
SEED = 20240501


def log(msg: str) -> None:
    print(f"make_tf_models: {msg}", file=sys.stderr, flush=True)


def default_out() -> Path:
    digest = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:16]
    cache = os.environ.get("OXSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "oxserve")
    return Path(cache) / "tf-models" / digest


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the cache, keyed by this script's hash)")
    p.add_argument("--if-needed", action="store_true", help="do nothing when <out>/.complete exists")
    return p.parse_args()


ARGS = parse_args()
OUT = (ARGS.out or default_out()).absolute()
if ARGS.if_needed and (OUT / ".complete").is_file():
    print(OUT)
    sys.exit(0)

# Before TensorFlow / Keras are imported: quiet logs, and keep Keras away from ~/.keras.
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_KERAS_HOME = tempfile.mkdtemp(prefix="oxserve-keras-home-")
atexit.register(shutil.rmtree, _KERAS_HOME, ignore_errors=True)
os.environ["KERAS_HOME"] = _KERAS_HOME

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import types_pb2  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402

import keras  # noqa: E402

tf.get_logger().setLevel("ERROR")  # tf.compat.v1 deprecation warnings
np.random.seed(SEED)
tf.random.set_seed(SEED)
keras.utils.set_random_seed(SEED)
tf.config.experimental.enable_op_determinism()


def rng(tag: str) -> np.random.Generator:
    """An independent, fixed random stream per purpose."""
    return np.random.default_rng([SEED, int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)])


def weights(tag: str, shape: tuple[int, ...], fan_in: int | None = None) -> np.ndarray:
    fan_in = fan_in or shape[0]
    return (rng(tag).standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def grid_values(tag: str, shape: tuple[int, ...], lo: float, hi: float, step: float) -> np.ndarray:
    """Random float32 inputs on a grid of `step`, so they print short and are exact in any format."""
    v = rng(tag).uniform(lo, hi, size=shape)
    return (np.round(v / step) * step).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# JSON encoding of tensors


def _num(v, dtype) -> float | int | bool:
    if dtype == tf.bool:
        return bool(v)
    if dtype.is_integer:
        return int(v)
    if dtype in (tf.float32, tf.float16, tf.bfloat16):
        # Shortest decimal that reads back as the same float32 (half and bfloat16 values are
        # exact in float32); float64 keeps Python's full repr.
        return float(str(np.float32(v)))
    return float(v)


def _string_elem(b: bytes, force_b64: bool = False):
    if not force_b64:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(b).decode("ascii")}


def tensor_json(value, dtype: tf.DType | None = None, force_b64: bool = False) -> dict:
    if isinstance(value, (tf.Tensor, tf.Variable)):
        dtype = value.dtype
        arr = value.numpy()
    else:
        arr = np.asarray(value)
    assert dtype is not None
    flat = np.asarray(arr).reshape(-1)
    if dtype == tf.string:
        data = [_string_elem(bytes(b), force_b64) for b in flat]
    else:
        data = [_num(v, dtype) for v in flat]
    return {
        "dtype": types_pb2.DataType.Name(dtype.as_datatype_enum),
        "shape": [int(d) for d in np.shape(arr)],
        "data": data,
    }


# ---------------------------------------------------------------------------------------------
# signatures.json: straight from saved_model.pb


def _tensor_info(ti) -> dict:
    kind = ti.WhichOneof("encoding")
    d: dict = {"name": ti.name if kind == "name" else None}
    if kind != "name":
        d["encoding"] = kind
    d["dtype"] = types_pb2.DataType.Name(ti.dtype)
    if ti.tensor_shape.unknown_rank:
        d["shape"] = None
    else:
        d["shape"] = [int(dim.size) for dim in ti.tensor_shape.dim]
    return d


def read_signatures(version_dir: Path) -> dict:
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    metas = [m for m in sm.meta_graphs if "serve" in m.meta_info_def.tags]
    assert len(metas) == 1, f"{version_dir}: {len(metas)} meta graphs tagged serve"
    out = {}
    for key in sorted(metas[0].signature_def):
        sd = metas[0].signature_def[key]
        out[key] = {
            "method_name": sd.method_name,
            "inputs": {k: _tensor_info(sd.inputs[k]) for k in sorted(sd.inputs)},
            "outputs": {k: _tensor_info(sd.outputs[k]) for k in sorted(sd.outputs)},
        }
    return out


# ---------------------------------------------------------------------------------------------
# Models. Each builder saves into `vdir` and returns {signature: spec}, where spec has
#   "inputs": {key: (numpy value, tf dtype)}, "expect": {key: numpy expected value},
#   optional "examples" (feature dicts) and "b64_inputs" (keys whose strings are always b64).


def make_two_sig(vdir: Path, version: int) -> dict:
    w = weights(f"two_sig/{version}/W", (4, 3))
    b = (rng(f"two_sig/{version}/b").standard_normal(3) * 0.5).astype(np.float32)

    class TwoSig(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(w, name="W")
            self.b = tf.Variable(b, name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            y = tf.matmul(x, self.w) + self.b
            return {"y": y, "total": tf.reduce_sum(y, axis=1)}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.int64, name="a")])
        def double(self, a):
            return {"doubled": a * 2}

    m = TwoSig()
    tf.saved_model.save(m, str(vdir), signatures={"serving_default": m.serve, "double": m.double})

    x = np.array([[1, 2, 3, 4], [0.5, -1, 0, 2], [-2, 0.25, 1.5, -0.75]], np.float32)
    a = np.array([[1, -2], [7, 1 << 40], [0, -5]], np.int64)
    y = x @ w + b
    return {
        "serving_default": {"inputs": {"x": (x, tf.float32)}, "expect": {"y": y, "total": y.sum(axis=1)}},
        "double": {"inputs": {"a": (a, tf.int64)}, "expect": {"doubled": a * 2}},
    }


def make_keras_mlp(vdir: Path, version: int) -> dict:
    keras.utils.set_random_seed(SEED)
    inp = keras.Input(shape=(8,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    model = keras.Model(inp, out, name="keras_mlp")
    w1, b1 = weights("keras_mlp/W1", (8, 16)), (rng("keras_mlp/b1").standard_normal(16) * 0.1).astype(np.float32)
    w2, b2 = weights("keras_mlp/W2", (16, 3)), (rng("keras_mlp/b2").standard_normal(3) * 0.1).astype(np.float32)
    model.get_layer("hidden").set_weights([w1, b1])
    model.get_layer("probs").set_weights([w2, b2])
    model.export(str(vdir), verbose=False)

    x = grid_values("keras_mlp/x", (2, 8), -2, 2, 0.125)
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    spec = {"inputs": {"features": (x, tf.float32)}, "expect": {"output_0": p}}
    return {"serving_default": spec, "serve": spec}


def make_strings(vdir: Path, version: int) -> dict:
    class Strings(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text):
            return {"length": tf.strings.length(text), "upper": tf.strings.upper(text)}

    m = Strings()
    tf.saved_model.save(m, str(vdir), signatures={"serving_default": m.serve})

    texts = ["hello", "Grüße, Zürich", "日本語 text", "", "mixed Case 123 ✓"]
    raw = [t.encode("utf-8") for t in texts]
    return {
        "serving_default": {
            "inputs": {"text": (np.array(raw, dtype=object), tf.string)},
            # Both ops work on bytes: length counts UTF-8 bytes, upper maps ASCII letters only
            # (as Python's bytes.upper()).
            "expect": {
                "length": np.array([len(r) for r in raw], np.int32),
                "upper": np.array([r.upper() for r in raw], dtype=object),
            },
        }
    }


CLASSES = ["setosa", "versicolor", "virginica"]


def make_classify_regress(vdir: Path, version: int) -> dict:
    wc = weights("classify/W", (2, 3))
    bc = (rng("classify/b").standard_normal(3) * 0.1).astype(np.float32)
    wr = weights("regress/W", (2, 1))
    br = np.array([0.5], np.float32)

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        serialized = v1.placeholder(tf.string, shape=[None], name="tf_example")
        feats = tf.io.parse_example(
            serialized,
            {
                "x1": tf.io.FixedLenFeature([], tf.float32),
                "x2": tf.io.FixedLenFeature([], tf.float32),
            },
        )
        xe = tf.stack([feats["x1"], feats["x2"]], axis=1, name="example_x")
        w_c = v1.Variable(wc, name="classify_W")
        b_c = v1.Variable(bc, name="classify_b")
        w_r = v1.Variable(wr, name="regress_W")
        b_r = v1.Variable(br, name="regress_b")

        scores = tf.nn.softmax(tf.matmul(xe, w_c) + b_c, name="scores")
        n = tf.shape(serialized)[0]
        classes = tf.tile(tf.constant([CLASSES]), tf.stack([n, 1]), name="classes")
        regression = tf.add(tf.matmul(xe, w_r), b_r, name="regression")

        px1 = v1.placeholder(tf.float32, shape=[None], name="x1")
        px2 = v1.placeholder(tf.float32, shape=[None], name="x2")
        px = tf.stack([px1, px2], axis=1)
        score = tf.reshape(tf.matmul(px, w_r) + b_r, [-1], name="score")

        sigs = {
            "serving_default": v1.saved_model.classification_signature_def(
                examples=serialized, classes=classes, scores=scores
            ),
            "regress": v1.saved_model.regression_signature_def(examples=serialized, predictions=regression),
            "predict": v1.saved_model.predict_signature_def(inputs={"x1": px1, "x2": px2}, outputs={"score": score}),
        }
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(vdir))
            builder.add_meta_graph_and_variables(
                sess,
                [tf.saved_model.SERVING],
                signature_def_map=sigs,
                main_op=v1.tables_initializer(),
                strip_default_attrs=True,
            )
            builder.save()

    examples = [{"x1": 5.0, "x2": 3.5}, {"x1": 6.25, "x2": 2.75}, {"x1": -1.5, "x2": 0.125}]
    protos = []
    for ex in examples:
        e = tf.train.Example()
        for k, v in ex.items():
            e.features.feature[k].float_list.value.append(v)
        protos.append(e.SerializeToString(deterministic=True))
    ser = np.array(protos, dtype=object)
    x = np.array([[ex["x1"], ex["x2"]] for ex in examples], np.float32)
    lg = x @ wc + bc
    e = np.exp(lg - lg.max(axis=1, keepdims=True))
    reg = x @ wr + br
    return {
        "serving_default": {
            "inputs": {"inputs": (ser, tf.string)},
            "b64_inputs": {"inputs"},
            "examples": examples,
            "expect": {
                "classes": np.array([[c.encode() for c in CLASSES]] * len(examples), dtype=object),
                "scores": e / e.sum(axis=1, keepdims=True),
            },
        },
        "regress": {
            "inputs": {"inputs": (ser, tf.string)},
            "b64_inputs": {"inputs"},
            "examples": examples,
            "expect": {"outputs": reg},
        },
        "predict": {
            "inputs": {"x1": (x[:, 0].copy(), tf.float32), "x2": (x[:, 1].copy(), tf.float32)},
            "expect": {"score": reg.reshape(-1)},
        },
    }


def make_half(vdir: Path, version: int) -> dict:
    class Half(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float16, name="x")])
        def serve(self, x):
            return {"y": x * tf.constant(2, tf.float16), "y32": tf.cast(x, tf.float32)}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.bfloat16, name="b")])
        def bf16(self, b):
            return {"out": b + tf.constant(1, tf.bfloat16)}

    m = Half()
    tf.saved_model.save(m, str(vdir), signatures={"serving_default": m.serve, "bf16": m.bf16})

    bf = tf.bfloat16.as_numpy_dtype
    x = np.array([[1, 2, -0.5, 0.25], [3.5, -4, 0.125, 100], [0.1, -0.3, 1000, 6e-5]], np.float16)
    b = np.array([[1.5, -2], [0.25, 8], [-0.75, 100]], bf)
    return {
        "serving_default": {
            "inputs": {"x": (x, tf.float16)},
            "expect": {"y": x * np.float16(2), "y32": x.astype(np.float32)},
        },
        "bf16": {"inputs": {"b": (b, tf.bfloat16)}, "expect": {"out": (b.astype(np.float32) + 1).astype(bf)}},
    }


TYPES = [
    ("i8", tf.int8, [[-5, 7], [100, -128]]),
    ("i16", tf.int16, [[-32768, 32766], [5, -5]]),
    ("i32", tf.int32, [[-2147483648, 2147483646], [0, 42]]),
    ("u8", tf.uint8, [[0, 200], [17, 254]]),
    ("u16", tf.uint16, [[0, 65534], [1000, 7]]),
    ("f64", tf.float64, [[0.1, -2.5], [1e10, 3.141592653589793]]),
    ("flag", tf.bool, [[True, False], [False, True]]),
]


def make_types(vdir: Path, version: int) -> dict:
    def transform(key, t):
        if key == "flag":
            return tf.logical_not(t)
        if key == "f64":
            return t * tf.constant(2, tf.float64)
        return t + tf.constant(1, t.dtype)

    class Types(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], dt, name=k) for k, dt, _ in TYPES])
        def serve(self, i8, i16, i32, u8, u16, f64, flag):
            args = {"i8": i8, "i16": i16, "i32": i32, "u8": u8, "u16": u16, "f64": f64, "flag": flag}
            return {f"{k}_out": transform(k, args[k]) for k, _, _ in TYPES}

    m = Types()
    tf.saved_model.save(m, str(vdir), signatures={"serving_default": m.serve})

    inputs, expect = {}, {}
    for k, dt, vals in TYPES:
        a = np.array(vals, dt.as_numpy_dtype)
        inputs[k] = (a, dt)
        expect[f"{k}_out"] = ~a if k == "flag" else (a * 2 if k == "f64" else a + np.array(1, a.dtype))
    return {"serving_default": {"inputs": inputs, "expect": expect}}


def make_scalar(vdir: Path, version: int) -> dict:
    class Scalar(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * 3.0}

    m = Scalar()
    tf.saved_model.save(m, str(vdir), signatures={"serving_default": m.serve})
    x = np.array(2.5, np.float32)
    return {"serving_default": {"inputs": {"x": (x, tf.float32)}, "expect": {"y": x * 3}}}


def make_mlp(vdir: Path, version: int) -> dict:
    dims = [64, 256, 256, 10]
    params = []
    for i in range(3):
        w = weights(f"mlp/W{i}", (dims[i], dims[i + 1]))
        b = (rng(f"mlp/b{i}").standard_normal(dims[i + 1]) * 0.05).astype(np.float32)
        params.append((w, b))

    class Mlp(tf.Module):
        def __init__(self):
            super().__init__()
            self.ws = [tf.Variable(w, name=f"W{i}") for i, (w, _) in enumerate(params)]
            self.bs = [tf.Variable(b, name=f"b{i}") for i, (_, b) in enumerate(params)]

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu(tf.matmul(x, self.ws[0]) + self.bs[0])
            h = tf.nn.relu(tf.matmul(h, self.ws[1]) + self.bs[1])
            return {"y": tf.matmul(h, self.ws[2]) + self.bs[2]}

    m = Mlp()
    tf.saved_model.save(m, str(vdir), signatures={"serving_default": m.serve})

    x = grid_values("mlp/x", (2, 64), -1, 1, 1 / 64)
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < 2:
            h = np.maximum(h, 0)
    return {"serving_default": {"inputs": {"x": (x, tf.float32)}, "expect": {"y": h}}}


def _np_conv_same(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """NHWC 'SAME' 3x3 stride-1 convolution (cross-correlation, as tf.nn.conv2d)."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(1, 2))  # N,H,W,C,3,3
    return np.einsum("nhwcij,ijco->nhwo", win, k.astype(np.float64))


def make_cnn(vdir: Path, version: int) -> dict:
    k1 = weights("cnn/K1", (3, 3, 3, 16), fan_in=27)
    c1 = (rng("cnn/c1").standard_normal(16) * 0.05).astype(np.float32)
    k2 = weights("cnn/K2", (3, 3, 16, 32), fan_in=144)
    c2 = (rng("cnn/c2").standard_normal(32) * 0.05).astype(np.float32)
    wd = weights("cnn/Wd", (32, 10))
    bd = (rng("cnn/bd").standard_normal(10) * 0.05).astype(np.float32)

    class Cnn(tf.Module):
        def __init__(self):
            super().__init__()
            self.k1, self.c1 = tf.Variable(k1, name="K1"), tf.Variable(c1, name="c1")
            self.k2, self.c2 = tf.Variable(k2, name="K2"), tf.Variable(c2, name="c2")
            self.wd, self.bd = tf.Variable(wd, name="Wd"), tf.Variable(bd, name="bd")

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="image")])
        def serve(self, image):
            h = tf.nn.relu(tf.nn.conv2d(image, self.k1, strides=1, padding="SAME") + self.c1)
            h = tf.nn.max_pool2d(h, ksize=2, strides=2, padding="VALID")
            h = tf.nn.relu(tf.nn.conv2d(h, self.k2, strides=1, padding="SAME") + self.c2)
            h = tf.reduce_mean(h, axis=[1, 2])
            return {"logits": tf.matmul(h, self.wd) + self.bd}

    m = Cnn()
    tf.saved_model.save(m, str(vdir), signatures={"serving_default": m.serve})

    x = grid_values("cnn/image", (2, 32, 32, 3), 0, 1, 1 / 256)
    h = np.maximum(_np_conv_same(x.astype(np.float64), k1) + c1, 0)
    n, hh, ww, c = h.shape
    h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    h = np.maximum(_np_conv_same(h, k2) + c2, 0)
    logits = h.mean(axis=(1, 2)) @ wd + bd
    return {"serving_default": {"inputs": {"image": (x, tf.float32)}, "expect": {"logits": logits}}}


MODELS = [
    ("two_sig", 1, make_two_sig),
    ("two_sig", 2, make_two_sig),
    ("keras_mlp", 1, make_keras_mlp),
    ("strings", 1, make_strings),
    ("classify_regress", 1, make_classify_regress),
    ("half", 1, make_half),
    ("types", 1, make_types),
    ("scalar", 1, make_scalar),
    ("mlp", 1, make_mlp),
    ("cnn", 1, make_cnn),
]

# What the specification promises for each signature (key -> (dtype, shape)); checked against
# signatures.json so a TensorFlow upgrade that changes them fails here, not in the Rust tests.
EXPECTED_SIGNATURES = {
    "two_sig": {
        "serving_default": ({"x": ("DT_FLOAT", [-1, 4])}, {"y": ("DT_FLOAT", [-1, 3]), "total": ("DT_FLOAT", [-1])}),
        "double": ({"a": ("DT_INT64", [-1, 2])}, {"doubled": ("DT_INT64", [-1, 2])}),
    },
    "keras_mlp": {
        "serving_default": ({"features": ("DT_FLOAT", [-1, 8])}, {"output_0": ("DT_FLOAT", [-1, 3])}),
        "serve": ({"features": ("DT_FLOAT", [-1, 8])}, {"output_0": ("DT_FLOAT", [-1, 3])}),
    },
    "strings": {
        "serving_default": ({"text": ("DT_STRING", [-1])}, {"length": ("DT_INT32", [-1]), "upper": ("DT_STRING", [-1])}),
    },
    "classify_regress": {
        "serving_default": ({"inputs": ("DT_STRING", [-1])}, {"classes": ("DT_STRING", [-1, 3]), "scores": ("DT_FLOAT", [-1, 3])}),
        "regress": ({"inputs": ("DT_STRING", [-1])}, {"outputs": ("DT_FLOAT", [-1, 1])}),
        "predict": ({"x1": ("DT_FLOAT", [-1]), "x2": ("DT_FLOAT", [-1])}, {"score": ("DT_FLOAT", [-1])}),
    },
    "half": {
        "serving_default": ({"x": ("DT_HALF", [-1, 4])}, {"y": ("DT_HALF", [-1, 4]), "y32": ("DT_FLOAT", [-1, 4])}),
        "bf16": ({"b": ("DT_BFLOAT16", [-1, 2])}, {"out": ("DT_BFLOAT16", [-1, 2])}),
    },
    "types": {
        "serving_default": (
            {k: (types_pb2.DataType.Name(dt.as_datatype_enum), [-1, 2]) for k, dt, _ in TYPES},
            {f"{k}_out": (types_pb2.DataType.Name(dt.as_datatype_enum), [-1, 2]) for k, dt, _ in TYPES},
        ),
    },
    "scalar": {"serving_default": ({"x": ("DT_FLOAT", [])}, {"y": ("DT_FLOAT", [])})},
    "mlp": {"serving_default": ({"x": ("DT_FLOAT", [-1, 64])}, {"y": ("DT_FLOAT", [-1, 10])})},
    "cnn": {"serving_default": ({"image": ("DT_FLOAT", [-1, 32, 32, 3])}, {"logits": ("DT_FLOAT", [-1, 10])})},
}

METHODS = {
    ("classify_regress", "serving_default"): "tensorflow/serving/classify",
    ("classify_regress", "regress"): "tensorflow/serving/regress",
}


def check_signatures(model: str, sigs: dict) -> None:
    want = EXPECTED_SIGNATURES[model]
    got = {k for k in sigs if k != "__saved_model_init_op"}
    assert got == set(want), f"{model}: signatures {sorted(got)} != {sorted(want)}"
    for name, (ins, outs) in want.items():
        sd = sigs[name]
        method = METHODS.get((model, name), "tensorflow/serving/predict")
        assert sd["method_name"] == method, f"{model}/{name}: method {sd['method_name']}"
        for side, spec in (("inputs", ins), ("outputs", outs)):
            have = {k: (v["dtype"], v["shape"]) for k, v in sd[side].items()}
            assert have == spec, f"{model}/{name} {side}: {have} != {spec}"
            assert all(v["name"] for v in sd[side].values()), f"{model}/{name} {side}: tensor without a name"


def compare(label: str, got: np.ndarray, want: np.ndarray, dtype: tf.DType) -> None:
    want = np.asarray(want)
    assert got.shape == want.shape, f"{label}: shape {got.shape} != {want.shape}"
    if dtype == tf.string:
        assert [bytes(v) for v in got.reshape(-1)] == [bytes(v) for v in want.reshape(-1)], f"{label}: {got} != {want}"
    elif dtype.is_floating:
        tol = {tf.float16: 1e-3, tf.bfloat16: 1e-2, tf.float32: 1e-5, tf.float64: 1e-12}[dtype]
        np.testing.assert_allclose(
            got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol, err_msg=label
        )
    else:
        assert np.array_equal(got, want), f"{label}: {got} != {want}"


def references_for(model: str, version: int, vdir: Path, specs: dict, sigs: dict) -> dict:
    """Reload the SavedModel, run each signature and check it against numpy."""
    loaded = tf.saved_model.load(str(vdir))
    refs = {}
    for name in sorted(specs):
        spec = specs[name]
        fn = loaded.signatures[name]
        feeds = {k: tf.constant(v, dtype=dt) for k, (v, dt) in spec["inputs"].items()}
        result = fn(**feeds)
        assert set(result) == set(sigs[name]["outputs"]), f"{model}/{name}: outputs {sorted(result)}"
        outputs = {}
        for key in sorted(result):
            t = result[key]
            want_dtype = sigs[name]["outputs"][key]["dtype"]
            assert types_pb2.DataType.Name(t.dtype.as_datatype_enum) == want_dtype, f"{model}/{name}/{key}: {t.dtype}"
            compare(f"{model}/{version}/{name}/{key}", t.numpy(), spec["expect"][key], t.dtype)
            outputs[key] = tensor_json(t)
        b64 = spec.get("b64_inputs", set())
        entry = {
            "method": sigs[name]["method_name"],
            "inputs": {k: tensor_json(feeds[k], force_b64=k in b64) for k in sorted(feeds)},
            "outputs": outputs,
        }
        if "examples" in spec:
            entry["examples"] = spec["examples"]
        refs[name] = entry
    return refs


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    start = time.monotonic()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{OUT.name}.tmp-", dir=OUT.parent))
    try:
        references: dict = {}
        signatures: dict = {}
        for model, version, build in MODELS:
            t0 = time.monotonic()
            vdir = tmp / model / str(version)
            vdir.parent.mkdir(parents=True, exist_ok=True)
            specs = build(vdir, version)
            sigs = read_signatures(vdir)
            check_signatures(model, sigs)
            signatures.setdefault(model, {})[str(version)] = sigs
            references.setdefault(model, {})[str(version)] = references_for(model, version, vdir, specs, sigs)
            log(f"{model}/{version}: {dir_size(vdir)} bytes, {time.monotonic() - t0:.1f} s")

        # The two versions of two_sig must be distinguishable by their outputs.
        y1 = references["two_sig"]["1"]["serving_default"]["outputs"]["y"]["data"]
        y2 = references["two_sig"]["2"]["serving_default"]["outputs"]["y"]["data"]
        assert y1 != y2, "two_sig versions 1 and 2 give the same outputs"

        for fname, obj in (("references.json", references), ("signatures.json", signatures)):
            text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
            (tmp / fname).write_text(text + "\n", encoding="utf-8")
        total = dir_size(tmp)
        assert total < 50 * 1024 * 1024, f"fixtures too large: {total} bytes"
        (tmp / ".complete").write_text("")
        tmp.chmod(0o755)

        if OUT.exists():
            shutil.rmtree(OUT)
        try:
            tmp.rename(OUT)
        except OSError:
            # A concurrent run finished first; keep its (identical) result.
            if not (OUT / ".complete").is_file():
                raise
            shutil.rmtree(tmp)
        log(f"done: {total} bytes in {time.monotonic() - start:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(OUT)


if __name__ == "__main__":
    main()
