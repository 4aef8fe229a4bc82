"""Test certificates made with the `openssl` command: a CA, server certificates for
127.0.0.1/localhost signed by it, and client certificates for mutual TLS.

Every certificate is generated fresh into a temporary directory by the tests that use it;
nothing is checked in.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DAYS = "2"


def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("the TLS tests need the `openssl` command (apt-get install openssl)", pytrace=False)
    return path


def _run(*args: str) -> None:
    proc = subprocess.run([openssl(), *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{proc.stderr}", pytrace=False)


@dataclass
class Authority:
    """A CA: its certificate and key, able to sign server and client certificates."""

    directory: Path
    name: str

    @property
    def cert(self) -> Path:
        return self.directory / f"{self.name}.crt"

    @property
    def key(self) -> Path:
        return self.directory / f"{self.name}.key"

    @classmethod
    def create(cls, directory: Path, name: str) -> "Authority":
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls(directory, name)
        _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(ca.key), "-out", str(ca.cert), "-days", DAYS,
             "-subj", f"/CN=oxserve test CA {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return ca

    def issue(self, name: str, *, server: bool, serial: int = 1) -> tuple[Path, Path]:
        """A leaf certificate and key signed by this CA: for 127.0.0.1 and localhost (server)
        or for client authentication. Returns (cert, key) paths."""
        cert = self.directory / f"{name}.crt"
        key = self.directory / f"{name}.key"
        csr = self.directory / f"{name}.csr"
        ext = self.directory / f"{name}.ext"
        if server:
            ext.write_text("basicConstraints=critical,CA:FALSE\n"
                           "keyUsage=critical,digitalSignature\n"
                           "extendedKeyUsage=serverAuth\n"
                           "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        else:
            ext.write_text("basicConstraints=critical,CA:FALSE\n"
                           "keyUsage=critical,digitalSignature\n"
                           "extendedKeyUsage=clientAuth\n")
        _run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        _run("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
             "-set_serial", str(serial), "-days", DAYS, "-extfile", str(ext), "-out", str(cert))
        return cert, key


def serial_of(cert_pem: bytes | str) -> int:
    """The serial number of a PEM certificate (as the server presented it)."""
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode()
    proc = subprocess.run([openssl(), "x509", "-noout", "-serial"], input=cert_pem,
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.decode().strip().split("=", 1)[1], 16)


@dataclass
class TlsFixture:
    """A server certificate (CA `ca`) and, for mutual TLS, a client CA with one client
    certificate."""

    ca: Authority
    server_cert: Path
    server_key: Path
    client_ca: Authority
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> "TlsFixture":
        ca = Authority.create(directory, "ca")
        server_cert, server_key = ca.issue("server", server=True)
        client_ca = Authority.create(directory, "client-ca")
        client_cert, client_key = client_ca.issue("client", server=False)
        return cls(ca, server_cert, server_key, client_ca, client_cert, client_key)

    def server_args(self, *, mutual: bool = False) -> list[str]:
        args = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        if mutual:
            args += ["--tls-client-ca", str(self.client_ca.cert)]
        return args
