"""`lexvla index export --format`: Anserini/PISA JSON lines, Elasticsearch/OpenSearch bulk NDJSON and
Qdrant points, each read back and searched: the top 10 equal the embedded index's. Unknown formats and
failures leave nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.index import random_csr
from lexvla.errors import LexVLAError
from lexvla.index import EXPORT_FORMATS, SparseIndex, export_index, export_jsonl

V = 64
VOCAB = [f"w{i}" for i in range(V - 3)] + ["café", "naïve", "日本"]  # non-ASCII words stay readable
N = 150


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> SparseIndex:
    m = random_csr(np.random.default_rng(11), N, V, 0.12, dyadic=False, head_words=4)
    meta = [
        {"key": f"img/{i}.jpg", "path": f"/data/{i}.jpg", "caption": f"photo {i}"} for i in range(N)
    ]
    built = SparseIndex.create(tmp_path_factory.mktemp("export") / "index", VOCAB, {"name": "t"})
    built.add(m.indptr, m.indices, m.data, meta)
    built.commit()
    built.delete(["img/4.jpg", "img/77.jpg"])
    built.commit()
    return built


def _queries(count: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(4)
    out = []
    for _ in range(count):
        terms = np.sort(rng.choice(V, rng.integers(2, 9), replace=False)).astype(np.int32)
        out.append((terms, rng.lognormal(size=len(terms)).astype(np.float32)))
    return out


def _active(index: SparseIndex) -> list[int]:
    return [d for d in range(index.num_docs) if not index.is_deleted(d)]


def test_formats_are_the_documented_ones() -> None:
    assert EXPORT_FORMATS == ("anserini", "pisa", "elasticsearch", "opensearch", "qdrant")


def test_anserini_and_pisa_keep_integer_impacts(index: SparseIndex, tmp_path: Path) -> None:
    assert export_index(index, tmp_path / "a.jsonl", "anserini") == N - 2
    assert export_index(index, tmp_path / "p.jsonl", "pisa") == N - 2
    assert export_jsonl(index, tmp_path / "j.jsonl") == N - 2
    text = (tmp_path / "a.jsonl").read_bytes()
    assert text == (tmp_path / "p.jsonl").read_bytes() == (tmp_path / "j.jsonl").read_bytes()
    records = [json.loads(line) for line in text.decode().splitlines()]
    assert [r["id"] for r in records] == [index.document(d)["key"] for d in _active(index)]
    for record, doc in zip(records, _active(index)):
        terms, weights = index.vector(doc)
        impacts = np.rint(weights.astype(np.float64) * 100).astype(int)
        want = {VOCAB[t]: int(i) for t, i in zip(terms, impacts) if i > 0}
        assert record == {"id": index.document(doc)["key"], "contents": "", "vector": want}
    assert "café" in text.decode()  # written as UTF-8, not \\u escapes


def _read_bulk(path: Path) -> list[tuple[dict, dict]]:
    """Parse a _bulk body as Elasticsearch documents it: action line, source line, each ending in \\n."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw
    lines = raw.decode("utf-8").split("\n")[:-1]
    assert len(lines) % 2 == 0
    pairs = []
    for action_line, source_line in zip(lines[::2], lines[1::2]):
        action, source = json.loads(action_line), json.loads(source_line)
        assert list(action) == ["index"] and set(action["index"]) == {"_id"}
        pairs.append((action, source))
    return pairs


@pytest.mark.parametrize("engine", ["elasticsearch", "opensearch"])
def test_bulk_ndjson_for_rank_features(index: SparseIndex, tmp_path: Path, engine: str) -> None:
    path = tmp_path / f"{engine}.ndjson"
    assert export_index(index, path, engine) == N - 2
    pairs = _read_bulk(path)
    active = _active(index)
    assert [a["index"]["_id"] for a, _ in pairs] == [index.document(d)["key"] for d in active]
    features = {}
    for (action, source), doc in zip(pairs, active):
        assert source["key"] == action["index"]["_id"] and source["meta"] == index.document(doc)
        words = source["words"]  # rank_features: string keys, strictly positive numbers
        assert all(isinstance(w, str) and isinstance(v, float) and v > 0 for w, v in words.items())
        terms, weights = index.vector(doc)
        assert list(words) == [VOCAB[t] for t in terms]
        np.testing.assert_array_equal(np.array(list(words.values()), np.float32), weights)
        features[source["key"]] = words
    # a bool query of linear rank_feature clauses (boost = query weight) sums q_w * w_doc
    for terms, weights in _queries():
        scores = {
            key: sum(float(q) * words.get(VOCAB[t], 0.0) for t, q in zip(terms, weights))
            for key, words in features.items()
        }
        ranked = sorted((k for k in scores if scores[k] > 0), key=lambda k: -scores[k])[:10]
        assert ranked == [h.key for h in index.search(terms, weights, 10)]


def test_qdrant_points_load_and_search_like_the_index(index: SparseIndex, tmp_path: Path) -> None:
    qdrant_client = pytest.importorskip(
        "qdrant_client", reason="qdrant-client is not installed: pip install 'lexvla[dev]'"
    )
    from qdrant_client import models

    path = tmp_path / "points.jsonl"
    assert export_index(index, path, "qdrant") == N - 2
    client = qdrant_client.QdrantClient(":memory:")  # local mode, in-process
    client.create_collection(
        "lexvla", vectors_config={}, sparse_vectors_config={"words": models.SparseVectorParams()}
    )
    points = [models.PointStruct(**json.loads(line)) for line in path.read_text().splitlines()]
    client.upsert("lexvla", points=points)
    assert client.count("lexvla").count == N - 2
    for terms, weights in _queries():
        found = client.query_points(
            "lexvla",
            query=models.SparseVector(indices=terms.tolist(), values=weights.tolist()),
            using="words",
            limit=10,
            with_payload=True,
        ).points
        want = index.search(terms, weights, 10)
        assert [p.id for p in found] == [h.doc for h in want]
        assert [p.payload for p in found] == [h.metadata for h in want]
        np.testing.assert_allclose([p.score for p in found], [h.score for h in want], rtol=1e-5)
    client.close()


def test_unknown_format_and_bad_paths_write_nothing(index: SparseIndex, tmp_path: Path) -> None:
    with pytest.raises(LexVLAError, match="unknown export format 'parquet'.*anserini, pisa"):
        export_index(index, tmp_path / "x.parquet", "parquet")
    with pytest.raises(LexVLAError, match="existing folder"):
        export_index(index, tmp_path / "missing" / "x.jsonl", "qdrant")
    with pytest.raises(LexVLAError, match="existing folder"):
        export_index(index, tmp_path, "qdrant")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_keeps_the_previous_file(tmp_path: Path) -> None:
    built = SparseIndex.create(tmp_path / "index", VOCAB, {})
    built.add([0, 1, 2], [1, 2], [0.5, 0.25], [{"key": "a"}, {"key": "k" * 600}])
    built.commit()
    out = tmp_path / "bulk.ndjson"
    out.write_text("previous\n")
    with pytest.raises(LexVLAError, match="longer than the 512 bytes"):
        export_index(built, out, "elasticsearch")  # the second document fails, after the first
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "bulk.ndjson",
        "index",
    ]


def test_cli_export_formats_and_exit_status(index, tmp_path, monkeypatch, capsys) -> None:
    from lexvla import cli

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.argv", ["lexvla", "index", "export", *args])
        try:
            cli.main()
        except SystemExit as exit_info:
            return int(exit_info.code or 0), capsys.readouterr().err
        return 0, capsys.readouterr().err

    base = ["--index", str(index.path)]
    assert run(*base, "--format", "qdrant", "--out", str(tmp_path / "q.jsonl"))[0] == 0
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == N - 2
    assert run(*base, "--out", str(tmp_path / "a.jsonl"))[0] == 0  # anserini by default
    assert json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])["contents"] == ""
    code, err = run(*base, "--format", "faiss", "--out", str(tmp_path / "f.out"))
    assert code == 2 and "unknown export format 'faiss'" in err and "Traceback" not in err
    assert not (tmp_path / "f.out").exists()
