#!/usr/bin/env python3
"""Build TorchServe .mar fixtures with the real torch-model-archiver 0.12.0 and record what a
real TorchServe 0.12.0 answers to its documented curl workflow, for oxserve's TorchServe
compatibility front end (inference :8080, management :8081, metrics :8082).

    scripts/setup-torchserve.sh
    ${OXSERVE_CACHE:-$HOME/.cache/oxserve}/venv-torchserve/bin/python \\
        scripts/make_torchserve_fixtures.py [--out DIR] [--if-needed] [--no-server] [--no-token-probe]

The default output directory is

    ${OXSERVE_CACHE:-$HOME/.cache/oxserve}/torchserve-fixtures/<first 16 hex of sha256(this file)>

printed as the last line on stdout (progress goes to stderr). With --if-needed nothing is done
when `<out>/.complete` exists. The tree is built in a temporary sibling and renamed into place.
Needs Java 17 (`java` on PATH or JAVA_HOME) for the server part; --no-server skips it (then
there is no torchserve_reference.json). Takes about 65 s on 2 cores; only the CPU is used. A local
http.server thread (127.0.0.1, a free port) serves copies of densenet_small.mar for the
registrations from URLs ("allowed_urls" below).

Layout:

    <out>/model-store/densenet_small.mar      handler image_classifier (TorchServe's default),
        model.pt + index_to_name.json. model.pt = torch.jit.trace of a small CNN on
        [N,3,224,224]: Conv(3->8,s2)-ReLU-Conv(8->16,s2)-ReLU-Conv(16->32,s2)-ReLU-
        AdaptiveAvgPool(1)-Flatten-Linear(32->10), weights from torch.manual_seed(0) (last layer
        scaled x8 so the softmax is not flat). index_to_name.json = the first 10 ImageNet
        classes in TorchServe's format {"0": ["n01440764", "tench"], ...}.
    <out>/model-store/linear_base.mar         model.pt = traced Linear(4->3) (seed 1) with a
        tiny custom handler.py (a BaseHandler subclass) because TorchServe's BaseHandler cannot
        take JSON: its preprocess is `torch.as_tensor(data)` on the list of request dicts
        ([{"body": ...}]) and fails. handler.py accepts a JSON body that is a list (one row
        [4] or rows [[4], ...]) or {"data": list}, and answers out.tolist().
    <out>/model-store/linear_basehandler.mar  the same model.pt with `--handler base_handler`,
        kept to record the failure above (an error fixture).
    <out>/model-store/custom_echo.mar         the same model.pt with `--handler
        custom_handler.py` (CUSTOM_HANDLER): a module-level handle(data, context), for
        oxserve's custom Python handler support (TorchServe's own Python worker). Per request
        it answers by its body: {"rows": [[4], ...]} -> {"out", "batch" (len(data)), "header"
        (request header x-echo), "inputs" (the request dict's sorted keys)}; {"status": N}
        also sets status N "Custom phrase", content type application/x-custom, header
        x-handler: yes; {"raise": msg} raises ValueError; {"prediction_exception": code}
        raises PredictionException; {"die": true} os._exit(1)s the worker; {"headers": true}
        adds all the request headers the worker got; multipart without body/data ->
        {"parts": {name: len}}; not JSON -> {"bytes": len}.
    <out>/model-store/segmenter_small.mar     handler image_segmenter (TorchServe's default),
        model.pt only. model.pt = torch.jit.trace(strict=False) of a small fully convolutional
        net on [N,3,224,224] answering a dict, as torchvision's segmentation models do:
        {"out": Conv(3->8,3x3,p1)-ReLU-Conv(8->4,3x3,p1)} = [N,4,224,224] scores, weights from
        torch.manual_seed(2) (last layer scaled x8 so the softmax is not flat).
    <out>/model-store/detector_small.mar      handler object_detector (TorchServe's default),
        model.pt + index_to_name.json. model.pt = torch.jit.script of a small detector
        (script_detector) taking [N,3,H,W] of any H, W (object_detector's preprocessing is
        ToTensor only) and answering, as torchvision's detection models, a list with per image
        {"boxes": [6,4] float (x1, y1, x2, y2 in pixels), "labels": [6] int64 in 1..5,
        "scores": [6] float}: Conv(3->8,3x3,p1)-ReLU-Conv(8->16,1x1)-ReLU (no biases)-
        AdaptiveAvgPool(2x3) = one 16-vector per cell of a 2x3 grid, less their mean; per cell
        a detection: score sigmoid(Linear(16->1)) (bias -1: an image of one colour scores
        0.269 everywhere, nothing detected), label argmax(Linear(16->5)) + 1, a box around the
        cell's centre from sigmoid(Linear(16->4)), clamped to the image and scaled to its size.
        Weights from torch.manual_seed(17) (score weights x100, label and box weights x40):
        kitten.jpg has 3 scores >= 0.5 and 3 below, none within 0.1 of 0.5 (checked when
        building). index_to_name.json = DETECTOR_LABELS, the plain {"1": "cat", ...} form
        (TorchServe's load_label_mapping also takes [..., name] lists and
        {"object_type_names": [...]}), with "0": "__background__" as torchvision's.
    <out>/kitten.jpg                           a 320x240 JPEG (quality 90): colour gradient +
        shapes, drawn with numpy/PIL (no real kitten).
    <out>/kitten.png                           kitten.jpg as PIL decodes it (what TorchServe's
        handlers see), written losslessly: the same pixels with no JPEG decoder in between.
    <out>/black.png                            an all-black 64x48 RGB PNG (detector_small
        detects nothing in it).
    <out>/handler.py                           the linear_base handler, as archived.
    <out>/custom_handler.py                    the custom_echo handler, as archived.
    <out>/fixtures.json                        sha256 and size of each fixture, MANIFEST.json of
        each .mar, and locally computed expected outputs (the image_classifier pipeline run in
        this Python: Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet), softmax,
        top 5 -> {label: prob}; the Linear outputs; "segmenter_small/kitten.jpg": the
        image_segmenter pipeline, the same preprocessing, out -> softmax over the classes ->
        max -> stack([class as float, probability]) -> tolist(): "segments" the [224][224][2]
        list (on one line), "shape", "class_counts", "top_probability_min_max" and
        "top2_gap_below_0.02" (pixels whose two most probable classes are that close);
        "detector_small/kitten.jpg", ".../kitten.png" (the same) and ".../black.png":
        TorchServe's own ObjectDetector's preprocess, inference and postprocess (detect()) on
        the image:
        "input_shape", "model" (the model's 6 scores, labels and boxes), "answer" (the
        handler's [{label name: box, "score": score}] for the scores >= 0.5) and "answer_text"
        (json.dumps(answer, indent=2), what TorchServe's worker sends)); "labels" (densenet's
        index_to_name.json) and "detector_labels" (detector_small's).
    <out>/torchserve_reference.json            the recorded exchanges (see below).

Determinism: model.pt, handler.py, custom_handler.py, the images, the .mar files and
fixtures.json are byte for byte identical between runs (fixed seeds; pinned torch 2.13.0 and
Pillow; detector_small's model.pt scripted in a child process with PYTHONHASHSEED=0, since
TorchScript writes a module's constants in the order of a set of strings) from the same script
at the same paths: model.pt's *.debug_pkl members hold source ranges with the absolute paths
(and line numbers) of this script and of venv-torch's torch/nn/*.py, so another checkout path
or OXSERVE_CACHE changes their bytes (and sha256), never the weights or the outputs. torch-model-archiver itself is not
reproducible (MANIFEST.json "createdOn" = now; zip member times = copy time; os.walk order), so
each .mar the real archiver wrote is then rewritten member for member, same bytes and
compression: members sorted by name, times 1980-01-01 00:00:00, mode 0644, and "createdOn"
replaced by "01/01/2024 00:00:00" (the archiver's format "%d/%m/%Y %H:%M:%S"; the manifest is
re-serialised exactly as the archiver does, json.dumps(indent=2), keys in its order).
The [224][224][2] lists (fixtures.json's "segments", the recorded segmenter answer) are
written on one line each (json.dumps separators (",", ":")); everything else with indent=2.
torchserve_reference.json is NOT deterministic: it holds live server answers (worker pids,
start times, memory, latencies) verbatim; only absolute paths of the scratch directory are
replaced by "<work>".

torchserve_reference.json, from four starts of TorchServe on 127.0.0.1:18080/18081/18082
(config.properties: inference_address, management_address, metrics_address,
enable_model_api=true; TMPDIR/TEMP and the working directory point into a scratch directory,
so the pid file, key_file.json and logs/ stay out of the system temp dir and the clone):
    {"versions": {...}, "config_properties": "...", "command": [...],
     "startup": {"start_to_ready_s", "pings"}           (no model at start),
     "register_densenet_small_s": float,
     "rss": {"after_register_densenet_small" | "after_scale_densenet_small_to_2" | "all_models":
             {"frontend_java_mb", "workers": [{"pid", "model", "rss_mb", "cmdline"}],
              "total_mb"}},
     "exchanges": [EXCHANGE, ...]                      the documented curl workflow: ping,
         OPTIONS /, register (+ conflict, missing url, no url, async), list (+ limit /
         next_page_token), describe (+ version, all, customized), scale (sync, async),
         predictions (raw POST with/without content types, PUT like `curl -T`, multipart
         `-F data=@kitten.jpg`, versioned, JSON for linear_base), prediction errors, metrics,
         set-default, management errors, unregister,
     "worker_errors_excerpt": [...]                    exception lines from logs/model_log.log,
     "metrics_log_mode": {...}                         /metrics in the default metrics_mode=log,
     "startup_with_model": {...}                       `--models densenet_small=densenet_small.mar`
         with metrics_mode=prometheus: start_to_ping_s, start_to_first_prediction_s,
         pings_while_loading, predictions_while_loading, rss_after_first_prediction,
         metrics {families, sample_names, ts_families}, exchanges (describe_loaded_at_startup
         once every worker is READY),
     "token_auth_default": {...}                       without --disable-token-auth: key_file.json
         shape (keys redacted to length + character classes), calls without/with tokens,
     "custom_handler": {...}                           custom_echo.mar on the first start, after
         its workflow: "exchanges" (register custom_echo with 1 worker and batch size 1,
         describe, predictions for each kind of body (rows with an x-echo header, the header
         in mixed case, no / text/plain content type, handler-set status 203 and 422, raise,
         PredictionException 507 and 422, multipart with two files, raw bytes, a query
         parameter, all request headers), a worker that dies (predict_die), a prediction and
         describe after TorchServe restarted it; custom_batch = the same archive registered
         with batch_size=4, max_batch_delay=200, 1 worker, and 4 concurrent predictions
         predict_batch_0..3; broken_handler.mar (a handler.py with a syntax error, written
         with zipfile for the time of its registration) refused; unregister), each exchange
         with "sent" ({"json"} | {"bytes_hex"} | {"files": {field: [filename, text, content
         type]}}, {"headers"}) to replay it exactly; "worker_process" (the worker's command
         line, cwd and the environment variables TorchServe added, paths as <venv>, <work>,
         <out>), "die" (worker states seen until a new READY worker, restarted_s),
         "worker_errors_excerpt" (the custom part's model_log.log exception lines), "rows",
         "raw_bytes_hex", "broken_handler_py", "broken_manifest",
     "image_segmenter": {...}                          segmenter_small.mar on the first start,
         last (after the "allowed_urls" "default" part): "exchanges" register_segmenter_small
         (1 worker, synchronous), describe_segmenter_small, predict_segmenter_kitten (raw POST
         of kitten.jpg), predict_segmenter_bad_image_bytes, unregister_segmenter_small,
         list_after_segmenter; predict_segmenter_kitten keeps "body_json" (the parsed
         [224][224][2] list, on one line) and, instead of "body_raw" (~3 MB: the worker's
         json.dumps(list, indent=2)), "body_raw_head" (its first 200 characters),
         "body_raw_len", "body_raw_sha256" and "body_raw_is_json_dumps_indent_2";
         "register_segmenter_small_s", "worker_errors_excerpt" (this part's model_log.log
         exception lines),
     "object_detector": {...}                          detector_small.mar on the first start,
         after "image_segmenter": "exchanges" register_detector_small (1 worker,
         synchronous), describe_detector_small, predict_detector_kitten (raw POST of
         kitten.jpg), predict_detector_kitten_png (kitten.png: the same answer),
         predict_detector_black_png (black.png: "[]"),
         predict_detector_bad_image_bytes, unregister_detector_small, list_after_detector
         (the answers are small: "body_raw" and "body_json" kept whole);
         "register_detector_small_s", "worker_errors_excerpt" (this part's model_log.log
         exception lines),
     "allowed_urls": {...}                             registration from URLs (TorchServe's
         allowed_urls: comma-separated Java regexes, each matched case-insensitively against the
         whole url). The http server serves densenet_small.mar copies as "http_files"
         (allowed/densenet_small.mar, allowed/densenet_upper.mar, denied/densenet_small.mar,
         other/densenet_default.mar); "file_url_files" are copies under <work>
         (files/allowed/densenet_file.mar, files/denied/densenet_file.mar).
         "default": on the first start (no allowed_urls key, TorchServe's default
         `file://.*|http(s)?://.*`), after the custom handler part: register_default_http
         (other/densenet_default.mar as dl_default, 0 workers), describe, unregister;
         "store_before" (the fixture model store) and "removed_by_script" (what the download
         left there, deleted again: nothing in 0.12).
         The rest: a separate start with an empty model store of its own and
         allowed_urls=ALLOWED_URLS (http on 127.0.0.1, any port, under /allowed/; file:// with
         a directory named allowed; "allowed_urls_regexes", and "allowed_urls_property" as
         config.properties holds it: backslashes doubled, java.util.Properties unescapes them),
         "config_properties", "command", "start_to_ready_s", "section_s", "store_before",
         "store_after_stop", "exchanges": urls matching no pattern
         (http, file://, an allowed http url inside a denied one), an allowed http url answered 404, a plain name not in the store,
         the allowed http url as dl_allowed (1 worker; describe, prediction), the same url
         again while its download is in the store, an allowed file:// url as dl_file, an
         upper-case scheme (HTTP://) as dl_upper, list, unregisters, the http url again
         after unregister. Each of these exchanges also has "store_after" (the model store's
         listing after it) and "http_requests" ([method, path, status] the http server
         answered during it). The http server's port is written "<http_port>".
     "script_s": float}
    EXCHANGE = {"name", "method", "url" (":port/path?query"), "request": {"headers",
                "body_kind", "body_len"}, "status", "reason", "headers" (all, lower-case
                names), "body_json" + "body_raw" (the exact text: TorchServe pretty-prints with
                2-space indents) | "body_text", "elapsed_ms"}; OPTIONS / and /api-description
                keep only "body_summary" (top-level keys, info, paths and their methods).
Volatile header values (date, x-request-id) are kept as "<volatile:...>" patterns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve()
CACHE = Path(os.environ.get("OXSERVE_CACHE", Path.home() / ".cache" / "oxserve"))
BIN = Path(sys.executable).parent
FIXED_CREATED_ON = "01/01/2024 00:00:00"
INF, MGMT, METRICS = 18080, 18081, 18082
SEGMENTER_CLASSES = 4
# detector_small: one detection per cell of a DETECTOR_GRID (rows, columns) grid over the image
# (2 x 3 = 6 per image), labels 1..5 named by DETECTOR_LABELS (its index_to_name.json, in the
# plain {"class": "label"} form of TorchServe's load_label_mapping; "0" as torchvision's
# detection models' background, never answered).
DETECTOR_GRID = (2, 3)
DETECTOR_LABELS = {"0": "__background__", "1": "cat", "2": "dog", "3": "bird", "4": "car",
                   "5": "tree"}
DETECTOR_SEED = 17
# What the scores, labels and boxes of kitten.jpg must be like (checked when the fixtures are
# built): at least this far from TorchServe's threshold 0.5, and some on each side of it.
DETECTOR_SCORE_MARGIN = 0.1

LABELS = [
    ("n01440764", "tench"),
    ("n01443537", "goldfish"),
    ("n01484850", "great_white_shark"),
    ("n01491361", "tiger_shark"),
    ("n01494475", "hammerhead"),
    ("n01496331", "electric_ray"),
    ("n01498041", "stingray"),
    ("n01514668", "cock"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich"),
]

LINEAR_HANDLER = '''\
"""TorchServe handler for oxserve's linear_base fixture: JSON in, JSON out.

TorchServe's BaseHandler.preprocess is torch.as_tensor(data) on the list of request dicts
([{"body": ...}]), so it cannot take a JSON body by itself. Accepted bodies: a JSON list (one
row [4] or rows [[4], ...]) or {"data": list}; parsed by the frontend already when the
request's Content-Type is application/json, raw bytes otherwise. Answer: output.tolist().
"""
import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class LinearHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for request in data:
            body = request.get("data")
            if body is None:
                body = request.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body.decode("utf-8"))
            if isinstance(body, dict):
                body = body["data"]
            rows.append(torch.as_tensor(body, dtype=torch.float32))
        return rows

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return [self.model(x.to(self.device)) for x in data]

    def postprocess(self, data):
        return [y.tolist() for y in data]
'''


CUSTOM_HANDLER = '''\
"""TorchServe handler for oxserve's custom_echo fixture: a module-level handle(data,
context), no requirements beyond torch and TorchServe's own ts package.

TorchServe's Python worker calls handle(None, context) once at load (the model is loaded
then), and handle(data, context) per batch: data is a list of dicts, one per request, keys
the input names ("body" for a raw body, "data", the field names of a multipart body) and the
query-string parameters. A value arrives as bytes, as str (text/* parts) or already decoded
(application/json). Per request, on its body:
    {"rows": [[4 floats], ...]}     the model's output: {"out", "batch" (len(data)), "header"
                                    (the request header x-echo), "inputs" (the sorted keys)}
    {"status": N}                   the same answer with status N ("Custom phrase"),
                                    content type application/x-custom, header x-handler: yes
    {"raise": "message"}            raise ValueError(message): 503 "Prediction failed"
    {"prediction_exception": code}  raise PredictionException("custom failure", code)
    {"die": true}                   os._exit(1): the worker dies mid-request
    {"headers": true}               also "request_headers": context.get_all_request_header(idx)
    no "body"/"data" (multipart)    {"parts": {name: len(bytes)}} for every key
    not JSON (raw bytes)            {"bytes": len}
"""
import json
import os

import torch
from ts.utils.util import PredictionException

_model = None


def _load(context):
    global _model
    props = context.system_properties
    serialized = context.manifest["model"]["serializedFile"]
    _model = torch.jit.load(os.path.join(props.get("model_dir"), serialized),
                            map_location="cpu")
    _model.eval()


def _as_bytes(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value).encode("utf-8")


def _as_json(value):
    """The body as a JSON value, or None when it is not JSON."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _answer(idx, request, data, context):
    body = request.get("body")
    if body is None:
        body = request.get("data")
    if body is None:
        return {"parts": {name: len(_as_bytes(v)) for name, v in sorted(request.items())}}
    obj = _as_json(body)
    if obj is None:
        return {"bytes": len(_as_bytes(body))}
    if isinstance(obj, list):
        obj = {"rows": obj}
    if not isinstance(obj, dict):
        return {"bytes": len(_as_bytes(body))}
    if obj.get("die"):
        os._exit(1)
    if "raise" in obj:
        raise ValueError(str(obj["raise"]))
    if "prediction_exception" in obj:
        raise PredictionException("custom failure", int(obj["prediction_exception"]))
    answer = {}
    if "rows" in obj:
        x = torch.as_tensor(obj["rows"], dtype=torch.float32)
        with torch.inference_mode():
            answer["out"] = _model(x).tolist()
    answer["batch"] = len(data)
    answer["header"] = context.get_request_header(idx, "x-echo")
    answer["inputs"] = sorted(request)
    if obj.get("headers"):
        answer["request_headers"] = context.get_all_request_header(idx)
    if "status" in obj:
        context.set_response_status(int(obj["status"]), "Custom phrase", idx)
        context.set_response_content_type(idx, "application/x-custom")
        context.set_response_header(idx, "x-handler", "yes")
    return answer


def handle(data, context):
    if data is None:  # TorchServe's worker initializes a function handler this way
        _load(context)
        return None
    if _model is None:
        _load(context)
    return [_answer(idx, request, data, context) for idx, request in enumerate(data)]
'''


def log(*a):
    print("make_torchserve_fixtures:", *a, file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    digest = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:16]
    p.add_argument("--out", type=Path, default=CACHE / "torchserve-fixtures" / digest)
    p.add_argument("--if-needed", action="store_true", help="do nothing when <out>/.complete exists")
    p.add_argument("--no-server", action="store_true", help="only build the fixtures")
    p.add_argument("--no-token-probe", action="store_true",
                   help="skip the second start that records the default token authorization")
    p.add_argument("--script-detector", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# Fixtures


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Compact:
    """A value that dumps() writes on one line (json.dumps with separators (",", ":")): the
    segmenter's [224][224][2] lists, which would take ~100k lines indented."""

    def __init__(self, value):
        self.value = value


def dumps(obj, sort_keys: bool = False) -> str:
    """json.dumps(obj, indent=2), Compact values on one line."""
    blobs = []

    def default(o):
        if isinstance(o, Compact):
            blobs.append(json.dumps(o.value, separators=(",", ":")))
            return f"@@compact:{len(blobs) - 1}@@"
        raise TypeError(f"{type(o).__name__} is not JSON serializable")

    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=default)
    return re.sub(r'"@@compact:(\d+)@@"', lambda m: blobs[int(m.group(1))], text)


def make_image(path: Path):
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = 240, 320
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = 127.5 + 127.5 * np.sin(x / 23.0) * np.cos(y / 17.0)
    img = Image.fromarray(np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse((40, 50, 150, 160), fill=(250, 240, 60), outline=(20, 20, 20), width=4)
    d.rectangle((180, 30, 290, 120), fill=(30, 60, 200))
    d.polygon([(200, 220), (260, 140), (310, 225)], fill=(200, 30, 40))
    d.line((0, 230, 320, 180), fill=(255, 255, 255), width=6)
    img.save(path, "JPEG", quality=90)


def make_png_of(jpg: Path, path: Path):
    """`jpg` as PIL decodes it (what TorchServe's handlers see), written losslessly as PNG: the
    same pixels without a JPEG decoder of one's own in between."""
    from PIL import Image

    with Image.open(jpg) as img:
        img.convert("RGB").save(path, "PNG")


def make_black(path: Path):
    """An all-black 64x48 RGB PNG (RGB: ToTensor gives it 3 channels, as the model needs)."""
    from PIL import Image

    Image.new("RGB", (64, 48)).save(path, "PNG")


def make_models(work: Path):
    import torch

    torch.set_num_threads(1)

    class SmallCnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.classifier = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.classifier(self.features(x))

    def trace(m, example):
        try:
            return torch.jit.trace(m, example, _store_inputs=False)
        except TypeError:
            return torch.jit.trace(m, example)

    torch.manual_seed(0)
    cnn = SmallCnn().eval()
    with torch.no_grad():
        cnn.classifier.weight.mul_(8.0)
        cnn.classifier.bias.mul_(8.0)
    d = work / "densenet_small"
    d.mkdir()
    with torch.no_grad():
        trace(cnn, torch.zeros(1, 3, 224, 224)).save(str(d / "model.pt"))
    (d / "index_to_name.json").write_text(
        json.dumps({str(i): list(v) for i, v in enumerate(LABELS)}, indent=2) + "\n")

    torch.manual_seed(1)
    lin = torch.nn.Linear(4, 3).eval()
    d = work / "linear_base"
    d.mkdir()
    with torch.no_grad():
        trace(lin, torch.zeros(2, 4)).save(str(d / "model.pt"))
    (d / "handler.py").write_text(LINEAR_HANDLER)
    # custom_echo: the same model.pt (its bytes) with the module-level handler CUSTOM_HANDLER.
    c = work / "custom_echo"
    c.mkdir()
    shutil.copy(d / "model.pt", c / "model.pt")
    (c / "custom_handler.py").write_text(CUSTOM_HANDLER)

    # segmenter_small: TorchServe's image_segmenter reads the model's dict result's "out"
    # ([N, classes, H, W] scores), as torchvision's segmentation models answer.
    class SmallSegmenter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, SEGMENTER_CLASSES, 3, padding=1)

        def forward(self, x):
            return {"out": self.conv2(torch.relu(self.conv1(x)))}

    torch.manual_seed(2)
    seg = SmallSegmenter().eval()
    with torch.no_grad():
        seg.conv2.weight.mul_(8.0)
        seg.conv2.bias.mul_(8.0)
    d = work / "segmenter_small"
    d.mkdir()
    with torch.no_grad():
        try:
            traced = torch.jit.trace(seg, torch.zeros(1, 3, 224, 224), strict=False,
                                     _store_inputs=False)
        except TypeError:
            traced = torch.jit.trace(seg, torch.zeros(1, 3, 224, 224), strict=False)
        traced.save(str(d / "model.pt"))

    # detector_small: scripted in a child process (script_detector).
    d = work / "detector_small"
    d.mkdir()
    subprocess.run([sys.executable, str(SCRIPT), "--script-detector", str(d / "model.pt")],
                   env=dict(os.environ, PYTHONHASHSEED="0"), check=True, stdout=sys.stderr)
    (d / "index_to_name.json").write_text(json.dumps(DETECTOR_LABELS, indent=2) + "\n")


def script_detector(path: Path):
    """detector_small's model.pt, torch.jit.script'ed and saved to `path`. Run in a child
    process with PYTHONHASHSEED=0 (make_models): TorchScript writes a module's __constants__
    (a set of names) in the set's order, which string hashing makes differ from one process to
    the next; with a fixed hash seed model.pt is byte for byte the same every run.

    TorchServe's object_detector calls the model on the stacked images ([N, 3, H, W], any H and
    W: its preprocessing is ToTensor only) and reads, per image, a dict {"boxes": [K, 4] float
    (x1, y1, x2, y2 in pixels), "labels": [K] int64, "scores": [K] float}, as torchvision's
    detection models answer. Scripted (not traced): the loop over the batch and the image size
    stay in the graph."""
    import torch

    torch.set_num_threads(1)
    rows, cols = DETECTOR_GRID
    classes = len(DETECTOR_LABELS) - 1

    class SmallDetector(torch.nn.Module):
        """Conv(3->8,3x3,p1,no bias)-ReLU-Conv(8->16,1x1,no bias)-ReLU-AdaptiveAvgPool(grid):
        a 16-vector per grid cell, less their mean over the image's cells (so an image of one
        colour has all of them 0). Per cell: score = sigmoid(Linear(16->1)), label =
        argmax(Linear(16->5)) + 1 (int64), box = the cell's centre moved by (sigmoid(t0, t1) -
        0.5) cells, (0.25 + sigmoid(t2, t3)) cells wide and high (t = Linear(16->4)), clamped
        to the image and scaled to its width and height."""

        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.conv2 = torch.nn.Conv2d(8, 16, 1, bias=False)
            self.pool = torch.nn.AdaptiveAvgPool2d(DETECTOR_GRID)
            self.score = torch.nn.Linear(16, 1)
            self.label = torch.nn.Linear(16, classes)
            self.box = torch.nn.Linear(16, 4)
            cy, cx = torch.meshgrid((torch.arange(rows) + 0.5) / rows,
                                    (torch.arange(cols) + 0.5) / cols, indexing="ij")
            self.register_buffer("centers", torch.stack([cx.flatten(), cy.flatten()], 1))
            self.register_buffer("cell", torch.tensor([1.0 / cols, 1.0 / rows]))

        def forward(self, x: torch.Tensor) -> typing.List[typing.Dict[str, torch.Tensor]]:
            h = x.shape[2]
            w = x.shape[3]
            f = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            cells = self.pool(f).flatten(2).transpose(1, 2)
            cells = cells - cells.mean(dim=1, keepdim=True)
            scores = torch.sigmoid(self.score(cells)).squeeze(2)
            labels = torch.argmax(self.label(cells), dim=2) + 1
            t = torch.sigmoid(self.box(cells))
            center = self.centers + (t[:, :, 0:2] - 0.5) * self.cell
            half = (0.25 + t[:, :, 2:4]) * self.cell * 0.5
            size = torch.tensor([float(w), float(h)], dtype=x.dtype, device=x.device)
            lo = (center - half).clamp(0.0, 1.0) * size
            hi = (center + half).clamp(0.0, 1.0) * size
            boxes = torch.cat([lo, hi], dim=2)
            out: typing.List[typing.Dict[str, torch.Tensor]] = []
            for i in range(x.shape[0]):
                out.append({"boxes": boxes[i], "labels": labels[i], "scores": scores[i]})
            return out

    torch.manual_seed(DETECTOR_SEED)
    det = SmallDetector().eval()
    with torch.no_grad():
        # Score logits of -1 for an image of one colour (sigmoid 0.269: nothing detected);
        # the gains spread kitten.jpg's scores to both sides of 0.5 and vary its labels.
        det.score.weight.mul_(100.0)
        det.score.bias.fill_(-1.0)
        det.label.weight.mul_(40.0)
        det.box.weight.mul_(40.0)
    torch.jit.script(det).save(str(path))


def archive(work: Path, store: Path, name: str, src: str, handler: str, extra: list[str]):
    cmd = [str(BIN / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
           "--serialized-file", "model.pt", "--handler", handler, "--export-path", str(store),
           "--force"]
    if extra:
        cmd += ["--extra-files", ",".join(extra)]
    log("$ torch-model-archiver", " ".join(cmd[1:]))
    subprocess.run(cmd, cwd=work / src, check=True)
    mar = store / f"{name}.mar"
    normalize_mar(mar)
    return mar, cmd


def normalize_mar(mar: Path):
    with zipfile.ZipFile(mar) as z:
        members = [(i.filename, i.compress_type, z.read(i)) for i in z.infolist()]
    tmp = mar.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        for name, ctype, data in sorted(members):
            if name == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["createdOn"] = FIXED_CREATED_ON
                data = json.dumps(manifest, indent=2).encode()
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = ctype
            info.external_attr = 0o644 << 16
            info.create_system = 3
            z.writestr(info, data)
    tmp.replace(mar)


def expected_outputs(work: Path, out: Path):
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    m = torch.jit.load(str(work / "densenet_small" / "model.pt"))
    x = tf(Image.open(out / "kitten.jpg")).unsqueeze(0)
    with torch.inference_mode():
        logits = m(x)
    probs, classes = torch.topk(F.softmax(logits, dim=1), 5, dim=1)
    image = {LABELS[c][1]: p for c, p in zip(classes[0].tolist(), probs[0].tolist())}

    lin = torch.jit.load(str(work / "linear_base" / "model.pt"))
    rows = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]
    with torch.inference_mode():
        linear = lin(torch.tensor(rows)).tolist()

    # image_segmenter: TorchServe's ImageSegmenter.postprocess on the same preprocessing.
    seg = torch.jit.load(str(work / "segmenter_small" / "model.pt"))
    with torch.inference_mode():
        scores = seg(x)["out"]
        top = torch.max(F.softmax(scores, dim=1), dim=1)
        segments = torch.stack([top.indices.type(top.values.dtype), top.values], dim=3)
        second = torch.topk(F.softmax(scores, dim=1), 2, dim=1).values
    detector = {f"detector_small/{name}": detect(work / "detector_small", out / name)
                for name in ("kitten.jpg", "kitten.png", "black.png")}
    kitten = detector["detector_small/kitten.jpg"]["model"]["scores"]
    black = detector["detector_small/black.png"]["model"]["scores"]
    if detector["detector_small/kitten.png"] != detector["detector_small/kitten.jpg"]:
        raise SystemExit("detector_small: kitten.png does not answer as kitten.jpg")
    if not (0 < sum(p >= 0.5 for p in kitten) < len(kitten)
            and min(abs(p - 0.5) for p in kitten) >= DETECTOR_SCORE_MARGIN
            and max(black) < 0.5 - DETECTOR_SCORE_MARGIN):
        raise SystemExit(f"detector_small: kitten.jpg scores {kitten}, black.png {black}: "
                         "want some of kitten's on each side of 0.5, all "
                         f">= {DETECTOR_SCORE_MARGIN} from it, black's all below")
    return {
        **detector,
        "densenet_small/kitten.jpg": {"logits": logits[0].tolist(), "top5": image},
        "linear_base": {"input": rows, "output": linear},
        "segmenter_small/kitten.jpg": {
            "shape": list(segments[0].shape),
            "class_counts": torch.bincount(top.indices[0].flatten(),
                                           minlength=SEGMENTER_CLASSES).tolist(),
            "top_probability_min_max": [top.values.min().item(), top.values.max().item()],
            "top2_gap_below_0.02": int((second[:, 0] - second[:, 1] < 0.02).sum()),
            "segments": Compact(segments[0].tolist()),
        },
    }


def detect(model_dir: Path, image: Path) -> dict:
    """TorchServe's object_detector pipeline on `image`, run with TorchServe's own
    ObjectDetector (its preprocess: ToTensor and torch.stack; its inference: the model in
    inference mode; its postprocess, with the mapping load_label_mapping reads from
    index_to_name.json): "input_shape", "model" (the model's scores, labels and boxes for the
    image: all 6 detections), "answer" (the handler's answer for the image: [{label: box,
    "score": score}] for the scores >= 0.5) and "answer_text" (json.dumps(answer, indent=2):
    what TorchServe's worker sends)."""
    import torch
    from ts.torch_handler.object_detector import ObjectDetector
    from ts.utils.util import load_label_mapping

    handler = ObjectDetector()
    handler.device = torch.device("cpu")
    handler.mapping = load_label_mapping(str(model_dir / "index_to_name.json"))
    model = torch.jit.load(str(model_dir / "model.pt"), map_location="cpu")
    model.eval()
    handler.model = model
    x = handler.preprocess([{"body": image.read_bytes()}])
    result = handler.inference(x)
    answer = handler.postprocess(result)[0]
    return {
        "input_shape": list(x.shape),
        "model": {key: result[0][key].tolist() for key in ("scores", "labels", "boxes")},
        "answer": answer,
        "answer_text": json.dumps(answer, indent=2),
    }


def build_fixtures(out: Path, work: Path):
    store = out / "model-store"
    store.mkdir(parents=True)
    work.mkdir(parents=True)
    make_models(work)
    make_image(out / "kitten.jpg")
    make_png_of(out / "kitten.jpg", out / "kitten.png")
    make_black(out / "black.png")
    shutil.copy(work / "linear_base" / "handler.py", out / "handler.py")
    shutil.copy(work / "custom_echo" / "custom_handler.py", out / "custom_handler.py")
    cmds = {}
    for name, src, handler, extra in [
        ("densenet_small", "densenet_small", "image_classifier", ["index_to_name.json"]),
        ("linear_base", "linear_base", "handler.py", []),
        ("linear_basehandler", "linear_base", "base_handler", []),
        ("custom_echo", "custom_echo", "custom_handler.py", []),
        ("segmenter_small", "segmenter_small", "image_segmenter", []),
        ("detector_small", "detector_small", "object_detector", ["index_to_name.json"]),
    ]:
        _, cmd = archive(work, store, name, src, handler, extra)
        cmds[name] = ["torch-model-archiver"] + cmd[1:cmd.index("--export-path")] + \
            ["--export-path", "model-store"] + cmd[cmd.index("--export-path") + 2:]
    files = {}
    for p in sorted([out / "kitten.jpg", out / "kitten.png", out / "black.png",
                     out / "handler.py", out / "custom_handler.py", *store.glob("*.mar")]):
        rel = str(p.relative_to(out))
        files[rel] = {"sha256": sha256(p), "bytes": p.stat().st_size}
        if p.suffix == ".mar":
            with zipfile.ZipFile(p) as z:
                files[rel]["members"] = {i.filename: i.file_size for i in z.infolist()}
                files[rel]["manifest"] = json.loads(z.read("MAR-INF/MANIFEST.json"))
                files[rel]["archiver_command"] = cmds[p.stem]
    fixtures = {"files": files, "expected": expected_outputs(work, out),
                "labels": {str(i): list(v) for i, v in enumerate(LABELS)},
                "detector_labels": DETECTOR_LABELS}
    (out / "fixtures.json").write_text(dumps(fixtures, sort_keys=True) + "\n")
    return fixtures


# ---------------------------------------------------------------------------------------------
# The live TorchServe


class Server:
    def __init__(self, work: Path, store: Path, token_auth: bool, tag: str,
                 extra_config: str = "", models: list[str] | None = None):
        self.work = work
        self.store = store
        self.dir = work / tag
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(parents=True)
        self.config = self.dir / "config.properties"
        self.config.write_text(
            f"inference_address=http://127.0.0.1:{INF}\n"
            f"management_address=http://127.0.0.1:{MGMT}\n"
            f"metrics_address=http://127.0.0.1:{METRICS}\n"
            "enable_model_api=true\n" + extra_config)
        self.env = dict(os.environ, TMPDIR=str(self.tmp), TEMP=str(self.tmp),
                        LOG_LOCATION=str(self.dir / "logs"),
                        METRICS_LOCATION=str(self.dir / "logs"),
                        PATH=f"{BIN}:{os.environ.get('PATH', '')}", CUDA_VISIBLE_DEVICES="")
        self.cmd = [str(BIN / "torchserve"), "--start", "--ncs", "--model-store", str(store),
                    "--ts-config", str(self.config)]
        if not token_auth:
            self.cmd.append("--disable-token-auth")
        if models:
            self.cmd += ["--models", *models]
        self.console = self.dir / "console.log"
        self.java_pid = None
        self.t0 = None

    def start(self, requests) -> float:
        for port in (INF, MGMT, METRICS):
            try:
                requests.get(f"http://127.0.0.1:{port}/", timeout=0.5)
                raise SystemExit(f"port {port} is already in use: stop what listens there")
            except requests.ConnectionError:
                pass
        self.t0 = t0 = time.monotonic()
        with open(self.console, "ab") as console:  # the java frontend inherits it
            subprocess.run(self.cmd, cwd=self.dir, env=self.env, check=True, stdout=console,
                           stderr=subprocess.STDOUT)
        self.java_pid = int((self.tmp / ".model_server.pid").read_text().strip())
        self.pings = []  # distinct (status, body) /ping answers seen while waiting
        while time.monotonic() - t0 < 90:
            try:
                r = requests.get(f"http://127.0.0.1:{INF}/ping", timeout=2)
                seen = (r.status_code, r.text)
                if not self.pings or self.pings[-1][1:] != seen:
                    self.pings.append((round(time.monotonic() - t0, 2), *seen))
                # The frontend binds inference, then management, then metrics: ready when all
                # three accept connections.
                if r.status_code < 500 and all(_listening(p) for p in (MGMT, METRICS)):
                    return time.monotonic() - t0
            except requests.ConnectionError:
                pass
            if not _alive(self.java_pid):
                break
            time.sleep(0.05)
        self.dump_logs()
        raise SystemExit("TorchServe did not become ready")

    def stop(self):
        if self.java_pid is None:
            return
        subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=self.dir, env=self.env,
                       stdout=sys.stderr, stderr=sys.stderr, timeout=60)
        for _ in range(200):
            if not _alive(self.java_pid):
                break
            time.sleep(0.1)
        else:
            log(f"java {self.java_pid} still alive after torchserve --stop: SIGKILL")
            _kill_tree(self.java_pid)
        self.java_pid = None

    def dump_logs(self, lines=60):
        for f in [self.console, *sorted((self.dir / "logs").glob("*.log"))]:
            if not f.is_file():
                continue
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            log(f"--- {f.name} (last {len(tail)} lines)")
            for line in tail:
                print(line, file=sys.stderr)

    def rss(self, requests, headers=None):
        """RSS of the java frontend and of each Python worker (with the model it serves, from
        the describe API)."""
        import psutil

        owner = {}
        try:
            base = f"http://127.0.0.1:{MGMT}/models"
            for m in requests.get(base, headers=headers, timeout=10).json()["models"]:
                for d in requests.get(f"{base}/{m['modelName']}/all", headers=headers,
                                      timeout=10).json():
                    for w in d.get("workers", []):
                        owner[w.get("pid")] = f"{d['modelName']}/{d['modelVersion']}"
        except Exception as e:  # noqa: BLE001 - best effort labels
            log(f"rss: no model names ({e})")
        java = psutil.Process(self.java_pid)
        workers = []
        for c in java.children(recursive=True):
            try:
                workers.append({"pid": c.pid, "model": owner.get(c.pid),
                                "rss_mb": round(c.memory_info().rss / 2**20, 1),
                                "cmdline": " ".join(_sanitize_cmd(c.cmdline()))})
            except psutil.NoSuchProcess:
                pass
        jmb = round(java.memory_info().rss / 2**20, 1)
        return {"frontend_java_mb": jmb, "workers": workers,
                "total_mb": round(jmb + sum(w["rss_mb"] for w in workers), 1)}


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _sanitize_cmd(cmd):
    return [Path(a).name if a.startswith("/") else a for a in cmd]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return True


def _kill_tree(pid: int):
    import psutil

    try:
        p = psutil.Process(pid)
        procs = p.children(recursive=True) + [p]
    except psutil.NoSuchProcess:
        return
    for q in procs:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


class Recorder:
    VOLATILE = {"date", "x-request-id"}

    def __init__(self, requests, work: Path):
        self.requests = requests
        self.session = requests.Session()
        self.work = str(work)
        self.exchanges = []

    def __call__(self, name, method, port, path, *, data=None, files=None, headers=None,
                 json_body=None, record=True, timeout=120):
        url = f"http://127.0.0.1:{port}{path}"
        t0 = time.monotonic()
        r = self.session.request(method, url, data=data, files=files, headers=headers,
                                 json=json_body, timeout=timeout)
        elapsed = (time.monotonic() - t0) * 1000
        req_headers = {k: v for k, v in (r.request.headers or {}).items()
                       if k.lower() in ("content-type", "authorization")}
        if "authorization" in {k.lower() for k in req_headers}:
            req_headers = {k: ("Bearer <token>" if k.lower() == "authorization" else v)
                           for k, v in req_headers.items()}
        body = r.request.body
        if isinstance(body, str):
            body = body.encode()
        ex = {
            "name": name,
            "method": method,
            "url": f":{port}{path}",
            "request": {"headers": req_headers,
                        "body_kind": ("json" if json_body is not None else "multipart" if files
                                      else "bytes" if data is not None else "none"),
                        "body_len": len(body or b"")},
            "status": r.status_code,
            "reason": r.reason,
            "headers": {k.lower(): self._header(k.lower(), v) for k, v in r.headers.items()},
            "elapsed_ms": round(elapsed, 1),
        }
        text = r.content.decode("utf-8", errors="replace").replace(self.work, "<work>")
        try:
            ex["body_json"] = json.loads(text)
            ex["body_raw"] = text
        except ValueError:
            ex["body_text"] = text
        if record:
            self.exchanges.append(ex)
        status = f"{r.status_code} {r.headers.get('content-type', '')}"
        log(f"{name}: {method} :{port}{path} -> {status} ({elapsed:.0f} ms)")
        return ex

    @staticmethod
    def _header(name, value):
        if name == "date":
            return "<volatile:http-date>"
        if name == "x-request-id":
            uuid = re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                                value)
            return "<volatile:uuid4>" if uuid else f"<volatile:{value}>"
        return value


def summarize_openapi(ex):
    body = ex.pop("body_json", None)
    ex.pop("body_raw", None)
    if isinstance(body, dict):
        ex["body_summary"] = {
            "top_level_keys": list(body),
            "openapi": body.get("openapi"),
            "info": body.get("info"),
            "paths": {p: sorted(v) for p, v in body.get("paths", {}).items()},
        }
    return ex


def parse_metrics(text: str):
    families, samples = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families[name] = kind
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, 1)[0])
    return families, sorted(samples)


def run_workflow(out: Path, work: Path, args):
    import requests

    store = out / "model-store"
    jpg = (out / "kitten.jpg").read_bytes()
    ref = {"versions": versions(), "rss": {}}
    srv = Server(work, store, token_auth=False, tag="ts")
    http = ArchiveHttp(work / "http", store)  # archives served for the allowed_urls part
    ref["config_properties"] = srv.config.read_text()
    ref["command"] = ["torchserve"] + [a if not a.startswith("/") else "<" + Path(a).name + ">"
                                       for a in srv.cmd[1:]]
    rec = Recorder(requests, work)
    try:
        ready = srv.start(requests)
        ref["startup"] = {"start_to_ready_s": round(ready, 2), "pings": srv.pings,
                          "note": "no model at startup: from running `torchserve --start` to "
                                  "/ping answering and the management and metrics ports "
                                  "accepting connections"}
        log(f"TorchServe ready in {ready:.1f} s (java pid {srv.java_pid})")

        rec("ping", "GET", INF, "/ping")
        summarize_openapi(rec("api_description_get", "GET", INF, "/api-description"))
        summarize_openapi(rec("api_description_inference", "OPTIONS", INF, "/"))
        summarize_openapi(rec("api_description_management", "OPTIONS", MGMT, "/"))
        rec("list_empty", "GET", MGMT, "/models")

        # Register (the documented curl: POST /models?url=...&initial_workers=1&synchronous=true)
        t0 = time.monotonic()
        rec("register", "POST", MGMT, "/models?url=densenet_small.mar&initial_workers=1"
            "&synchronous=true")
        ref["register_densenet_small_s"] = round(time.monotonic() - t0, 2)
        ref["rss"]["after_register_densenet_small"] = srv.rss(requests)
        rec("register_again_conflict", "POST", MGMT, "/models?url=densenet_small.mar"
            "&initial_workers=1&synchronous=true")
        rec("register_missing_url", "POST", MGMT, "/models?url=missing.mar&initial_workers=1"
            "&synchronous=true")
        rec("register_no_url", "POST", MGMT, "/models")
        rec("register_linear_base", "POST", MGMT, "/models?url=linear_base.mar"
            "&initial_workers=1&synchronous=true")
        rec("register_async_linear_basehandler", "POST", MGMT,
            "/models?url=linear_basehandler.mar&initial_workers=1&synchronous=false")

        # List with pagination
        rec("list", "GET", MGMT, "/models")
        rec("list_limit_1", "GET", MGMT, "/models?limit=1")
        rec("list_limit_1_next_page_token_1", "GET", MGMT, "/models?limit=1&next_page_token=1")

        # Describe
        rec("describe", "GET", MGMT, "/models/densenet_small")
        rec("describe_version", "GET", MGMT, "/models/densenet_small/1.0")
        rec("describe_all", "GET", MGMT, "/models/densenet_small/all")
        rec("describe_customized", "GET", MGMT, "/models/densenet_small?customized=true")
        rec("describe_linear_base", "GET", MGMT, "/models/linear_base")

        # Scale
        rec("scale_sync_min_worker_2", "PUT", MGMT,
            "/models/densenet_small?min_worker=2&synchronous=true")
        ref["rss"]["after_scale_densenet_small_to_2"] = srv.rss(requests)
        rec("describe_after_scale", "GET", MGMT, "/models/densenet_small")
        rec("scale_async_min_worker_1", "PUT", MGMT, "/models/densenet_small?min_worker=1")

        # Predictions
        rec("predict_jpeg_raw_post", "POST", INF, "/predictions/densenet_small", data=jpg)
        rec("predict_jpeg_raw_post_image_jpeg", "POST", INF, "/predictions/densenet_small",
            data=jpg, headers={"Content-Type": "image/jpeg"})
        rec("predict_jpeg_raw_post_octet_stream", "POST", INF, "/predictions/densenet_small",
            data=jpg, headers={"Content-Type": "application/octet-stream"})
        rec("predict_jpeg_put_like_curl_T", "PUT", INF, "/predictions/densenet_small", data=jpg)
        rec("predict_jpeg_multipart_data", "POST", INF, "/predictions/densenet_small",
            files={"data": ("kitten.jpg", jpg, "image/jpeg")})
        rec("predict_jpeg_version", "POST", INF, "/predictions/densenet_small/1.0", data=jpg)
        rec("predict_unknown_model", "POST", INF, "/predictions/nosuchmodel", data=jpg)
        rec("predict_unknown_version", "POST", INF, "/predictions/densenet_small/9.9", data=jpg)
        rec("predict_bad_image_bytes", "POST", INF, "/predictions/densenet_small",
            data=b"this is not an image")
        rec("predict_get_method", "GET", INF, "/predictions/densenet_small")
        rows = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]
        rec("predict_linear_json", "POST", INF, "/predictions/linear_base", json_body=rows)
        rec("predict_linear_json_no_content_type", "POST", INF, "/predictions/linear_base",
            data=json.dumps(rows).encode())
        rec("predict_linear_json_dict", "POST", INF, "/predictions/linear_base",
            json_body={"data": rows[0]})
        rec("predict_linear_bad_json", "POST", INF, "/predictions/linear_base",
            data=b"[1, 2", headers={"Content-Type": "application/json"})
        _wait_workers(rec, "linear_basehandler")
        rec("predict_basehandler_json", "POST", INF, "/predictions/linear_basehandler",
            json_body=rows)
        ref["rss"]["all_models"] = srv.rss(requests)

        # Misc inference-port paths
        rec("inference_port_models_list", "GET", INF, "/models")
        rec("unknown_path", "GET", INF, "/nosuchpath")
        rec("ping_after", "GET", INF, "/ping")

        # Metrics (default metrics_mode=log: see the "startup_with_model" run for prometheus)
        m = rec("metrics_log_mode", "GET", METRICS, "/metrics")
        ref["metrics_log_mode"] = {"families": parse_metrics(m.get("body_text") or "")[0],
                                   "body_len": len(m.get("body_text") or "")}

        # Default version, management errors, unregister
        rec("set_default", "PUT", MGMT, "/models/densenet_small/1.0/set-default")
        rec("set_default_unknown_version", "PUT", MGMT, "/models/densenet_small/9.9/set-default")
        rec("describe_unknown_model", "GET", MGMT, "/models/nosuchmodel")
        rec("describe_unknown_version", "GET", MGMT, "/models/densenet_small/9.9")
        rec("scale_unknown_model", "PUT", MGMT, "/models/nosuchmodel?min_worker=1")
        rec("list_bad_limit", "GET", MGMT, "/models?limit=abc")
        rec("unregister_unknown_model", "DELETE", MGMT, "/models/nosuchmodel")
        rec("unregister", "DELETE", MGMT, "/models/densenet_small/1.0")
        rec("unregister_again", "DELETE", MGMT, "/models/densenet_small/1.0")
        rec("predict_after_unregister", "POST", INF, "/predictions/densenet_small", data=jpg)
        rec("unregister_linear_base", "DELETE", MGMT, "/models/linear_base")
        rec("unregister_linear_basehandler", "DELETE", MGMT, "/models/linear_basehandler")
        rec("list_after_unregister", "GET", MGMT, "/models")

        # Custom Python handler (custom_echo.mar), after the workflow above so that its
        # listings stay as they were.
        log_mark = _log_size(srv)
        ref["custom_handler"] = record_custom_handler(srv, out, work, requests)
        # TorchServe's default allowed_urls, last (the listings above stay as they were).
        ref["allowed_urls"] = {"default": record_default_allowed_urls(store, work, http,
                                                                      requests)}
        # image_segmenter (segmenter_small.mar), last: the listings above stay as they were.
        seg_mark = _log_size(srv)
        ref["image_segmenter"] = record_segmenter(work, jpg, requests)
        # object_detector (detector_small.mar), after it.
        det_mark = _log_size(srv)
        ref["object_detector"] = record_detector(work, jpg, (out / "kitten.png").read_bytes(),
                                                 (out / "black.png").read_bytes(), requests)
    except BaseException:
        srv.dump_logs()
        http.close()
        raise
    finally:
        srv.stop()
    ref["exchanges"] = rec.exchanges
    ref["worker_errors_excerpt"] = worker_errors(srv, work, end=log_mark)
    ref["custom_handler"]["worker_errors_excerpt"] = worker_errors(srv, work, start=log_mark,
                                                                   end=seg_mark)
    ref["image_segmenter"]["worker_errors_excerpt"] = worker_errors(srv, work, start=seg_mark,
                                                                    end=det_mark)
    ref["object_detector"]["worker_errors_excerpt"] = worker_errors(srv, work, start=det_mark)
    ref["startup_with_model"] = startup_with_model(work, store, jpg, requests)
    try:
        ref["allowed_urls"].update(record_allowed_urls(work, store, http, jpg, requests))
    finally:
        http.close()
    if not args.no_token_probe:
        ref["token_auth_default"] = token_probe(work, store, requests)
    return ref


def _log_size(srv: Server) -> int:
    f = srv.dir / "logs" / "model_log.log"
    return f.stat().st_size if f.is_file() else 0


def worker_errors(srv: Server, work: Path, limit=40, start=0, end=None):
    """The exception lines the Python workers logged (why the 503s happened), from the bytes
    [start, end) of logs/model_log.log."""
    f = srv.dir / "logs" / "model_log.log"
    if not f.is_file():
        return []
    text = f.read_bytes()[start:end].decode(errors="replace")
    lines = [re.sub(r"^\S+ \[\w+ ?\] ", "", line).replace(str(work), "<work>")
             for line in text.splitlines()
             if re.search(r"(Error|Exception)\b.*:|Traceback", line)]
    return lines[:limit]


# ---------------------------------------------------------------------------------------------
# TorchServe's default image_segmenter (segmenter_small.mar)


def _register_and_describe(rec: "Recorder", model: str) -> dict:
    """Registers `model`.mar with one worker, synchronously, waits for it and describes it
    (exchanges register_<model> and describe_<model>); the results dict with the registration's
    duration."""
    t0 = time.monotonic()
    rec(f"register_{model}", "POST", MGMT, f"/models?url={model}.mar"
        "&initial_workers=1&synchronous=true")
    res = {f"register_{model}_s": round(time.monotonic() - t0, 2)}
    _wait_workers(rec, model)
    rec(f"describe_{model}", "GET", MGMT, f"/models/{model}")
    return res


def record_segmenter(work: Path, jpg: bytes, requests) -> dict:
    """segmenter_small.mar (handler image_segmenter) on the running TorchServe: registration
    (1 worker), describe, kitten.jpg, bytes that are no image, unregister. The prediction's
    body (the Python worker's json.dumps(list, indent=2) of the [224][224][2] list, ~3 MB) is
    kept as its parsed list on one line, the first 200 characters of the text, its length and
    sha256, and whether it is exactly json.dumps(parsed, indent=2)."""
    rec = Recorder(requests, work)
    res = _register_and_describe(rec, "segmenter_small")
    ex = rec("predict_segmenter_kitten", "POST", INF, "/predictions/segmenter_small", data=jpg)
    raw = ex.pop("body_raw", None)
    if raw is not None:
        body = ex["body_json"]
        ex["body_json"] = Compact(body)
        ex["body_raw_head"] = raw[:200]
        ex["body_raw_len"] = len(raw)
        ex["body_raw_sha256"] = hashlib.sha256(raw.encode()).hexdigest()
        ex["body_raw_is_json_dumps_indent_2"] = raw == json.dumps(body, indent=2)
    rec("predict_segmenter_bad_image_bytes", "POST", INF, "/predictions/segmenter_small",
        data=b"this is not an image")
    rec("unregister_segmenter_small", "DELETE", MGMT, "/models/segmenter_small")
    rec("list_after_segmenter", "GET", MGMT, "/models")
    res["exchanges"] = rec.exchanges
    return res


# ---------------------------------------------------------------------------------------------
# TorchServe's default object_detector (detector_small.mar)


def record_detector(work: Path, jpg: bytes, png: bytes, black: bytes, requests) -> dict:
    """detector_small.mar (handler object_detector) on the running TorchServe: registration
    (1 worker), describe, kitten.jpg, kitten.png (the same pixels), black.png (nothing
    detected; all raw POSTs), bytes that are no image, unregister. The answers are small: kept
    whole ("body_raw", the worker's json.dumps(answer, indent=2), and "body_json")."""
    rec = Recorder(requests, work)
    res = _register_and_describe(rec, "detector_small")
    rec("predict_detector_kitten", "POST", INF, "/predictions/detector_small", data=jpg)
    rec("predict_detector_kitten_png", "POST", INF, "/predictions/detector_small", data=png)
    rec("predict_detector_black_png", "POST", INF, "/predictions/detector_small", data=black)
    rec("predict_detector_bad_image_bytes", "POST", INF, "/predictions/detector_small",
        data=b"this is not an image")
    rec("unregister_detector_small", "DELETE", MGMT, "/models/detector_small")
    rec("list_after_detector", "GET", MGMT, "/models")
    res["exchanges"] = rec.exchanges
    return res


# ---------------------------------------------------------------------------------------------
# Custom Python handler (custom_echo.mar, CUSTOM_HANDLER)

CUSTOM_ROWS = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]
# Not UTF-8, so never JSON.
CUSTOM_RAW = bytes([0, 1, 2, 255, 254]) + b" raw bytes, not JSON"
# A handler that does not import (a syntax error): broken_handler.mar, made here with zipfile
# (the archiver does not check the handler), only for the time of its registration.
BROKEN_HANDLER = "def handle(data, context)\n    return data\n"
BROKEN_MANIFEST = {
    "createdOn": FIXED_CREATED_ON,
    "runtime": "python",
    "model": {"modelName": "broken_handler", "serializedFile": "model.pt",
              "handler": "broken_handler.py", "modelVersion": "1.0"},
    "archiverVersion": "0.12.0",
}


def _sent(json_body=None, data=None, files=None, headers=None):
    """What a custom_handler exchange sent, so that a replay sends the same: "json", "bytes_hex",
    "files" {field: [filename, text, content type]}, "headers"."""
    sent = {}
    if json_body is not None:
        sent["json"] = json_body
    if data is not None:
        sent["bytes_hex"] = data.hex()
    if files is not None:
        sent["files"] = {k: [v[0], v[1].decode(), v[2]] for k, v in files.items()}
    if headers:
        sent["headers"] = headers
    return sent


def _worker_process(srv: Server, out: Path, work: Path, model: str, requests) -> dict:
    """How TorchServe started the Python worker of `model`: its command line, working
    directory, and the environment variables it has that the launcher's environment (what
    this script passed to `torchserve --start`) has not, or has with another value."""
    import psutil

    r = requests.get(f"http://127.0.0.1:{MGMT}/models/{model}", timeout=10)
    pids = [w["pid"] for w in r.json()[0]["workers"]]
    java = psutil.Process(srv.java_pid)

    def clean(v: str) -> str:
        for path, name in ((str(out), "<out>"), (str(work), "<work>"),
                           (str(BIN.parent), "<venv>"), (sys.executable, "<python>")):
            v = v.replace(path, name)
        return v

    res = {"pids_from_describe": pids, "processes": []}
    jenv = java.environ()
    res["java_cmdline"] = [clean(a) for a in java.cmdline()]
    res["java_env_added"] = {k: clean(v) for k, v in sorted(jenv.items())
                             if srv.env.get(k) != v}
    for c in java.children(recursive=True):
        try:
            env = c.environ()
            res["processes"].append({
                "pid": c.pid, "ppid": c.ppid(), "in_describe": c.pid in pids,
                "cmdline": [clean(a) for a in c.cmdline()],
                "cwd": clean(c.cwd()),
                "env_added_or_changed": {k: clean(v) for k, v in sorted(env.items())
                                         if srv.env.get(k) != v},
                "env_removed": sorted(k for k in srv.env if k not in env),
                "env_differs_from_java": sorted(k for k in set(env) | set(jenv)
                                                if env.get(k) != jenv.get(k)),
                "pythonpath": clean(env.get("PYTHONPATH", "")),
                "ts_vars": {k: clean(v) for k, v in sorted(env.items())
                            if k.startswith("TS_")},
            })
        except psutil.Error as e:
            res["processes"].append({"pid": c.pid, "error": repr(e)})
    return res


def _worker_states(model: str, requests):
    try:
        body = requests.get(f"http://127.0.0.1:{MGMT}/models/{model}", timeout=10).json()
        return [(w.get("id"), w.get("pid"), w.get("status")) for w in body[0]["workers"]]
    except Exception as e:  # noqa: BLE001 - recorded as it is
        return [repr(e)]


def record_custom_handler(srv: Server, out: Path, work: Path, requests) -> dict:
    """custom_echo.mar (a module-level handle(data, context), CUSTOM_HANDLER) on the running
    TorchServe: registration, each kind of body, handler errors, a worker that dies, batching
    (custom_batch: the same archive with batch_size 4), a handler that does not import."""
    import threading

    rec = Recorder(requests, work)
    res = {}

    def send(name, method, port, path, *, json_body=None, data=None, files=None,
             headers=None, recorder=None, **kw):
        files_arg = None
        if files is not None:
            files_arg = {k: (v[0], v[1], v[2]) for k, v in files.items()}
        ex = (recorder or rec)(name, method, port, path, json_body=json_body, data=data,
                               files=files_arg, headers=headers, **kw)
        ex["sent"] = _sent(json_body, data, files, headers)
        return ex

    t0 = time.monotonic()
    send("register_custom_echo", "POST", MGMT, "/models?url=custom_echo.mar&initial_workers=1"
         "&synchronous=true")
    res["register_custom_echo_s"] = round(time.monotonic() - t0, 2)
    # TorchServe answers a synchronous registration a moment before its describe calls the
    # worker READY (it said "UNLOADING" in one of several runs): wait for READY.
    _wait_workers(rec, "custom_echo")
    send("describe_custom_echo", "GET", MGMT, "/models/custom_echo")
    res["worker_process"] = _worker_process(srv, out, work, "custom_echo", requests)

    P = "/predictions/custom_echo"
    rows = {"rows": CUSTOM_ROWS}
    send("predict_rows", "POST", INF, P, json_body=rows, headers={"x-echo": "hello"})
    send("predict_rows_header_mixed_case", "POST", INF, P, json_body=rows,
         headers={"X-Echo": "Hello"})
    send("predict_rows_no_content_type", "POST", INF, P, data=json.dumps(rows).encode())
    send("predict_rows_text_plain", "POST", INF, P, data=json.dumps(rows).encode(),
         headers={"Content-Type": "text/plain"})
    send("predict_rows_list_body", "POST", INF, P, json_body=CUSTOM_ROWS)
    send("predict_status_203", "POST", INF, P, json_body={"status": 203, "rows": CUSTOM_ROWS})
    send("predict_status_422", "POST", INF, P, json_body={"status": 422})
    send("predict_raise", "POST", INF, P, json_body={"raise": "boom from the handler"})
    send("predict_prediction_exception_507", "POST", INF, P,
         json_body={"prediction_exception": 507})
    send("predict_prediction_exception_422", "POST", INF, P,
         json_body={"prediction_exception": 422})
    send("predict_multipart_two_files", "POST", INF, P,
         files={"a": ("a.bin", b"alpha-bytes", "application/octet-stream"),
                "b": ("b.txt", b"bravo text!", "text/plain")})
    send("predict_raw_bytes", "POST", INF, P, data=CUSTOM_RAW,
         headers={"Content-Type": "application/octet-stream"})
    send("predict_query_param", "POST", INF, P + "?foo=bar", json_body={"rows": CUSTOM_ROWS[:1]})
    send("predict_request_headers", "POST", INF, P, json_body={"headers": True},
         headers={"x-echo": "hi", "X-Mixed-Case": "Value"})
    send("predict_rows_after_errors", "POST", INF, P, json_body=rows,
         headers={"x-echo": "again"})

    # A worker that dies mid-request, then TorchServe's restart of it.
    before = _worker_states("custom_echo", requests)
    send("predict_die", "POST", INF, P, json_body={"die": True})
    t_die = time.monotonic()
    seen = [(0.0, before)]
    restarted_s = None
    while time.monotonic() - t_die < 60:
        states = _worker_states("custom_echo", requests)
        if states != seen[-1][1]:
            seen.append((round(time.monotonic() - t_die, 2), states))
        if any(isinstance(w, tuple) and w[2] == "READY" and w[1] not in [b[1] for b in before]
               for w in states):
            restarted_s = round(time.monotonic() - t_die, 2)
            break
        time.sleep(0.1)
    res["die"] = {"workers_before": before, "worker_states_seen": seen,
                  "restarted_s": restarted_s}
    send("predict_rows_after_restart", "POST", INF, P, json_body=rows,
         headers={"x-echo": "back"})
    _wait_workers(rec, "custom_echo")
    send("describe_custom_echo_after_restart", "GET", MGMT, "/models/custom_echo")

    # Batching: the same archive as custom_batch, batch_size 4, max_batch_delay 200 ms.
    send("register_custom_batch", "POST", MGMT, "/models?url=custom_echo.mar&model_name="
         "custom_batch&batch_size=4&max_batch_delay=200&initial_workers=1&synchronous=true")
    _wait_workers(rec, "custom_batch")
    send("describe_custom_batch", "GET", MGMT, "/models/custom_batch")
    results = [None] * 4
    barrier = threading.Barrier(4)

    def one(i):
        r = Recorder(requests, work)
        barrier.wait()
        results[i] = send(f"predict_batch_{i}", "POST", INF, "/predictions/custom_batch",
                          json_body={"rows": [CUSTOM_ROWS[i % 2]]},
                          headers={"x-echo": f"r{i}"}, recorder=r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.exchanges.extend(results)

    # A handler that does not import: the registration fails; the server keeps serving.
    broken = srv.store / "broken_handler.mar"
    with zipfile.ZipFile(srv.store / "custom_echo.mar") as z:
        model = z.read("model.pt")
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps(BROKEN_MANIFEST, indent=2))
        z.writestr("broken_handler.py", BROKEN_HANDLER)
        z.writestr("model.pt", model)
    res["broken_handler_py"] = BROKEN_HANDLER
    res["broken_manifest"] = BROKEN_MANIFEST
    try:
        t0 = time.monotonic()
        send("register_broken_handler", "POST", MGMT, "/models?url=broken_handler.mar"
             "&initial_workers=1&synchronous=true", timeout=180)
        res["register_broken_handler_s"] = round(time.monotonic() - t0, 2)
        send("describe_broken_handler", "GET", MGMT, "/models/broken_handler")
        send("list_after_broken_handler", "GET", MGMT, "/models")
        send("predict_rows_after_broken_handler", "POST", INF, P, json_body=rows)
        send("unregister_broken_handler", "DELETE", MGMT, "/models/broken_handler")
    finally:
        broken.unlink()
    send("unregister_custom_batch", "DELETE", MGMT, "/models/custom_batch")
    send("unregister_custom_echo", "DELETE", MGMT, "/models/custom_echo")
    send("list_after_custom_handler", "GET", MGMT, "/models")
    res["rows"] = CUSTOM_ROWS
    res["raw_bytes_hex"] = CUSTOM_RAW.hex()
    res["exchanges"] = rec.exchanges
    return res


def _wait_workers(rec, model, timeout=60, every=False):
    """Until describe shows a READY worker of `model` (`every`: all its workers READY)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        ex = rec("wait", "GET", MGMT, f"/models/{model}", record=False)
        body = ex.get("body_json")
        if isinstance(body, list) and body:
            ready = [w.get("status") == "READY" for w in body[0].get("workers", [])]
            if ready and (all(ready) if every else any(ready)):
                return
        time.sleep(0.2)
    log(f"{model}: no READY worker after {timeout} s" if not every else
        f"{model}: not all workers READY after {timeout} s")


def token_probe(work: Path, store: Path, requests):
    """A second start with TorchServe's defaults for token authorization (no
    --disable-token-auth): record what calls without and with the keys answer."""
    srv = Server(work, store, token_auth=True, tag="ts-token")
    rec = Recorder(requests, work)
    res = {"command": ["torchserve"] + [a if not a.startswith("/") else "<" + Path(a).name + ">"
                                        for a in srv.cmd[1:]]}
    try:
        res["start_to_ready_s"] = round(srv.start(requests), 2)
        key_files = sorted(p.name for p in srv.dir.glob("*.json"))
        res["files_written_in_cwd"] = key_files
        keys = {}
        if (srv.dir / "key_file.json").is_file():
            keys = json.loads((srv.dir / "key_file.json").read_text())
            res["key_file_shape"] = {
                k: ({f: (_pattern(x) if f == "key" else x) for f, x in v.items()}
                    if isinstance(v, dict) else type(v).__name__)
                for k, v in keys.items()}
        rec("ping_no_token", "GET", INF, "/ping")
        rec("list_no_token", "GET", MGMT, "/models")
        rec("predict_no_token", "POST", INF, "/predictions/nosuchmodel", data=b"x")
        mt = rec("metrics_no_token", "GET", METRICS, "/metrics")
        mt["body_text"] = "\n".join((mt.get("body_text") or "").splitlines()[:5])
        rec("list_wrong_token", "GET", MGMT, "/models",
            headers={"Authorization": "Bearer wrong"})
        mkey = keys.get("management", {}).get("key")
        ikey = keys.get("inference", {}).get("key")
        if mkey:
            rec("list_management_token", "GET", MGMT, "/models",
                headers={"Authorization": f"Bearer {mkey}"})
        if ikey:
            rec("list_inference_token_on_management", "GET", MGMT, "/models",
                headers={"Authorization": f"Bearer {ikey}"})
            rec("ping_inference_token", "GET", INF, "/ping",
                headers={"Authorization": f"Bearer {ikey}"})
            rec("predict_inference_token", "POST", INF, "/predictions/nosuchmodel", data=b"x",
                headers={"Authorization": f"Bearer {ikey}"})
    except BaseException:
        srv.dump_logs()
        raise
    finally:
        srv.stop()
    res["exchanges"] = rec.exchanges
    return res


def _pattern(key: str) -> str:
    """Describe a secret without keeping it: length and character classes."""
    classes = [n for n, rx in (("a-z", "[a-z]"), ("A-Z", "[A-Z]"), ("0-9", "[0-9]"),
                               ("_", "_"), ("-", "-")) if re.search(rx, key)]
    other = sorted(set(re.sub(r"[A-Za-z0-9_-]", "", key)))
    return f"<{len(key)} chars [{''.join(classes)}{''.join(other)}]>"


def startup_with_model(work: Path, store: Path, jpg: bytes, requests):
    """The documented `torchserve --start --ncs --model-store ... --models m.mar` start, with
    metrics_mode=prometheus: start -> /ping answers -> first successful prediction, RSS, and the
    Prometheus metric families after some traffic."""
    srv = Server(work, store, token_auth=False, tag="ts-startup",
                 extra_config="metrics_mode=prometheus\n",
                 models=["densenet_small=densenet_small.mar"])
    rec = Recorder(requests, work)
    res = {"config_properties": srv.config.read_text(),
           "command": ["torchserve"] + [a if not a.startswith("/") else "<" + Path(a).name + ">"
                                        for a in srv.cmd[1:]]}
    try:
        res["start_to_ping_s"] = round(srv.start(requests), 2)
        url = f"http://127.0.0.1:{INF}/predictions/densenet_small"
        # distinct (status, body) of predictions and pings while the workers load
        answers, pings = [], srv.pings
        while time.monotonic() - srv.t0 < 90:
            r = requests.post(url, data=jpg, timeout=30)
            now = round(time.monotonic() - srv.t0, 2)
            if not answers or answers[-1][1:] != (r.status_code, r.text):
                answers.append((now, r.status_code, r.text))
            if r.status_code == 200:
                break
            p = requests.get(f"http://127.0.0.1:{INF}/ping", timeout=10)
            if pings[-1][1:] != (p.status_code, p.text):
                pings.append((now, p.status_code, p.text))
            time.sleep(0.1)
        res["start_to_first_prediction_s"] = round(time.monotonic() - srv.t0, 2)
        res["pings_while_loading"] = pings
        res["predictions_while_loading"] = answers
        res["rss_after_first_prediction"] = srv.rss(requests)
        # The first prediction can come before the other workers are READY (describe said
        # "UNLOADING" for the second of 2 in one run): wait for all of them.
        _wait_workers(rec, "densenet_small", every=True)
        rec("describe_loaded_at_startup", "GET", MGMT, "/models/densenet_small")
        for i in range(5):
            rec("predict", "POST", INF, "/predictions/densenet_small", data=jpg, record=i == 0)
        rec("predict_bad_image_bytes", "POST", INF, "/predictions/densenet_small",
            data=b"this is not an image")
        rec("predict_unknown_model", "POST", INF, "/predictions/nosuchmodel", data=jpg)
        m = rec("metrics", "GET", METRICS, "/metrics")
        text = m.pop("body_text", "") or ""
        families, samples = parse_metrics(text)
        m["body_text"] = text
        res["metrics"] = {"families": families, "sample_names": samples,
                          "ts_families": sorted(n for n in families if n.startswith("ts_"))}
        mf = rec("metrics_name_filter", "GET", METRICS,
                 "/metrics?name[]=ts_inference_requests_total")
        mf["families"] = parse_metrics(mf.get("body_text") or "")[0]
    except BaseException:
        srv.dump_logs()
        raise
    finally:
        srv.stop()
    res["exchanges"] = rec.exchanges
    return res


# ---------------------------------------------------------------------------------------------
# Registration from URLs (allowed_urls)

# TorchServe splits allowed_urls on "," and matches each Java regex case-insensitively against
# the whole url (Matcher.matches). config.properties is read with java.util.Properties, where
# "\" escapes: the file holds every backslash doubled (ALLOWED_URLS_PROPERTY).
ALLOWED_URLS = r"http://127\.0\.0\.1:\d+/allowed/.*,file://.*/allowed/.*"
ALLOWED_URLS_PROPERTY = ALLOWED_URLS.replace("\\", "\\\\")
# What the local http server serves (path -> the model store's archive, copied), and the
# files a file:// url names (under <work>).
HTTP_FILES = {"allowed/densenet_small.mar": "densenet_small.mar",
              "allowed/densenet_upper.mar": "densenet_small.mar",
              "denied/densenet_small.mar": "densenet_small.mar",
              "other/densenet_default.mar": "densenet_small.mar"}
FILE_URL_FILES = {"files/allowed/densenet_file.mar": "densenet_small.mar",
                  "files/denied/densenet_file.mar": "densenet_small.mar"}


class ArchiveHttp:
    """A local http.server (a thread, 127.0.0.1, a free port) serving <work>/http: HTTP_FILES.
    `log` holds [method, path, status] of every request it answered."""

    def __init__(self, root: Path, store: Path):
        import functools
        import http.server
        import threading

        for rel, src in HTTP_FILES.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(store / src, root / rel)
        self.log = []
        log_ = self.log

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code="-", size="-"):
                log_.append([self.command, self.path, int(getattr(code, "value", code))])

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, rel: str) -> str:
        return f"http://127.0.0.1:{self.port}/{rel}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _listing(store: Path) -> list[str]:
    return sorted(p.name + ("/" if p.is_dir() else "") for p in store.iterdir())


def _url_exchange(rec, http: ArchiveHttp, store: Path, name, method, port, path, **kw):
    """rec(...) plus what the exchange made the server fetch from the local http server
    ("http_requests": [method, path, status]) and the model store's listing after it
    ("store_after")."""
    mark = len(http.log)
    ex = rec(name, method, port, path, **kw)
    ex["http_requests"] = http.log[mark:]
    ex["store_after"] = _listing(store)
    return ex


def _placeholders(obj, work: Path, http_port: int):
    """The scratch directory as "<work>" and the http server's port as "<http_port>"."""
    text = json.dumps(obj).replace(str(work), "<work>")
    return json.loads(text.replace(f"127.0.0.1:{http_port}", "127.0.0.1:<http_port>"))


def record_default_allowed_urls(store: Path, work: Path, http: ArchiveHttp, requests) -> dict:
    """On the main start (no allowed_urls key: TorchServe's default `file://.*|http(s)?://.*`):
    an http url of the local server (other/densenet_default.mar, a name not in the store) with
    0 workers, describe, unregister; the file TorchServe downloaded into the (fixture) model
    store is removed afterwards if it is still there ("removed_by_script")."""
    rec = Recorder(requests, work)
    res = {"store_before": _listing(store)}
    url = http.url("other/densenet_default.mar")
    _url_exchange(rec, http, store, "register_default_http", "POST", MGMT,
                  f"/models?url={url}&model_name=dl_default&initial_workers=0&synchronous=true")
    _url_exchange(rec, http, store, "describe_dl_default", "GET", MGMT, "/models/dl_default")
    _url_exchange(rec, http, store, "unregister_dl_default", "DELETE", MGMT,
                  "/models/dl_default")
    left = [n for n in _listing(store) if n not in res["store_before"]]
    for name in left:
        p = store / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    res["removed_by_script"] = left
    res["exchanges"] = rec.exchanges
    return _placeholders(res, work, http.port)


def record_allowed_urls(work: Path, src_store: Path, http: ArchiveHttp, jpg: bytes,
                        requests) -> dict:
    """A start with allowed_urls=ALLOWED_URLS and an empty model store of its own: urls that
    match no pattern (http, file://), an allowed http url the server answers 404 for, a plain
    archive name not in the store, allowed http and file:// urls (registered, described,
    predicted, unregistered), the same http url again while registered and after unregister,
    an upper-case scheme (case-insensitive matching); the store listing after each."""
    store = work / "ts-allowed-store"
    store.mkdir()
    for rel, src in FILE_URL_FILES.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_store / src, work / rel)
    srv = Server(work, store, token_auth=False, tag="ts-allowed",
                 extra_config=f"allowed_urls={ALLOWED_URLS_PROPERTY}\n")
    rec = Recorder(requests, work)
    res = {"allowed_urls_regexes": ALLOWED_URLS.split(","),
           "allowed_urls_property": ALLOWED_URLS_PROPERTY,
           "config_properties": srv.config.read_text(),
           "command": ["torchserve"] + [a if not a.startswith("/") else "<" + Path(a).name + ">"
                                        for a in srv.cmd[1:]],
           "http_files": sorted(HTTP_FILES), "file_url_files": sorted(FILE_URL_FILES),
           "store_before": _listing(store)}

    def ex(name, method, path, port=MGMT, **kw):
        return _url_exchange(rec, http, store, name, method, port, path, **kw)

    sync1 = "&initial_workers=1&synchronous=true"
    file_allowed = f"file://{work}/files/allowed/densenet_file.mar"
    file_denied = f"file://{work}/files/denied/densenet_file.mar"
    t_section = time.monotonic()
    try:
        res["start_to_ready_s"] = round(srv.start(requests), 2)
        ex("register_denied_http", "POST",
           f"/models?url={http.url('denied/densenet_small.mar')}{sync1}")
        ex("register_denied_file", "POST", f"/models?url={file_denied}{sync1}")
        # An allowed url inside a denied one: the pattern must match the whole url.
        ex("register_denied_http_allowed_inside", "POST", "/models?url="
           f"{http.url('denied/' + http.url('allowed/densenet_small.mar'))}{sync1}")
        ex("register_allowed_http_not_found", "POST",
           f"/models?url={http.url('allowed/nosuch.mar')}{sync1}")
        ex("register_not_in_store", "POST", f"/models?url=nosuch_archive.mar{sync1}")
        t0 = time.monotonic()
        ex("register_allowed_http", "POST",
           f"/models?url={http.url('allowed/densenet_small.mar')}&model_name=dl_allowed{sync1}")
        res["register_allowed_http_s"] = round(time.monotonic() - t0, 2)
        _wait_workers(rec, "dl_allowed")
        ex("describe_dl_allowed", "GET", "/models/dl_allowed")
        ex("predict_dl_allowed", "POST", "/predictions/dl_allowed", port=INF, data=jpg)
        ex("register_allowed_http_again", "POST",
           f"/models?url={http.url('allowed/densenet_small.mar')}&model_name=dl_again"
           "&initial_workers=0&synchronous=true")
        ex("register_allowed_file", "POST", f"/models?url={file_allowed}&model_name=dl_file"
           f"{sync1}")
        _wait_workers(rec, "dl_file")
        ex("describe_dl_file", "GET", "/models/dl_file")
        ex("predict_dl_file", "POST", "/predictions/dl_file", port=INF, data=jpg)
        ex("register_allowed_http_upper_case_scheme", "POST",
           f"/models?url={http.url('allowed/densenet_upper.mar').replace('http:', 'HTTP:')}"
           "&model_name=dl_upper&initial_workers=0&synchronous=true")
        ex("list_models", "GET", "/models")
        ex("unregister_dl_allowed", "DELETE", "/models/dl_allowed")
        ex("unregister_dl_file", "DELETE", "/models/dl_file")
        ex("unregister_dl_upper", "DELETE", "/models/dl_upper")
        ex("register_allowed_http_after_unregister", "POST",
           f"/models?url={http.url('allowed/densenet_small.mar')}&model_name=dl_allowed"
           "&initial_workers=0&synchronous=true")
        ex("unregister_dl_allowed_again", "DELETE", "/models/dl_allowed")
        ex("list_after_unregister", "GET", "/models")
    except BaseException:
        srv.dump_logs()
        raise
    finally:
        srv.stop()
    res["store_after_stop"] = _listing(store)
    res["section_s"] = round(time.monotonic() - t_section, 1)
    res["exchanges"] = rec.exchanges
    return _placeholders(res, work, http.port)


def versions():
    import importlib.metadata as md

    v = {p: md.version(p) for p in ("torchserve", "torch-model-archiver", "torch", "torchvision",
                                    "captum", "pillow")}
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") \
        else "java"
    jv = subprocess.run([java, "-version"], capture_output=True, text=True)
    v["java"] = (jv.stderr or jv.stdout).splitlines()[0] if jv.returncode == 0 else None
    v["python"] = sys.version.split()[0]
    return v


def main():
    args = parse_args()
    if args.script_detector:  # the child process of make_models
        script_detector(args.script_detector)
        return
    out = args.out.resolve()
    if args.if_needed and (out / ".complete").is_file():
        print(out)
        return
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    if not (BIN / "torch-model-archiver").exists():
        raise SystemExit(f"no torch-model-archiver next to {sys.executable}: run this with "
                         "$OXSERVE_CACHE/venv-torchserve/bin/python (scripts/setup-torchserve.sh)")
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    tmp_out = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix="oxserve-torchserve-"))
    try:
        log(f"building fixtures in {tmp_out}")
        build_fixtures(tmp_out, work / "src")
        if not args.no_server:
            ref = run_workflow(tmp_out, work, args)
            ref["script_s"] = round(time.monotonic() - t_start, 1)
            (tmp_out / "torchserve_reference.json").write_text(dumps(ref) + "\n")
        (tmp_out / ".complete").write_text("")
        tmp_out.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp_out.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if tmp_out.exists():
            shutil.rmtree(tmp_out, ignore_errors=True)
    log(f"done in {time.monotonic() - t_start:.1f} s")
    print(out)


if __name__ == "__main__":
    main()
