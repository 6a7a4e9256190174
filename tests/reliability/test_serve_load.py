"""`lexvla serve` under load (bounded, loopback only): concurrent clients search (text, words, image
uploads), fetch documents and send refused uploads for a fixed time, while two connections stall
mid-request and one client's requests run past the server's time limit. Every answer is checked
against the embedded index; there must be no 5xx other than the expected 504s, no wrong answer, no
transport error, and the 413/415/504 limits must hold.

The driver is bench/serve_load.py (whose full run records the figures in bench/results/).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.search import build_tiny_index

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import serve_load  # noqa: E402

pytest.importorskip("fastapi")

CLIENTS, SECONDS, MAX_REQUESTS = 6, 10.0, 4000
TIMEOUT = 2.0  # the server's per-request limit in this test
SLOW_K = 99  # a search with this k sleeps past the limit (the wrapper below)


class SlowForOneK:
    """The engine, except that a search with k == SLOW_K takes longer than the server's limit."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def __len__(self) -> int:
        return len(self.engine)

    def search(self, query, k: int = 10, **kwargs):
        if k == SLOW_K:
            time.sleep(TIMEOUT + 1.0)
        return self.engine.search(query, k, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The app on a free 127.0.0.1 port (uvicorn in a thread); yields (port, engine, image paths)."""
    import uvicorn

    from lexvla.search import SearchEngine
    from lexvla.serve.app import create_app

    root = tmp_path_factory.mktemp("load")
    _, index = build_tiny_index(tiny_model, root, count=24)
    engine = SearchEngine.open(index, tiny_model)
    app = create_app(SlowForOneK(engine), max_upload_mb=0.5, timeout=TIMEOUT)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=5)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    images = sorted((root / "images").glob("*.png"))
    yield sock.getsockname()[1], engine, images
    uv.should_exit = True
    thread.join(timeout=15)
    sock.close()


@pytest.mark.slow
def test_serve_under_load(server) -> None:
    port, engine, images = server
    plans = serve_load.plan_requests(engine, [p.read_bytes() for p in images[:3]], 0.5)
    slow = serve_load.json_request(
        "slow", "/api/search", {"words": {"dog": 1.0}, "k": SLOW_K}, status=504, every=2.0
    )  # one at a time: waits for its 504 (2 s), then 2 s more; its thread sleeps 3 s
    figures = serve_load.run_load(
        "127.0.0.1",
        port,
        [*plans, slow],
        clients=CLIENTS,
        seconds=SECONDS,
        max_requests=MAX_REQUESTS,
        stalled=2,
    )
    by_kind = figures["by_kind"]
    assert figures["transport_errors"] == 0, [(k, v["statuses"]) for k, v in by_kind.items()]
    assert figures["wrong"] == 0, {k: v for k, v in by_kind.items() if v["wrong"]}
    assert figures["server_errors_5xx"] == by_kind.get("slow", {}).get("count", 0), figures
    for kind in ("text", "words", "image", "doc", "too-large", "not-image"):
        assert by_kind.get(kind, {}).get("count", 0) > 0, f"no {kind} request was sent"
    assert figures["requests"] >= 50, figures  # progress despite stalled and slow requests
    slow_row = by_kind.get("slow")
    if slow_row:  # the time limit holds under load: 504 well before the work finishes
        assert slow_row["max_ms"] < (TIMEOUT + 2.0) * 1000, slow_row
    print(
        f"\n{figures['requests']} requests in {figures['seconds']} s = "
        f"{figures['requests_per_second']} req/s, p50 {figures['latency']['p50_ms']} ms, "
        f"p99 {figures['latency']['p99_ms']} ms"
    )


@pytest.mark.slow
def test_soak_mix_in_short_windows(server) -> None:
    """bench/serve_soak.py's mix (every endpoint, answers known in advance) and its window loop, for
    two short windows: no 5xx, no wrong answer, the server's memory read after each window."""
    import serve_soak

    port, engine, images = server
    plans = serve_soak.soak_plans(engine, [p.read_bytes() for p in images[:3]], 0.5)
    figures = serve_soak.soak(
        port, os.getpid(), plans, clients=4, windows=2, window_seconds=4.0, max_requests=3000
    )
    rows = figures["windows"]
    assert [r["server_errors_5xx"] + r["transport_errors"] + r["wrong"] for r in rows] == [0, 0], (
        rows
    )
    sent = {kind for r in rows for kind in r["kinds"]}
    assert {"explain", "grounding", "vocab", "thumbnail", "describe", "json-too-large"} <= sent
    assert all(r["rss_mib"] and r["rss_mib"] > 0 for r in rows)
