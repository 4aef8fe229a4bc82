"""Measures what a request body costs in server memory once decoded: the peak RSS (VmHWM)
increase of a fresh server that reads and decodes one large request, per body byte.

    OXSERVE_BIN=target/release/oxserve .venv/bin/python bench/memory_weights.py [MiB]

The requests go to a model that does not exist: the body is read and fully decoded before the
model is looked up, and nothing else allocates. Each case runs on a fresh server (VmHWM only
grows). The JSON weight of the in-flight budget (crates/oxserve-server/src/inflight.rs) must
be at least the largest JSON figure.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "python"))
from _server import ServerProcess  # noqa: E402


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def json_body(datatype: str, element: str, n: int) -> bytes:
    data = ",".join([element] * n)
    return (f'{{"inputs":[{{"name":"x","datatype":"{datatype}","shape":[{n}],"data":[{data}]}}]}}').encode()


def binary_body(n_bytes: int) -> tuple[bytes, int]:
    header = (f'{{"inputs":[{{"name":"x","datatype":"UINT8","shape":[{n_bytes}],'
              f'"parameters":{{"binary_data_size":{n_bytes}}}}}]}}').encode()
    return header + bytes(n_bytes), len(header)


def measure(name: str, body: bytes, headers: dict[str, str]) -> None:
    server = ServerProcess(f"weights-{name}", ["examples/models"],
                           ["--max-inflight-bytes", str(16 << 30)]).start()
    try:
        pid = server.proc.pid
        time.sleep(0.5)
        before = vm_kib(pid, "VmHWM")
        r = requests.post(server.http_url + "/v2/models/no_such_model/infer", data=body,
                          headers=headers, timeout=300)
        peak = vm_kib(pid, "VmHWM")
        delta = (peak - before) * 1024
        print(f"{name:<28} body {len(body) / 2**20:7.1f} MiB  status {r.status_code}  "
              f"peak RSS +{delta / 2**20:7.1f} MiB  = {delta / len(body):5.2f} bytes per body byte")
    finally:
        server.stop_and_check()


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 48
    target = mib << 20
    measure("JSON INT64 0,", json_body("INT64", "0", target // 2), {"Content-Type": "application/json"})
    measure("JSON FP64 0,", json_body("FP64", "0", target // 2), {"Content-Type": "application/json"})
    measure("JSON FP32 0,", json_body("FP32", "0", target // 2), {"Content-Type": "application/json"})
    measure("JSON BYTES \"\",", json_body("BYTES", '""', target // 3), {"Content-Type": "application/json"})
    body, header_len = binary_body(target)
    measure("binary UINT8", body, {"Inference-Header-Content-Length": str(header_len)})


if __name__ == "__main__":
    main()
