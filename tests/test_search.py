"""lexvla.search: corpus encoding (folders, WebDataset tars, resume, ranks), queries, steering, search
equal to a brute-force dot product, explanations and grounding, on the `tiny` model.

The images, the tiny index and the brute force are in tests/helpers/search.py (shared).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.search import brute_force, build_tiny_index, make_image, make_images, stored_matrix
from lexvla.errors import LexVLAError


@pytest.fixture(scope="module")
def tiny_index(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    shards, index = build_tiny_index(tiny_model, root)
    return shards, index


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_index):
    from lexvla.search import SearchEngine

    return SearchEngine.open(tiny_index[1], tiny_model)


def assert_same_ranking(hits, expected, k):
    assert [h["key"] for h in hits] == [key for key, _ in expected[:k]]
    np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in expected[:k]], rtol=1e-5)


# ---------------------------------------------------------------------------------- encode_corpus
def test_encode_folder_report_and_resume(tiny_model, tmp_path):
    from lexvla.index import read_shard_manifest
    from lexvla.search import encode_corpus

    make_images(tmp_path / "images", 6)
    out = tmp_path / "lex_emb"
    report = encode_corpus(tiny_model, tmp_path / "images", out, chunk_size=4, progress=False)
    assert report["encoded"] == ["chunk-00000", "chunk-00001"] and report["images"] == 6
    assert [f["key"] for f in report["failed"]] == ["broken.jpg"]
    assert (
        "broken.jpg" in report["failed"][0]["error"]
        and "BytesIO" not in report["failed"][0]["error"]
    )
    assert json.loads((out / "encode_report.json").read_text())["images"] == 6
    manifest = read_shard_manifest(out)
    assert sum(s.rows for s in manifest.shards) == 6
    assert manifest.model["vocab_fingerprint"] == tiny_model.vocab.fingerprint()
    again = encode_corpus(tiny_model, tmp_path / "images", out, chunk_size=4, progress=False)
    assert again["encoded"] == [] and again["skipped"] == report["encoded"]
    assert again["failed"] == report["failed"]  # failures of finished shards are still reported
    make_image(0).save(tmp_path / "images" / "000-new.png")  # sorts first: every chunk shifts
    with pytest.raises(LexVLAError, match="image folder changed"):
        encode_corpus(tiny_model, tmp_path / "images", out, chunk_size=4, progress=False)


def test_encode_sparsity_cap_and_types(tiny_model, tmp_path):
    from lexvla.index import read_shard
    from lexvla.search import encode_corpus

    make_images(tmp_path / "images", 3, broken=False)
    encode_corpus(tiny_model, tmp_path / "images", tmp_path / "out", max_words=20, progress=False)
    shard = read_shard(tmp_path / "out", "chunk-00000")
    assert shard.indices.dtype == np.int32 and shard.values.dtype == np.float16
    assert np.diff(shard.indptr).max() <= 20
    # The stored rows are the model's threshold-sparsified weights, capped at the top 20.
    image = Image.open(shard.metadata[0]["path"])
    with torch.no_grad():
        weights = tiny_model.encode_image([image]).image_weights
    expected = tiny_model.sparsify(weights, max_words=20)[0]
    ids = torch.nonzero(expected).flatten().numpy()
    np.testing.assert_array_equal(shard.indices[: shard.indptr[1]], ids)
    np.testing.assert_allclose(shard.values[: shard.indptr[1]], expected[ids].numpy(), rtol=1e-3)


def test_encode_resumes_after_a_crash(tiny_model, tmp_path, monkeypatch):
    from lexvla.index import read_shard
    from lexvla.search import encode, encode_corpus

    make_images(tmp_path / "images", 9, broken=False)
    real = encode._encode_shard
    calls = []

    def crash_on_second(model, shard, *args):
        calls.append(shard.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed mid-shard
        return real(model, shard, *args)

    monkeypatch.setattr(encode, "_encode_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(
            tiny_model, tmp_path / "images", tmp_path / "out", chunk_size=4, progress=False
        )
    monkeypatch.setattr(encode, "_encode_shard", real)
    report = encode_corpus(
        tiny_model, tmp_path / "images", tmp_path / "out", chunk_size=4, progress=False
    )
    assert report["skipped"] == ["chunk-00000"]
    assert report["encoded"] == ["chunk-00001", "chunk-00002"]
    encode_corpus(tiny_model, tmp_path / "images", tmp_path / "clean", chunk_size=4, progress=False)
    for name in ("chunk-00000", "chunk-00001", "chunk-00002"):
        resumed, clean = read_shard(tmp_path / "out", name), read_shard(tmp_path / "clean", name)
        np.testing.assert_array_equal(resumed.indices, clean.indices)
        np.testing.assert_array_equal(resumed.values, clean.values)


def test_encode_ranks_split_the_shards(tiny_model, tmp_path, monkeypatch):
    from lexvla.search import encode_corpus

    make_images(tmp_path / "images", 7, broken=False)
    out = tmp_path / "out"
    r0 = encode_corpus(
        tiny_model, tmp_path / "images", out, chunk_size=2, rank=0, world_size=2, progress=False
    )
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r1 = encode_corpus(tiny_model, tmp_path / "images", out, chunk_size=2, progress=False)
    assert r0["encoded"] == ["chunk-00000", "chunk-00002"]
    assert r1["encoded"] == ["chunk-00001", "chunk-00003"] and r1["rank"] == 1
    assert (out / "encode_report-rank0.json").is_file() and (
        out / "encode_report-rank1.json"
    ).is_file()
    with pytest.raises(LexVLAError, match="rank 2"):
        encode_corpus(tiny_model, tmp_path / "images", out, rank=2, world_size=2, progress=False)


def _write_tar(path: Path, samples: list[tuple[str, Image.Image | bytes, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            if isinstance(image, Image.Image):
                buf = io.BytesIO()
                image.save(buf, format="JPEG")
                data = buf.getvalue()
            else:
                data = image
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_encode_webdataset_tars(tiny_model, tmp_path):
    from lexvla.index import build_index, read_shard
    from lexvla.search import SearchEngine, encode_corpus

    (tmp_path / "tars").mkdir()
    _write_tar(
        tmp_path / "tars" / "part-0.tar",
        [("a/000", make_image(0), "a sky"), ("a/001", make_image(1), "grass")],
    )
    _write_tar(
        tmp_path / "tars" / "part 1.tar",
        [("002", make_image(2), "sand"), ("003", b"garbage", "bad")],
    )
    report = encode_corpus(
        tiny_model, str(tmp_path / "tars" / "*.tar"), tmp_path / "out", progress=False
    )
    # Tars in sorted order; a name with a space is made a valid shard name.
    assert report["encoded"] == ["part_1", "part-0"] and report["images"] == 3
    assert [f["key"] for f in report["failed"]] == ["part_1/003"]
    meta = read_shard(tmp_path / "out", "part-0").metadata
    assert meta[0]["key"] == "part-0/a/000" and meta[0]["caption"] == "a sky"
    assert meta[0]["member"] == "a/000.jpg"
    build_index(tmp_path / "out", tmp_path / "index")
    engine = SearchEngine.open(tmp_path / "index", tiny_model)
    doc = engine.index.doc_id("part-0/a/001")
    image = engine.document_image(doc)  # read back from inside the tar
    assert image.size == (160, 120)
    # A folder of tars works the same way.
    again = encode_corpus(tiny_model, tmp_path / "tars", tmp_path / "out", progress=False)
    assert again["skipped"] == ["part_1", "part-0"]


def test_encode_input_errors(tiny_model, tmp_path):
    from lexvla.search import encode_corpus

    with pytest.raises(LexVLAError, match="does not exist"):
        encode_corpus(tiny_model, tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LexVLAError, match="no images"):
        encode_corpus(tiny_model, tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(LexVLAError, match="no file matches"):
        encode_corpus(tiny_model, str(tmp_path / "*.tar"), tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------- search
def test_open_loads_the_model_the_index_records(tiny_index):
    from lexvla.search import SearchEngine

    engine = SearchEngine.open(tiny_index[1])
    assert engine.info()["model"]["name"] == "tiny" and len(engine) == 10


def test_open_refuses_another_vocabulary(tiny_index, tiny_model):
    from lexvla.index import SparseIndex
    from lexvla.search import SearchEngine

    with pytest.raises(LexVLAError, match="different vocabulary"):
        SearchEngine(tiny_model, _FakeVocabIndex(SparseIndex.open(tiny_index[1])))


class _FakeVocabIndex:
    def __init__(self, index):
        self.index = index
        self.vocab = ["other"] * 3

    def __getattr__(self, name):
        return getattr(self.index, name)


def test_text_search_equals_brute_force(engine, tiny_index):
    query = engine.query_from_text("a red ball on the grass")
    assert 0 < len(query) <= 256 and query.source == "text: a red ball on the grass"
    hits = engine.search(query, k=5)
    assert_same_ranking(hits, brute_force(engine, tiny_index[0], query), 5)
    for hit in hits:  # the listed per-word contributions add up to the score
        assert hit["words"] and sum(w["contribution"] for w in hit["words"]) == pytest.approx(
            hit["score"], rel=1e-4
        )
        assert hit["metadata"]["path"].endswith(hit["key"].split("/")[-1])
    groups, labels = engine.model.vocab.word_groups()
    # Each word is named as a person reads it.
    for row in (row for hit in hits for row in hit["words"]):
        assert row["group"] == labels[groups[engine.model.vocab.index_of(row["word"])]]
    groups_seen = [row["group"] for row in hits[0]["words"]]
    assert len(groups_seen) == len(set(groups_seen))  # one row per word, its forms merged


def test_image_query_finds_the_same_image_first(engine, tiny_index):
    first = engine.document(3)
    query = engine.query_from_image(Path(first["path"]))
    hits = engine.search(query, k=3)
    assert hits[0]["doc"] == 3
    assert_same_ranking(hits, brute_force(engine, tiny_index[0], query), 3)


def test_steering_drop_boost_add(engine, tiny_index):
    shards = tiny_index[0]
    query = engine.query_from_text("a dog")
    base = engine.search(query, k=10)
    # Add a word that only one document holds strongly, with a large weight: that document wins.
    matrix, keys = stored_matrix(shards, engine.vocab.size)
    target = base[-1]["doc"]
    word_id = int(
        np.argmax(
            matrix[target]
            - matrix.max(axis=0, where=np.arange(len(keys))[:, None] != target, initial=0)
        )
    )
    word = engine.vocab.words[word_id]
    added = query.copy().add(word, 50.0)
    hits = engine.search(added, k=10)
    assert hits[0]["doc"] == target and hits[0]["words"][0]["word"] == word
    assert_same_ranking(hits, brute_force(engine, shards, added), 10)
    # Dropping that word again gives back the original ranking.
    assert [h["doc"] for h in engine.search(added.drop(word), k=10)] == [h["doc"] for h in base]
    # Boosting the best hit's top contributing word raises that hit's score by the right amount.
    top = base[0]
    boosted_word = top["words"][0]["word"]
    boosted = query.copy().boost(boosted_word, 3.0)
    hits = {h["doc"]: h for h in engine.search(boosted, k=10)}
    expected = top["score"] + 2.0 * top["words"][0]["contribution"]
    assert hits[top["doc"]]["score"] == pytest.approx(expected, rel=1e-4)
    assert_same_ranking(engine.search(boosted, k=10), brute_force(engine, shards, boosted), 10)
    # Dropping every word but one: only documents with that word remain, scored by it alone.
    single = engine.query_from_words({boosted_word: 1.0})
    for hit in engine.search(single, k=10):
        assert [w["word"] for w in hit["words"]] == [boosted_word]


def test_query_errors(engine):
    query = engine.query_from_text("a cat")
    with pytest.raises(LexVLAError, match="not in the lexical vocabulary"):
        query.add("zzzqqq", 1.0)
    with pytest.raises(LexVLAError, match="Did you mean 'dog'"):
        query.add("DOG", 1.0)
    absent = next(w for w in engine.vocab.words if w not in query)
    with pytest.raises(LexVLAError, match="not a word of this query"):
        query.drop(absent)
    word = next(iter(query.words))
    with pytest.raises(LexVLAError, match=">= 0"):
        query.boost(word, -1)
    with pytest.raises(LexVLAError, match="finite"):
        query.add(word, float("nan"))
    with pytest.raises(LexVLAError, match="empty"):
        engine.query_from_text("   ")
    with pytest.raises(LexVLAError, match="not in the lexical vocabulary"):
        engine.query_from_words({"dog": 1.0, "nonword": 2.0})


def test_empty_query_gives_no_result(engine):
    query = engine.query_from_words({"dog": 1.0}).drop("dog")
    assert query.is_empty and engine.search(query) == []


def test_explain_matches_the_score(engine):
    query = engine.query_from_text("two people on a beach")
    hit = engine.search(query, k=1)[0]
    ex = engine.explain_match(query, hit["doc"], k=5)
    assert ex["score"] == pytest.approx(hit["score"], rel=1e-5)
    assert sum(r["contribution"] for r in ex["words"]) + ex["remainder"] == pytest.approx(
        ex["score"], rel=1e-5
    )
    assert len(ex["words"]) == 5 and ex["shared_words"] >= 5
    for row in ex["words"]:
        assert row["contribution"] == pytest.approx(
            row["query_weight"] * row["doc_weight"], rel=1e-5
        )
    assert [r["word"] for r in ex["words"]] == [w["word"] for w in hit["words"][:5]]
    assert ex["doc_words"][0]["weight"] >= ex["doc_words"][-1]["weight"]
    with pytest.raises(LexVLAError, match="not in the index"):
        engine.explain_match(query, 10)


def test_grounding_is_patch_weights_dot_query(engine, tiny_model):
    query = engine.query_from_text("a blue sky")
    heat = engine.grounding(query, doc=2)
    image = engine.document_image(2)
    with torch.no_grad():
        patches = tiny_model.encode_image([image], return_patches=True, crop=False).patch_weights[0]
    expected = patches.float() @ torch.from_numpy(query.to_dense())
    assert heat["rows"] * heat["cols"] == patches.shape[0]
    np.testing.assert_allclose(
        np.array(heat["scores"]).ravel(), expected.numpy(), rtol=1e-4, atol=1e-7
    )
    assert heat["max"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert all(w in query for row in heat["words"] for w in row if w)
    described = engine.describe_image(image, k=5)
    assert len(described["words"]) == 5 and len(described["patches"]) == described["rows"]


def test_complete(engine):
    words = engine.complete("do", limit=5)
    assert words and all(w.startswith("do") or w.startswith("##do") for w in words)
    assert "dog" in engine.complete("dog")
    assert engine.complete("   ") == [] and engine.complete("zzzzq") == []


def test_query_words_name_their_group(engine):
    """Each query word carries the word its forms share, so "dog" and "dogs" show as one word."""
    query = engine.query_from_words({"dogs": 2.0, "dog": 1.0, "cat": 0.5})
    rows = {row["word"]: row["group"] for row in query.to_dict()["words"]}
    assert rows == {"dogs": "dog", "dog": "dog", "cat": "cat"}


def test_run_search_for_the_cli(engine, tiny_index):
    from lexvla.search import parse_word_values, run_search

    out = run_search(tiny_index[1], text="a dog", k=3, engine=engine)
    word = out["results"][0]["words"][0]["word"]
    steered = run_search(
        tiny_index[1], text="a dog", k=3, engine=engine, drop=[word], boost=[], explain=True
    )
    assert word not in [w["word"] for w in steered["query"]["words"]]
    assert steered["results"][0]["explanation"]["score"] == pytest.approx(
        steered["results"][0]["score"], rel=1e-5
    )
    added = run_search(tiny_index[1], text="a dog", k=3, engine=engine, add=["cat=5"])
    assert {"word": "cat", "weight": 5.0, "group": "cat"} in added["query"]["words"]
    assert parse_word_values(["dog=2", " cat = 0.5"], "--boost") == {"dog": 2.0, "cat": 0.5}
    for bad in (["dog"], ["dog=x"], ["=2"], ["dog=-1"], ["dog=inf"]):
        with pytest.raises(LexVLAError, match="WORD=NUMBER"):
            parse_word_values(bad, "--boost")
    with pytest.raises(LexVLAError, match="exactly one"):
        run_search(tiny_index[1], engine=engine)


def test_a_retrained_model_cannot_add_to_an_older_models_corpus(fresh_tiny_model, tmp_path):
    """The corpus records a fingerprint of the trained weights: after retraining, encoding into the
    same folder is refused instead of silently keeping the older model's vectors as 'done'."""
    from lexvla.search.encode import encode_corpus, trained_weights_fingerprint

    make_images(tmp_path / "images", 4, broken=False)
    out = tmp_path / "out"
    before = trained_weights_fingerprint(fresh_tiny_model)
    encode_corpus(fresh_tiny_model, tmp_path / "images", out, progress=False)
    with torch.no_grad():
        next(iter(fresh_tiny_model.trainable_parameters().values())).add_(0.01)
    assert trained_weights_fingerprint(fresh_tiny_model) != before
    with pytest.raises(LexVLAError, match="holds vectors of model"):
        encode_corpus(fresh_tiny_model, tmp_path / "images", out, progress=False)


def test_hit_words_merge_the_forms_of_one_word():
    """A hit's contributions from "dog" and "dogs" are one row (summed, named by the larger form);
    other words stay apart and the total is unchanged."""
    from types import SimpleNamespace

    from lexvla.search.engine import _hit_dict
    from lexvla.vocab import LexicalVocabulary

    words = ("dog", "dogs", "cat", "grass")
    vocab = LexicalVocabulary(tuple(range(len(words))), words, "pieces", 10)
    hit = SimpleNamespace(
        doc=3, score=0.7, words=[("dog", 0.1), (1, 0.3), ("cat", 0.25), (3, 0.05)]
    )
    rows = _hit_dict(hit, vocab)["words"]
    assert [r["word"] for r in rows] == ["dogs", "cat", "grass"]
    assert [r["contribution"] for r in rows] == pytest.approx([0.4, 0.25, 0.05])
    assert sum(r["contribution"] for r in rows) == pytest.approx(0.7)
