"""The batching server under a request storm: more clients than a batch holds, empty, very long and
failing texts mixed in. Every request gets its own answer (equal to the single-query answer), the
failing text fails alone, and the batches really were shared."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

from helpers.search import build_tiny_index
from lexvla import create_model
from lexvla.errors import LexVLAError

pytest.importorskip("fastapi")

CLIENTS, ROUNDS, K = 16, 6, 5
EXPLODE = "explode this query"  # the engine below refuses any batch holding it, and it alone
TEXTS = [f"a {c} {a} near the {p}" for c, a, p in zip(
    ["red", "blue", "green", "small", "large", "white", "black", "wet"],
    ["dog", "boat", "house", "cat", "bus", "bird", "horse", "car"],
    ["river", "sea", "park", "road", "tree", "wall", "hill", "beach"],
)] + ["dog " * 4000, "   a\tcat  "]  # fmt: skip
EMPTY = ["", "   ", "\n"]


class RefusesOneText:
    """The engine, except that a batch holding EXPLODE fails (as a damaged input would)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def __len__(self) -> int:
        return len(self.engine)

    def queries_from_texts(self, texts):
        if EXPLODE in texts:
            raise LexVLAError(f"cannot encode {EXPLODE!r}")
        return self.engine.queries_from_texts(texts)


@pytest.fixture(scope="module")
def storm_server(tiny_model, tmp_path_factory):
    import uvicorn

    from lexvla.search import SearchEngine
    from lexvla.serve.app import BatchingOptions, create_app

    root = tmp_path_factory.mktemp("storm")
    _, index = build_tiny_index(tiny_model, root, count=16)
    # without LoRA the text tower runs its packed inference path, batched and alone
    engine = SearchEngine.open(index, create_model("tiny", overrides=["text.use_lora=false"]))
    options = BatchingOptions(max_batch=4, max_wait_ms=20.0, query_cache=0, threads=0)
    app = create_app(RefusesOneText(engine), timeout=60.0, batching=options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield sock.getsockname()[1], engine
    uv.should_exit = True
    thread.join(timeout=15)
    sock.close()


def _post(conn: http.client.HTTPConnection, text: str) -> tuple[int, dict]:
    conn.request("POST", "/api/search", json.dumps({"text": text, "k": K}),
                 {"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_storm_answers_each_request_with_its_own_answer(storm_server) -> None:
    port, engine = storm_server
    expected = {}
    for text in TEXTS:  # the single-query answers
        query = engine.query_from_text(text)
        expected[text] = (query.words, *engine.index.search_ids(*query.to_arrays(), K))
    mix = [*TEXTS, *EMPTY, EXPLODE]
    outcomes: list[tuple[str, int, dict]] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(ROUNDS):
            text = mix[(seed * 7 + i * 3) % len(mix)]
            status, body = _post(conn, text)
            with lock:
                outcomes.append((text, status, body))
        conn.close()

    threads = [threading.Thread(target=client, args=(s,)) for s in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == CLIENTS * ROUNDS
    for text, status, body in outcomes:
        if text in EMPTY:
            assert status == 400 and "empty" in body["error"], (text, body)
        elif text == EXPLODE:
            assert status == 400 and EXPLODE in body["error"], body
        else:
            assert status == 200, (text[:40], body)
            words, ids, scores = expected[text]
            got = {w["word"]: w["weight"] for w in body["query"]["words"]}
            assert set(got) == set(words), text[:40]
            np.testing.assert_allclose([got[w] for w in words], list(words.values()), rtol=1e-5)
            assert [r["doc"] for r in body["results"]] == ids.tolist(), text[:40]
            np.testing.assert_allclose([r["score"] for r in body["results"]], scores, rtol=1e-5)
            assert body["query"]["source"] == f"text: {text.strip()}"
    # The mix above puts the failing text beside others only as scheduling allows: send it once more
    # together with three texts released at the same instant (well inside max_wait_ms), so at least
    # one of its batches holds other texts that must still be answered.
    burst = [EXPLODE, *TEXTS[:3]]
    barrier = threading.Barrier(len(burst))
    answers: dict[str, tuple[int, dict]] = {}

    def burst_client(text: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.connect()
        barrier.wait()
        answers[text] = _post(conn, text)
        conn.close()

    burst_threads = [threading.Thread(target=burst_client, args=(t,)) for t in burst]
    for thread in burst_threads:
        thread.start()
    for thread in burst_threads:
        thread.join(timeout=60)
    assert answers[EXPLODE][0] == 400, answers[EXPLODE]
    for text in TEXTS[:3]:
        status, body = answers[text]
        assert status == 200, (text[:40], body)
        assert [r["doc"] for r in body["results"]] == expected[text][1].tolist(), text[:40]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/info")
    stats = json.loads(conn.getresponse().read())["text_batching"]
    assert stats["mean_batch"] > 1.0, stats  # forwards were shared
    assert stats["retried"] >= 1, stats  # the failing text's batches were split, not failed
