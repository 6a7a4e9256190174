"""The main job: end to end with a tiny training budget (report with non-empty figures, the bundled
Flickr8k head beside the untrained and the briefly trained model), and fast checks of its parts
(the head or its announced stand-in, shares that never read 0, the report's tables)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from lexvla.demo import pipeline, run_report
from lexvla.models import bundled


@pytest.mark.assets
@pytest.mark.slow
def test_demo_writes_a_report_with_figures(tmp_path, coco_mini, small_offline_model):
    console = Console(record=True, width=200)
    path = pipeline.run_demo(data_dir=coco_mini, out_dir=tmp_path, steps=2, console=console)
    html = path.read_text()
    assert "Retrieval on held-out images" in html and "PatchDis" in html and "word by word" in html
    assert "Word quality on held-out images" in html and "fixed answer" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    assert not re.search(r"(?<![\d.])0(\.0+)?%", html)  # a share above 0 never reads as 0%
    results = json.loads((tmp_path / "report.json").read_text())
    assert {"retrieval", "words", "patchdis", "searches", "sparsity_curve", "head"} <= set(results)
    bundled_head = results["head"]["bundled"]
    assert bundled_head == bundled.bundled_checkpoint_available("flickr8k")
    compared = {"untrained", "trained", "head"} if bundled_head else {"untrained", "trained"}
    assert set(results["retrieval"]) == set(results["words"]) == compared
    assert set(results["patchdis"]) == {"untrained", "head" if bundled_head else "trained"}
    assert all(r["num_images"] == 16 for r in results["retrieval"].values())
    for words in results["words"].values():
        assert 0 <= words["image_precision"] <= 100 and 0 <= words["text_precision"] <= 100
        assert words["fixed_answer"] and words["active_words"]["image"] > 0
    assert all(p["background"] == "relative" for p in results["patchdis"].values())
    assert len(results["searches"]) == 3
    if bundled_head:  # (2 training steps may leave a query no shared word with any image)
        assert all(s["hits"] for s in results["searches"])
    for search in results["searches"]:
        for hit in search["hits"]:
            assert hit["score"] > 0 and hit["shares"][0]["share"] > 0
    shown = console.export_text()
    model = "flickr8k" if bundled_head else str(tmp_path / "run")
    assert f"--model {model}" in shown
    if not bundled_head:
        assert "bundled Flickr8k head is missing" in shown and "missing" in html
    for png in [tmp_path / "sparsity.png", *tmp_path.glob("inside/*/*.png")]:
        pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
        assert pixels.std() > 5, f"{png} looks blank"
    assert len(list(tmp_path.glob("inside/*/*.png"))) >= 6


# ------------------------------------------------------------------------------ the parts, fast
def test_shares_show_the_digits_they_need():
    assert run_report.share_text(0.4213) == "42%" and run_report.share_text(0.0734) == "7.3%"
    assert run_report.share_text(0.0042) == "0.42%" and run_report.share_text(1e-7) == "<0.01%"
    assert run_report.share_text(0.0) == "0%"
    shown = pipeline._word_shares([("dog", 0.02), ("grass", 0.0005), ("sky", 1e-9)], 0.1)
    assert shown == "dog 20%, grass 0.50%, sky <0.01%"
    assert pipeline._word_shares([("dog", 0.0)], 0.0) == "dog"


def test_search_shares_merge_the_forms_of_a_word():

    from lexvla.vocab import LexicalVocabulary

    words = ("dog", "dogs", "##dog", "grass", "puppies")
    vocab = LexicalVocabulary(tuple(range(len(words))), words, "pieces", 10)
    rows = [
        {"word": "dogs", "contribution": 0.01},
        {"word": "grass", "contribution": 0.015},
        {"word": "dog", "contribution": 0.02},
        {"word": "puppies", "contribution": 0.005},
    ]
    shares = pipeline._merged_shares(rows, 0.1, vocab)
    assert [(s["word"], round(s["share"], 6)) for s in shares] == [
        ("dog", 0.3),
        ("grass", 0.15),
        ("puppies", 0.05),
    ]


def test_the_head_is_the_bundled_checkpoint(monkeypatch, tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "flickr8k-head")
    monkeypatch.setattr(bundled, "RESOURCES", tmp_path)
    console = Console(record=True, width=200)
    run = pipeline.DemoRun(out_dir=tmp_path / "out", data_dir=None, console=console)
    trained = object()
    head = pipeline._load_head(run, trained)
    assert head is not trained and head.vocab.words == tiny_model.vocab.words
    assert run.results["head"] == {
        "bundled": True,
        "model": "flickr8k",
        "path": str(tmp_path / "flickr8k-head"),
    }
    assert pipeline.serve_command(run).endswith(f"--index {run.out_dir / 'index'} --model flickr8k")
    assert [n for n, _ in pipeline._compared(run, trained, head, None)] == [
        "untrained",
        "trained",
        "head",
    ]


def test_without_the_bundled_head_the_brief_model_stands_in_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled, "RESOURCES", tmp_path)  # no flickr8k-head there
    console = Console(record=True, width=200)
    run = pipeline.DemoRun(out_dir=tmp_path / "out", data_dir=None, console=console)
    trained = object()
    assert pipeline._load_head(run, trained) is trained
    assert "bundled Flickr8k head is missing" in console.export_text()
    assert run.results["head"]["bundled"] is False
    assert pipeline.serve_command(run).endswith(f"--model {tmp_path / 'out' / 'run'}")
    assert [n for n, _ in pipeline._compared(run, trained, trained, None)] == [
        "untrained",
        "trained",
    ]
    run.results["total_seconds"] = 1.0
    run.out_dir.mkdir()
    html = run_report.write(run).read_text()
    assert "bundled Flickr8k head is missing" in html and "briefly trained model" in html


def _words(precision: float) -> dict:
    return {
        "k": 10,
        "image_precision": precision,
        "text_precision": 2 * precision,
        "fixed_answer_precision": 12.5,
        "fixed_answer": ["dog", "man", "table"],
        "object_recall": 30.0,
        "object_k": 20,
        "active_words": {"image": 900.0, "text": 400.0},
        "overused_words": {
            "image": [{"word": "kitchen", "share": 0.5, "stop_word": False, "fragment": False}],
            "text": [],
        },
        "overuse_share": 0.1,
        "examples": [{"image": "a/1.jpg", "top_words": ["dog", "grass"], "caption": "a dog"}],
    }


def _retrieval(r1: float) -> dict:
    keys = [f"{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    return {
        **dict.fromkeys(keys, r1),
        "chance": dict.fromkeys(keys, 6.25),
        "num_images": 16,
        "num_texts": 80,
        "active_words": {"image": 900.0, "text": 400.0},
        "sparsify": "threshold",
    }


def test_report_sets_the_three_models_side_by_side(tmp_path):
    run = pipeline.DemoRun(out_dir=tmp_path, data_dir=None, console=Console(record=True))
    run.timings = {"data": 1.0}
    run.results = {
        "head": {"bundled": True, "model": "flickr8k", "path": "/x/flickr8k-head"},
        "training": [{"step": 5, "loss": 3.0}, {"step": 40, "loss": 2.0}],
        "retrieval": {
            n: _retrieval(r) for n, r in (("untrained", 6.0), ("trained", 9.0), ("head", 40.0))
        },
        "words": {n: _words(p) for n, p in (("untrained", 1.0), ("trained", 3.0), ("head", 35.0))},
        "searches": [
            {
                "query": "a dog",
                "query_words": [("dog", 0.31)],
                "hits": [
                    {
                        "key": "1.jpg",
                        "score": 0.05,
                        "words": [
                            {"word": "dog", "contribution": 0.02},
                            {"word": "grass", "contribution": 0.0001},
                        ],
                    }
                ],
            }
        ],
        "total_seconds": 99.0,
    }
    html = run_report.write(run).read_text()
    for label in ("untrained heads", "briefly trained (this run)", "Flickr8k head (bundled)"):
        assert html.count(label) >= 2, label  # a row in retrieval and in word quality
    assert "one fixed answer (calibration)" in html and "kitchen 50%" in html
    assert "dog 40%, grass 0.20%" in html and "0.000" not in html
    assert "--model flickr8k" in html or "flickr8k" in html
    assert json.loads(Path(tmp_path / "report.json").read_text())["head"]["model"] == "flickr8k"
