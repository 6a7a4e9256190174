"""MilvusIndex against a `milvus-lite server` started here: results equal SparseIndex on the same data;
`lexvla index build / search / serve --milvus` give the same hits, explanations and steering as the
embedded index; bad URIs, collections and vocabularies are refused before anything is written."""

from __future__ import annotations

import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers.index import random_csr
from lexvla.errors import LexVLAError
from lexvla.index import (
    LexicalIndex,
    SparseIndex,
    build_index,
    init_shard_dir,
    read_shard_manifest,
    write_shard,
)

pytest.importorskip(
    "pymilvus", reason="the milvus extra is not installed: pip install 'lexvla[milvus]'"
)
pytest.importorskip(
    "milvus_lite", reason="milvus-lite is not installed: pip install 'lexvla[milvus]'"
)

from lexvla.index.milvus import MilvusIndex, build_milvus_index, milvus_lite_server  # noqa: E402

V = 64
VOCAB = [f"w{i}" for i in range(V)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Milvus Lite gRPC server on a free loopback port, for the whole module."""
    if shutil.which(
        "milvus-lite", path=str(Path(sys.executable).parent)
    ) is None and not shutil.which("milvus-lite"):
        pytest.skip("the milvus-lite command is not installed (pip install 'lexvla[milvus]')")
    with milvus_lite_server(tmp_path_factory.mktemp("milvus"), _free_port()) as uri:
        yield uri


def _corpus(n: int = 160) -> tuple:
    m = random_csr(np.random.default_rng(21), n, V, 0.12, dyadic=False, head_words=4)
    meta = [{"key": f"d{i}", "path": f"img/{i}.jpg", "caption": f"caption {i}"} for i in range(n)]
    return m, meta


def _queries(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(count):
        terms = np.sort(rng.choice(V, rng.integers(1, 10), replace=False))
        out.append((terms, rng.lognormal(size=len(terms)).astype(np.float32)))
    return out


def _same(sparse_hits: list, milvus_hits: list) -> None:
    assert [h.key for h in milvus_hits] == [h.key for h in sparse_hits]
    assert [h.doc for h in milvus_hits] == [h.doc for h in sparse_hits]
    np.testing.assert_allclose(
        [h.score for h in milvus_hits], [h.score for h in sparse_hits], rtol=1e-5
    )
    assert [h.metadata for h in milvus_hits] == [h.metadata for h in sparse_hits]


def test_milvus_matches_sparse_index(server: str, tmp_path: Path) -> None:
    m, meta = _corpus()
    sparse = SparseIndex.create(tmp_path / "sparse", VOCAB, {"model": "t"})
    sparse.add(m.indptr, m.indices, m.data, meta)
    sparse.commit()
    milvus = MilvusIndex.create(server, VOCAB, {"model": "t"}, collection="match")
    assert isinstance(milvus, LexicalIndex) and isinstance(sparse, LexicalIndex)
    half = m.shape[0] // 2  # two batches: ids continue where the first batch ended
    first, rest = m[:half], m[half:]
    milvus.add(first.indptr, first.indices, first.data, meta[:half])
    assert milvus.add(rest.indptr, rest.indices, rest.data, meta[half:]) == m.shape[0] - half
    assert len(milvus) == milvus.num_docs == m.shape[0]
    for doc in (0, half, m.shape[0] - 1):  # the LexicalIndex reads of one document
        assert milvus.document(doc) == sparse.document(doc)
        for got, want in zip(milvus.vector(doc), sparse.vector(doc)):
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype
    queries = _queries(12)
    for terms, weights in queries:
        for k in (1, 10, 500):  # 500 > N
            _same(sparse.search(terms, weights, k), milvus.search(terms, weights, k))
        for hit in milvus.search(terms, weights, 5, explain=True):
            assert sum(c for _, c in hit.words) == pytest.approx(hit.score, rel=1e-5)
            sparse_doc = sparse.doc_id(hit.key)
            assert hit.words == sparse.explain(
                sparse_doc, terms, weights
            )  # the same float32 products
    # deletions and re-adding a key
    gone = [f"d{i}" for i in range(0, 160, 7)] + ["missing"]
    assert milvus.delete(gone) == sparse.delete(gone) == len(gone) - 1
    sparse.commit()
    assert milvus.is_deleted(7) and sparse.is_deleted(7) and not milvus.is_deleted(8)
    with pytest.raises(LexVLAError, match="not in"):
        milvus.document(7)
    for terms, weights in queries:
        _same(sparse.search(terms, weights, 20), milvus.search(terms, weights, 20))
    # batches: same keys row by row, -1 padding in the same places
    q_indptr = np.cumsum([0] + [len(t) for t, _ in queries])
    q_terms, q_weights = (
        np.concatenate([t for t, _ in queries]),
        np.concatenate([w for _, w in queries]),
    )
    s_ids, s_scores = sparse.search_batch(q_indptr, q_terms, q_weights, k=8)
    m_ids, m_scores = milvus.search_batch(q_indptr, q_terms, q_weights, k=8)
    np.testing.assert_array_equal(m_ids == -1, s_ids == -1)
    np.testing.assert_allclose(m_scores, s_scores, rtol=1e-5)
    reopened = MilvusIndex.open(server, VOCAB, collection="match")
    assert len(reopened) == len(sparse) and reopened.model_ref == {"model": "t"}


def test_milvus_errors_and_empty_queries(server: str, caplog: pytest.LogCaptureFixture) -> None:
    m, meta = _corpus(20)
    index = MilvusIndex.create(server, VOCAB, {}, collection="errors")
    index.add(m.indptr, m.indices, m.data, meta)
    with pytest.raises(LexVLAError, match="already in the index"):
        index.add(m.indptr[:2], m.indices[: m.indptr[1]], m.data[: m.indptr[1]], meta[:1])
    with pytest.raises(LexVLAError, match="already exists"):
        MilvusIndex.create(server, VOCAB, {}, collection="errors")
    with pytest.raises(LexVLAError, match="another vocabulary"):
        MilvusIndex.open(server, VOCAB[::-1], collection="errors")
    with pytest.raises(LexVLAError, match="no Milvus collection"):
        MilvusIndex.open(server, VOCAB, collection="nothing_here")
    with pytest.raises(LexVLAError, match="outside"):
        index.search([V + 1], [1.0])
    assert index.search([3], [0.0]) == []
    assert "no active words" in caplog.text


def test_milvus_lite_local_file(tmp_path: Path) -> None:
    """A local `.db` URI: pymilvus starts Milvus Lite by itself."""
    m, meta = _corpus(30)
    index = MilvusIndex.create(str(tmp_path / "lex.db"), VOCAB, {"model": "t"})
    index.add(m.indptr, m.indices, m.data, meta)
    sparse = SparseIndex.create(tmp_path / "sparse", VOCAB, {"model": "t"})
    sparse.add(m.indptr, m.indices, m.data, meta)
    sparse.commit()
    terms, weights = _queries(1)[0]
    _same(sparse.search(terms, weights, 10), index.search(terms, weights, 10))
    index.close()


def test_milvus_refuses_bad_uris(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    for uri, named in (
        (f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"),
        ("bogus://nowhere", "bogus://nowhere"),
        (str(tmp_path / "missing" / "lex.db"), "missing"),
    ):
        with pytest.raises(LexVLAError, match="cannot connect to Milvus") as err:
            MilvusIndex.describe(uri)
        assert named in str(err.value)
    with pytest.raises(LexVLAError, match="'my-photos' is not a Milvus collection name"):
        MilvusIndex.describe(str(tmp_path / "lex.db"), collection="my-photos")
    assert not (tmp_path / "lex.db").exists()


# ------------------------------------------------------------------------------ build from shards
def _shards(root: Path, vocab: list[str], count: int = 3, rows: int = 40) -> Path:
    shards = root / "lex_emb"
    init_shard_dir(shards, vocab, {"name": "t"})
    rng = np.random.default_rng(5)
    for s in range(count):
        m = random_csr(rng, rows, len(vocab), 0.12, dyadic=False, head_words=4)
        meta = [{"key": f"s{s}-{i}", "path": f"img/{s}-{i}.jpg"} for i in range(rows)]
        write_shard(shards, f"part-{s}", m.indptr, m.indices, m.data, meta)
    return shards


def test_build_milvus_index_equals_build_index(server: str, tmp_path: Path) -> None:
    shards = _shards(tmp_path, VOCAB)
    sparse = build_index(shards, tmp_path / "index")
    milvus = build_milvus_index(shards, server, collection="built")
    assert len(milvus) == len(sparse) == 120 and milvus.model_ref == {"name": "t"}
    for terms, weights in _queries(8):
        _same(sparse.search(terms, weights, 10), milvus.search(terms, weights, 10))
    # run again: every shard is already there, nothing is added twice
    assert len(build_milvus_index(shards, server, collection="built")) == 120
    # an interrupted build: part of shard 2 inserted, shard 3 not yet
    source = f"part-2:{read_shard_manifest(shards).get('part-2').npz_sha256}"
    milvus.client.delete(milvus.collection, filter="doc >= 90")
    milvus.flush()
    assert milvus._count(f'source == "{source}"') == 10
    again = build_milvus_index(shards, server, collection="built")
    assert len(again) == 120 and again.num_docs == 160  # shard 2 inserted again as ids 120..159
    for terms, weights in _queries(8):
        want = [(h.key, h.score) for h in sparse.search(terms, weights, 10)]
        got = [(h.key, h.score) for h in again.search(terms, weights, 10)]
        assert [k for k, _ in got] == [k for k, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)


def test_build_milvus_refuses_another_vocabulary_before_writing(
    server: str, tmp_path: Path
) -> None:
    build_milvus_index(_shards(tmp_path / "a", VOCAB, count=1), server, collection="vocab")
    other = _shards(tmp_path / "b", VOCAB[::-1], count=1)
    with pytest.raises(LexVLAError, match="another vocabulary") as err:
        build_milvus_index(other, server, collection="vocab")
    assert "'vocab'" in str(err.value) and "--collection" in str(err.value)
    assert len(MilvusIndex.open(server, VOCAB, collection="vocab")) == 40  # nothing written


# ------------------------------------------------------------------ engine, CLI and server over Milvus
@pytest.fixture(scope="module")
def tiny_corpus(server: str, tiny_model, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The tiny model's corpus built twice: an embedded index and the Milvus collection 'tiny'."""
    from helpers.search import build_tiny_index

    shards, index = build_tiny_index(tiny_model, tmp_path_factory.mktemp("engine"), count=12)
    build_milvus_index(shards, server, collection="tiny").close()
    return shards, index


def _same_results(embedded: list[dict], remote: list[dict]) -> None:
    assert [(h["doc"], h["key"], h["metadata"]) for h in remote] == [
        (h["doc"], h["key"], h["metadata"]) for h in embedded
    ]
    np.testing.assert_allclose(
        [h["score"] for h in remote], [h["score"] for h in embedded], rtol=1e-5
    )
    for r, e in zip(remote, embedded):  # explanations: the same words, the same float32 products
        assert r["words"] == e["words"]


def test_engine_over_milvus_equals_the_embedded_index(server: str, tiny_model, tiny_corpus) -> None:
    from lexvla.search import SearchEngine, run_search

    embedded = SearchEngine.open(tiny_corpus[1], tiny_model)
    remote = SearchEngine.open(milvus=server, collection="tiny", model=tiny_model)
    assert remote.info() == embedded.info() and remote.num_docs == embedded.num_docs == 12
    for text in ("a red ball on the grass", "a dog", "two people on a beach"):
        query = embedded.query_from_text(text)
        base = embedded.search(query, k=10)
        _same_results(base, remote.search(query, k=10))
        word = base[0]["words"][0]["word"]  # steering: drop, boost, add
        for steered in (query.copy().drop(word), query.copy().boost(word, 3.0)):
            _same_results(embedded.search(steered, k=10), remote.search(steered, k=10))
        doc = base[-1]["doc"]
        want, got = embedded.explain_match(query, doc), remote.explain_match(query, doc)
        assert got["words"] == want["words"] and got["score"] == pytest.approx(want["score"])
        assert got["doc_words"] == want["doc_words"] and got["missing"] == want["missing"]
    args = {"text": "a dog", "k": 5, "drop": [], "boost": [f"{word}=2"], "explain": True}
    out_e = run_search(tiny_corpus[1], engine=embedded, **args)
    out_r = run_search(milvus=server, collection="tiny", engine=remote, **args)
    _same_results(out_e["results"], out_r["results"])
    assert remote.document(3) == embedded.document(3)
    for doc in (12, -1):
        with pytest.raises(LexVLAError, match="not in the index"):
            remote.check_doc(doc)


def test_serve_over_milvus_answers_like_the_embedded_index(server: str, tiny_model, tiny_corpus):
    from fastapi.testclient import TestClient

    from lexvla.search import SearchEngine
    from lexvla.serve.app import create_app

    apps = [
        create_app(SearchEngine.open(tiny_corpus[1], tiny_model)),
        create_app(SearchEngine.open(milvus=server, collection="tiny", model=tiny_model)),
    ]
    answers = []
    for app in apps:
        with TestClient(app) as client:
            found = client.post("/api/search", json={"text": "a dog", "k": 5}).json()
            doc = found["results"][0]["doc"]
            words = {w["word"]: w["weight"] for w in found["query"]["words"]}
            explained = client.post("/api/explain", json={"doc": doc, "words": words}).json()
            document = client.get(f"/api/docs/{doc}").json()
            missing = client.get("/api/docs/99").status_code
            answers.append((found, explained, document, missing))
    (found_e, explained_e, doc_e, missing_e), (found_r, explained_r, doc_r, missing_r) = answers
    _same_results(found_e["results"], found_r["results"])
    assert found_r["query"] == found_e["query"] and doc_r == doc_e and missing_e == missing_r == 404
    assert explained_r["words"] == explained_e["words"]


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple:
    """Run `lexvla ARGS` as the script does: (exit status, stdout, stderr)."""
    from lexvla import cli

    monkeypatch.setattr("sys.argv", ["lexvla", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_build_and_search_with_milvus(server: str, tiny_corpus, tmp_path, monkeypatch, capsys):
    shards, index = tiny_corpus
    code, out, _ = _main(
        monkeypatch, capsys, "index", "build", "--from", str(shards), "--milvus", server,
        "--collection", "cli",
    )  # fmt: skip
    assert code == 0 and "'cli'" in out and "12 documents" in out
    steer = ["--text", "a dog", "-k", "5", "--model", "tiny", "--add", "dog=2", "--explain"]
    lines = []
    for where in ([str(index)], ["--milvus", server, "--collection", "cli"]):
        code, out, err = _main(monkeypatch, capsys, "search", *where, *steer)
        assert code == 0, err
        lines.append([line.split() for line in out.splitlines() if re.match(r"\s*\d+\. ", line)])
    embedded, remote = lines
    assert len(embedded) == 5 and [r[2] for r in remote] == [r[2] for r in embedded]
    np.testing.assert_allclose(
        [float(r[1]) for r in remote], [float(r[1]) for r in embedded], atol=2e-4
    )


def test_cli_milvus_bad_input_exits_2_and_writes_nothing(
    server: str, tiny_corpus, tmp_path, monkeypatch, capsys
):
    shards, index = tiny_corpus
    dead = f"http://127.0.0.1:{_free_port()}"
    for args in (
        ["index", "build", "--from", str(shards), "--milvus", dead],
        ["search", "--milvus", dead, "--text", "a dog"],
        ["serve", "--milvus", dead],
        ["search", "--milvus", server, "--collection", "no_such", "--text", "a dog"],
        ["index", "build", "--from", str(shards), "--milvus", str(tmp_path / "no" / "x.db")],
    ):
        code, _, err = _main(monkeypatch, capsys, *args)
        assert code == 2 and "Traceback" not in err, (args, err)
        assert ("cannot connect to Milvus" in err) or ("no Milvus collection 'no_such'" in err), err
    assert not (tmp_path / "no").exists()
    # a collection built over another vocabulary: refused by name, nothing inserted
    other = _shards(tmp_path / "other", VOCAB, count=1)
    code, _, err = _main(
        monkeypatch, capsys, "index", "build", "--from", str(other), "--milvus", server,
        "--collection", "tiny",
    )  # fmt: skip
    assert code == 2 and "'tiny'" in err and "another vocabulary" in err
    assert MilvusIndex.describe(server, collection="tiny")["next_doc"] == 12
    code, _, err = _main(monkeypatch, capsys, "index", "build", "--from", str(shards))
    assert code == 2 and "exactly one of --out" in err


def test_cli_serve_passes_milvus_to_the_server(monkeypatch) -> None:
    from typer.testing import CliRunner

    from lexvla.cli import app

    calls = []
    monkeypatch.setattr("lexvla.serve.app.run", lambda *a, **kw: calls.append((a, kw)))
    result = CliRunner().invoke(app, ["serve", "--milvus", "x.db", "--collection", "photos"])
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = calls
    assert args[0] is None and kwargs["milvus"] == "x.db" and kwargs["collection"] == "photos"
