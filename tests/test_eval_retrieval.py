"""Zero-shot retrieval: the evaluation path against a naive reference, dot vs cosine, cache, reports."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lexvla.errors import LexVLAError
from lexvla.eval import retrieval as R
from lexvla.eval.results import build_report, model_fingerprint, write_report


def _naive_recall(scores: list[list[float]], owner: list[int], ks) -> dict[str, float]:
    """Sort candidates by score; on ties the correct item goes last (pessimistic)."""
    out = {}
    i2t = []
    for i in range(len(scores)):
        if i not in owner:
            continue
        order = sorted(range(len(owner)), key=lambda t, i=i: (-scores[i][t], owner[t] == i))
        i2t.append(next(pos for pos, t in enumerate(order) if owner[t] == i))
    t2i = []
    for t in range(len(owner)):
        order = sorted(range(len(scores)), key=lambda i, t=t: (-scores[i][t], i == owner[t]))
        t2i.append(order.index(owner[t]))
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            out[f"{name}/R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    return out


class ScoreModel(nn.Module):
    """A fake model whose dot products are a given (N_i, N_t) score matrix.

    Image i (a 2x2 PIL image of red value i) encodes as row i of the scores; caption "t{j}" as the
    one-hot vector of word j, so image · text = scores[i, j].
    """

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scores", scores.float())
        self.cfg = SimpleNamespace(lexical=SimpleNamespace(sparsify="none", threshold=0.0, top_k=5))
        self.calls = 0

    @property
    def vocab_size(self) -> int:
        return self.scores.shape[1]

    def encode_image(self, images, crop=True, **_):
        self.calls += 1
        rows = [self.scores[im.getpixel((0, 0))[0]] for im in images]
        return SimpleNamespace(image_weights=torch.stack(rows))

    def encode_text(self, texts):
        ids = torch.tensor([int(t[1:]) for t in texts])
        return SimpleNamespace(text_weights=torch.eye(self.vocab_size)[ids])


def _case(n_images: int, captions: int, seed: int, levels: int):
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_images), captions)
    rng.shuffle(owner)
    scores = rng.normal(size=(n_images, len(owner))) + 1.2 * (
        np.arange(n_images)[:, None] == owner[None, :]
    )
    scores = np.round(scores * levels) / levels  # quantised: many ties
    return torch.tensor(scores, dtype=torch.float32), owner.tolist()


def _pairs(owner: list[int], n_images: int):
    images = [Image.new("RGB", (2, 2), (i, 0, 0)) for i in range(n_images)]
    return [(images[o], f"t{t}") for t, o in enumerate(owner)]


@pytest.mark.parametrize(("n_images", "captions", "levels"), [(9, 3, 1), (12, 5, 2), (7, 2, 4)])
def test_recall_through_evaluation_path_matches_naive(n_images, captions, levels):
    scores, owner = _case(n_images, captions, seed=n_images, levels=levels)
    model = ScoreModel(scores)
    result = R.evaluate_retrieval(
        model, _pairs(owner, n_images), sparsify="dense", batch_size=4, progress=False
    )
    expected = _naive_recall(scores.tolist(), owner, (1, 5, 10))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert result["num_images"] == n_images and result["num_texts"] == len(owner)


def test_pairs_of_one_image_are_merged_and_limit_keeps_first_images():
    scores, owner = _case(5, 3, seed=0, levels=2)
    data = R.collect_retrieval_data(_pairs(owner, 5))
    assert data.num_images == 5 and data.num_texts == 15
    for t, o in enumerate(data.text_to_image.tolist()):
        assert data.images[o].getpixel((0, 0))[0] == owner[t]
    limited = R.collect_retrieval_data(_pairs(owner, 5), limit=2)
    assert limited.num_images == 2 and limited.num_texts == 6


def test_samples_with_captions_are_accepted(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    sample = SimpleNamespace(key="a", image=Image.open(path), captions=["x", "y"], path=path)
    data = R.collect_retrieval_data([sample])
    assert data.images == [path] and data.captions == ["x", "y"]
    with pytest.raises(LexVLAError, match="pairs"):
        R.collect_retrieval_data([42])
    with pytest.raises(LexVLAError, match="no image"):
        R.collect_retrieval_data([])


def test_cosine_and_dot_differ_on_unnormalised_vectors():
    # Image A has a large norm: with the dot product it wins text t1 that belongs to B.
    images = torch.tensor([[3.0, 1.0], [0.0, 0.5]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    result = R.recall_from_weights(images, texts, torch.tensor([0, 1]), ks=(1,))
    assert result["text_to_image/R@1"] == 50.0
    assert result["cosine"]["text_to_image/R@1"] == 100.0


def test_dense_dot_equals_cosine_for_normalised_vectors(tiny_model):
    images = [Image.new("RGB", (30, 20), (40 * i, 255 - 30 * i, 7 * i)) for i in range(4)]
    pairs = [(im, [f"a photo number {i}", f"picture {i} here"]) for i, im in enumerate(images)]
    result = R.evaluate_retrieval(tiny_model, pairs, sparsify="dense", progress=False)
    for key, value in result["cosine"].items():
        assert result[key] == pytest.approx(value)
    assert result["active_words"]["image"] == tiny_model.vocab_size
    default = R.evaluate_retrieval(tiny_model, pairs, progress=False)
    assert default["sparsify"].startswith("threshold")
    assert default["active_words"]["image"] < tiny_model.vocab_size
    assert "I→T R@1" in R.retrieval_table(default)


def test_encodings_are_cached_on_disk_without_pickle(tmp_path):
    scores, owner = _case(6, 2, seed=3, levels=2)
    model = ScoreModel(scores)
    pairs = _pairs(owner, 6)
    first = R.evaluate_retrieval(model, pairs, sparsify="dense", cache_dir=tmp_path, progress=False)
    calls = model.calls
    files = list(tmp_path.rglob("*"))
    assert any(f.suffix == ".safetensors" for f in files)
    assert not any(f.suffix in (".pt", ".pkl", ".pickle") for f in files)
    second = R.evaluate_retrieval(
        model, pairs, sparsify="dense", cache_dir=tmp_path, progress=False
    )
    assert model.calls == calls  # read from the cache
    assert first == second
    model.scores[0, 0] += 1.0  # another model: another fingerprint, no stale cache hit
    R.evaluate_retrieval(model, pairs, sparsify="dense", cache_dir=tmp_path, progress=False)
    assert model.calls > calls


def test_operating_points():
    assert R.parse_operating_point("512") == 512
    assert R.parse_operating_point("topk:64") == 64
    assert R.parse_operating_point("none") == "dense"
    with pytest.raises(LexVLAError):
        R.parse_operating_point("fancy")
    with pytest.raises(LexVLAError):
        R.parse_operating_point(0)
    weights = torch.tensor([[0.5, 0.3, 0.1, 0.0]])
    assert (R.sparsify_weights(weights, 2) != 0).sum() == 2
    assert (R.sparsify_weights(weights, "threshold", 0.2) != 0).sum() == 2


def test_chance_recall_one_caption_per_image():
    owner = torch.arange(20)
    chance = R.chance_recall(owner, 20, ks=(1, 5))
    assert chance["text_to_image/R@5"] == pytest.approx(25.0)
    assert chance["image_to_text/R@1"] == pytest.approx(5.0)
    assert chance["image_to_text/R@5"] == pytest.approx(25.0)
    two = R.chance_recall(torch.arange(10).repeat(2), 10, ks=(1,))  # 2 of 20 texts are right
    assert two["image_to_text/R@1"] == pytest.approx(10.0)


def test_report_has_metadata_and_is_strict_json(tmp_path):
    result = {"image_to_text/R@1": 12.5, "cosine": {"image_to_text/R@1": math.nan}}
    path = write_report(
        tmp_path / "out" / "r.json",
        result,
        model_ref={"ref": "tiny", "fingerprint": "abc"},
        data={"path": "x"},
        settings={"sparsify": "threshold", "ks": (1, 5)},
    )
    text = path.read_text()
    report = json.loads(text)
    assert report["image_to_text/R@1"] == 12.5
    assert report["cosine"]["image_to_text/R@1"] is None  # NaN written as null
    assert report["model"]["fingerprint"] == "abc" and report["settings"]["ks"] == [1, 5]
    assert {"torch", "python", "lexvla"} <= set(report["versions"])
    assert not list(tmp_path.rglob("*.tmp-*"))
    with pytest.raises(ValueError, match="reserved"):
        build_report({"model": 1}, model_ref="m", data="d", settings={})


def test_model_fingerprint_tracks_weights(tiny_model, fresh_tiny_model):
    assert model_fingerprint(tiny_model) == model_fingerprint(fresh_tiny_model)
    with torch.no_grad():
        fresh_tiny_model.vision.codebook.add_(1e-3)
    assert model_fingerprint(tiny_model) != model_fingerprint(fresh_tiny_model)


def test_training_validation_reports_the_configured_recall_ks(tiny_model):
    from lexvla.data.synthetic import SyntheticDataset
    from lexvla.train.validate import validate

    result = validate(
        tiny_model, SyntheticDataset(6, image_size=32, captions_per_image=2), ks=(1, 2)
    )
    assert "image_to_text/R@2" in result and "image_to_text/R@5" not in result
    assert set(result["at_top_300"]) == {
        f"{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 2)
    }
