"""Triton's dynamic-batcher dispatch rule against the real binary (docs/scheduling.md): with
`preferred_batch_size: [2, 6]` and a 10 s `max_queue_delay_microseconds`, a lone request whose
rows are a preferred size, or more than every preferred size, is sent at once; one that could
still grow into a preferred size waits (for the delay, or for company)."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient

from _server import ROOT, ServerProcess

DELAY_US = 10_000_000


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("batcher")
    model = repo / "add_sub"
    shutil.copytree(ROOT / "examples/models/add_sub", model)
    config = model / "config.pbtxt"
    config.write_text(config.read_text() + "dynamic_batching { preferred_batch_size: [ 2, 6 ] "
                      f"max_queue_delay_microseconds: {DELAY_US} }}\n")
    server = ServerProcess("batcher-dispatch", [str(repo)]).start()
    try:
        yield server
    finally:
        server.stop_and_check()


def infer_rows(server, rows: int) -> float:
    """Seconds one add_sub request of `rows` rows took; checks the answer."""
    client = httpclient.InferenceServerClient(server.http_host, network_timeout=30)
    a = np.arange(16 * rows, dtype=np.float32).reshape(rows, 16)
    b = np.ones((rows, 16), dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [rows, 16], "FP32"), httpclient.InferInput("INPUT1", [rows, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    started = time.monotonic()
    result = client.infer("add_sub", inputs)
    took = time.monotonic() - started
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    return took


@pytest.mark.parametrize("rows", [2, 6, 7, 8])
def test_a_request_that_cannot_grow_into_a_preferred_size_goes_at_once(batching_server, rows):
    assert infer_rows(batching_server, rows) < 2.0


def test_a_request_that_can_grow_waits_for_company(batching_server):
    # 3 rows alone could become 6: it waits; 3 more rows make 6 and both go together, long
    # before the 10 s delay.
    took = {}
    first = threading.Thread(target=lambda: took.setdefault("first", infer_rows(batching_server, 3)))
    first.start()
    time.sleep(1.0)
    assert first.is_alive(), "a 3-row request did not wait for a preferred size"
    second = infer_rows(batching_server, 3)
    first.join(timeout=30)
    assert second < 2.0 and 1.0 <= took["first"] < 3.0, (took, second)
