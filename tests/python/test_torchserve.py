"""oxserve invoked as `torchserve` (a symlink named so): TorchServe's command line
(crates/oxserve/src/torchserve_cli.rs), its inference and management APIs and .mar archives
(crates/oxserve-torchserve), compared with what the real TorchServe 0.12 answered to the same
requests (torchserve_reference.json from scripts/make_torchserve_fixtures.py; see
_torchserve.py for where the fixtures come from and when the module is skipped).

Every server runs in a workspace of its own (_torchserve.Workspace: the working directory,
where key_file.json and logs/ land, a private TMPDIR, config.properties with the inference,
management, metrics and gRPC ports on free ports).

1. TorchServe's documented curl workflow (register, list with limit / next_page_token, describe
   by version and all, scale, predictions raw, PUT like `curl -T` and multipart, set-default,
   unregister), each answer compared with TorchServe's field by field: the status, the JSON
   keys (recursively) and the values that are not volatile (pids, start times, worker ids,
   memory: compared by JSON type); predictions: the same labels in the same order,
   probabilities within 1e-4 (oxserve's resize is Pillow's algorithm, a level off at times). TorchServe's asynchronous
   answers (202) and the form of a worker's startTime have tests of their own.
2. `--models densenet=densenet_small.mar` at start-up (loadedAtStartup true).
3. `--start` in the background, then `--stop` (the pid file in $TMPDIR).
4. Token authorization (key_file.json).
5. Errors, with TorchServe's type and message where it has them, a good prediction after
   each; broken and hostile archives; the model API disabled.
6. KServe v2 on the inference port, Prometheus on the metrics port.
7. Custom Python handlers (custom_echo.mar, run by TorchServe's own Python worker): each kind
   of request replayed from the reference's "custom_handler" section (status, content type,
   handler-set headers, body), batching of concurrent requests, a worker that dies and is
   restarted, a handler.py that does not import.
8. Python workers as processes: scaling (one live worker process per worker, none left after
   scaling down), the response timeout (the hung worker stopped and replaced), a worker
   killed from outside while idle, install_py_dep_per_model (an archive's requirements
   installed, or ignored without the key), a streamed answer joined into one body.
9. Registration from URLs (TorchServe's allowed_urls): the reference's "allowed_urls"
   exchanges replayed against oxserve with the same allowed_urls and the same archives served
   by a local http server and named by file:// urls (status, error type and message, describe's
   modelUrl, predictions, what was fetched, the model store's listing after each); TorchServe's
   default allowed_urls accepting an http url.
10. image_segmenter natively (segmenter_small.mar): registration, describe (the worker is the
   server itself) and unregister as TorchServe's; kitten.jpg's [224][224][2] answer laid out
   as TorchServe's json.dumps(indent=2), the class as TorchServe's for >= 99.5 % of the pixels
   and the probability within 3e-2 where it is (the resize is a level off at times); bytes that are no
   image a 400 as for image_classifier.
11. object_detector natively (detector_small.mar, a scripted TorchScript detector): registration,
   describe (the worker is the server itself) and unregister as TorchServe's; no resize
   (ToTensor only), so the answers are the very texts TorchServe sent (their values first
   compared within a relative 1e-6 to say which differ): kitten.png (kitten.jpg's pixels as
   PIL decodes them, lossless), an all-black PNG (nothing scores >= 0.5: "[]"), and kitten.jpg
   itself (which also needs the JPEG decoded to PIL's very pixels); bytes that are no image
   the native image_classifier's 400.

Differences from TorchServe asserted as oxserve's behaviour: /ping needs no key and an
undecodable image is a 400 BadRequestException (TorchServe: 503 "Prediction failed"), both in
docs/torchserve.md; a missing or wrong key is 401 and a key without the scope 403 (TorchServe:
400 InvalidKeyException for both).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests

import _torchserve as ts
from _torchserve import TorchServe, Workspace

_SKIP = ts.skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

STORE = ts.model_store()
JPG = ts.kitten()
# TorchServe's answer for kitten.jpg (every prediction exchange holds the same one).
KITTEN = ts.exchange("predict_jpeg_raw_post")["body_json"]
MODEL = "densenet_small"
REFUSED_ARCHIVE_MANIFEST = {
    "runtime": "python",
    "model": {"modelName": "escape", "modelVersion": "1.0", "serializedFile": "model.pt",
              "handler": "image_classifier"},
    "archiverVersion": "0.12.0",
}


@pytest.fixture(scope="module", autouse=True)
def _torch_engine():
    """Skips the module where the binary has no PyTorch engine (_torchserve.engine_skip_reason)."""
    reason = ts.engine_skip_reason()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def serving(server: TorchServe):
    """Starts `server`, and stops it cleanly (exit code 0, one stdout line) at the end."""
    server.start()
    try:
        yield server
    finally:
        if server.alive():
            server.stop_and_check()


def assert_still_predicts(server: TorchServe, model: str = MODEL) -> None:
    r = server.predict(model)
    assert r.status_code == 200, f"a good prediction after the error: {r.status_code} {r.text}"
    diffs = ts.prediction_differences(r.json(), KITTEN)
    assert not diffs, diffs


def assert_torchserve_error(r: requests.Response, status: int, kind: str) -> dict:
    """TorchServe's error body {"code", "type", "message"} with this status and type."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"code", "type", "message"}, body
    assert body["code"] == status and body["type"] == kind, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


# ---------------------------------------------------------------------------------------------
# 1. The documented curl workflow


def test_curl_workflow_matches_torchserve(tmp_path):
    """TorchServe's recorded workflow replayed in its order against a server started with no
    model, with the model API on and token authorization off.

    TorchServe's recording also had linear_base.mar (a custom handler.py) and
    linear_basehandler.mar (base_handler) registered; they are here too, run by TorchServe's
    Python worker, so the listings (limit, next_page_token) see the same three models."""
    store = tmp_path / "store"
    store.mkdir()
    for name in ("densenet_small", "linear_base", "linear_basehandler"):
        shutil.copy(STORE / f"{name}.mar", store)
    ws = Workspace(tmp_path / "ws")
    server = TorchServe("workflow", ws, store, "--enable-model-api", "--disable-token-auth")
    diffs: list[str] = []

    def check(name: str, prediction: bool = False, **kwargs) -> requests.Response:
        ex = ts.exchange(name)
        r = ts.replay(server, ex, **kwargs)
        diffs.extend(ts.response_differences(r, ex, prediction=prediction))
        return r

    with serving(server):
        check("ping")
        check("list_empty")
        r = check("register")
        assert r.status_code == 200, f"registering densenet_small.mar: {r.status_code} {r.text}"
        # The Python-handler archives (synchronous, both: TorchServe's asynchronous registration is
        # test_asynchronous_register_and_scale_answer_202's).
        r = server.request("POST", "management", "/models?url=linear_base.mar&model_name="
                           "linear_base&initial_workers=1&synchronous=true")
        diffs.extend(ts.response_differences(r, ts.exchange("register_linear_base")))
        r = server.request("POST", "management", "/models?url=linear_basehandler.mar&model_name="
                           "linear_basehandler&initial_workers=1&synchronous=true")
        assert r.status_code == 200, r.text
        for name in ("list", "list_limit_1", "list_limit_1_next_page_token_1", "list_bad_limit",
                     "describe", "describe_version", "describe_all", "describe_linear_base",
                     "scale_sync_min_worker_2",
                     "describe_after_scale"):
            check(name)
        # Back to one worker (TorchServe's recording did this asynchronously).
        r = server.request("PUT", "management", f"/models/{MODEL}?min_worker=1&synchronous=true")
        assert (r.status_code, r.json()) == (
            200, {"status": f"Workers scaled to 1 for model: {MODEL}"}), r.text
        check("predict_jpeg_raw_post", True, data=JPG)
        check("predict_jpeg_raw_post_image_jpeg", True, data=JPG,
              headers={"Content-Type": "image/jpeg"})
        check("predict_jpeg_raw_post_octet_stream", True, data=JPG,
              headers={"Content-Type": "application/octet-stream"})
        check("predict_jpeg_put_like_curl_T", True, data=JPG)
        check("predict_jpeg_multipart_data", True,
              files={"data": ("kitten.jpg", JPG, "image/jpeg")})
        check("predict_jpeg_version", True, data=JPG)
        check("set_default")
        check("unregister")
        check("unregister_again")
        check("predict_after_unregister", data=JPG)
        check("unregister_linear_base")
        check("unregister_linear_basehandler")
        check("list_after_unregister")
        check("ping_after")
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)


def test_asynchronous_register_and_scale_answer_202(ts_server):
    """TorchServe answers registrations with synchronous=false, and scaling without
    synchronous=true (its default), with 202 {"status": "Processing worker updates..."}."""
    name = "densenet_async"
    registered = False
    try:
        r = ts_server.request("POST", "management", f"/models?url=densenet_small.mar&model_name="
                              f"{name}&initial_workers=1&synchronous=false")
        registered = r.status_code in (200, 202)
        diffs = ts.response_differences(r, ts.exchange("register_async_linear_basehandler"))
        r = ts.replay(ts_server, ts.exchange("scale_async_min_worker_1"))
        diffs += ts.response_differences(r, ts.exchange("scale_async_min_worker_1"))
        assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    finally:
        # An accepted registration completes in the background: unregister it once it shows.
        deadline = time.monotonic() + ts.TIMEOUT_S
        while registered and time.monotonic() < deadline:
            if ts_server.request("GET", "management", f"/models/{name}").status_code == 200:
                r = ts_server.request("DELETE", "management", f"/models/{name}")
                assert r.status_code == 200, r.text
                break
            time.sleep(0.1)
    assert_still_predicts(ts_server)


def test_worker_start_time_is_torchserve_timestamp(ts_server):
    """A worker's startTime is TorchServe's UTC timestamp with milliseconds, e.g.
    "2026-12-06T18:17:30.157Z" (clients parse it)."""
    want = ts.exchange("describe")["body_json"][0]["workers"][0]["startTime"]
    assert ts.ISO_8601_MS.match(want), want
    r = ts_server.request("GET", "management", f"/models/{MODEL}")
    assert r.status_code == 200, r.text
    starts = [w["startTime"] for w in r.json()[0]["workers"]]
    assert starts, r.text
    for start in starts:
        assert ts.ISO_8601_MS.match(start), (
            f"startTime {start!r}; TorchServe's form is like {want!r}")


# ---------------------------------------------------------------------------------------------
# 2. Models at start-up; 3. --start in the background and --stop


def test_startup_models_serve_without_registering(tmp_path):
    """`--start --foreground --models densenet=densenet_small.mar`: predictions need no
    registration; describe shows the model loaded at start-up with default_workers_per_model
    workers (2, as TorchServe's recording on 2 cores)."""
    ws = Workspace(tmp_path, {"default_workers_per_model": "2"})
    server = TorchServe("startup", ws, STORE, "--disable-token-auth", "--models",
                        "densenet=densenet_small.mar")
    with serving(server):
        r = server.wait_predicts("densenet")
        diffs = ts.response_differences(r, ts.exchange("predict", "startup_with_model"),
                                        prediction=True)
        r = server.request("GET", "management", "/models/densenet")
        assert r.status_code == 200, r.text
        assert r.json()[0]["loadedAtStartup"] is True, r.text
        # TorchServe's recording named the model densenet_small.
        diffs += ts.response_differences(
            r, ts.exchange("describe_loaded_at_startup", "startup_with_model"),
            rename={'"densenet_small"': '"densenet"'})
        r = server.request("GET", "management", "/models")
        assert r.json() == {"models": [{"modelName": "densenet",
                                        "modelUrl": "densenet_small.mar"}]}, r.text
        # The model API is off (no --enable-model-api) but the start-up model serves.
        assert server.request("POST", "management", "/models?url=densenet_small.mar"
                              ).status_code == 405
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return fields[0] in ("Z", "X")


def test_start_in_background_then_stop(tmp_path):
    """`torchserve --start` returns at once, the server comes up (/ping polled) with its pid in
    $TMPDIR/.model_server.pid and its output in logs/ts_log.log; `torchserve --stop` stops it
    and removes the pid file; a second --stop says nothing runs."""
    ws = Workspace(tmp_path)
    pid_file = ws.tmp / ".model_server.pid"
    done = subprocess.run(ws.argv(STORE, "--disable-token-auth"), cwd=ws.cwd, env=ws.env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert pid_file.is_file(), (done.stdout, done.stderr, sorted(os.listdir(ws.tmp)))
    pid = int(pid_file.read_text().strip())
    log = ws.cwd / "logs" / "ts_log.log"
    try:
        deadline = time.monotonic() + ts.TIMEOUT_S
        last = "no answer"
        while True:
            assert not _gone(pid), f"the server exited: {log.read_text(errors='replace')[-3000:]}"
            try:
                r = requests.get(ws.inference_url + "/ping", timeout=2)
                if r.status_code == 200:
                    break
                last = f"{r.status_code} {r.text[:200]}"
            except requests.RequestException as e:
                last = repr(e)
            assert time.monotonic() < deadline, f"/ping never answered 200 (last: {last})"
            time.sleep(0.05)
        assert r.json() == {"status": "Healthy"}
        assert requests.get(ws.management_url + "/models", timeout=10).json() == {"models": []}
        assert log.is_file()
        t0 = time.monotonic()
        stop = subprocess.run([str(ws.link), "--stop"], cwd=ws.cwd, env=ws.env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)
        stop_s = time.monotonic() - t0
    finally:
        if not _gone(pid):
            # Only the server this test started (by its recorded pid).
            os.kill(pid, signal.SIGKILL)
    assert stop.returncode == 0, (stop.stdout, stop.stderr)
    assert "TorchServe has stopped." in stop.stdout, stop.stdout
    assert _gone(pid), "--stop returned with the server still running"
    assert stop_s < 15, f"--stop took {stop_s:.1f} s"
    assert not pid_file.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(ws.inference_url + "/ping", timeout=2)
    again = subprocess.run([str(ws.link), "--stop"], cwd=ws.cwd, env=ws.env(),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert "TorchServe is not currently running." in again.stdout, again.stdout


# ---------------------------------------------------------------------------------------------
# 4. Token authorization


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """Token authorization on (no --disable-token-auth), densenet_small at start-up; yields
    (server, keys: {"management", "inference", "API"} -> token)."""
    ws = Workspace(tmp_path_factory.mktemp("ts-auth"))
    server = TorchServe("auth", ws, STORE, "--models", "densenet_small.mar")
    with serving(server):
        key_file = ws.cwd / "key_file.json"
        assert key_file.is_file(), sorted(os.listdir(ws.cwd))
        keys = {k: v["key"] for k, v in json.loads(key_file.read_text()).items()}
        server.wait_predicts(MODEL, headers=bearer(keys["inference"]))
        yield server, keys


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_token_auth_key_file_and_scopes(auth_server):
    server, keys = auth_server
    key_file = server.workspace.cwd / "key_file.json"
    body = json.loads(key_file.read_text())
    # TorchServe's shape: {"management": {"key", "expiration time"}, "inference": {...},
    # "API": {"key"}}.
    want = ts.reference()["token_auth_default"]["key_file_shape"]
    assert set(body) == set(want) == {"management", "inference", "API"}, body
    for name, entry in body.items():
        assert set(entry) == set(want[name]), (name, entry, want[name])
        assert isinstance(entry["key"], str) and len(entry["key"]) >= 8, entry
    assert len({keys["management"], keys["inference"], keys["API"]}) == 3, keys
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, oct(key_file.stat().st_mode)

    def predict(headers):
        return server.predict(MODEL, headers=headers)

    def list_models(headers):
        return server.request("GET", "management", "/models", headers=headers)

    # Predictions: no key or a wrong one 401, the inference key 200, the management key 403.
    assert predict({}).status_code == 401
    assert predict(bearer("not-a-key")).status_code == 401
    r = predict(bearer(keys["inference"]))
    assert r.status_code == 200, r.text
    assert not ts.prediction_differences(r.json(), KITTEN), r.text
    assert predict(bearer(keys["management"])).status_code == 403
    assert predict(bearer(keys["API"])).status_code == 200
    # The management API: no key 401, the inference key 403, the management key 200.
    assert list_models({}).status_code == 401
    assert list_models(bearer(keys["inference"])).status_code == 403
    r = list_models(bearer(keys["management"]))
    assert r.status_code == 200, r.text
    assert r.json() == {"models": [{"modelName": MODEL, "modelUrl": "densenet_small.mar"}]}
    assert list_models(bearer(keys["API"])).status_code == 200
    assert server.request("GET", "management", f"/models/{MODEL}",
                          headers=bearer(keys["management"])).status_code == 200
    # /ping needs no key in oxserve (a documented difference: TorchServe asks for one).
    r = server.request("GET", "inference", "/ping")
    assert (r.status_code, r.json()) == (200, {"status": "Healthy"}), r.text


def test_token_auth_errors_have_torchserve_body(auth_server):
    """Refused keys answer TorchServe's error body {"code", "type": "InvalidKeyException",
    "message"} (oxserve's statuses: 401 without a valid key, 403 without the scope)."""
    server, keys = auth_server
    want = ts.exchange("list_no_token", "token_auth_default")["body_json"]
    cases = [
        (401, "POST", "inference", f"/predictions/{MODEL}", {}),
        (401, "GET", "management", "/models", bearer("not-a-key")),
        (403, "GET", "management", "/models", bearer(keys["inference"])),
    ]
    problems = []
    for status, method, port, path, headers in cases:
        r = server.request(method, port, path, headers=headers,
                           data=JPG if method == "POST" else None)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if (r.status_code != status or not isinstance(body, dict)
                or set(body) != set(want) or body.get("type") != want["type"]
                or body.get("code") != status):
            problems.append(f"{method} {port} {path} {headers or 'no key'}: {r.status_code} "
                            f"{body!r}; want {status} with TorchServe's {want!r} shape")
    assert not problems, "\n".join(problems)


def test_token_auth_metrics_need_no_key(auth_server):
    """TorchServe's metrics API asks for no key (token_auth_default's metrics_no_token: 200):
    Prometheus scrapes configured for TorchServe send none."""
    server, _ = auth_server
    want = ts.exchange("metrics_no_token", "token_auth_default")
    r = server.request("GET", "metrics", "/metrics")
    assert r.status_code == want["status"], (r.status_code, r.text[:300])


# ---------------------------------------------------------------------------------------------
# 5. Errors


def _zip(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(zipfile.ZipInfo(name), data)


@pytest.fixture(scope="module")
def error_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ts-errors")


# Hostile archive entries: archive name -> entry, `{root}` the test's temporary root (all the
# server's directories are under it: its TMPDIR holds where it unpacks).
ESCAPES = {
    "escape_parent.mar": "../escaped-parent.txt",
    "escape_nested.mar": "model/../../../escaped-nested.txt",
    "escape_absolute.mar": "{root}/escaped-absolute.txt",
}


@pytest.fixture(scope="module")
def ts_server(error_root):
    """Model API on, token authorization off, densenet_small at start-up; the store also holds
    linear_base.mar (custom handler.py), linear_basehandler.mar (base_handler),
    segmenter_small.mar (image_segmenter), detector_small.mar (object_detector), a file that is
    not a zip and archives with entries that leave the archive."""
    store = error_root / "store"
    store.mkdir()
    for name in ("densenet_small.mar", "linear_base.mar", "linear_basehandler.mar",
                 "segmenter_small.mar", "detector_small.mar"):
        shutil.copy(STORE / name, store)
    (store / "not_a_zip.mar").write_bytes(b"this is not a zip archive\n" * 10)
    manifest = json.dumps(REFUSED_ARCHIVE_MANIFEST).encode()
    with zipfile.ZipFile(STORE / "densenet_small.mar") as mar:
        model = mar.read("model.pt")
    for archive, entry in ESCAPES.items():
        _zip(store / archive, {"MAR-INF/MANIFEST.json": manifest, "model.pt": model,
                               entry.format(root=error_root): b"escaped"})
    ws = Workspace(error_root / "ws")
    server = TorchServe("errors", ws, store, "--enable-model-api", "--disable-token-auth",
                        "--models", "densenet_small.mar")
    with serving(server):
        server.wait_predicts(MODEL)
        yield server


@pytest.mark.parametrize("name", [
    "predict_unknown_model",
    "predict_unknown_version",
    "describe_unknown_model",
    "describe_unknown_version",
    "register_no_url",
    "register_missing_url",
    "register_again_conflict",
    "set_default_unknown_version",
    "scale_unknown_model",
    "unregister_unknown_model",
    "unknown_path",
    "inference_port_models_list",
])
def test_error_as_torchserve(ts_server, name):
    """Status, type and message as TorchServe's (the reference exchange of the same request)."""
    ex = ts.exchange(name)
    body = JPG if ex["request"]["body_kind"] == "bytes" else None
    r = ts.replay(ts_server, ex, data=body)
    diffs = ts.response_differences(r, ex)
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    assert_still_predicts(ts_server)


def test_unknown_management_path(ts_server):
    want = ts.exchange("unknown_path")["body_json"]
    for method, path in (("GET", "/nosuchpath"), ("POST", "/models/a/b/c/d"), ("GET", "/")):
        r = ts_server.request(method, "management", path)
        body = assert_torchserve_error(r, 404, "ResourceNotFoundException")
        assert body == want, (method, path, body)
    assert_still_predicts(ts_server)


def test_bad_image_is_a_bad_request(ts_server):
    """A body that is no image: 400 BadRequestException naming the problem (a documented
    difference: TorchServe answers 503 "Prediction failed")."""
    ex = ts.exchange("predict_bad_image_bytes")
    assert (ex["status"], ex["body_json"]["message"]) == (503, "Prediction failed")
    for body in (b"this is not an image", b"", b"\xff\xd8\xff\xe0" + b"\0" * 64):
        r = ts_server.predict(MODEL, body)
        err = assert_torchserve_error(r, 400, "BadRequestException")
        assert "image" in err["message"], err
    # Multipart with a part that is no image.
    r = ts_server.request("POST", "inference", f"/predictions/{MODEL}",
                          files={"data": ("x.jpg", b"not an image", "image/jpeg")})
    assert_torchserve_error(r, 400, "BadRequestException")
    assert_still_predicts(ts_server)


def test_malformed_archive_is_refused(ts_server):
    r = ts_server.request("POST", "management", "/models?url=not_a_zip.mar&initial_workers=1"
                          "&synchronous=true")
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = assert_torchserve_error(r, r.status_code, "BadRequestException")
    assert "not_a_zip.mar" in err["message"] and "zip" in err["message"], err
    assert ts_server.request("GET", "management", "/models").json() == {
        "models": [{"modelName": MODEL, "modelUrl": "densenet_small.mar"}]}
    assert_still_predicts(ts_server)


@pytest.mark.parametrize("archive", sorted(ESCAPES))
def test_archive_entry_outside_is_refused(ts_server, error_root, archive):
    """An entry with `..` or an absolute path: the registration is refused, naming the entry,
    and nothing is written outside the server's unpack directory."""
    entry = ESCAPES[archive].format(root=error_root)
    r = ts_server.request("POST", "management", f"/models?url={archive}&initial_workers=1"
                          "&synchronous=true")
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = assert_torchserve_error(r, r.status_code, "BadRequestException")
    assert entry in err["message"], err
    written = Path(entry).name
    found = [str(p) for p in error_root.rglob(written)]
    assert not found, f"{archive}: {found} written"
    assert not Path(entry).exists() and not (Path("/") / written).exists()
    assert ts_server.request("GET", "management", "/models/escape").status_code == 404
    assert_still_predicts(ts_server)


LINEAR_ROWS = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]


def test_linear_base_handler_py_and_base_handler_answer_as_torchserve(ts_server):
    """linear_base.mar (a custom handler.py) and linear_basehandler.mar (TorchServe's
    base_handler) register and run in TorchServe's Python worker: the JSON predictions of
    TorchServe's recording give the same outputs (which it computed with PyTorch), its
    malformed-JSON and base_handler failures the same errors."""
    cases = [
        ("predict_linear_json", "linear_base", {"json": LINEAR_ROWS}),
        ("predict_linear_json_no_content_type", "linear_base",
         {"data": json.dumps(LINEAR_ROWS).encode()}),
        ("predict_linear_json_dict", "linear_base", {"json": {"data": LINEAR_ROWS[0]}}),
        ("predict_linear_bad_json", "linear_base",
         {"data": b"[1, 2", "headers": {"Content-Type": "application/json"}}),
        ("predict_basehandler_json", "linear_basehandler", {"json": LINEAR_ROWS}),
    ]
    registered = []
    try:
        for name in ("linear_base", "linear_basehandler"):
            r = ts_server.request("POST", "management", f"/models?url={name}.mar&model_name="
                                  f"{name}&initial_workers=1&synchronous=true")
            assert r.status_code == 200, r.text
            registered.append(name)
        diffs: list[str] = []
        for exchange, model, kwargs in cases:
            ex = ts.exchange(exchange)
            r = ts_server.request("POST", "inference", f"/predictions/{model}", **kwargs)
            assert r.status_code == ex["status"], (exchange, r.status_code, r.text)
            diffs.extend(f"{exchange}: {d}" for d in ts.json_differences(r.json(), ex["body_json"]))
        assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    finally:
        for name in registered:
            ts_server.request("DELETE", "management", f"/models/{name}")
    assert_still_predicts(ts_server)


def test_model_api_disabled(tmp_path):
    """Without --enable-model-api: registering and unregistering answer 405
    MethodNotAllowedException; the other management calls and predictions work."""
    ws = Workspace(tmp_path)
    server = TorchServe("no-model-api", ws, STORE, "--disable-token-auth", "--models",
                        "densenet_small.mar")
    with serving(server):
        server.wait_predicts(MODEL)
        r = server.request("POST", "management", "/models?url=linear_base.mar&initial_workers=1")
        err = assert_torchserve_error(r, 405, "MethodNotAllowedException")
        assert "enable_model_api" in err["message"] or "model API" in err["message"], err
        assert_still_predicts(server)
        r = server.request("DELETE", "management", f"/models/{MODEL}")
        assert_torchserve_error(r, 405, "MethodNotAllowedException")
        assert_still_predicts(server)
        assert server.request("GET", "management", f"/models/{MODEL}").status_code == 200
        r = server.request("PUT", "management", f"/models/{MODEL}?min_worker=1&synchronous=true")
        assert r.status_code == 200, r.text
        assert_still_predicts(server)


# ---------------------------------------------------------------------------------------------
# 6. The other protocols on TorchServe's ports


def test_kserve_and_metrics_on_torchserve_ports(ts_server):
    r = ts_server.request("GET", "inference", "/v2/health/ready")
    assert r.status_code == 200, r.text
    r = ts_server.request("GET", "inference", f"/v2/models/{MODEL}/ready")
    assert r.status_code == 200, r.text
    r = ts_server.request("GET", "metrics", "/metrics")
    assert r.status_code == 200, r.text
    assert r.headers.get("content-type", "").startswith("text/plain"), r.headers
    assert "# TYPE " in r.text, r.text[:500]


def test_torchserve_metric_families(ts_server):
    """TorchServe's ts_* counters (its prometheus metrics mode) for the served model: they
    count the predictions made, with TorchServe's names, labels and units."""
    def count() -> float:
        r = ts_server.request("GET", "metrics", "/metrics")
        assert r.status_code == 200, r.text
        for line in r.text.splitlines():
            if line.startswith("ts_inference_requests_total{") and f'model_name="{MODEL}"' in line:
                assert 'model_version="default"' in line and "hostname=" in line, line
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no ts_inference_requests_total for {MODEL}: {r.text[-2000:]}")

    before = count()
    for _ in range(3):
        r = ts_server.request("POST", "inference", f"/predictions/{MODEL}", data=JPG)
        assert r.status_code == 200, r.text
    assert count() == before + 3
    text = ts_server.request("GET", "metrics", "/metrics").text
    for family in ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds"):
        assert f"# TYPE {family} counter" in text, text[-2000:]


def test_torchserve_host_gauges(ts_server):
    """TorchServe's host gauges on the metrics API, with the types TorchServe's recording has
    (prometheus mode), its {Level="Host",Hostname=...} labels and sane values."""
    recorded = ts.reference()["startup_with_model"]["metrics"]["families"]
    host = ["CPUUtilization", "MemoryUsed", "MemoryAvailable", "MemoryUtilization", "DiskUsage",
            "DiskAvailable", "DiskUtilization"]
    text = ts_server.request("GET", "metrics", "/metrics").text
    values = {}
    for family in host:
        assert recorded[family] == "gauge", (family, recorded[family])
        assert f"# TYPE {family} gauge" in text, text[-3000:]
        line = next((l for l in text.splitlines() if l.startswith(family + "{")), None)
        assert line and 'Level="Host"' in line and "Hostname=" in line, (family, line)
        values[family] = float(line.rsplit(" ", 1)[1])
    for percent in ("CPUUtilization", "MemoryUtilization", "DiskUtilization"):
        assert 0.0 <= values[percent] <= 100.0, values
    assert values["MemoryAvailable"] > 0 and values["MemoryUsed"] > 0, values
    assert values["DiskUsage"] > 0 and values["DiskAvailable"] >= 0, values


@pytest.mark.parametrize("port_kind,name", [("inference", "api_description_inference"),
                                            ("management", "api_description_management")])
def test_api_descriptions_list_torchserves_endpoints(ts_server, port_kind, name):
    """OPTIONS / and GET /api-description answer an OpenAPI document listing the endpoints
    TorchServe's own lists (its /metrics entry aside: metrics are on the metrics port)."""
    recorded = ts.exchange(name)["body_summary"]["paths"]
    for method, path in (("OPTIONS", "/"), ("GET", "/api-description")):
        r = ts_server.request(method, port_kind, path)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["openapi"] == "3.0.1" and {"info", "paths"} <= body.keys()
        for endpoint, methods in recorded.items():
            if endpoint == "/metrics":
                continue
            assert endpoint in body["paths"], (endpoint, sorted(body["paths"]))
            assert set(methods) <= set(body["paths"][endpoint]), (endpoint, methods)


# ---------------------------------------------------------------------------------------------
# 7. Custom Python handlers (TorchServe's own Python worker)
#
# custom_echo.mar: the traced Linear(4->3) with custom_handler.py, a module-level
# handle(data, context) that answers by its body (the generator's CUSTOM_HANDLER docstring).
# TorchServe's recording is the reference's "custom_handler" section; each exchange keeps what
# it sent ("sent"), so a replay sends the same bytes.

CUSTOM = "custom_echo"
# The handler's answers hold float outputs of the same model run by the same worker code;
# compared rounded, in case the worker's torch threads differ.
CUSTOM_FLOAT_DIGITS = 6
CUSTOM_EXCHANGES = [
    "predict_rows",
    "predict_rows_header_mixed_case",
    "predict_rows_no_content_type",
    "predict_rows_text_plain",
    "predict_rows_list_body",
    "predict_status_203",
    "predict_status_422",
    "predict_raise",
    "predict_prediction_exception_507",
    "predict_prediction_exception_422",
    "predict_multipart_two_files",
    "predict_raw_bytes",
    "predict_query_param",
    "predict_rows_after_errors",
]


def custom_exchange(name: str) -> dict:
    return ts.exchange(name, "custom_handler")


def replay_sent(server: TorchServe, ex: dict) -> requests.Response:
    """The recorded custom_handler request `ex` again: the same method, path, query, body and
    headers ("sent")."""
    sent = ex.get("sent", {})
    kwargs: dict = {}
    if "json" in sent:
        kwargs["json"] = sent["json"]
    if "bytes_hex" in sent:
        kwargs["data"] = bytes.fromhex(sent["bytes_hex"])
    if "files" in sent:
        kwargs["files"] = {field: (filename, text.encode(), content_type)
                           for field, (filename, text, content_type) in sent["files"].items()}
    if "headers" in sent:
        kwargs["headers"] = sent["headers"]
    return ts.replay(server, ex, **kwargs)


def _rounded(value):
    if isinstance(value, float):
        return round(value, CUSTOM_FLOAT_DIGITS)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def custom_differences(r: requests.Response, ex: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """`r` against TorchServe's answer `ex` to the same request to custom_echo: the status; the
    content type (TorchServe's when it sent one: the handler's application/x-custom, or
    application/json on errors; TorchServe sends none with a handler's JSON answer, where
    oxserve may send none or application/json); the x-handler header the handler set; the
    JSON body, key for key (floats rounded; `ignore`: top-level keys of a handler's answer
    left out, compared by the caller)."""
    name = ex["name"]
    out = []
    if r.status_code != ex["status"]:
        out.append(f"status {r.status_code}, TorchServe has {ex['status']}")
    have_type = r.headers.get("content-type")
    want_type = ex["headers"].get("content-type")
    if want_type is not None:
        if (have_type or "").split(";")[0].strip() != want_type:
            out.append(f"content-type {have_type!r}, TorchServe has {want_type!r}")
    elif have_type is not None and have_type.split(";")[0].strip() != "application/json":
        out.append(f"content-type {have_type!r}, TorchServe sends none (or application/json)")
    if "x-handler" in ex["headers"] and r.headers.get("x-handler") != ex["headers"]["x-handler"]:
        out.append(f"x-handler {r.headers.get('x-handler')!r}, TorchServe has "
                   f"{ex['headers']['x-handler']!r}")
    want = ex.get("body_json")
    try:
        have = r.json()
    except ValueError:
        out.append(f"body is not JSON: {r.text[:300]!r}")
        return [f"{name}: {d}" for d in out]
    if isinstance(want, dict) and isinstance(have, dict):
        want = {k: v for k, v in want.items() if k not in ignore}
        have = {k: v for k, v in have.items() if k not in ignore}
    out += ts.json_differences(_rounded(have), _rounded(want))
    return [f"{name}: {d}" for d in out]


def assert_custom_predicts(server: TorchServe, timeout: float = 0.0) -> requests.Response:
    """A rows prediction on custom_echo answers as TorchServe's (polled for `timeout` s while
    it answers anything else, e.g. while its worker restarts)."""
    ex = custom_exchange("predict_rows")
    deadline = time.monotonic() + timeout
    while True:
        r = replay_sent(server, ex)
        if r.status_code == 200 or time.monotonic() >= deadline:
            break
        assert server.alive(), "the server exited"
        time.sleep(0.2)
    diffs = custom_differences(r, ex)
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    return r


@pytest.fixture(scope="module")
def custom_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("ts-custom") / "store"
    store.mkdir()
    for name in ("densenet_small.mar", "custom_echo.mar"):
        shutil.copy(STORE / name, store)
    return store


@pytest.fixture(scope="module")
def custom_server(custom_store):
    """Model API on, token authorization off, densenet_small (native image_classifier) at
    start-up; custom_echo registered as in TorchServe's recording (initial_workers=1,
    synchronous=true; batch size 1). Yields (server, the registration's response)."""
    ws = Workspace(custom_store.parent / "ws")
    server = TorchServe("custom", ws, custom_store, "--enable-model-api", "--disable-token-auth",
                        "--models", "densenet_small.mar")
    with serving(server):
        server.wait_predicts(MODEL)
        registered = ts.replay(server, custom_exchange("register_custom_echo"))
        yield server, registered


def test_python_workers_start_with_a_tmpdir_too_long_for_a_socket(tmp_path, custom_store):
    """The Python worker listens on a Unix socket, whose path may not exceed 107 bytes; with a
    TMPDIR longer than that allows, the socket goes to /tmp and custom_echo (loaded at start-up)
    still answers as TorchServe."""
    ws = Workspace(tmp_path / ("long-tmpdir-" + "x" * 90))
    assert len(str(ws.tmp)) > 107 - len("/oxserve-ts-worker-XXXXXX/.ts.sock.1"), ws.tmp
    server = TorchServe("long-tmpdir", ws, custom_store, "--disable-token-auth",
                        "--models", f"{CUSTOM}.mar")
    with serving(server):
        assert_custom_predicts(server, timeout=ts.TIMEOUT_S)


def test_custom_handler_registers_as_torchserve(custom_server):
    """Registering custom_echo.mar (custom_handler.py) answers as TorchServe; describe shows one
    READY worker with TorchServe's fields (runtime python, batch size 1, ...)."""
    server, registered = custom_server
    diffs = ts.response_differences(registered, custom_exchange("register_custom_echo"))
    r = ts.replay(server, custom_exchange("describe_custom_echo"))
    diffs += ts.response_differences(r, custom_exchange("describe_custom_echo"))
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    workers = r.json()[0]["workers"]
    assert [w["status"] for w in workers] == ["READY"], workers
    assert isinstance(workers[0]["pid"], int) and workers[0]["pid"] > 0, workers


@pytest.mark.parametrize("name", CUSTOM_EXCHANGES)
def test_custom_handler_answers_as_torchserve(custom_server, name):
    """Each kind of request to the handler (rows with an x-echo header, no or text/plain content
    type, handler-set status / content type / header, ValueError -> 503 "Prediction failed",
    PredictionException -> its code, multipart with two files, raw bytes, a query parameter
    (TorchServe does not hand it to the handler)): status, content type and body as
    TorchServe's; then a good prediction."""
    server, registered = custom_server
    assert registered.status_code == 200, registered.text
    ex = custom_exchange(name)
    r = replay_sent(server, ex)
    ignore: tuple[str, ...] = ()
    if name == "predict_rows_header_mixed_case":
        # The client sent "X-Echo"; the handler asks for "x-echo". TorchServe hands the worker
        # the header names as the client spelled them (context lookups are case-sensitive),
        # so its handler saw None; an HTTP stack that lowercases header names gives "Hello".
        # Either is accepted.
        ignore = ("header",)
        assert ex["body_json"]["header"] is None, ex["body_json"]
        if r.status_code == 200:
            assert r.json().get("header") in (None, "Hello"), r.text
    diffs = custom_differences(r, ex, ignore=ignore)
    if ex["status"] >= 400 and ex["headers"].get("content-type") == "application/json":
        # An error from the frontend (not an answer of the handler): TorchServe's error body.
        assert_torchserve_error(r, ex["status"], ex["body_json"]["type"])
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    assert_custom_predicts(server)
    assert_still_predicts(server)


def test_custom_handler_body_is_the_workers_bytes(custom_server):
    """A handler's answer (a dict the worker serializes with json.dumps(indent=2)) reaches the
    client byte for byte as TorchServe sent it."""
    server, _ = custom_server
    ex = custom_exchange("predict_rows")
    r = replay_sent(server, ex)
    assert r.status_code == 200, r.text
    assert r.text == ex["body_raw"], (r.text, ex["body_raw"])


def test_custom_handler_sees_request_headers(custom_server):
    """context.get_all_request_header(idx) holds the client's headers (TorchServe also adds
    each input's {"content-type"} under its name, and "explain", "url_path")."""
    server, _ = custom_server
    ex = custom_exchange("predict_request_headers")
    r = replay_sent(server, ex)
    assert r.status_code == ex["status"] == 200, r.text
    have = r.json()["request_headers"]
    want = ex["body_json"]["request_headers"]
    lower = {k.lower(): v for k, v in have.items()}
    assert have.get("x-echo") == "hi", have
    assert lower.get("x-mixed-case") == "Value", have
    assert have.get("body") == want["body"] == {"content-type": "application/json"}, have
    assert lower.get("content-type") == "application/json", have
    # Header names compared case-insensitively (HTTP's rule); Connection is hop-by-hop, Host
    # names the port, and Accept-Encoding / User-Agent are what this client's `requests`
    # sends (the recording's ran in the TorchServe venv, with other optional packages).
    client_dependent = ("connection", "host", "accept-encoding", "user-agent")
    problems = [f"{k}: {lower.get(k.lower())!r}, TorchServe's worker had {v!r}"
                for k, v in want.items() if k.lower() not in client_dependent
                and lower.get(k.lower()) != v]
    assert not problems, "\n".join(problems) + f"\nall: {have}"
    assert r.json()["header"] == ex["body_json"]["header"] == "hi", r.text


def test_custom_handler_batches_concurrent_requests(custom_server):
    """custom_batch (the same archive with batch_size=4, max_batch_delay=200, one worker): four
    concurrent requests are handed to the handler together (TorchServe's recording saw
    batches of more than one; the exact count may differ), each answered with its own rows
    and header."""
    import threading

    server, _ = custom_server
    diffs: list[str] = []
    r = ts.replay(server, custom_exchange("register_custom_batch"))
    try:
        diffs += ts.response_differences(r, custom_exchange("register_custom_batch"))
        assert r.status_code == 200, r.text
        r = ts.replay(server, custom_exchange("describe_custom_batch"))
        diffs += ts.response_differences(r, custom_exchange("describe_custom_batch"))
        recorded = [custom_exchange(f"predict_batch_{i}") for i in range(4)]
        for ex in recorded:
            assert ex["body_json"]["batch"] > 1, ("TorchServe's recording", ex["body_json"])
        answers: list[requests.Response | None] = [None] * 4
        barrier = threading.Barrier(4)

        def one(i: int) -> None:
            barrier.wait()
            answers[i] = replay_sent(server, recorded[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=2 * ts.TIMEOUT_S)
        batches = []
        for ex, r in zip(recorded, answers):
            assert r is not None, f"{ex['name']}: no answer"
            diffs += custom_differences(r, ex, ignore=("batch",))
            if r.status_code == 200:
                batches.append(r.json().get("batch"))
        assert diffs or all(isinstance(b, int) and 1 < b <= 4 for b in batches), (
            f"batch sizes the handler saw: {batches}; TorchServe's: "
            f"{[ex['body_json']['batch'] for ex in recorded]}")
    finally:
        r = ts.replay(server, custom_exchange("unregister_custom_batch"))
    diffs += ts.response_differences(r, custom_exchange("unregister_custom_batch"))
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    assert_custom_predicts(server)


def test_custom_handler_worker_death(custom_server):
    """The handler's worker exits mid-request (os._exit(1)): that request answers TorchServe's
    500 InternalServerException ("Worker died."); the server keeps serving (densenet_small at
    once); within 60 s a new worker answers custom_echo's predictions again, and describe
    shows one READY worker with another pid."""
    server, _ = custom_server
    assert_custom_predicts(server)
    before = server.request("GET", "management", f"/models/{CUSTOM}").json()[0]["workers"]
    assert len(before) == 1, before
    ex = custom_exchange("predict_die")
    want = ex["body_json"]
    assert (ex["status"], want["type"], want["message"]) == (
        500, "InternalServerException", "Worker died."), want
    r = replay_sent(server, ex)
    body = assert_torchserve_error(r, ex["status"], want["type"])
    assert "died" in body["message"].lower(), body
    assert server.alive(), "the server exited with the worker"
    assert_still_predicts(server)
    t0 = time.monotonic()
    r = assert_custom_predicts(server, timeout=60.0)
    restarted_s = time.monotonic() - t0
    diffs = custom_differences(replay_sent(server, custom_exchange("predict_rows_after_restart")),
                               custom_exchange("predict_rows_after_restart"))
    r = ts.replay(server, custom_exchange("describe_custom_echo_after_restart"))
    diffs += ts.response_differences(r, custom_exchange("describe_custom_echo_after_restart"))
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    workers = r.json()[0]["workers"]
    assert [w["status"] for w in workers] == ["READY"], workers
    assert workers[0]["pid"] != before[0]["pid"], (before, workers)
    # TorchServe's restart took restarted_s of the recording (about 3 s).
    assert restarted_s < 60, restarted_s


def test_custom_handler_that_does_not_import_is_refused(custom_server, custom_store):
    """An archive whose handler.py has a syntax error: the synchronous registration fails with
    TorchServe's error body and a message naming the Python error (TorchServe's own, 500
    "Failed to start workers for model broken_handler version: 1.0", does not); nothing is
    registered and the other models keep serving."""
    server, _ = custom_server
    section = ts.reference()["custom_handler"]
    with zipfile.ZipFile(custom_store / "custom_echo.mar") as mar:
        model = mar.read("model.pt")
    _zip(custom_store / "broken_handler.mar", {
        "MAR-INF/MANIFEST.json": json.dumps(section["broken_manifest"], indent=2).encode(),
        "broken_handler.py": section["broken_handler_py"].encode(),
        "model.pt": model,
    })
    before = server.request("GET", "management", "/models").json()
    ex = custom_exchange("register_broken_handler")
    assert ex["status"] == 500, ex
    r = ts.replay(server, ex)
    assert 400 <= r.status_code < 600, (r.status_code, r.text)
    body = assert_torchserve_error(r, r.status_code, r.json().get("type"))
    assert "SyntaxError" in body["message"], body
    for name in ("describe_broken_handler", "unregister_broken_handler"):
        diffs = ts.response_differences(ts.replay(server, custom_exchange(name)),
                                        custom_exchange(name))
        assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    assert server.request("GET", "management", "/models").json() == before
    assert_custom_predicts(server)
    assert_still_predicts(server)


# ---------------------------------------------------------------------------------------------
# 8. Python workers as processes: scaling, the response timeout, a worker killed from outside,
# per-model requirements (install_py_dep_per_model), streamed answers.
#
# The archives here are built by the real torch-model-archiver of the TorchServe venv from
# small module-level handlers (PROBE_HANDLER, DEP_HANDLER), into custom_server's store.

ARCHIVER = ts.venv_python().parent / "torch-model-archiver"
PROBE = "py_probe"
# A handler that answers by its body: b"sleep" sleeps past any response timeout, b"stream"
# sends "a", "b", "c" as intermediate parts (TorchServe's streaming) and then returns "d",
# anything else answers "ok".
PROBE_HANDLER = '''\
import time

from ts.protocol.otf_message_handler import send_intermediate_predict_response


def _body(request):
    body = request.get("body")
    if body is None:
        body = request.get("data")
    return bytes(body) if isinstance(body, (bytes, bytearray)) else str(body).encode()


def handle(data, context):
    if data is None:
        return None
    answers = []
    for request in data:
        body = _body(request)
        if body == b"sleep":
            time.sleep(60)
        if body == b"stream":
            for part in ("a", "b", "c"):
                send_intermediate_predict_response([part], context.request_ids,
                                                   "Intermediate Prediction success", 200,
                                                   context)
            answers.append("d")
        else:
            answers.append("ok")
    return answers
'''
DEP = "dep_probe"
DEP_MODULE = "oxdep_probe"
# A handler that needs the archive's requirement (the wheel built by _probe_wheel) at import.
DEP_HANDLER = f'''\
import {DEP_MODULE}


def handle(data, context):
    if data is None:
        return None
    return [{DEP_MODULE}.VALUE for _ in data]
'''
WORKER_SCRIPT = "model_service_worker.py"
# What pip says when it would need an index it cannot reach (the test skips then).
PIP_NETWORK_WORDS = ("NewConnectionError", "Network is unreachable", "name resolution",
                     "No matching distribution", "Could not find a version", "ConnectTimeout",
                     "Max retries exceeded")


def _archive(store: Path, name: str, handler_py: str, requirements: str | None = None) -> Path:
    """`store`/`name`.mar made by torch-model-archiver from handler.py (and a requirements
    file); no serialized model."""
    src = store.parent / f"src-{name}"
    src.mkdir(exist_ok=True)
    (src / "handler.py").write_text(handler_py)
    cmd = [str(ARCHIVER), "--model-name", name, "--version", "1.0", "--handler", "handler.py",
           "--export-path", str(store), "--force"]
    if requirements is not None:
        (src / "requirements.txt").write_text(requirements)
        cmd += ["--requirements-file", "requirements.txt"]
    done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (cmd, done.stdout, done.stderr)
    return store / f"{name}.mar"


def _register(server: TorchServe, archive: str, name: str, **query) -> requests.Response:
    q = "".join(f"&{k}={v}" for k, v in query.items())
    return server.request("POST", "management", f"/models?url={archive}&model_name={name}"
                          f"&initial_workers=1&synchronous=true{q}")


@contextlib.contextmanager
def _registered(server: TorchServe, archive: str, name: str, **query):
    """`archive` registered as `name` (synchronously, one worker) for the block; unregistered
    after it."""
    r = _register(server, archive, name, **query)
    assert r.status_code == 200, f"registering {archive}: {r.status_code} {r.text}"
    try:
        yield r
    finally:
        r = server.request("DELETE", "management", f"/models/{name}")
        assert r.status_code == 200, f"unregistering {name}: {r.status_code} {r.text}"


def _workers(server: TorchServe, model: str) -> list[dict]:
    r = server.request("GET", "management", f"/models/{model}")
    assert r.status_code == 200, r.text
    return r.json()[0]["workers"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _assert_live_workers(workers: list[dict], count: int) -> list[int]:
    """`count` READY workers, each a distinct live process running TorchServe's worker script,
    with its RSS as memoryUsage; their pids."""
    assert [w["status"] for w in workers] == ["READY"] * count, workers
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == count and all(isinstance(p, int) and p > 0 for p in pids), workers
    for w in workers:
        assert not _gone(w["pid"]), (f"worker pid {w['pid']} is not a running process", workers)
        assert WORKER_SCRIPT in _cmdline(w["pid"]), (w["pid"], _cmdline(w["pid"]))
        assert isinstance(w["memoryUsage"], int) and w["memoryUsage"] > 1 << 20, w
    return pids


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _predict_after_restart(server: TorchServe, model: str, body: bytes,
                           timeout: float = 60.0) -> tuple[requests.Response, float]:
    """Predicts until the answer is not a 5xx (a worker being replaced) or `timeout` passes;
    the last answer and the seconds it took."""
    t0 = time.monotonic()
    while True:
        r = server.predict(model, body)
        if r.status_code < 500 or time.monotonic() - t0 > timeout:
            return r, time.monotonic() - t0
        assert server.alive(), "the server exited"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def probe_archive(custom_store) -> str:
    return _archive(custom_store, PROBE, PROBE_HANDLER).name


def test_python_worker_response_timeout(custom_server, probe_archive):
    """A handler that does not answer within the model's response_timeout (2 s here): that
    request gets TorchServe's error body (5xx) naming the timeout within a few seconds, the
    hung worker process is stopped, and a new worker (another pid, READY) answers the next
    requests."""
    server, _ = custom_server
    with _registered(server, probe_archive, PROBE, response_timeout=2):
        r = server.predict(PROBE, b"hello")
        assert (r.status_code, r.text) == (200, "ok"), r.text
        (before,) = _assert_live_workers(_workers(server, PROBE), 1)
        t0 = time.monotonic()
        r = server.predict(PROBE, b"sleep", timeout=30)
        took = time.monotonic() - t0
        assert 500 <= r.status_code < 600, (r.status_code, r.text)
        body = assert_torchserve_error(r, r.status_code, r.json().get("type"))
        assert "timeout" in body["message"].lower() or "timed out" in body["message"].lower(), body
        assert took < 10, f"the timed-out request answered after {took:.1f} s: {body}"
        assert _wait_gone(before), f"the hung worker {before} still runs"
        r, _ = _predict_after_restart(server, PROBE, b"hello")
        assert (r.status_code, r.text) == (200, "ok"), r.text
        (after,) = _assert_live_workers(_workers(server, PROBE), 1)
        assert after != before
    assert_custom_predicts(server)
    assert_still_predicts(server)


def test_python_worker_killed_while_idle(custom_server):
    """custom_echo's worker SIGKILLed from outside between requests: the next prediction is
    answered by a new worker (answers other than 5xx are not retried), describe shows its
    pid."""
    server, _ = custom_server
    assert_custom_predicts(server)
    (before,) = _assert_live_workers(_workers(server, CUSTOM), 1)
    # Only the process describe names, and only if it is TorchServe's worker script.
    assert WORKER_SCRIPT in _cmdline(before), _cmdline(before)
    os.kill(before, signal.SIGKILL)
    assert _wait_gone(before)
    ex = custom_exchange("predict_rows")
    r, took = _predict_after_restart(server, CUSTOM, json.dumps(ex["sent"]["json"]).encode())
    assert r.status_code == 200, (r.status_code, r.text, f"after {took:.1f} s")
    r = assert_custom_predicts(server)
    (after,) = _assert_live_workers(_workers(server, CUSTOM), 1)
    assert after != before
    assert_still_predicts(server)


def test_python_handler_streamed_answer_is_joined(custom_server, probe_archive):
    """A handler that streams (send_intermediate_predict_response "a", "b", "c", then returns
    "d"): the client gets one 200 answer with the parts joined, "abcd"; the worker then
    answers ordinary requests."""
    server, _ = custom_server
    name = "py_stream"
    with _registered(server, probe_archive, name):
        r = server.predict(name, b"stream")
        assert (r.status_code, r.text) == (200, "abcd"), (r.status_code, r.text)
        r = server.predict(name, b"hello")
        assert (r.status_code, r.text) == (200, "ok"), r.text
        r = server.predict(name, b"stream")
        assert (r.status_code, r.text) == (200, "abcd"), (r.status_code, r.text)
    assert_custom_predicts(server)


def test_python_model_registers_again_after_unregister(custom_server, probe_archive):
    """A Python-handler model unregistered and registered again under the same name serves
    again; unregistering stops its worker process."""
    server, _ = custom_server
    name = "py_again"
    for _ in range(2):
        with _registered(server, probe_archive, name):
            r = server.predict(name, b"hello")
            assert (r.status_code, r.text) == (200, "ok"), r.text
            (pid,) = _assert_live_workers(_workers(server, name), 1)
        assert server.request("GET", "management", f"/models/{name}").status_code == 404
        assert _wait_gone(pid), f"the unregistered model's worker {pid} still runs"
    assert_custom_predicts(server)


def _probe_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel of oxdep_probe 1.0 (oxdep_probe.VALUE = 42), made by hand."""
    import base64
    import hashlib

    version = "1.0"
    info = f"{DEP_MODULE}-{version}.dist-info"
    files = {
        f"{DEP_MODULE}/__init__.py": b"VALUE = 42\n",
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {DEP_MODULE}\n"
                             f"Version: {version}\n").encode(),
        f"{info}/WHEEL": (b"Wheel-Version: 1.0\nGenerator: oxserve-tests\n"
                          b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }

    def digest(data: bytes) -> str:
        raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        return "sha256=" + raw.decode()

    record = "".join(f"{p},{digest(d)},{len(d)}\n" for p, d in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{DEP_MODULE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


@pytest.fixture(scope="module")
def dep_archive(custom_store) -> str:
    """dep_probe.mar in custom_store: DEP_HANDLER, and a requirements file naming the wheel of
    _probe_wheel by its absolute path (pip needs no index for it)."""
    wheel = _probe_wheel(custom_store.parent / "wheels")
    return _archive(custom_store, DEP, DEP_HANDLER, requirements=f"{wheel}\n").name


def test_install_py_dep_per_model_installs_requirements(tmp_path, custom_store, dep_archive):
    """With install_py_dep_per_model=true in config.properties, registering an archive whose
    requirements file names a wheel installs it for the model's workers: the handler imports
    it and answers its VALUE (42)."""
    ws = Workspace(tmp_path, {"install_py_dep_per_model": "true"})
    server = TorchServe("deps", ws, custom_store, "--enable-model-api", "--disable-token-auth")
    with serving(server):
        r = _register(server, dep_archive, DEP)
        if r.status_code != 200 and any(w in r.text for w in PIP_NETWORK_WORDS):
            pytest.skip(f"pip wants a package index to install a local wheel here: {r.text}")
        assert r.status_code == 200, f"registering {dep_archive}: {r.status_code} {r.text}"
        r = server.predict(DEP, b"{}")
        assert (r.status_code, r.text) == (200, "42"), (r.status_code, r.text)
        _assert_live_workers(_workers(server, DEP), 1)
        r = server.request("DELETE", "management", f"/models/{DEP}")
        assert r.status_code == 200, r.text


def test_requirements_ignored_without_install_py_dep_per_model(custom_server, dep_archive):
    """Without install_py_dep_per_model the requirements file is ignored (as TorchServe does):
    the handler's import of the missing module fails when the worker loads it, so the
    synchronous registration fails (TorchServe: 500 "Failed to start workers ...") with
    TorchServe's error body, whose message names the module that is missing (TorchServe's
    model_loader then also tries ts.torch_handler.handler and fails again: the first error is
    the one that says what to install); nothing is registered and the other models keep
    serving."""
    server, _ = custom_server
    before = server.request("GET", "management", "/models").json()
    r = _register(server, dep_archive, DEP)
    try:
        assert 400 <= r.status_code < 600, (r.status_code, r.text)
        body = assert_torchserve_error(r, r.status_code, r.json().get("type"))
        assert DEP_MODULE in body["message"] and "ModuleNotFoundError" in body["message"], body
    finally:
        if r.status_code == 200:
            server.request("DELETE", "management", f"/models/{DEP}")
    assert server.request("GET", "management", f"/models/{DEP}").status_code == 404
    assert server.request("GET", "management", "/models").json() == before
    assert_custom_predicts(server)
    assert_still_predicts(server)


def test_python_workers_scale_as_processes(custom_server):
    """Scaling custom_echo to 2 workers (synchronous) runs two worker processes of TorchServe's
    worker script, both READY in describe with their pids and RSS; predictions work; back to
    1, describe shows one such worker and no other worker process of the two is left."""
    server, _ = custom_server
    assert_custom_predicts(server)
    r = server.request("PUT", "management", f"/models/{CUSTOM}?min_worker=2&synchronous=true")
    try:
        assert (r.status_code, r.json()) == (
            200, {"status": f"Workers scaled to 2 for model: {CUSTOM}"}), r.text
        two = _assert_live_workers(_workers(server, CUSTOM), 2)
        for _ in range(4):
            assert_custom_predicts(server)
        # Describe goes on showing the same two (not only right after the answer).
        time.sleep(0.5)
        assert _assert_live_workers(_workers(server, CUSTOM), 2) == two
    finally:
        r = server.request("PUT", "management", f"/models/{CUSTOM}?min_worker=1&synchronous=true")
    assert (r.status_code, r.json()) == (
        200, {"status": f"Workers scaled to 1 for model: {CUSTOM}"}), r.text
    (one,) = _assert_live_workers(_workers(server, CUSTOM), 1)
    left = [p for p in two if p != one and not _wait_gone(p)]
    assert not left, f"worker processes {left} still run after scaling to 1 (worker {one})"
    assert_custom_predicts(server)
    assert_still_predicts(server)
    assert _assert_live_workers(_workers(server, CUSTOM), 1) == [one]


# ---------------------------------------------------------------------------------------------
# 9. Registration from URLs (allowed_urls)
#
# The reference's "allowed_urls" section: TorchServe 0.12 started with allowed_urls = an http
# pattern (127.0.0.1, any port, under /allowed/) and a file:// pattern (a directory named
# allowed), an empty model store, and copies of densenet_small.mar served by a local
# http.server (its "http_files") and put under its scratch directory (its "file_url_files").
# The exchanges are replayed here in the same order against oxserve with the same
# config.properties value, the same files under this test's directory ("<work>") and an http
# server of its own ("<http_port>"). What TorchServe 0.12 does, asserted here too: a url that
# matches no pattern is refused (404 ModelNotFoundException "Given URL <url> does not match any
# allowed URL(s)") before anything is fetched; an archive downloaded from an http url, or
# copied from a file:// url, is kept in the model store under the url's file name while its
# model is registered (a second registration from the same url then fails: 500 "Model file
# already exists <name>") and is deleted from the store on unregister; a 404 from the http
# server is 400 DownloadArchiveException "Failed to download archive from: <url>" and leaves
# nothing in the store; the patterns match case-insensitively (HTTP://...).


def _query(ex: dict) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(ex["url"]).query))


@pytest.fixture(scope="module")
def url_server(tmp_path_factory):
    """oxserve with the recording's allowed_urls (the config.properties text TorchServe was
    given), model API on, token authorization off, an empty model store; the recording's
    archives served by a local http server and under this fixture's directory. Yields
    (server, http server, the directory standing for "<work>", the model store)."""
    ref = ts.url_reference()
    root = tmp_path_factory.mktemp("ts-urls")
    for rel in ref["http_files"]:
        (root / "http" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STORE / "densenet_small.mar", root / "http" / rel)
    for rel in ref["file_url_files"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STORE / "densenet_small.mar", root / rel)
    store = root / "store"
    store.mkdir()
    ws = Workspace(root / "ws", {"allowed_urls": ref["allowed_urls_property"]})
    server = TorchServe("urls", ws, store, "--enable-model-api", "--disable-token-auth")
    with ts.ArchiveHttpServer(root / "http") as http, serving(server):
        yield server, http, root, store


def _url_exchange_differences(server: TorchServe, http: ts.ArchiveHttpServer, store: Path,
                              want: dict, before: list[str],
                              recorded_before: list[str]) -> list[str]:
    """Replays the recorded exchange `want` (placeholders already replaced) and compares: the
    status and JSON body (error code, type and message; a registration's status message;
    describe's modelUrl and the other fields; a prediction's labels and probabilities), which
    paths the http server was asked for (none for a url no pattern allows), and how the model
    store changed against its listing `before` the replay began (TorchServe's: its
    "store_after" against `recorded_before`, its listing before)."""
    name = want["name"]
    mark = len(http.log)
    body = JPG if want["request"]["body_kind"] == "bytes" else None
    r = ts.replay(server, want, data=body)
    diffs = ts.response_differences(r, want, prediction=name.startswith("predict_"))
    fetched = http.fetched_since(mark)
    recorded = sorted({path for _, path, _ in want["http_requests"]})
    if fetched != recorded:
        diffs.append(f"{name}: fetched {fetched} from the http server, TorchServe {recorded}")
    have_store = ts.store_changes(before, ts.store_listing(store))
    want_store = ts.store_changes(recorded_before, want["store_after"])
    if have_store != want_store:
        diffs.append(f"{name}: the model store changed by {have_store}, TorchServe's by "
                     f"{want_store}")
    return diffs


def test_register_from_urls_as_torchserve(url_server):
    """The recording's exchanges in its order (see the section's comment): refused urls, a
    404 download, a plain name not in the store, registrations from allowed http and file://
    urls (describe, prediction), the same url again while its archive is in the store, an
    upper-case scheme, list, unregisters (deleting the downloads from the store), the url
    again after unregister. After each error, the models registered with workers still
    predict; at the end, a new registration from the allowed http url predicts."""
    server, http, work, store = url_server
    ref = ts.url_reference()
    assert ts.store_listing(store) == ref["store_before"] == []
    diffs: list[str] = []
    serving_models: set[str] = set()
    for recorded in ref["exchanges"]:
        want = ts.with_locations(recorded, work, http.port)
        diffs += _url_exchange_differences(server, http, store, want, ref["store_before"],
                                           ref["store_before"])
        query = _query(want)
        name = want["name"]
        if name.startswith("register_") and want["status"] == 200 \
                and int(query.get("initial_workers", "0")) > 0:
            serving_models.add(query["model_name"])
        if name.startswith("unregister_") and want["status"] == 200:
            serving_models.discard(want["url"].split("/models/", 1)[1].split("/")[0])
        if want["status"] >= 400:
            for model in sorted(serving_models):
                r = server.predict(model)
                if r.status_code != 200:
                    diffs.append(f"after {name}: {model} answers {r.status_code} {r.text[:200]}")
                else:
                    diffs += [f"after {name}: {model}: {d}"
                              for d in ts.prediction_differences(r.json(), KITTEN)]
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    assert ts.store_listing(store) == ref["store_after_stop"] == []

    # The server still registers from the allowed url and predicts.
    allowed = f"http://127.0.0.1:{http.port}/allowed/densenet_small.mar"
    r = server.request("POST", "management", f"/models?url={allowed}&model_name=dl_final"
                       "&initial_workers=1&synchronous=true")
    assert r.status_code == 200, r.text
    try:
        assert_still_predicts(server, "dl_final")
    finally:
        r = server.request("DELETE", "management", "/models/dl_final")
    assert r.status_code == 200, r.text
    assert ts.store_listing(store) == [], "unregister leaves the downloaded archive"


@pytest.mark.parametrize("name", ["register_denied_http", "register_denied_file",
                                  "register_denied_http_allowed_inside"])
def test_url_not_allowed_is_refused_unfetched(url_server, name):
    """A url no allowed_urls pattern matches as a whole (one that only contains an allowed
    url too): TorchServe's 404 ModelNotFoundException "Given URL <url> does not match any
    allowed URL(s)", nothing fetched, nothing written to the model store."""
    server, http, work, store = url_server
    want = ts.with_locations(ts.exchange(name, "allowed_urls"), work, http.port)
    url = _query(want)["url"]
    assert want["status"] == 404 and want["body_json"] == {
        "code": 404, "type": "ModelNotFoundException",
        "message": f"Given URL {url} does not match any allowed URL(s)"}, want["body_json"]
    before = ts.store_listing(store)
    mark = len(http.log)
    r = ts.replay(server, want)
    assert_torchserve_error(r, 404, "ModelNotFoundException")
    assert r.json() == want["body_json"], r.text
    assert http.fetched_since(mark) == [], "a url that is not allowed was fetched"
    assert ts.store_listing(store) == before


def test_default_allowed_urls_accept_http(ts_server, tmp_path):
    """Without allowed_urls (TorchServe's default `file://.*|http(s)?://.*`) an http url
    registers: the reference's "default" exchanges (on TorchServe's first start, whose store
    held the fixture archives) replayed on ts_server (no allowed_urls key): the registration
    with 0 workers, describe (modelUrl the url), unregister; the archive is in the model store
    while registered and gone after, as in TorchServe."""
    ref = ts.url_reference(default=True)
    served = tmp_path / "http" / "other" / "densenet_default.mar"
    served.parent.mkdir(parents=True)
    shutil.copy(STORE / "densenet_small.mar", served)
    store = ts_server.store
    before = ts.store_listing(store)
    diffs: list[str] = []
    with ts.ArchiveHttpServer(tmp_path / "http") as http:
        for recorded in ref["exchanges"]:
            want = ts.with_locations(recorded, tmp_path, http.port)
            diffs += _url_exchange_differences(ts_server, http, store, want, before,
                                               ref["store_before"])
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    assert ts.store_listing(store) == before
    assert_still_predicts(ts_server)


# ---------------------------------------------------------------------------------------------
# 10. image_segmenter natively
#
# segmenter_small.mar (handler image_segmenter, TorchServe's default): a traced fully
# convolutional net answering {"out": [N, 4, 224, 224] scores}, as torchvision's segmentation
# models do. TorchServe's ImageSegmenter: the image_classifier's preprocessing, then softmax
# over the classes and per pixel [class index as a float, its probability]; its Python worker
# answers json.dumps(list, indent=2) of the [224][224][2] list (the reference's
# "image_segmenter" section keeps the parsed list and the text's first 200 characters).

SEGMENTER = "segmenter_small"
# The resize leaves a few pixels one level off PIL's (3.6 % of kitten.jpg's samples;
# docs/torchserve.md), and here nothing averages that away: each pixel's scores come from its
# own 5x5 neighbourhood of the resized image, so a probability moves by up to ~2e-2 where the
# classifier's (averaged over the image) move by 1e-5, and a pixel whose two most probable
# classes are that close (the fixture has ~2 % within 0.02) may take the other one (0.2 % do).
SEGMENT_CLASS_AGREEMENT = 0.995
SEGMENT_PROBABILITY_ATOL = 3e-2
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|NaN|-?Infinity")


def _layout(text: str, lines: int) -> list[str]:
    """The first `lines` lines of a JSON text with every number written N."""
    return [_NUMBER.sub("N", line) for line in text.split("\n")[:lines]]


def _descendants(pid: int) -> list[int]:
    """The live processes under `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _python_workers(server: TorchServe) -> set[int]:
    return {p for p in _descendants(server.proc.pid) if WORKER_SCRIPT in _cmdline(p)}


def _text_differences(text: str, parsed, head: str) -> list[str]:
    """The answer's text against TorchServe's layout: exactly json.dumps(parsed, indent=2) (as
    TorchServe's was, "body_raw_is_json_dumps_indent_2"), and its first lines as `head`'s
    (TorchServe's first 200 characters), numbers aside."""
    out = []
    lines = head.count("\n")
    if _layout(text, lines) != _layout(head, lines):
        out.append(f"the text begins {text[:200]!r}, TorchServe's {head!r}")
    python = json.dumps(parsed, indent=2)
    if text != python:
        have_lines, want_lines = text.split("\n"), python.split("\n")
        differ = [(i + 1, h, w) for i, (h, w) in enumerate(zip(have_lines, want_lines))
                  if h != w]
        out.append(f"the text is not json.dumps(answer, indent=2): {len(differ)} lines differ "
                   f"(line, oxserve, Python) {differ[:5]}; {len(have_lines)} lines, Python "
                   f"{len(want_lines)}")
    return out


def segment_agreement(have, want) -> tuple[list[str], dict]:
    """oxserve's [H][W][2] segments against TorchServe's: the same shape; the fraction of pixels
    with the same class; the largest probability difference where the class is the same."""
    shape = (len(want), len(want[0]), len(want[0][0]))
    if not (isinstance(have, list) and len(have) == shape[0]
            and all(isinstance(row, list) and len(row) == shape[1] for row in have)
            and all(isinstance(px, list) and len(px) == shape[2]
                    and all(isinstance(v, float) for v in px) for row in have for px in row)):
        return [f"not a {shape[0]}x{shape[1]}x{shape[2]} list of floats"], {}
    pixels = equal = 0
    max_diff = 0.0
    for row_have, row_want in zip(have, want):
        for (c_have, p_have), (c_want, p_want) in zip(row_have, row_want):
            pixels += 1
            if c_have == c_want:
                equal += 1
                max_diff = max(max_diff, abs(p_have - p_want))
    stats = {"pixels": pixels, "equal_class_fraction": equal / pixels,
             "max_probability_difference": max_diff}
    out = []
    if equal / pixels < SEGMENT_CLASS_AGREEMENT:
        out.append(f"the class equals TorchServe's for {equal} of {pixels} pixels "
                   f"({equal / pixels:.4f} < {SEGMENT_CLASS_AGREEMENT})")
    if max_diff > SEGMENT_PROBABILITY_ATOL:
        out.append(f"a probability differs from TorchServe's by {max_diff:.3g} "
                   f"(tolerance {SEGMENT_PROBABILITY_ATOL})")
    return out, stats


@contextlib.contextmanager
def _registered_natively(server: TorchServe, section: str, model: str):
    """Registers `model` as the reference's `section` recorded it and describes it, both
    compared with TorchServe's answers; the model must run in the server itself (describe's
    worker pid is the server's own, memoryUsage 0, no Python worker started for it). Yields the
    differences found (the caller adds its own); then unregisters it as TorchServe did, and on
    any failure deletes it so the shared server stays clean."""
    workers_before = _python_workers(server)
    diffs: list[str] = []
    registered = False
    try:
        r = ts.replay(server, ts.exchange(f"register_{model}", section))
        registered = r.status_code == 200
        diffs += ts.response_differences(r, ts.exchange(f"register_{model}", section))
        assert registered, f"registering {model}.mar: {r.status_code} {r.text}"
        r = ts.replay(server, ts.exchange(f"describe_{model}", section))
        diffs += ts.response_differences(r, ts.exchange(f"describe_{model}", section))
        workers = r.json()[0]["workers"]
        assert [(w["status"], w["pid"], w["memoryUsage"]) for w in workers] == [
            ("READY", server.proc.pid, 0)], ("not a native model", workers)
        assert _python_workers(server) <= workers_before, "a Python worker was started"
        yield diffs
        r = ts.replay(server, ts.exchange(f"unregister_{model}", section))
        registered = r.status_code != 200
        diffs += ts.response_differences(r, ts.exchange(f"unregister_{model}", section))
    finally:
        if registered:
            server.request("DELETE", "management", f"/models/{model}")


def test_image_segmenter_runs_natively_as_torchserve(ts_server):
    """The reference's "image_segmenter" exchanges replayed on ts_server: the registration (1
    worker) and describe as TorchServe's; the model runs in the server itself (describe's worker
    pid is the server's own, memoryUsage 0, and no TorchServe worker process started for it);
    kitten.jpg answers 200 with TorchServe's content type (TorchServe sends none with a
    prediction; oxserve's native handlers send application/json, a documented difference), the
    text laid out as TorchServe's (exactly json.dumps(answer, indent=2); its first lines as
    TorchServe's, numbers aside), a 224x224x2 list whose class equals TorchServe's for at least
    99.5 % of the pixels and, where it does, whose probability is within 3e-2 of TorchServe's
    (SEGMENT_PROBABILITY_ATOL: the resize leaves a few pixels one level off PIL's, and nothing
    averages the difference away); unregister as TorchServe's."""
    section = "image_segmenter"
    ex = ts.exchange("predict_segmenter_kitten", section)
    want = ex["body_json"]
    assert ex["status"] == 200 and ex["body_raw_is_json_dumps_indent_2"], ex["status"]
    with _registered_natively(ts_server, section, SEGMENTER) as diffs:
        r = ts.replay(ts_server, ex, data=JPG)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        have_type = r.headers.get("content-type")
        want_type = ex["headers"].get("content-type")
        if want_type is not None:
            if (have_type or "").split(";")[0].strip() != want_type:
                diffs.append(f"content-type {have_type!r}, TorchServe has {want_type!r}")
        elif have_type not in (None, "application/json"):
            diffs.append(f"content-type {have_type!r}, TorchServe sends none")
        have = r.json()
        diffs += _text_differences(r.text, have, ex["body_raw_head"])
        agreement, stats = segment_agreement(have, want)
        print(f"image_segmenter agreement with TorchServe: {stats}")
        diffs += [f"predict_segmenter_kitten: {d} ({stats})" for d in agreement]
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    assert_still_predicts(ts_server)


def test_image_segmenter_bad_image_is_a_bad_request(ts_server):
    """Bytes that are no image: as the native image_classifier's, 400 BadRequestException
    naming the problem (a documented difference: TorchServe answers 503 "Prediction failed",
    recorded as predict_segmenter_bad_image_bytes); kitten.jpg still answers after them."""
    ex = ts.exchange("predict_segmenter_bad_image_bytes", "image_segmenter")
    assert (ex["status"], ex["body_json"]["message"]) == (503, "Prediction failed")
    with _registered(ts_server, f"{SEGMENTER}.mar", SEGMENTER):
        _bad_images_are_bad_requests(ts_server, SEGMENTER)
        # A good image still answers (its agreement with TorchServe is the test above's).
        r = ts_server.predict(SEGMENTER)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        body = r.json()
        assert (len(body), len(body[0]), len(body[0][0])) == (224, 224, 2), r.text[:200]
    assert_still_predicts(ts_server)


BAD_IMAGES = (b"this is not an image", b"", b"\xff\xd8\xff\xe0" + b"\0" * 64)


def _bad_images_are_bad_requests(server: TorchServe, model: str) -> list[tuple[bytes, int, dict]]:
    """Each of BAD_IMAGES as a raw body, then one as the multipart part "data": a 400
    BadRequestException (naming the image for the raw ones). The raw ones' (body, status,
    error body)."""
    answers = []
    for body in BAD_IMAGES:
        r = server.predict(model, body)
        err = assert_torchserve_error(r, 400, "BadRequestException")
        assert "image" in err["message"], err
        answers.append((body, r.status_code, err))
    r = server.request("POST", "inference", f"/predictions/{model}",
                       files={"data": ("x.jpg", b"not an image", "image/jpeg")})
    assert_torchserve_error(r, 400, "BadRequestException")
    return answers


# ---------------------------------------------------------------------------------------------
# 11. object_detector natively
#
# detector_small.mar (handler object_detector, TorchServe's default): a torch.jit.script'ed
# detector taking [N, 3, H, W] at the image's own size and answering, as torchvision's detection
# models, a list with per image {"boxes": [6, 4], "labels": [6] int64, "scores": [6]}.
# TorchServe's ObjectDetector: ToTensor only (no resize, no normalization), the model, then per
# image [{label name (index_to_name.json): box, "score": score}] for the scores >= 0.5; its
# Python worker answers json.dumps(answer, indent=2). The reference's "object_detector" section
# keeps the answers whole (they are small). With no resize the model sees the same tensor as in
# TorchServe when the image decodes to the same pixels, so the text is expected to be
# TorchServe's exactly: for the PNGs (lossless; kitten.png holds kitten.jpg's pixels as PIL
# decodes them, and TorchServe answered it as kitten.jpg) and, given a JPEG decoder that
# decodes as PIL's libjpeg-turbo does, for kitten.jpg.

DETECTOR = "detector_small"
DETECTOR_SECTION = "object_detector"
# Used only to say which values differ (and by how much) when the text is not TorchServe's:
# the text itself must be equal.
DETECTOR_VALUE_RTOL = 1e-6


def _first_text_difference(have: str, want: str) -> str:
    """Where `have` first differs from TorchServe's `want`: the offset, and the characters
    around it in both."""
    i = next((k for k, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
    lo = max(0, i - 40)
    return (f"the text differs from TorchServe's at character {i} (lengths {len(have)}, "
            f"TorchServe {len(want)}): oxserve {have[lo:i + 40]!r}, TorchServe "
            f"{want[lo:i + 40]!r}")


def detection_differences(have, want, path: str = "$",
                          rtol: float = DETECTOR_VALUE_RTOL) -> list[str]:
    """An object_detector answer against TorchServe's, parsed: the same structure (lists of the
    same lengths, the same keys in the same order), floats within a relative `rtol`, every other
    value (labels, types) equal."""
    if isinstance(want, dict):
        if not isinstance(have, dict) or list(have) != list(want):
            return [f"{path}: keys {list(have) if isinstance(have, dict) else have!r}, "
                    f"TorchServe has {list(want)}"]
        out = []
        for key in want:
            out += detection_differences(have[key], want[key], f"{path}.{key}", rtol)
        return out
    if isinstance(want, list):
        if not isinstance(have, list) or len(have) != len(want):
            return [f"{path}: {have!r}, TorchServe has {len(want)} entries"]
        out = []
        for i, (h, w) in enumerate(zip(have, want)):
            out += detection_differences(h, w, f"{path}[{i}]", rtol)
        return out
    if isinstance(want, float) and type(have) is float:
        if not math.isclose(have, want, rel_tol=rtol, abs_tol=0.0):
            rel = abs(have - want) / abs(want) if want else math.inf
            return [f"{path}: {have!r}, TorchServe has {want!r} (relative {rel:.3g} > {rtol})"]
        return []
    if type(have) is not type(want) or have != want:
        return [f"{path}: {have!r}, TorchServe has {want!r}"]
    return []


def _content_type_differences(r: requests.Response, ex: dict) -> list[str]:
    """TorchServe sends no content type with a prediction; oxserve's native handlers send
    application/json (a documented difference)."""
    have = r.headers.get("content-type")
    want = ex["headers"].get("content-type")
    if want is not None:
        if (have or "").split(";")[0].strip() != want:
            return [f"{ex['name']}: content-type {have!r}, TorchServe has {want!r}"]
    elif have not in (None, "application/json"):
        return [f"{ex['name']}: content-type {have!r}, TorchServe sends none"]
    return []


def _detector_prediction_differences(r: requests.Response, ex: dict) -> list[str]:
    """A prediction against TorchServe's recorded one: status, content type, the parsed values
    (within DETECTOR_VALUE_RTOL, to say what differs), then the exact text."""
    name = ex["name"]
    if r.status_code != ex["status"]:
        return [f"{name}: status {r.status_code}, TorchServe has {ex['status']}: {r.text[:500]}"]
    out = _content_type_differences(r, ex)
    try:
        have = r.json()
    except ValueError:
        return out + [f"{name}: body is not JSON: {r.text[:300]!r}"]
    values = detection_differences(have, ex["body_json"])
    out += [f"{name}: {d}" for d in values]
    if r.text != ex["body_raw"]:
        agree = ("the values agree within a relative "
                 f"{DETECTOR_VALUE_RTOL}" if not values else f"{len(values)} values differ")
        out.append(f"{name}: {_first_text_difference(r.text, ex['body_raw'])} ({agree})")
    return out


def test_object_detector_runs_natively_as_torchserve(ts_server):
    """The reference's "object_detector" exchanges replayed on ts_server: the registration (1
    worker) and describe as TorchServe's; the model runs in the server itself (describe's worker
    pid is the server's own, memoryUsage 0, and no TorchServe worker process started for it);
    kitten.png (kitten.jpg's pixels as PIL decodes them) answers 200 with the very text
    TorchServe sent (its values are also compared within a relative 1e-6 first, to name what
    differs), as a raw body and as the multipart part "data" (TorchServe's handler reads "data"
    as it reads "body"); the all-black PNG answers TorchServe's "[]"; unregister as
    TorchServe's."""
    section = DETECTOR_SECTION
    kitten = ts.exchange("predict_detector_kitten", section)
    png = ts.exchange("predict_detector_kitten_png", section)
    black = ts.exchange("predict_detector_black_png", section)
    expected = json.loads((ts.fixtures_dir() / "fixtures.json").read_text())["expected"]
    # The recordings are what the generator computed with TorchServe's ObjectDetector in
    # Python; kitten.png answered as kitten.jpg, with detections on both sides of the threshold.
    assert kitten["status"] == 200 and kitten["body_raw"] == \
        expected[f"{DETECTOR}/kitten.jpg"]["answer_text"], kitten["body_raw"][:300]
    assert (png["status"], png["body_raw"]) == (200, kitten["body_raw"]), png["body_raw"][:300]
    scores = expected[f"{DETECTOR}/kitten.jpg"]["model"]["scores"]
    assert 0 < len(kitten["body_json"]) < len(scores), scores
    assert (black["status"], black["body_raw"]) == (200, "[]"), black
    png_bytes = (ts.fixtures_dir() / "kitten.png").read_bytes()
    workers_before = _python_workers(ts_server)
    with _registered_natively(ts_server, section, DETECTOR) as diffs:
        r = ts.replay(ts_server, png, data=png_bytes)
        diffs += _detector_prediction_differences(r, png)
        r = ts_server.request("POST", "inference", f"/predictions/{DETECTOR}",
                              files={"data": ("kitten.png", png_bytes, "image/png")})
        diffs += [f"multipart: {d}" for d in _detector_prediction_differences(r, png)]
        r = ts.replay(ts_server, black, data=(ts.fixtures_dir() / "black.png").read_bytes())
        diffs += _detector_prediction_differences(r, black)
        assert _python_workers(ts_server) <= workers_before, "a Python worker was started"
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)
    assert_still_predicts(ts_server)


def test_object_detector_jpeg_answer_is_torchserves_text(ts_server):
    """kitten.jpg, raw and as the multipart part "data": 200 with the very text TorchServe sent
    (the values compared within a relative 1e-6 first, to name what differs). This needs the
    JPEG decoded to the pixels PIL's libjpeg-turbo gives (kitten.png's, answered exactly by the
    test above): with no resize, every decoded pixel reaches the model as it is."""
    kitten = ts.exchange("predict_detector_kitten", DETECTOR_SECTION)
    r = ts_server.request("POST", "management", f"/models?url={DETECTOR}.mar&initial_workers=1"
                          "&synchronous=true")
    assert r.status_code == 200, r.text
    try:
        diffs = _detector_prediction_differences(ts.replay(ts_server, kitten, data=JPG), kitten)
        r = ts_server.request("POST", "inference", f"/predictions/{DETECTOR}",
                              files={"data": ("kitten.jpg", JPG, "image/jpeg")})
        diffs += [f"multipart: {d}" for d in _detector_prediction_differences(r, kitten)]
    finally:
        r = ts_server.request("DELETE", "management", f"/models/{DETECTOR}")
        assert r.status_code == 200, r.text
    assert not diffs, "oxserve differs from TorchServe:\n" + "\n".join(diffs)


def test_object_detector_bad_image_is_a_bad_request(ts_server):
    """Bytes that are no image: the native image_classifier's answer to the same bytes, a 400
    BadRequestException naming the problem (a documented difference: TorchServe answers 503
    "Prediction failed", recorded as predict_detector_bad_image_bytes); kitten.jpg still answers
    after them."""
    ex = ts.exchange("predict_detector_bad_image_bytes", DETECTOR_SECTION)
    assert (ex["status"], ex["body_json"]["message"]) == (503, "Prediction failed")
    with _registered(ts_server, f"{DETECTOR}.mar", DETECTOR):
        for body, status, err in _bad_images_are_bad_requests(ts_server, DETECTOR):
            classifier = ts_server.predict(MODEL, body)
            assert (status, err) == (classifier.status_code, classifier.json()), (
                f"object_detector answers {body[:8]!r} with {status} {err}, the "
                f"image_classifier with {classifier.status_code} {classifier.text}")
        # A good image still answers (its agreement with TorchServe is the test above's).
        r = ts_server.predict(DETECTOR)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        assert isinstance(r.json(), list) and r.json(), r.text[:300]
    assert_still_predicts(ts_server)
