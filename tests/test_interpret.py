"""Looking inside: exact per-word explanations, word clouds, grounding heatmaps, the explain page."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.errors import LexVLAError
from lexvla.interpret import grounding as G
from lexvla.interpret import plots
from lexvla.interpret.explain import image_report
from lexvla.interpret.lexicon import OTHER_WORDS, merge_pieces, score_contributions

WORDS = [f"w{i}" for i in range(40)] + ["dog", "##dog", "##ing", "dogs", "puppies"]


def _sparse(seed: int, nnz: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.zeros(len(WORDS))
    v[torch.randperm(len(WORDS), generator=gen)[:nnz]] = torch.rand(nnz, generator=gen)
    return torch.nn.functional.normalize(v, dim=0)


def _variance(path) -> float:
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float32).std())


@pytest.mark.parametrize(("k", "merge"), [(3, False), (5, True), (100, False), (0, False)])
def test_score_contributions_sum_to_the_score(k, merge):
    image, text = _sparse(0, 30), _sparse(1, 25)
    score = float(image @ text)
    parts = score_contributions(image, text, WORDS, k, merge=merge)
    assert sum(c for _, c in parts) == pytest.approx(score, abs=1e-5)
    shared = int(((image * text) != 0).sum())
    named = [w for w, _ in parts if w != OTHER_WORDS]
    assert len(named) == min(k, shared) or merge
    assert (parts[-1][0] == OTHER_WORDS) == (len(named) < (shared if not merge else len(named) + 1))
    values = [c for w, c in parts if w != OTHER_WORDS]
    assert values == sorted(values, reverse=True)


def test_score_contributions_exact_example():
    image = torch.zeros(len(WORDS))
    text = torch.zeros(len(WORDS))
    image[[0, 1, 40, 41]] = torch.tensor([0.5, 0.1, 0.3, 0.2])
    text[[0, 1, 40, 41]] = torch.tensor([0.2, 0.4, 0.5, 0.5])
    assert score_contributions(image, text, WORDS, 1) == [
        ("dog", pytest.approx(0.15)),
        (OTHER_WORDS, pytest.approx(0.24)),  # w0 0.1, w1 0.04, ##dog 0.1
    ]
    assert score_contributions(image, text, WORDS, 1, merge=True)[0] == ("dog", pytest.approx(0.25))
    with pytest.raises(ValueError):
        score_contributions(image, text[:3], WORDS, 1)


def test_merge_pieces_sums_twins():
    v = torch.zeros(len(WORDS))
    v[40], v[41], v[42] = 0.3, 0.2, 0.1
    assert merge_pieces(v, WORDS) == pytest.approx({"dog": 0.5, "ing": 0.1})
    v[43], v[44] = 0.25, 0.05  # a plural joins its singular; a plural without one shows as itself
    assert merge_pieces(v, WORDS) == pytest.approx({"dog": 0.75, "ing": 0.1, "puppies": 0.05})


def test_word_cloud_png_is_not_blank(tmp_path):
    path = plots.save_word_cloud(_sparse(2, 20), WORDS, tmp_path / "cloud.png")
    assert _variance(path) > 10
    empty = plots.save_word_cloud(torch.zeros(len(WORDS)), WORDS, tmp_path / "empty.png")
    assert empty.is_file()


def test_grounding_scores_and_heatmap(tmp_path):
    gen = torch.Generator().manual_seed(0)
    patches = torch.rand(16, len(WORDS), generator=gen)  # (P, V)
    text = torch.rand(len(WORDS), generator=gen)
    scores = G.text_patch_scores(patches, text)
    assert torch.allclose(scores, torch.stack([p @ text for p in patches]))
    assert torch.allclose(G.text_patch_scores(patches[None], text[None])[0], scores)
    image = Image.new("RGB", (90, 60), (120, 160, 200))
    path = plots.save_grounding_heatmap(
        image, G.to_grid(scores), tmp_path / "heat.png", boxes=G.top_patches(scores)
    )
    assert _variance(path) > 10


def test_patch_selection():
    patches = torch.arange(9 * 2, dtype=torch.float32).reshape(9, 2)
    assert (
        G.parse_patch("1,2", 3) == 5 and G.parse_patch((2, 0), 3) == 6 and G.parse_patch(4, 3) == 4
    )
    assert G.patches_weights(patches, [0, "2,2"]).tolist() == [16.0, 17.0]
    for bad in ("3,0", 9, "x", (0, -1)):
        with pytest.raises(LexVLAError):
            G.parse_patch(bad, 3)
    with pytest.raises(LexVLAError):
        G.patches_weights(patches, [])
    image_weights = torch.tensor([0.0, 1.0])
    assert G.word_source_patches(patches, image_weights, k=1) == [8]


def _assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert 'src="file' not in page and "src='file" not in page
    sources = re.findall(r"""src=["']([^"']*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page


def test_image_report_writes_pngs_and_a_self_contained_page(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    image_path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image_path)
    out = image_report(tiny_model, image_path, "a dog & <b>frisbee</b>", tmp_path / "out", k=5)
    assert set(out["files"]) == {
        "image_words",
        "text_words",
        "grounding",
        "contributions",
        "patch_words",
    }
    for path in out["files"].values():
        assert _variance(path) > 5, path
    assert sum(c for _, c in out["contributions"]) == pytest.approx(out["score"], abs=1e-5)
    assert len(out["patches"]) == 3 and out["grid"] == tiny_model.cfg.vision.image_size // 14
    page = (tmp_path / "out" / "index.html").read_text()
    _assert_self_contained(page)
    assert "&lt;b&gt;frisbee&lt;/b&gt;" in page  # the caption is escaped
    saved = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert saved["score"] == pytest.approx(out["score"])


def test_image_report_without_caption_and_chosen_patches(tiny_model, tmp_path):
    image = Image.new("RGB", (40, 40), (200, 30, 60))
    out = image_report(tiny_model, image, None, tmp_path, patches=["0,1", 3])
    assert set(out["files"]) == {"image_words", "patch_words"}
    assert [p["index"] for p in out["patches"]] == [1, 3]
    assert "score" not in out
    _assert_self_contained((tmp_path / "index.html").read_text())


def test_image_report_names_the_model_on_its_page(tiny_model, tmp_path):
    image = Image.new("RGB", (30, 30), (9, 99, 199))
    out = image_report(tiny_model, image, "a red bus", tmp_path, model_ref="tiny")
    assert out["model"] == "tiny" and "tiny" in (tmp_path / "index.html").read_text()
