"""The TorchServe fixtures (scripts/make_torchserve_fixtures.py), TorchServe's recorded answers,
and oxserve started as `torchserve`, for test_torchserve.py.

Where the fixtures come from, first match wins:

1. `OXSERVE_TORCHSERVE_FIXTURES`: a directory the generator made before (model-store/ with the
   .mar archives, kitten.jpg, kitten.png, black.png, fixtures.json,
   torchserve_reference.json);
2. the generator itself, run with the Python of the TorchServe venv
   (`$OXSERVE_CACHE/venv-torchserve/bin/python scripts/make_torchserve_fixtures.py
   --if-needed`, OXSERVE_CACHE defaulting to ~/.cache/oxserve, from scripts/setup-torchserve.sh);
   it prints the directory as its last stdout line.

`skip_reason()` says why the tests cannot run here (neither of the two), or "". A generator
that exists but fails, or a directory that is not a fixture directory, fails instead (never a
silent skip). `engine_skip_reason()` says whether the server binary lacks the PyTorch engine
(cargo feature `torch`): the archives' model.pt is TorchScript, so without the engine nothing
here can serve. It asks the binary itself (`oxserve models --json` on a one-model repository
holding densenet_small.mar's model.pt), and only the binary's own words for that ("built
without the PyTorch engine") skip; any other failure to load fails.

torchserve_reference.json (see the generator's docstring) holds every request TorchServe 0.12
was sent and its answer: {"exchanges": [EXCHANGE], "startup_with_model": {"exchanges": ...},
"token_auth_default": {"exchanges": ...}, ...}, EXCHANGE = {"name", "method", "url"
(":port/path?query"), "request", "status", "body_json" | "body_text", ...}.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import requests

import _fixtures
from _server import ServerProcess, oxserve_bin

FIXTURES_ENV = "OXSERVE_TORCHSERVE_FIXTURES"
# What a server built without the `torch` feature says of a TorchScript model.
NOT_BUILT_IN = "built without the PyTorch engine"
LINK_NAME = "torchserve"
# TorchServe's reference ports (18080 inference, 18081 management, 18082 metrics): the
# exchanges' urls start with them.
REFERENCE_PORTS = {"18080": "inference", "18081": "management", "18082": "metrics"}
# Values that differ from run to run (compared by JSON type only): worker pids, start times,
# memory, and worker ids (inside "workers").
VOLATILE_KEYS = {"pid", "startTime", "memoryUsage"}
VOLATILE_WORKER_KEYS = {"id"}
# oxserve's image resize differs slightly from PIL's (docs/torchserve.md).
PROBABILITY_ATOL = 1e-4
TIMEOUT_S = 60.0


def venv_python() -> Path:
    return _fixtures.venv_python("venv-torchserve")


def skip_reason() -> str:
    """Why the TorchServe fixtures cannot be had on this machine, or "" when they can."""
    if not os.environ.get(FIXTURES_ENV) and not venv_python().is_file():
        return (f"no TorchServe venv ({venv_python()}) to generate the TorchServe fixtures; run "
                f"scripts/setup-torchserve.sh, or set {FIXTURES_ENV} to a directory made by "
                "scripts/make_torchserve_fixtures.py")
    return ""


@functools.lru_cache(maxsize=None)
def fixtures_dir() -> Path:
    """The fixture directory (see the module docstring); fails the caller when it cannot be had."""
    java_hint = (" (torchserve_reference.json needs Java 17 when the generator runs: it was run "
                 "with --no-server or without java)")
    return _fixtures.generated(
        FIXTURES_ENV, "venv-torchserve", "scripts/make_torchserve_fixtures.py",
        ["model-store/densenet_small.mar", "model-store/linear_base.mar",
         "model-store/segmenter_small.mar", "model-store/detector_small.mar", "kitten.jpg",
         "kitten.png", "black.png", "fixtures.json", "torchserve_reference.json"],
        timeout=900, hints={"torchserve_reference.json": java_hint})


def model_store() -> Path:
    return fixtures_dir() / "model-store"


def kitten() -> bytes:
    return (fixtures_dir() / "kitten.jpg").read_bytes()


@functools.lru_cache(maxsize=None)
def reference() -> dict:
    return json.loads((fixtures_dir() / "torchserve_reference.json").read_text())


def exchange(name: str, section: str | None = None) -> dict:
    """The recorded exchange `name` (of `section`'s exchanges, e.g. "token_auth_default")."""
    exchanges = reference()[section]["exchanges"] if section else reference()["exchanges"]
    for ex in exchanges:
        if ex["name"] == name:
            return ex
    raise KeyError(f"no exchange {name!r} in torchserve_reference.json"
                   + (f" ({section})" if section else ""))


@functools.lru_cache(maxsize=None)
def engine_skip_reason() -> str:
    """"" when the binary serves TorchScript; the reason to skip when it was built without the
    PyTorch engine; fails on any other load failure."""
    binary = oxserve_bin()
    with tempfile.TemporaryDirectory(prefix="oxserve-ts-probe-") as tmp:
        version = Path(tmp) / "probe" / "1"
        version.mkdir(parents=True)
        with zipfile.ZipFile(model_store() / "densenet_small.mar") as mar:
            (version / "model.pt").write_bytes(mar.read("model.pt"))
        (version.parent / "config.pbtxt").write_text(
            'name: "probe"\nplatform: "pytorch_libtorch"\nmax_batch_size: 1\n'
            'input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 3, 224, 224 ] } ]\n'
            'output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 10 ] } ]\n')
        done = subprocess.run([binary, "models", "--json", tmp], capture_output=True, text=True,
                              timeout=120, cwd=tmp)
    text = done.stdout + done.stderr
    try:
        entries = json.loads(done.stdout)
        state = entries[0]["state"]
        reason = entries[0].get("reason", "")
    except (ValueError, LookupError, TypeError):
        pytest.fail(f"`oxserve models --json` gave no model list (exit {done.returncode}):\n"
                    f"{text[-3000:]}", pytrace=False)
    if state == "READY":
        return ""
    if NOT_BUILT_IN in reason:
        return (f"the server binary has no PyTorch engine ({reason}); build with "
                "`--features oxserve/torch` (scripts/setup-torch.sh)")
    pytest.fail(f"densenet_small.mar's model.pt does not load in {binary}: {state} {reason}",
                pytrace=False)


# ---------------------------------------------------------------------------------------------
# oxserve as torchserve


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_link(directory: Path) -> Path:
    """A symlink named torchserve to $OXSERVE_BIN in `directory`."""
    link = directory / LINK_NAME
    if not link.exists():
        link.symlink_to(oxserve_bin())
    return link


class Workspace:
    """A working directory for one torchserve: config.properties on free ports, a private
    TMPDIR (the pid file of --start, the server's unpack directory), the link."""

    def __init__(self, root: Path, properties: dict[str, str] | None = None):
        self.root = root
        self.cwd = root / "cwd"
        self.tmp = root / "tmp"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.link = make_link(root)
        inference, management, metrics, grpc, grpc_management = free_ports(5)
        self.ports = {"inference": inference, "management": management, "metrics": metrics,
                      "grpc": grpc, "grpc_management": grpc_management}
        props = {
            "inference_address": f"http://127.0.0.1:{inference}",
            "management_address": f"http://127.0.0.1:{management}",
            "metrics_address": f"http://127.0.0.1:{metrics}",
            # TorchServe's gRPC ports are 7070/7071; a fixed port would collide between tests
            # and with other servers on the machine.
            "grpc_inference_port": str(grpc),
            "grpc_management_port": str(grpc_management),
            **(properties or {}),
        }
        self.config = self.cwd / "config.properties"
        self.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def env(self) -> dict[str, str]:
        return {**os.environ, "TMPDIR": str(self.tmp), "ORT_DISABLE_TELEMETRY": "1"}

    def argv(self, store: Path, *flags: str) -> list[str]:
        return [str(self.link), "--start", "--model-store", str(store), "--ts-config",
                str(self.config), "--ncs", *flags]

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"


class TorchServe(ServerProcess):
    """oxserve started through the torchserve link with `--start --foreground`, in a
    Workspace (cwd and TMPDIR). The listening line (which also names "management"), the
    readiness poll (/ping, which needs no key in oxserve), logs and the clean stop are
    ServerProcess's. The session-wide TLS / API-key switches of conftest.py do not apply
    (TorchServe's command line has no flags for them)."""

    def __init__(self, name: str, workspace: Workspace, store: Path, *flags: str):
        super().__init__(f"ts-{name}", [], None, "/ping", tls_args=[], api_key="")
        self.workspace = workspace
        self.store = store
        self.flags = list(flags)

    def command(self, binary: str) -> list[str]:
        ws = self.workspace
        # `env -C` runs the link in the workspace (key_file.json and logs land there) with
        # the workspace's TMPDIR.
        # Custom handlers run in TorchServe's Python worker with the `python` on PATH (as
        # TorchServe's): the TorchServe venv's first, as an activated venv would have it.
        path = f"{venv_python().parent}:{os.environ.get('PATH', '')}"
        return ["env", "-C", str(ws.cwd), f"TMPDIR={ws.tmp}", f"PATH={path}",
                *ws.argv(self.store, "--foreground", *self.flags)]

    def start(self) -> "TorchServe":
        super().start()
        ws = self.workspace
        want = {"http": ws.ports["inference"], "management": ws.ports["management"],
                "metrics": ws.ports["metrics"], "grpc": ws.ports["grpc"],
                "grpc_management": ws.ports["grpc_management"]}
        for key, port in want.items():
            addr = self.listening.get(key, "")
            if not isinstance(addr, str) or not addr.endswith(f":{port}"):
                self._kill()
                self.fail(f"listening line {self.listening!r}: {key} is not on port {port} "
                          "(config.properties)")
        return self

    # -- requests ---------------------------------------------------------------------------
    def url(self, port_kind: str, path: str) -> str:
        ws = self.workspace
        base = {"inference": ws.inference_url, "management": ws.management_url,
                "metrics": ws.metrics_url}[port_kind]
        return base + path

    def request(self, method: str, port_kind: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT_S)
        return requests.request(method, self.url(port_kind, path), **kwargs)

    def predict(self, model: str = "densenet_small", body: bytes | None = None,
                **kwargs) -> requests.Response:
        return self.request("POST", "inference", f"/predictions/{model}",
                            data=kitten() if body is None else body, **kwargs)

    def wait_predicts(self, model: str, timeout: float = TIMEOUT_S, **kwargs) -> requests.Response:
        """Polls a kitten prediction until it answers 200 (start-up models are registered after
        the server listens)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.predict(model, **kwargs)
            if r.status_code == 200:
                return r
            if not self.alive():
                self.fail(f"exited while waiting for {model} to predict (last: {r.status_code} "
                          f"{r.text[:300]})")
            if time.monotonic() > deadline:
                self.fail(f"{model} does not predict within {timeout:.0f} s: {r.status_code} "
                          f"{r.text[:500]}")
            time.sleep(0.1)


def split_url(ex: dict) -> tuple[str, str]:
    """A reference exchange's url (":18081/models?x") as (port kind, path)."""
    port, _, path = ex["url"][1:].partition("/")
    return REFERENCE_PORTS[port], "/" + path


def replay(server: TorchServe, ex: dict, **kwargs) -> requests.Response:
    """Sends the request of a recorded exchange (method, port, path and query; a body passed
    in kwargs, since the reference keeps only its kind and length)."""
    kind, path = split_url(ex)
    return server.request(ex["method"], kind, path, **kwargs)


# ---------------------------------------------------------------------------------------------
# Registration from URLs (the reference's "allowed_urls" section)


class ArchiveHttpServer:
    """A local http.server in a thread on 127.0.0.1 and a free port, serving the files under
    `root` (as the generator's, for the reference's registrations from http urls). `log` holds
    [method, path, status] of every request it answered. A context manager."""

    def __init__(self, root: Path):
        import http.server
        import threading

        self.log: list[list] = []
        log = self.log

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code="-", size="-"):
                log.append([self.command, self.path, int(getattr(code, "value", code))])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ArchiveHttpServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def fetched_since(self, mark: int) -> list[str]:
        """The distinct paths requested after log entry `mark`, sorted."""
        return sorted({path for _, path, _ in self.log[mark:]})


def url_reference(default: bool = False) -> dict:
    """The reference's "allowed_urls" section (its "default" part: TorchServe's default
    allowed_urls on the first start)."""
    section = reference()["allowed_urls"]
    return section["default"] if default else section


def with_locations(value, work: Path, http_port: int):
    """`value` (a recorded exchange, a message) with the generator's placeholders replaced:
    "<work>" by `work` (where this test put the file:// archives) and "<http_port>" by this
    test's http server's port."""
    text = json.dumps(value)
    text = text.replace("<work>", json.dumps(str(work))[1:-1])
    text = text.replace("<http_port>", str(http_port))
    return json.loads(text)


def store_changes(before: list[str], after: list[str]) -> dict[str, list[str]]:
    """What changed in a model store's listing: {"added": [...], "removed": [...]}."""
    return {"added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after))}


def store_listing(store: Path) -> list[str]:
    """A model store's listing as the generator records it (directories with a trailing /)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in store.iterdir())


# ---------------------------------------------------------------------------------------------
# Comparisons


def _type_name(value) -> str:
    return type(value).__name__


def json_differences(have, want, path: str = "$", in_workers: bool = False) -> list[str]:
    """Where `have` differs from TorchServe's `want`: the same keys (recursively), the same
    list lengths, the same values except volatile ones (VOLATILE_KEYS anywhere,
    VOLATILE_WORKER_KEYS in a "workers" entry), which must only have the same JSON type."""
    out: list[str] = []
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return [f"{path}: {_type_name(have)} {have!r}, TorchServe has an object"]
        missing = [k for k in want if k not in have]
        extra = [k for k in have if k not in want]
        if missing:
            out.append(f"{path}: keys missing {missing}")
        if extra:
            out.append(f"{path}: keys TorchServe does not have {extra}")
        for key in want:
            if key not in have:
                continue
            sub = f"{path}.{key}"
            volatile = key in VOLATILE_KEYS or (in_workers and key in VOLATILE_WORKER_KEYS)
            if volatile:
                if type(have[key]) is not type(want[key]):
                    out.append(f"{sub}: {_type_name(have[key])} {have[key]!r}, TorchServe has "
                               f"{_type_name(want[key])} (e.g. {want[key]!r})")
                continue
            out += json_differences(have[key], want[key], sub, in_workers=(key == "workers"))
        return out
    if isinstance(want, list):
        if not isinstance(have, list):
            return [f"{path}: {_type_name(have)} {have!r}, TorchServe has a list"]
        if len(have) != len(want):
            out.append(f"{path}: {len(have)} entries, TorchServe has {len(want)}")
        for i, (h, w) in enumerate(zip(have, want)):
            out += json_differences(h, w, f"{path}[{i}]", in_workers=in_workers)
        return out
    # bool is an int in Python: compare types strictly.
    if type(have) is not type(want) or have != want:
        out.append(f"{path}: {have!r}, TorchServe has {want!r}")
    return out


def prediction_differences(have: dict, want: dict) -> list[str]:
    """An image_classifier answer against TorchServe's: the same labels in the same order,
    probabilities within PROBABILITY_ATOL."""
    if not isinstance(have, dict):
        return [f"not a JSON object: {have!r}"]
    out = []
    if list(have) != list(want):
        out.append(f"labels {list(have)}, TorchServe has {list(want)} (in this order)")
    for label, p in want.items():
        q = have.get(label)
        if not isinstance(q, float) or abs(q - p) > PROBABILITY_ATOL:
            out.append(f"{label}: {q!r}, TorchServe has {p!r} (tolerance {PROBABILITY_ATOL})")
    return out


def response_differences(r: requests.Response, ex: dict, prediction: bool = False,
                         rename: dict[str, str] | None = None) -> list[str]:
    """`r` against the recorded exchange `ex`: status, then the JSON body (json_differences,
    or prediction_differences for predictions). `rename` replaces strings in TorchServe's body
    first (a model registered under another name here)."""
    name = ex["name"]
    out = []
    if r.status_code != ex["status"]:
        out.append(f"status {r.status_code}, TorchServe has {ex['status']}")
    want = ex.get("body_json")
    if want is None:
        return [f"{name}: {d}" for d in out]
    if rename:
        text = json.dumps(want)
        for old, new in rename.items():
            text = text.replace(old, new)
        want = json.loads(text)
    try:
        have = r.json()
    except ValueError:
        out.append(f"body is not JSON: {r.text[:300]!r}")
        return [f"{name}: {d}" for d in out]
    diffs = prediction_differences(have, want) if prediction else json_differences(have, want)
    return [f"{name}: {d}" for d in out + diffs]


ISO_8601_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
