"""lexvla.serve: the JSON API and the page, through FastAPI's TestClient on a tiny index."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from helpers.search import brute_force, build_tiny_index, make_image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from lexvla.search import SearchEngine
    from lexvla.serve.app import create_app

    shards, index = build_tiny_index(tiny_model, tmp_path_factory.mktemp("serve"))
    engine = SearchEngine.open(index, tiny_model)
    with TestClient(create_app(engine, max_upload_mb=0.25)) as client:
        yield client, engine, shards


def png_bytes(index: int = 4, size: tuple[int, int] = (160, 120)) -> bytes:
    buf = io.BytesIO()
    make_image(index, size).save(buf, format="PNG")
    return buf.getvalue()


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


# ---------------------------------------------------------------------------------- the page
def test_page_and_static_files(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "LexVLA search" in page.text
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    info = client.get("/api/info").json()
    assert info["documents"] == 10 and info["model"]["name"] == "tiny"


# ---------------------------------------------------------------------------------- search
def test_text_search_equals_brute_force(served):
    client, engine, shards = served
    body = client.post("/api/search", json={"text": "a dog on the grass", "k": 6}).json()
    words = {w["word"]: w["weight"] for w in body["query"]["words"]}
    weights = [w["weight"] for w in body["query"]["words"]]
    assert weights == sorted(weights, reverse=True)
    expected = brute_force(engine, shards, engine.query_from_words(words))[:6]
    assert [r["key"] for r in body["results"]] == [key for key, _ in expected]
    np.testing.assert_allclose(
        [r["score"] for r in body["results"]], [s for _, s in expected], rtol=1e-5
    )
    first = body["results"][0]
    assert first["words"] and {"word", "contribution"} <= set(first["words"][0])
    assert "path" not in first["metadata"]  # server file locations stay on the server


def test_explicit_words_steer_the_search(served):
    client, engine, shards = served
    body = client.post("/api/search", json={"text": "a cat", "k": 10}).json()
    words = {w["word"]: w["weight"] for w in body["query"]["words"]}
    top_word = body["results"][0]["words"][0]["word"]
    dropped = {w: v for w, v in words.items() if w != top_word}
    steered = client.post("/api/search", json={"words": dropped, "k": 10}).json()
    expected = brute_force(engine, shards, engine.query_from_words(dropped))[:10]
    assert [r["key"] for r in steered["results"]] == [key for key, _ in expected]
    assert all(top_word not in [w["word"] for w in r["words"]] for r in steered["results"])
    assert steered["query"]["source"] == "words"
    # Boosting one word by a lot puts the document where it weighs most first.
    boosted = {**words, top_word: words.get(top_word, 0) + 100.0}
    result = client.post("/api/search", json={"words": boosted, "k": 3}).json()["results"][0]
    assert result["words"][0]["word"] == top_word


def test_image_search_finds_itself(served):
    client, engine, _ = served
    path = engine.document(5)["path"]
    with open(path, "rb") as f:
        body = client.post(
            "/api/search/image", files={"file": ("q.jpg", f, "image/jpeg")}, data={"k": "3"}
        )
    assert body.status_code == 200, body.text
    assert body.json()["results"][0]["doc"] == 5
    assert body.json()["query"]["source"] == "image: q.jpg"


def test_explain_grounding_and_documents(served):
    client, _, _ = served
    hit = client.post("/api/search", json={"text": "a boat", "k": 1}).json()
    words = {w["word"]: w["weight"] for w in hit["query"]["words"]}
    doc = hit["results"][0]["doc"]
    ex = client.post("/api/explain", json={"doc": doc, "words": words, "k": 4}).json()
    assert ex["score"] == pytest.approx(hit["results"][0]["score"], rel=1e-5)
    assert sum(r["contribution"] for r in ex["words"]) + ex["remainder"] == pytest.approx(
        ex["score"], rel=1e-5
    )
    heat = client.post("/api/grounding", json={"doc": doc, "words": words}).json()
    assert len(heat["scores"]) == heat["rows"] and len(heat["scores"][0]) == heat["cols"]
    document = client.get(f"/api/docs/{doc}").json()
    assert document["key"] == hit["results"][0]["key"] and "path" not in document["metadata"]
    thumb = client.get(f"/api/docs/{doc}/thumbnail?size=64")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64


def test_describe_an_upload(served):
    client, _, _ = served
    body = client.post("/api/describe", files={"file": ("x.png", png_bytes(), "image/png")}).json()
    assert len(body["words"]) == 25 and body["words"][0]["weight"] >= body["words"][-1]["weight"]
    assert len(body["patches"]) == body["rows"] and len(body["patches"][0][0]) == 3


def test_vocab_autocomplete(served):
    client, _, _ = served
    words = client.get("/api/vocab", params={"prefix": "do", "limit": 5}).json()["words"]
    assert 0 < len(words) <= 5 and all(w.lstrip("#").startswith("do") for w in words)
    assert client.get("/api/vocab", params={"prefix": ""}).json() == {"words": []}
    error_of(client.get("/api/vocab", params={"prefix": "do", "limit": 1000}), 422)


# ---------------------------------------------------------------------------------- bad input
def test_bad_uploads(served):
    client, _, _ = served
    big = png_bytes(size=(2000, 2000)) + b"\0" * 300_000  # > 0.25 MiB
    message = error_of(
        client.post("/api/search/image", files={"file": ("big.png", big, "image/png")}), 413
    )
    assert "MiB" in message
    message = error_of(
        client.post("/api/describe", files={"file": ("a.txt", b"hello", "text/plain")}), 415
    )
    assert "not an image" in message
    fake = error_of(
        client.post("/api/describe", files={"file": ("a.png", b"\x89PNG garbage", "image/png")}),
        415,
    )
    assert "a.png" in fake and "BytesIO" not in fake
    assert "empty" in error_of(
        client.post("/api/describe", files={"file": ("e.png", b"", "image/png")}), 400
    )
    error_of(client.post("/api/describe"), 422)  # no file at all


def test_chunked_oversized_body_is_cut(served):
    client, _, _ = served

    def chunks():
        for _ in range(40):
            yield b"x" * 16384  # 640 KiB, no Content-Length

    response = client.post(
        "/api/search", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "256 KiB" in error_of(response, 413)  # the JSON limit: this is no upload endpoint


def test_every_endpoint_has_a_body_limit(served):
    from lexvla.serve.app import create_app

    _, engine, _ = served
    with TestClient(create_app(engine, max_upload_mb=1, max_json_kb=16)) as client:
        long_text = "a dog on the grass " * 1000  # 19 KB of JSON
        for method, path in [("POST", "/api/search"), ("POST", "/api/explain"),
                             ("POST", "/api/grounding"), ("GET", "/api/info"),
                             ("GET", "/api/docs/0"), ("POST", "/no/such/path")]:  # fmt: skip
            response = client.request(method, path, json={"text": long_text, "doc": 0})
            assert "16 KiB" in error_of(response, 413), (method, path)
        chunked = client.post(
            "/api/search",
            content=(b" " * 4096 for _ in range(5)),
            headers={"content-type": "application/json"},
        )
        assert "16 KiB" in error_of(chunked, 413)
        fits = client.post("/api/search", json={"text": "a dog on the grass " * 600, "k": 3})
        assert fits.status_code == 200 and len(fits.json()["results"]) == 3  # 11 KB: under it
        upload = png_bytes() + b"\0" * 40_000  # trailing bytes after the PNG are ignored
        assert len(upload) > 16 * 2**10  # uploads keep the upload limit
        response = client.post("/api/search/image", files={"file": ("q.png", upload, "image/png")})
        assert response.status_code == 200, response.text


def test_bad_queries(served):
    client, _, _ = served
    assert "empty" in error_of(client.post("/api/search", json={"text": "   "}), 400)
    assert "no words" in error_of(client.post("/api/search", json={"words": {}}), 400)
    assert "exactly one" in error_of(
        client.post("/api/search", json={"text": "a", "words": {"dog": 1}}), 400
    )
    assert "exactly one" in error_of(client.post("/api/search", json={}), 400)
    unknown = error_of(client.post("/api/search", json={"words": {"dog": 1.0, "qqqzz": 1.0}}), 400)
    assert "'qqqzz' is not in the lexical vocabulary" in unknown
    assert "Did you mean 'dog'" in error_of(
        client.post("/api/search", json={"words": {"Dog": 1.0}}), 400
    )
    assert ">= 0" in error_of(client.post("/api/search", json={"words": {"dog": -1.0}}), 400)
    assert "k" in error_of(client.post("/api/search", json={"text": "a", "k": 0}), 422)
    error_of(
        client.post(
            "/api/search", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
    )
    assert "no words" in error_of(client.post("/api/explain", json={"doc": 0, "words": {}}), 400)


@pytest.mark.parametrize(
    "doc",
    [
        "10",
        "999999",
        "-1",
        "1e3",
        "abc",
        "%2E%2E%2Fetc%2Fpasswd",
        "..%2F..%2Fpyproject.toml",
        "\uff10",
        " 1",
    ],
)
def test_unknown_ids_and_path_tricks(served, doc):
    client, _, _ = served
    for url in (f"/api/docs/{doc}/thumbnail", f"/api/docs/{doc}"):
        response = client.get(url)
        assert response.status_code == 404, (url, response.text)
        assert response.headers["content-type"] == "application/json"
    if doc.lstrip("-").isascii() and doc.lstrip("-").isdigit():
        words = {"dog": 1.0}
        assert "not in the index" in error_of(
            client.post("/api/explain", json={"doc": int(doc), "words": words}), 404
        )
        error_of(client.post("/api/grounding", json={"doc": int(doc), "words": words}), 404)


def test_no_file_outside_the_index_is_served(served):
    client, _, _ = served
    for url in (
        "/static/../app.py",
        "/static/%2E%2E/app.py",
        "/../pyproject.toml",
        "/api/docs//etc/passwd",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert b"import" not in response.content and b"root:" not in response.content


def test_document_whose_file_is_gone(tiny_model, tmp_path):
    from lexvla.search import SearchEngine
    from lexvla.serve.app import create_app

    _, index = build_tiny_index(tiny_model, tmp_path, count=3)
    engine = SearchEngine.open(index, tiny_model)
    engine.document(0)  # exists in the index...
    import os

    os.remove(engine.document(0)["path"])  # ...but its image was moved away
    with TestClient(create_app(engine)) as client:
        assert "moved" in error_of(client.get("/api/docs/0/thumbnail"), 404)


def test_request_timeout(served):
    from lexvla.serve.app import create_app

    _, engine, _ = served

    class SlowEngine:
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def __len__(self):
            return len(self.engine)

        def search(self, *args, **kwargs):
            time.sleep(1.0)
            return self.engine.search(*args, **kwargs)

    with TestClient(create_app(SlowEngine(engine), timeout=0.2)) as client:
        start = time.perf_counter()
        message = error_of(client.post("/api/search", json={"words": {"dog": 1.0}}), 504)
        assert "longer than 0.2 s" in message and time.perf_counter() - start < 0.9
