"""Starting and stopping the real oxserve binary for the client conformance tests.

The binary comes from $OXSERVE_BIN. It is started as

    $OXSERVE_BIN serve --model-repository R1 [--model-repository R2 ...] \
        --http-port 0 --grpc-port 0 --host 127.0.0.1 [extra args]

with ORT_DISABLE_TELEMETRY=1 (and OXSERVE_API_KEY under OXSERVE_TEST_API_KEY=1) and the
repository root as working directory (plus `--metrics-port 0` when the binary has that flag). The server prints exactly one JSON line on
stdout, {"event":"listening","http":"127.0.0.1:P","grpc":"127.0.0.1:P","metrics":"127.0.0.1:P"}
("metrics" only while the metrics endpoint is enabled); its logs go to stderr, which is written
to a file whose tail is shown on any failure.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
# --http-max-input-size of the `limited_server` fixture (body-limit tests).
LIMITED_MAX_INPUT_SIZE = 4096

_help_cache: dict[str, str] = {}


def oxserve_bin() -> str:
    """The server binary from $OXSERVE_BIN; fails (never skips) when it is not usable."""
    path = os.environ.get("OXSERVE_BIN", "")
    if not path:
        pytest.fail(
            "OXSERVE_BIN is not set. Build the server and point OXSERVE_BIN at the binary, e.g.\n"
            "  cargo build -p oxserve && OXSERVE_BIN=$PWD/target/debug/oxserve "
            ".venv/bin/python -m pytest tests/python -q",
            pytrace=False,
        )
    resolved = Path(path)
    if not resolved.is_absolute():
        resolved = (Path.cwd() / resolved).resolve()
    if not resolved.is_file() or not os.access(resolved, os.X_OK):
        pytest.fail(f"OXSERVE_BIN={path!r} is not an executable file", pytrace=False)
    return str(resolved)


def serve_help(binary: str) -> str:
    if binary not in _help_cache:
        out = subprocess.run(
            [binary, "serve", "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT
        )
        _help_cache[binary] = out.stdout + out.stderr
    return _help_cache[binary]


class ServerProcess:
    """One oxserve process on ephemeral ports."""

    # TLS arguments for every server of the session (`OXSERVE_TEST_TLS=1`, see conftest.py):
    # with them the whole suite runs over TLS without changing a test.
    session_tls_args: list[str] = []
    # The API key every server of the session gets (`OXSERVE_TEST_API_KEY=1`, see conftest.py),
    # passed as OXSERVE_API_KEY (one key with every scope); "" for none.
    session_api_key: str = ""
    # host:port of every listener (HTTP, gRPC, metrics) of a server started with an API key ->
    # its token: the patched clients send `authorization: Bearer <token>` to these only.
    api_key_by_address: dict[str, str] = {}

    def __init__(self, name: str, repositories: list[str], extra_args: list[str] | None = None,
                 ready_path: str = "/v2/health/ready", tls_args: list[str] | None = None,
                 api_key: str | None = None):
        self.name = name
        self.repositories = repositories
        self.extra_args = list(extra_args or [])
        self.tls_args = list(ServerProcess.session_tls_args if tls_args is None else tls_args)
        # A server given its own key file (--api-keys) is left with just those keys.
        if api_key is None:
            api_key = "" if "--api-keys" in self.extra_args else ServerProcess.session_api_key
        self.api_key = api_key
        # Extra `requests` arguments for the server's own HTTP calls (readiness, index), e.g.
        # `verify=CA` and `cert=(crt, key)` for a server with its own test CA or mutual TLS.
        self.requests_kwargs: dict = {}
        self.ready_path = ready_path
        self.proc: subprocess.Popen | None = None
        self.http_addr = ""
        self.grpc_addr = ""
        self.metrics_addr = ""
        self.listening: dict = {}
        self.stdout_lines: list[str] = []
        self._stdout_queue: queue.Queue = queue.Queue()
        self._stderr_dir = tempfile.mkdtemp(prefix=f"oxserve-{name}-")
        self.stderr_path = Path(self._stderr_dir) / "stderr.log"
        self._stderr_file = None
        self._reader: threading.Thread | None = None

    # -- queries --------------------------------------------------------------------------------
    def repository_index(self) -> dict[str, dict]:
        """POST /v2/repository/index, by model name (state and reason of each)."""
        r = requests.post(self.http_url + "/v2/repository/index", timeout=30, **self.requests_kwargs)
        assert r.status_code == 200, r.text
        return {e["name"]: e for e in r.json()}

    # -- addresses --------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """Base URL for `requests`, e.g. http://127.0.0.1:PORT (https:// with --tls-cert)"""
        scheme = "https" if "--tls-cert" in self.tls_args else "http"
        return f"{scheme}://{self.http_addr}"

    def http_connection(self, timeout: float) -> http.client.HTTPConnection:
        """A raw HTTP/1.1 connection to the HTTP listener: over TLS, trusting the session's CA
        (REQUESTS_CA_BUNDLE, set by conftest.py under OXSERVE_TEST_TLS=1), when it serves TLS."""
        host, port = self.http_addr.rsplit(":", 1)
        if self.http_url.startswith("https://"):
            context = ssl.create_default_context(cafile=os.environ.get("REQUESTS_CA_BUNDLE"))
            return http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)
        return http.client.HTTPConnection(host, int(port), timeout=timeout)

    @property
    def http_host(self) -> str:
        """host:port for tritonclient.http"""
        return self.http_addr

    @property
    def grpc_host(self) -> str:
        """host:port for tritonclient.grpc / grpc channels"""
        return self.grpc_addr

    @property
    def metrics_url(self) -> str:
        """The Prometheus endpoint, e.g. http://127.0.0.1:PORT/metrics (fails the test when
        the server reported no metrics listener)."""
        if not self.metrics_addr:
            self.fail(f"no metrics address in the listening line: {self.listening!r}")
        return f"http://{self.metrics_addr}/metrics"

    # -- diagnostics ------------------------------------------------------------------------
    def stderr_tail(self, lines: int = 60) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return "<no stderr captured>"
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str) -> None:
        pytest.fail(
            f"[oxserve {self.name}] {message}\n--- server stderr (tail, {self.stderr_path}) ---\n"
            f"{self.stderr_tail()}",
            pytrace=False,
        )

    # -- lifecycle --------------------------------------------------------------------------
    def command(self, binary: str) -> list[str]:
        cmd = [binary, "serve"]
        for repo in self.repositories:
            cmd += ["--model-repository", repo]
        cmd += ["--http-port", "0", "--grpc-port", "0", "--host", "127.0.0.1"]
        # Several servers run at once in one test session: if the binary has a metrics
        # listener, put it on an ephemeral port too, so fixed default ports never collide.
        if "--metrics-port" in serve_help(binary):
            cmd += ["--metrics-port", "0"]
        return cmd + self.tls_args + self.extra_args

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._stdout_queue.put(line)
        self._stdout_queue.put(None)

    def start(self) -> "ServerProcess":
        binary = oxserve_bin()
        env = dict(os.environ)
        env["ORT_DISABLE_TELEMETRY"] = "1"
        if self.api_key:
            env["OXSERVE_API_KEY"] = self.api_key
        self._stderr_file = open(self.stderr_path, "wb")
        cmd = self.command(binary)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._stderr_file, text=True, bufsize=1,
        )
        self._reader = threading.Thread(target=self._read_stdout, daemon=True,
                                        name=f"oxserve-{self.name}-stdout")
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S

        # 1. The listening line: the first line on stdout.
        try:
            line = self._stdout_queue.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            self._kill()
            self.fail(f"no listening line on stdout within {START_TIMEOUT_S:.0f} s; command: {cmd}")
        if line is None:
            code = self.proc.wait(timeout=10)
            self.fail(f"exited with code {code} before printing the listening line; command: {cmd}")
        self.stdout_lines.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            self._kill()
            self.fail(f"first stdout line is not JSON: {line!r}")
        if not isinstance(event, dict) or event.get("event") != "listening":
            self._kill()
            self.fail(f'first stdout line is not {{"event":"listening",...}}: {line!r}')
        if not isinstance(event.get("http"), str) or not isinstance(event.get("grpc"), str):
            self._kill()
            self.fail(f"listening line lacks http/grpc addresses: {line!r}")
        self.listening = event
        self.http_addr = event["http"]
        self.grpc_addr = event["grpc"]
        metrics = event.get("metrics", "")
        if not isinstance(metrics, str):
            self._kill()
            self.fail(f"listening line has a non-string metrics address: {line!r}")
        self.metrics_addr = metrics
        if self.api_key:
            for addr in (self.http_addr, self.grpc_addr, self.metrics_addr):
                if addr:
                    ServerProcess.api_key_by_address[addr] = self.api_key

        # 2. Readiness, polled (no fixed sleeps).
        url = self.http_url + self.ready_path
        last = "no answer"
        while True:
            code = self.proc.poll()
            if code is not None:
                self.fail(f"exited with code {code} while waiting for {self.ready_path}")
            try:
                resp = requests.get(url, timeout=2, **self.requests_kwargs)
                if resp.status_code == 200:
                    break
                last = f"HTTP {resp.status_code} {resp.text[:200]!r}"
            except requests.RequestException as e:
                last = repr(e)
            if time.monotonic() > deadline:
                self._kill()
                self.fail(f"{self.ready_path} not 200 within {START_TIMEOUT_S:.0f} s (last: {last})")
            time.sleep(POLL_INTERVAL_S)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            self._kill()
            self.fail(f"did not exit within {timeout:.0f} s of SIGTERM")
        if self._reader is not None:
            self._reader.join(timeout=5)
        while True:
            try:
                line = self._stdout_queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.stdout_lines.append(line)
        if self._stderr_file is not None:
            self._stderr_file.close()
        return code

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit code (the caller asserts it)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            self.fail(f"had already exited with code {self.proc.returncode} before the end of its tests")
        self.send_sigterm()
        return self.wait_exit()

    def stop_and_check(self) -> None:
        code = self.stop()
        if code != 0:
            self.fail(f"exit code {code} after SIGTERM, expected 0")
        extra = [line for line in self.stdout_lines[1:] if line.strip()]
        if extra:
            self.fail(f"stdout must hold exactly one line (the listening event); also got: {extra[:5]!r}")
        self.remove_logs()

    def remove_logs(self) -> None:
        """Deletes the stderr log after a clean stop (it is kept whenever a check failed)."""
        shutil.rmtree(self._stderr_dir, ignore_errors=True)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
