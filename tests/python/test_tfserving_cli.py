"""oxserve invoked as `tensorflow_model_server` (a symlink named so, in a temporary directory):
TF Serving's command line (crates/oxserve/src/tfserving_cli.rs) and its configuration files
(crates/oxserve-tfserving/src/config.rs), against the real binary ($OXSERVE_BIN).

Every server here is started through the link with an explicit argv and environment (the
inherited MODEL_NAME / MODEL_BASE_PATH are removed first), on free ports picked here (TF
Serving's --port / --rest_api_port take explicit numbers), and checked through TF Serving's
REST API on --rest_api_port (and KServe v2 gRPC on --port). Fixture SavedModels and their
reference outputs come from scripts/make_tf_models.py (see _tf.py).

1. the official Docker image's command (`--model_name=${MODEL_NAME}
   --model_base_path=${MODEL_BASE_PATH}/${MODEL_NAME}`, expanded by a shell, the binary found
   on PATH), and the same environment with no model flags;
2. --model_config_file (a SavedModel and an ONNX model, version policies, version labels) and
   --model_config_file_poll_wait_seconds (models added and removed while serving);
3. --file_system_poll_wait_seconds (a version directory added, then removed);
4. --enable_batching with --batching_parameters_file (concurrent requests, max_batch_size);
5. --monitoring_config_file (Prometheus text on the REST port);
6. thread flags, --version, refused flags and start-up errors;
7. OXSERVE__BACKENDS__TENSORFLOW_LIBRARY in this mode (a missing library, a library directory).

The session-wide TLS / API-key switches of conftest.py do not apply to these servers (TF
Serving's command line has no flags for them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

import _tf
from _models import add_sub_inputs, ort_run
from _server import ROOT, ServerProcess, oxserve_bin

_SKIP = _tf.skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

MODELS = _tf.models_dir()
REFERENCES = _tf.references()
DEFAULT = _tf.DEFAULT_SIGNATURE
LINK_NAME = "tensorflow_model_server"
# How long a change on disk (a version directory, the model config file) may take to show
# with 1-second polls: oxserve loads a changed model directory once it stays unchanged for a
# scan, then loads the SavedModel.
CHANGE_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------
# Starting tensorflow_model_server


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def link(tmp_path_factory) -> Path:
    """A symlink named tensorflow_model_server to $OXSERVE_BIN."""
    path = tmp_path_factory.mktemp("tfs-bin") / LINK_NAME
    path.symlink_to(oxserve_bin())
    return path


def _local(addr: str) -> str:
    """A listening address (0.0.0.0:P: TF Serving listens on every interface) as one to dial."""
    host, _, port = addr.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


class TfServing(ServerProcess):
    """oxserve started through the tensorflow_model_server link with TF Serving's argv.

    `argv` follows the program name; `env` is added to the inherited environment, less
    MODEL_NAME and MODEL_BASE_PATH; `shell` instead runs that line with `sh -c`, the link's
    directory first on PATH (so the program is found by its bare name, as in the Docker
    image). The listening line, readiness, logs and the clean stop are ServerProcess's."""

    def __init__(self, name: str, link: Path, argv: list[str], env: dict[str, str] | None = None,
                 shell: str | None = None, ready_path: str = "/v2/health/ready"):
        super().__init__(f"tfs-{name}", [], None, ready_path, tls_args=[], api_key="")
        self.link = link
        self.argv = list(argv)
        self.env = dict(env or {})
        self.shell = shell

    def command(self, binary: str) -> list[str]:
        cmd = ["env", "-u", "MODEL_NAME", "-u", "MODEL_BASE_PATH"]
        cmd += [f"{k}={v}" for k, v in self.env.items()]
        if self.shell is not None:
            path = f"{self.link.parent}{os.pathsep}{os.environ.get('PATH', '')}"
            return cmd + [f"PATH={path}", "sh", "-c", self.shell, "sh"]
        return cmd + [str(self.link), *self.argv]

    @property
    def http_url(self) -> str:
        return f"http://{_local(self.http_addr)}"

    @property
    def grpc_host(self) -> str:
        return _local(self.grpc_addr)

    def check_ports(self, grpc_port: int, rest_port: int) -> None:
        assert self.grpc_addr.rsplit(":", 1)[1] == str(grpc_port), self.listening
        assert self.http_addr.rsplit(":", 1)[1] == str(rest_port), self.listening

    def get(self, path: str) -> requests.Response:
        return requests.get(self.http_url + path, timeout=60)

    def post(self, path: str, body) -> requests.Response:
        return requests.post(self.http_url + path, data=json.dumps(body),
                             headers={"content-type": "application/json"}, timeout=60)


@contextlib.contextmanager
def serving(name: str, link: Path, argv: list[str], env: dict[str, str] | None = None,
            shell: str | None = None, ready_path: str = "/v2/health/ready"):
    server = TfServing(name, link, argv, env, shell, ready_path).start()
    try:
        yield server
    finally:
        if server.alive():
            server.stop_and_check()
        else:
            server.fail(f"exited with code {server.proc.returncode} during the test")


def run_exits(link: Path, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs the link with `argv` expecting it to exit (not to serve)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAME", "MODEL_BASE_PATH")}
    full_env["ORT_DISABLE_TELEMETRY"] = "1"
    full_env.update(env or {})
    try:
        return subprocess.run([str(link), *argv], cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{LINK_NAME} {argv} (env {env}) did not exit within {EXIT_TIMEOUT_S:.0f} s; "
                    f"stdout {e.stdout!r}, stderr {e.stderr!r}", pytrace=False)


def wait_until(what: str, check, timeout: float = CHANGE_TIMEOUT_S, interval: float = 0.1):
    """Polls `check()` until it returns without an AssertionError (its value is returned);
    after `timeout` the last AssertionError is raised, naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, requests.RequestException) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s; last: {e}") from e
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# TF Serving's JSON


def ok(r: requests.Response) -> dict:
    assert r.status_code == 200, (r.status_code, r.text[:2000])
    body = json.loads(r.text)
    assert isinstance(body, dict), r.text[:2000]
    return body


def error(r: requests.Response, status: int | None = None) -> str:
    """A TF Serving error answer: `{"error": "..."}` with `status` (any 4xx/5xx when None)."""
    if status is None:
        assert r.status_code >= 400, (r.status_code, r.text[:2000])
    else:
        assert r.status_code == status, (r.status_code, r.text[:2000])
    body = json.loads(r.text)
    assert isinstance(body, dict) and set(body) == {"error"} and body["error"], r.text[:2000]
    return body["error"]


def status_entry(version: str) -> dict:
    return {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}


def model_status(server: TfServing, model: str) -> dict[str, dict]:
    """GET /v1/models/M as {version: entry}; 200 expected."""
    entries = ok(server.get(f"/v1/models/{model}"))["model_version_status"]
    return {e["version"]: e for e in entries}


def end_entry(version: str) -> dict:
    """A version unloaded in the ordinary way: TF Serving's ServableStateMonitor keeps it as
    END with an OK status (the status is an error only when the version failed)."""
    return {"version": version, "state": "END", "status": {"error_code": "OK", "error_message": ""}}


def assert_serving_only(server: TfServing, model: str, versions: list[str]) -> list[dict]:
    """`versions` are AVAILABLE (newest first, as TF Serving lists them); any other version
    listed is END. Returns the END entries (checked with `assert_ended_cleanly` at the end of
    the test, so the other checks run first)."""
    entries = ok(server.get(f"/v1/models/{model}"))["model_version_status"]
    available = [e["version"] for e in entries if e["state"] == "AVAILABLE"]
    assert available == sorted(versions, key=int, reverse=True), entries
    assert [e["version"] for e in entries] == sorted((e["version"] for e in entries), key=int, reverse=True), entries
    for e in entries:
        if e["version"] in versions:
            assert e == status_entry(e["version"]), entries
        else:
            assert e["state"] == "END", entries
    return [e for e in entries if e["version"] not in versions]


def assert_ended_cleanly(entries: list[dict]) -> None:
    """Versions unloaded in the ordinary way (a newer version, a removed directory or model)
    are END with an OK status, as in TF Serving."""
    assert entries, "no END entry was seen"
    for e in entries:
        assert e == end_entry(e["version"]), entries


def not_found(r: requests.Response, request: str) -> None:
    """TF Serving's answer for a model or version that is not loaded (never loaded, or
    unloaded): NOT_FOUND (404) "Servable not found for request: <request>"."""
    message = error(r, 404)
    assert f"Servable not found for request: {request}" in message, message


def _tensor_info(t: dict) -> dict:
    if t["shape"] is None:
        shape = {"dim": [], "unknown_rank": True}
    else:
        shape = {"dim": [{"size": str(d), "name": ""} for d in t["shape"]], "unknown_rank": False}
    return {"dtype": t["dtype"], "tensor_shape": shape, "name": t["name"]}


def expected_metadata(model: str, version: str, served_as: str | None = None) -> dict:
    return {
        "model_spec": {"name": served_as or model, "signature_name": "", "version": version},
        "metadata": {"signature_def": {"signature_def": {
            name: {
                "inputs": {k: _tensor_info(t) for k, t in sig["inputs"].items()},
                "outputs": {k: _tensor_info(t) for k, t in sig["outputs"].items()},
                "method_name": sig["method_name"],
                "defaults": {},
            }
            for name, sig in _tf.served_signatures(model, version).items()
        }}},
    }


def nest(flat: list, shape: list[int]):
    if len(shape) == 1:
        return list(flat)
    step = math.prod(shape[1:])
    return [nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def two_sig_rows(version: str, picks: list[int]) -> tuple[list, dict[str, np.ndarray]]:
    """two_sig's serving_default with the reference rows `picks` (repeats allowed; the model
    works row by row): the JSON rows and the expected outputs."""
    ref = REFERENCES["two_sig"][version][DEFAULT]
    x = nest(ref["inputs"]["x"]["data"], ref["inputs"]["x"]["shape"])
    want = {k: _tf.to_numpy(t)[picks] for k, t in ref["outputs"].items()}
    return [x[i] for i in picks], want


def check_two_sig(server: TfServing, path: str, version: str, picks: list[int] | None = None,
                  fmt: str = "row") -> None:
    """POST two_sig rows to `path`:predict and compare with `version`'s references."""
    picks = picks if picks is not None else [0, 1, 2]
    rows, want = two_sig_rows(version, picks)
    body = {"instances": rows} if fmt == "row" else {"inputs": {"x": rows}}
    reply = ok(server.post(path + ":predict", body))
    if fmt == "row":
        assert set(reply) == {"predictions"}, reply
        got = {k: np.array([p[k] for p in reply["predictions"]], np.float32) for k in want}
    else:
        assert set(reply) == {"outputs"}, reply
        got = {k: np.array(reply["outputs"][k], np.float32) for k in want}
    for k, w in want.items():
        _tf.assert_matches(f"{path} v{version} {k}", got[k], w)


def check_two_sig_double(server: TfServing, path: str, rows: list[list[int]]) -> None:
    reply = ok(server.post(path + ":predict", {"signature_name": "double", "instances": rows}))
    assert reply == {"predictions": [[2 * v for v in row] for row in rows]}, reply


def versions_differ() -> None:
    """two_sig's two versions answer differently (so a reply tells which one served)."""
    a = _tf.to_numpy(REFERENCES["two_sig"]["1"][DEFAULT]["outputs"]["y"])
    b = _tf.to_numpy(REFERENCES["two_sig"]["2"][DEFAULT]["outputs"]["y"])
    assert not np.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# 1. The Docker image's command


DOCKER_ENTRYPOINT = ('exec tensorflow_model_server --port={grpc} --rest_api_port={rest} '
                     '--model_name=${{MODEL_NAME}} --model_base_path=${{MODEL_BASE_PATH}}/${{MODEL_NAME}} "$@"')


@pytest.mark.parametrize("form", ["entrypoint", "env_only"])
def test_docker_recipe(link, form):
    """MODEL_NAME=two_sig MODEL_BASE_PATH=<fixtures>: the image's entrypoint line (through a
    shell, the program found on PATH by its bare name), or the environment alone. The latest
    version (2) serves; unbatched, so more than 4 rows answer."""
    versions_differ()
    grpc_port, rest_port = free_ports(2)
    env = {"MODEL_NAME": "two_sig", "MODEL_BASE_PATH": str(MODELS)}
    if form == "entrypoint":
        kwargs = {"shell": DOCKER_ENTRYPOINT.format(grpc=grpc_port, rest=rest_port), "argv": []}
    else:
        kwargs = {"argv": [f"--port={grpc_port}", f"--rest_api_port={rest_port}"]}
    with serving(f"docker-{form}", link, env=env, **kwargs) as server:
        server.check_ports(grpc_port, rest_port)
        assert ok(server.get("/v1/models/two_sig")) == {"model_version_status": [status_entry("2")]}
        assert ok(server.get("/v1/models/two_sig/versions/2")) == {"model_version_status": [status_entry("2")]}
        assert ok(server.get("/v1/models/two_sig/metadata")) == expected_metadata("two_sig", "2")
        # 9 and 6 rows (more than oxserve's auto-completed 4): no batch limit without batching.
        check_two_sig(server, "/v1/models/two_sig", "2", [0, 1, 2] * 3, "row")
        check_two_sig(server, "/v1/models/two_sig/versions/2", "2", [2, 1, 0, 0, 1, 2], "columnar")
        check_two_sig_double(server, "/v1/models/two_sig", [[i, -i] for i in range(7)])
        # Version 1 is on disk but not served (the default policy: the latest version).
        error(server.post("/v1/models/two_sig/versions/1:predict", {"instances": [[1.0] * 4]}), 404)
        # KServe v2 on the gRPC port (--port).
        import tritonclient.grpc as grpcclient
        client = grpcclient.InferenceServerClient(server.grpc_host)
        try:
            assert client.is_server_live()
            assert client.is_model_ready("two_sig")
            assert not client.is_model_ready("two_sig", "1")
        finally:
            client.close()


# ---------------------------------------------------------------------------------------------
# 2. --model_config_file


def _config_entry(name: str, base_path: Path, platform: str | None = "tensorflow", policy: str = "",
                  labels: dict[str, int] | None = None) -> str:
    lines = [f'    name: "{name}"', f'    base_path: "{base_path}"']
    if platform is not None:
        lines.append(f'    model_platform: "{platform}"')
    if policy:
        lines.append(f"    model_version_policy {{ {policy} }}")
    for label, version in (labels or {}).items():
        lines.append(f'    version_labels {{ key: "{label}" value: {version} }}')
    return "  config {\n" + "\n".join(lines) + "\n  }\n"


def write_config(path: Path, entries: list[str]) -> None:
    """Writes the ModelServerConfig whole (a temporary file renamed over the old one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("model_config_list {\n" + "".join(entries) + "}\n")
    tmp.replace(path)


def check_add_sub(server: TfServing, path: str, batch: int, seed: int) -> None:
    feeds = add_sub_inputs(batch, seed=seed)
    reply = ok(server.post(path + ":predict", {"inputs": {k: v.tolist() for k, v in feeds.items()}}))
    assert set(reply) == {"outputs"}, reply
    for name, want in ort_run("add_sub", feeds).items():
        _tf.assert_matches(name, np.array(reply["outputs"][name], np.float32), want)


def test_model_config_file_and_its_polling(link, tmp_path):
    """Two models from a ModelServerConfig: a SavedModel with `all {}` and labels, and an ONNX
    model (its platform detected) with `specific { versions: 1 }`. Then, with
    --model_config_file_poll_wait_seconds=1, the file is rewritten: the ONNX model removed and
    a third model (the SavedModel with `specific { versions: 1 }`) added."""
    versions_differ()
    add_sub = tmp_path / "add_sub"
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", add_sub)
    config = tmp_path / "models.config"
    tf_entry = _config_entry("tf", MODELS / "two_sig", policy="all {}",
                             labels={"stable": 1, "canary": 2})
    onnx_entry = _config_entry("onnx", add_sub, platform=None, policy="specific { versions: 1 }")
    write_config(config, [tf_entry, onnx_entry])
    grpc_port, rest_port = free_ports(2)
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", f"--model_config_file={config}",
            "--model_config_file_poll_wait_seconds=1"]
    with serving("config-file", link, argv) as server:
        server.check_ports(grpc_port, rest_port)
        assert ok(server.get("/v1/models/tf")) == {"model_version_status": [status_entry("2"), status_entry("1")]}
        assert ok(server.get("/v1/models/onnx")) == {"model_version_status": [status_entry("1")]}
        # Versions and labels of the SavedModel.
        check_two_sig(server, "/v1/models/tf", "2", [0, 1, 2, 0, 1])
        check_two_sig(server, "/v1/models/tf/versions/1", "1", [2, 1, 0, 1, 2])
        check_two_sig(server, "/v1/models/tf/labels/stable", "1", [0, 1, 2], "columnar")
        check_two_sig(server, "/v1/models/tf/labels/canary", "2", [0, 1, 2], "columnar")
        assert ok(server.get("/v1/models/tf/labels/stable/metadata")) == expected_metadata("two_sig", "1", "tf")
        assert ok(server.get("/v1/models/tf/versions/2/metadata")) == expected_metadata("two_sig", "2", "tf")
        error(server.post("/v1/models/tf/labels/nope:predict", {"instances": [[1.0] * 4]}), 400)
        # The ONNX model, with 5 rows (unbatched as TF Serving: no limit below its config's 8).
        check_add_sub(server, "/v1/models/onnx", 5, seed=7)
        check_add_sub(server, "/v1/models/onnx/versions/1", 2, seed=8)

        # Rewritten: onnx removed, tf_v1 added (only version 1 of the SavedModel).
        tf_v1_entry = _config_entry("tf_v1", MODELS / "two_sig", policy="specific { versions: 1 }")
        write_config(config, [tf_entry, tf_v1_entry])

        def added():
            assert ok(server.get("/v1/models/tf_v1")) == {"model_version_status": [status_entry("1")]}
        wait_until("tf_v1 AVAILABLE after it was added to the config file", added)

        ended: list[dict] = []

        def removed():
            r = server.get("/v1/models/onnx")
            if r.status_code != 404:  # TF Serving keeps the unloaded versions' states (END)
                entries = ok(r)["model_version_status"]
                assert [(e["version"], e["state"]) for e in entries] == [("1", "END")], r.text
                ended.extend(entries)
            r = server.post("/v1/models/onnx:predict", {"inputs": {"INPUT0": [[0.0] * 16], "INPUT1": [[0.0] * 16]}})
            error(r)  # exactly which error: at the end of the test
        wait_until("onnx gone after it was removed from the config file", removed)

        check_two_sig(server, "/v1/models/tf_v1", "1", [0, 1, 2, 2, 1, 0])
        error(server.post("/v1/models/tf_v1/versions/2:predict", {"instances": [[1.0] * 4]}), 404)
        # The model left in the file kept serving, labels included.
        check_two_sig(server, "/v1/models/tf/labels/canary", "2")
        check_two_sig(server, "/v1/models/tf/labels/stable", "1")

        # Back again: onnx re-added, tf_v1 removed.
        write_config(config, [tf_entry, onnx_entry])

        def onnx_back():
            assert ok(server.get("/v1/models/onnx")) == {"model_version_status": [status_entry("1")]}
            check_add_sub(server, "/v1/models/onnx", 3, seed=9)
        wait_until("onnx AVAILABLE after it was listed again", onnx_back)
        def tf_v1_removed():
            r = server.get("/v1/models/tf_v1")
            if r.status_code != 404:
                entries = ok(r)["model_version_status"]
                assert [(e["version"], e["state"]) for e in entries] == [("1", "END")], r.text
                ended.extend(entries)
            error(server.post("/v1/models/tf_v1:predict", {"instances": [[1.0] * 4]}))
        wait_until("tf_v1 gone after it was removed from the config file", tf_v1_removed)
        check_two_sig(server, "/v1/models/tf", "2")
        # A model removed from the config is not found, as one never listed.
        not_found(server.post("/v1/models/tf_v1:predict", {"instances": [[1.0] * 4]}), "Latest(tf_v1)")
        not_found(server.post("/v1/models/tf_v1/versions/1:predict", {"instances": [[1.0] * 4]}),
                  "Specific(tf_v1, 1)")
        not_found(server.get("/v1/models/tf_v1/metadata"), "Latest(tf_v1)")
        if ended:  # TF Serving: the removed model's versions END with an OK status
            assert_ended_cleanly(ended)


# ---------------------------------------------------------------------------------------------
# 3. --file_system_poll_wait_seconds


def test_file_system_poll_new_and_removed_version(link, tmp_path):
    """A base path with two_sig's version 1; version 2 copied in (complete under a temporary
    name, then renamed) is picked up and serves; removed, version 1 serves again."""
    versions_differ()
    base = tmp_path / "models" / "two_sig"
    base.mkdir(parents=True)
    shutil.copytree(MODELS / "two_sig" / "1", base / "1")
    grpc_port, rest_port = free_ports(2)
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--model_name=two_sig",
            f"--model_base_path={base}", "--file_system_poll_wait_seconds=1"]
    with serving("fs-poll", link, argv) as server:
        assert ok(server.get("/v1/models/two_sig")) == {"model_version_status": [status_entry("1")]}
        check_two_sig(server, "/v1/models/two_sig", "1")

        staging = base / ".incoming-2"
        shutil.copytree(MODELS / "two_sig" / "2", staging)
        staging.rename(base / "2")

        def new_version():
            ended = assert_serving_only(server, "two_sig", ["2"])
            check_two_sig(server, "/v1/models/two_sig", "2")
            return ended
        ended = wait_until("version 2 serving after it was copied in", new_version)
        check_two_sig(server, "/v1/models/two_sig/versions/2", "2", [1, 1, 2])
        assert ok(server.get("/v1/models/two_sig/metadata")) == expected_metadata("two_sig", "2")

        shutil.rmtree(base / "2")

        def old_version():
            ended = assert_serving_only(server, "two_sig", ["1"])
            check_two_sig(server, "/v1/models/two_sig", "1")
            return ended
        ended += wait_until("version 1 serving again after version 2 was removed", old_version)
        # The removed version is not found, as one never on disk.
        not_found(server.post("/v1/models/two_sig/versions/2:predict", {"instances": [[1.0] * 4]}),
                  "Specific(two_sig, 2)")
        not_found(server.get("/v1/models/two_sig/versions/2/metadata"), "Specific(two_sig, 2)")
        # Version 1 ended when 2 came, then 2 when it was removed: TF Serving lists both END,
        # status OK.
        assert_ended_cleanly(ended)


# ---------------------------------------------------------------------------------------------
# 4. --enable_batching with --batching_parameters_file


BATCHING = "max_batch_size { value: 8 } batch_timeout_micros { value: 1000 } num_batch_threads { value: 2 }\n"


def test_batching_parameters(link, tmp_path):
    params = tmp_path / "batching.config"
    params.write_text(BATCHING)
    grpc_port, rest_port = free_ports(2)
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--model_name=two_sig",
            f"--model_base_path={MODELS / 'two_sig'}", "--enable_batching",
            f"--batching_parameters_file={params}"]
    with serving("batching", link, argv) as server:
        rng = np.random.default_rng(11)
        jobs = []
        for i in range(24):
            n = int(rng.integers(1, 5))
            jobs.append(("default", [int(p) for p in rng.integers(0, 3, n)]) if i % 3
                        else ("double", [[int(v) for v in rng.integers(-1000, 1000, 2)] for _ in range(n)]))

        def run(job):
            kind, arg = job
            if kind == "default":
                check_two_sig(server, "/v1/models/two_sig", "2", arg, "row" if len(arg) % 2 else "columnar")
            else:
                check_two_sig_double(server, "/v1/models/two_sig", arg)

        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            for future in [pool.submit(run, job) for job in jobs]:
                future.result()

        # max_batch_size 8: 8 rows answer, 9 are refused (TF Serving: "Task size 9 is larger
        # than maximum input batch size 8", INVALID_ARGUMENT).
        check_two_sig(server, "/v1/models/two_sig", "2", [0, 1, 2, 0, 1, 2, 0, 1], "row")
        check_two_sig(server, "/v1/models/two_sig", "2", [2, 2, 2, 1, 1, 1, 0, 0], "columnar")
        rows, _ = two_sig_rows("2", [0, 1, 2] * 3)
        error(server.post("/v1/models/two_sig:predict", {"instances": rows}), 400)
        error(server.post("/v1/models/two_sig:predict", {"inputs": {"x": rows}}), 400)
        check_two_sig(server, "/v1/models/two_sig", "2")


# ---------------------------------------------------------------------------------------------
# 5. --monitoring_config_file


MONITORING = 'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n'


def test_monitoring_config_prometheus(link, tmp_path):
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text(MONITORING)
    grpc_port, rest_port = free_ports(2)
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--model_name=two_sig",
            f"--model_base_path={MODELS / 'two_sig'}", f"--monitoring_config_file={monitoring}"]
    with serving("monitoring", link, argv) as server:
        check_two_sig(server, "/v1/models/two_sig", "2")
        check_two_sig(server, "/v1/models/two_sig", "2", [1])
        r = server.get("/monitoring/prometheus/metrics")
        assert r.status_code == 200, (r.status_code, r.text[:2000])
        assert r.headers.get("content-type", "").startswith("text/plain"), r.headers
        text = r.text
        assert "# TYPE oxserve_inference_request_success" in text, text[:3000]
        counts = [line for line in text.splitlines()
                  if line.startswith("oxserve_inference_request_success_total{")
                  and 'model="two_sig"' in line and 'version="2"' in line]
        assert counts and float(counts[0].rsplit(" ", 1)[1]) >= 2, (counts, text[:3000])
        assert "oxserve_inference_count_total{" in text, text[:3000]


# ---------------------------------------------------------------------------------------------
# 6. Other flags, refused flags, start-up errors


def test_thread_flags_accepted(link):
    grpc_port, rest_port = free_ports(2)
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--model_name=two_sig",
            f"--model_base_path={MODELS / 'two_sig'}", "--tensorflow_intra_op_parallelism=1",
            "--tensorflow_inter_op_parallelism=1", "--rest_api_num_threads=2"]
    with serving("threads", link, argv) as server:
        server.check_ports(grpc_port, rest_port)
        assert ok(server.get("/v1/models/two_sig")) == {"model_version_status": [status_entry("2")]}
        check_two_sig(server, "/v1/models/two_sig", "2", [0, 1, 2, 2, 1])
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            for future in [pool.submit(check_two_sig, server, "/v1/models/two_sig", "2", [i % 3])
                           for i in range(12)]:
                future.result()


def test_tf_serving_test_harness_flags(link):
    """The flags TF Serving's own integration tests start every server with
    (model_servers/test_util/tensorflow_model_server_test_base.py): --rest_api_timeout_in_ms and
    --grpc_socket_path. Every gRPC service also answers on the Unix socket, a stale socket file
    left by an earlier run is replaced, and the TCP port keeps serving."""
    grpc_port, rest_port = free_ports(2)
    # Under /tmp: a Unix socket's path must stay under 108 bytes, pytest's tmp_path may not.
    sock_dir = Path(tempfile.mkdtemp(prefix="oxs-uds-", dir="/tmp"))
    sock = sock_dir / "tf-serving.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--rest_api_timeout_in_ms=5000",
            f"--grpc_socket_path={sock}", "--model_name=two_sig", f"--model_base_path={MODELS / 'two_sig'}"]
    try:
        with serving("harness", link, argv) as server:
            check_two_sig(server, "/v1/models/two_sig", "2")
            # C-core gRPC clients send the socket's path as :authority by default, which the
            # HTTP/2 library refuses (docs/tfserving.md); "localhost" is what grpc-go sends.
            for url, args in ((f"unix:{sock}", [("grpc.default_authority", "localhost")]),
                              (server.grpc_host, None)):
                client = grpcclient.InferenceServerClient(url=url, channel_args=args)
                try:
                    assert client.is_server_live(), url
                    assert client.is_model_ready("two_sig"), url
                    rows, want = two_sig_rows("2", [0, 2, 1])
                    x = grpcclient.InferInput("x", [len(rows), len(rows[0])], "FP32")
                    x.set_data_from_numpy(np.array(rows, np.float32))
                    result = client.infer("two_sig", [x])
                    for k, w in want.items():
                        _tf.assert_matches(f"{url} {k}", result.as_numpy(k), w)
                finally:
                    client.close()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_rest_api_timeout(link, tmp_path):
    """A REST predict not answered within --rest_api_timeout_in_ms is DEADLINE_EXCEEDED (504,
    TF Serving's error shape) well before its 3-second batch delay would have run it; the server
    goes on serving."""
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 3000000 }\n")
    grpc_port, rest_port = free_ports(2)
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--rest_api_timeout_in_ms=300",
            "--model_name=two_sig", f"--model_base_path={MODELS / 'two_sig'}",
            f"--batching_parameters_file={params}"]
    with serving("rest-timeout", link, argv) as server:
        rows, _ = two_sig_rows("2", [1])
        began = time.monotonic()
        message = error(server.post("/v1/models/two_sig:predict", {"instances": rows}), 504)
        assert time.monotonic() - began < 2.5, "answered only after the batch delay"
        assert "deadline" in message.lower() and "300 ms" in message, message
        assert ok(server.get("/v1/models/two_sig")) == {"model_version_status": [status_entry("2")]}


def test_version_flag(link):
    done = run_exits(link, ["--version"])
    assert done.returncode == 0, done
    assert "TensorFlow ModelServer" in done.stdout, done


@pytest.mark.parametrize("flag", ["--enable_model_warmup=true", "--bogus=1"])
def test_unknown_flag_refused(link, flag):
    argv = ["--port=1", "--rest_api_port=2", "--model_name=two_sig",
            f"--model_base_path={MODELS / 'two_sig'}", flag]
    done = run_exits(link, argv)
    assert done.returncode != 0, done
    assert flag.split("=")[0] in done.stderr, done
    assert '"event"' not in done.stdout, done


def test_missing_base_path(link, tmp_path):
    missing = tmp_path / "nowhere" / "two_sig"
    done = run_exits(link, ["--port=0", "--model_name=two_sig", f"--model_base_path={missing}"])
    assert done.returncode != 0, done
    assert str(missing) in done.stderr, done
    assert '"event"' not in done.stdout, done
    # Through the Docker image's environment too.
    done = run_exits(link, ["--port=0"], {"MODEL_NAME": "two_sig", "MODEL_BASE_PATH": str(tmp_path / "nowhere")})
    assert done.returncode != 0, done
    assert str(missing) in done.stderr, done


def test_no_base_path_nor_config_file(link):
    done = run_exits(link, ["--port=0", "--model_name=two_sig"])
    assert done.returncode != 0, done
    assert "model_base_path" in done.stderr, done
    assert '"event"' not in done.stdout, done


def test_config_file_with_base_path_refused(link, tmp_path):
    config = tmp_path / "models.config"
    write_config(config, [_config_entry("tf", MODELS / "two_sig")])
    done = run_exits(link, ["--port=0", f"--model_config_file={config}",
                            f"--model_base_path={MODELS / 'two_sig'}"])
    assert done.returncode != 0, done
    assert "model_config_file" in done.stderr and "model_base_path" in done.stderr, done
    assert '"event"' not in done.stdout, done


# ---------------------------------------------------------------------------------------------
# 7. OXSERVE__BACKENDS__TENSORFLOW_LIBRARY in this mode


def test_tensorflow_library_missing(link):
    """A library that is not there: the SavedModel fails to load (END, with the reason), the
    server keeps running and answers."""
    grpc_port, rest_port = free_ports(2)
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--model_name=two_sig",
            f"--model_base_path={MODELS / 'two_sig'}"]
    env = {_tf.LIBRARY_ENV: "/nonexistent/libtensorflow_cc.so.2"}
    with serving("no-library", link, argv, env, ready_path="/v2/health/live") as server:
        def settled():
            entries = ok(server.get("/v1/models/two_sig"))["model_version_status"]
            assert entries and all(e["state"] not in ("START", "LOADING") for e in entries), entries
            return entries
        entries = wait_until("two_sig's load settled", settled)
        assert len(entries) == 1, entries
        (entry,) = entries
        assert entry["state"] == "END", entry
        assert entry["status"]["error_code"] != "OK", entry
        message = entry["status"]["error_message"]
        assert "libtensorflow_cc.so.2" in message or "/nonexistent" in message, entry
        error(server.post("/v1/models/two_sig:predict", {"instances": [[1.0] * 4]}))
        assert server.get("/v2/health/live").status_code == 200
        assert server.alive()
        # TF Serving reports the version it failed to load (ServableId {two_sig, 2}).
        assert entry["version"] == "2", entry
        r = server.get("/v1/models/two_sig/versions/2")
        assert ok(r)["model_version_status"] == [entry], r.text


def test_tensorflow_library_directory(link):
    library = _tf.tensorflow_library()
    assert library is not None
    grpc_port, rest_port = free_ports(2)
    argv = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--model_name=two_sig",
            f"--model_base_path={MODELS / 'two_sig'}"]
    env = {_tf.LIBRARY_ENV: str(library.parent)}
    with serving("library-dir", link, argv, env) as server:
        assert ok(server.get("/v1/models/two_sig")) == {"model_version_status": [status_entry("2")]}
        check_two_sig(server, "/v1/models/two_sig", "2", [0, 1, 2, 1, 0])
