"""The caption zoo: empty, whitespace-only, 10k-character, control-character, non-Latin, emoji,
zero-width and lone-surrogate captions through the text tower, the server, the training readers and
corpus encoding. Each is encoded, dropped (and counted) or refused with an error naming it.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.bad_inputs import CAPTION_ZOO, EMPTY_CAPTIONS
from helpers.search import make_image
from lexvla.data import ImageTextDataset, ShardDataset, read_coco_captions, read_table
from lexvla.errors import LexVLAError

TEXT_CAPTIONS = [n for n in CAPTION_ZOO if n not in EMPTY_CAPTIONS]
# A lone surrogate is replaced by "?" at every boundary: JSON, file names and the model API itself.
MODEL_CAPTIONS = TEXT_CAPTIONS


def _weights(model, captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(captions).text_weights.float()  # (B, V)


@pytest.mark.parametrize("name", EMPTY_CAPTIONS)
def test_empty_captions_are_refused_by_position(tiny_model, name: str) -> None:
    with pytest.raises(LexVLAError, match="caption 1 is empty or whitespace only"):
        _weights(tiny_model, ["a dog", CAPTION_ZOO[name]])


def test_caption_zoo_encodes_like_its_clean_form(tiny_model) -> None:
    """Each caption alone equals its row in a batch, and equals the encoding of the text a naive
    cleaner gives (lone surrogates -> "?", control characters -> spaces, whitespace collapsed, cut at
    max_caption_tokens)."""
    captions = [CAPTION_ZOO[n] for n in MODEL_CAPTIONS]
    batch = _weights(tiny_model, captions)
    assert bool(batch.isfinite().all()) and bool((batch >= 0).all())
    limit = tiny_model.cfg.text.max_caption_tokens
    for row, caption in zip(batch, captions):
        encodable = caption.encode("utf-8", "replace").decode("utf-8")
        clean = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", encodable).split())
        if len(clean) > 1000:  # the long caption: one token per word in the tiny tokenizer
            clean = " ".join(clean.split()[:limit])
        torch.testing.assert_close(row, _weights(tiny_model, [clean])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row, _weights(tiny_model, [caption])[0], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from helpers.search import build_tiny_index
    from lexvla.search import SearchEngine
    from lexvla.serve.app import create_app

    _, index = build_tiny_index(tiny_model, tmp_path_factory.mktemp("serve"), count=6)
    engine = SearchEngine.open(index, tiny_model)
    with TestClient(create_app(engine)) as client:
        yield client, engine


def _post_json(client, url: str, payload: dict):
    """POST JSON with \\u escapes (the way browsers send a lone surrogate)."""
    body = json.dumps(payload).encode()
    return client.post(url, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("name", sorted(CAPTION_ZOO))
def test_text_search_answers_results_or_400(served, name: str) -> None:
    client, engine = served
    caption = CAPTION_ZOO[name]
    response = _post_json(client, "/api/search", {"text": caption, "k": 5})
    if name in EMPTY_CAPTIONS:
        assert response.status_code == 400 and "empty" in response.json()["error"]
        return
    assert response.status_code == 200, response.text
    query = engine.query_from_text(caption)
    ids, scores = engine.index.search_ids(*query.to_arrays(), 5)
    got = response.json()["results"]
    assert [r["doc"] for r in got] == ids.tolist()
    np.testing.assert_allclose([r["score"] for r in got], scores, rtol=1e-6)


@pytest.mark.parametrize("word", ["\ud800", "一只狗", "a\x00b", "x" * 5000, ""])
def test_odd_query_words_answer_400(served, word: str) -> None:
    client, _ = served
    response = _post_json(client, "/api/search", {"words": {word: 1.0}})
    assert response.status_code == 400, response.text
    assert "vocabulary" in response.json()["error"] or "empty" in response.json()["error"]


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"text": ' + b"[" * 50_000 + b"}", b"\xff\xfe\x00garbage", b'{"text": 1}'],
    ids=["nested-array", "nested-value", "binary", "wrong-type"],
)
def test_malformed_request_bodies_answer_4xx(served, body: bytes) -> None:
    client, _ = served
    response = client.post(
        "/api/search", content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(count)]
    for i, path in enumerate(paths):
        make_image(i).save(path)
    return paths


def test_training_readers_drop_empty_captions_and_fix_surrogates(tmp_path: Path) -> None:
    names = sorted(CAPTION_ZOO)
    paths = _images(tmp_path / "img", len(names))
    table = tmp_path / "t.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        import csv

        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for path, name in zip(paths, names):
            if name != "lone-surrogate":  # a UTF-8 file cannot hold one
                writer.writerow([path.name, CAPTION_ZOO[name]])
    records = read_table(table)
    kept = {Path(r.path).name: r.captions[0] for r in records}
    expected = {
        p.name: CAPTION_ZOO[n].strip()
        for p, n in zip(paths, names)
        if n not in EMPTY_CAPTIONS and n != "lone-surrogate"
    }
    assert kept == expected
    coco = {
        "images": [{"id": i, "file_name": p.name} for i, p in enumerate(paths)],
        "annotations": [
            {"id": i, "image_id": i, "caption": CAPTION_ZOO[n]} for i, n in enumerate(names)
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))  # ensure_ascii: "\ud800" escaped
    records = read_coco_captions(tmp_path / "captions.json", tmp_path / "img")
    assert len(records) == len(TEXT_CAPTIONS)
    by_file = {r.key: r.captions for r in records}
    fixed = by_file[paths[names.index("lone-surrogate")].name]
    assert fixed == [CAPTION_ZOO["lone-surrogate"].replace("\ud800", "?")]
    assert all(len(s.captions) == 1 for s in ImageTextDataset(records))


def _caption_tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            image = io.BytesIO()
            make_image(i).save(image, format="PNG")
            caption = json.dumps({"caption": CAPTION_ZOO[name]}).encode()
            for member, data in ((f"{i:03d}.png", image.getvalue()), (f"{i:03d}.json", caption)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_shards_skip_and_count_captionless_samples(tmp_path: Path) -> None:
    names = sorted(CAPTION_ZOO)
    dataset = ShardDataset(_caption_tar(tmp_path / "c.tar", names), shuffle=False)
    samples = list(dataset)
    assert len(samples) == len(TEXT_CAPTIONS) and dataset.skips.count == len(EMPTY_CAPTIONS)
    assert all("no caption" in r for r in dataset.skips.reasons.values())
    assert all(c.encode("utf-8") for s in samples for c in s.captions)  # all valid UTF-8


def test_corpus_captions_round_trip_into_the_index(tiny_model, tmp_path: Path) -> None:
    from lexvla.index import build_index
    from lexvla.search import encode_corpus

    names = sorted(CAPTION_ZOO)
    tar = _caption_tar(tmp_path / "c.tar", names)
    report = encode_corpus(tiny_model, [tar], tmp_path / "lex", batch_size=4, progress=False)
    assert report["images"] == len(names) and not report["failed"]
    index = build_index(tmp_path / "lex", tmp_path / "index")
    captions = [index.document(d).get("caption", "") for d in range(index.num_docs)]
    assert captions == [CAPTION_ZOO[n].replace("\ud800", "?").strip() for n in names]


def test_training_on_the_caption_zoo_keeps_a_finite_loss(tmp_path: Path) -> None:
    from lexvla.train.loop import fit
    from lexvla.train.setup import experiment_config

    names = [n for n in sorted(CAPTION_ZOO) if n != "lone-surrogate"]
    paths = _images(tmp_path / "img", len(names))
    lines = ["filepath\tcaption"] + [
        f"{p.name}\t{CAPTION_ZOO[n].replace(chr(9), ' ').replace(chr(10), ' ').replace(chr(13), ' ')}"
        for p, n in zip(paths, names)
    ]
    (tmp_path / "img" / "t.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = experiment_config(
        "tiny",
        overrides=[
            f"data.path={tmp_path / 'img' / 't.tsv'}",
            "train.steps=3",
            "train.batch_size=4",
            "train.save_every=0",
        ],
    )
    state = fit(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert state.step == 3 and len(losses) == 3 and all(np.isfinite(losses))
