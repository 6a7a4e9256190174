"""False discoveries: which words a model activates for everything, and which it activates wrongly.

The overuse penalty (docs/method.md) exists because a lexical model can take the shortcut of activating
the same meaningless words for every input. This module measures that on a dataset, per modality:

- **document frequency** of each word (share of inputs whose sparsified vector activates it) and its mean
  weight; the most overused words;
- **overused words** = words active in more than `top_frac` of the inputs (default 50 %), and the share of
  each vector's mass on them (L1 mass of the active words: `Σ_overused w / Σ_active w`);
- with ground truth (the words of an image's captions, or a synthetic sample's words): the **false
  discovery share** = share of an image's active words that appear in none of its captions (also
  weighted by mass), the most frequent false discoveries, and the share of the caption words in the
  vocabulary that the image activates (`gt_recall`).

Active = not below the threshold (default the paper's `1/sqrt(V)`).

Word matching: caption words are lower-cased and split on anything but letters. A display word matches
when, lower-cased and without a leading `##`, it equals a caption word, or does so after dropping a plural
"s"/"es" on either side (dog / dogs, bus / buses), or is a prefix of 4+ letters of a caption word (the
tokenizer splits rare words: "frisb" of "frisbee"). A `##` continuation piece is the form the LLM predicts
right after the prompt's opening quote and shows as the same word in merged displays, so "##dog" counts
as "dog"; a piece that spells no caption word ("##ing") is a false discovery like any other word.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lexvla.eval.results import format_table
from lexvla.eval.retrieval import (
    RetrievalData,
    collect_retrieval_data,
    encode_retrieval_data,
    model_operating_point,
)
from lexvla.layers.lexical import sparsify_threshold

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z]+")
PREFIX_MIN = 4


def caption_words(texts: Iterable[str]) -> set[str]:
    """Lower-cased alphabetic words of some captions (or of single words)."""
    return {w for text in texts for w in _WORD.findall(str(text).lower())}


def normalize_word(display: str) -> str:
    """A display word as matched against captions: lower-cased, leading `##` removed."""
    return display.lower().removeprefix("##")


def _singular(word: str) -> str:
    if word.endswith("es") and len(word) > 4:
        return word[:-2]
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def truth_forms(truth: set[str]) -> tuple[set[str], set[str]]:
    """(words and their singulars, prefixes of 4+ letters) of a set of caption words."""
    exact = truth | {_singular(t) for t in truth}
    prefixes = {t[:n] for t in truth for n in range(PREFIX_MIN, len(t) + 1)}
    return exact, prefixes


def word_in_caption(word: str, forms: tuple[set[str], set[str]]) -> bool:
    """Whether a normalised vocabulary word matches caption words given as :func:`truth_forms`."""
    exact, prefixes = forms
    return bool(word) and (word in exact or _singular(word) in exact or word in prefixes)


# ------------------------------------------------------------------------------ per modality
def overused_mass_share(weights: Tensor, overused: Tensor) -> Tensor:
    """Share of each vector's L1 mass on the overused words: (N, V), (V,) bool -> (N,)."""
    weights = weights.float()
    total = weights.sum(-1).clamp_min(1e-30)
    return (weights * overused.float()).sum(-1) / total


def word_statistics(
    active_weights: Tensor, words: Sequence[str], *, top_frac: float = 0.5, top_n: int = 20
) -> dict[str, Any]:
    """Document frequency, mean weight, overused words and their mass share for one modality.

    Args:
        active_weights: (N, V) sparsified weights (zero = inactive).
        words: (V,) display words.
        top_frac: a word active in more than this share of the inputs is overused.
        top_n: how many of the most frequent words to list.
    """
    active = active_weights != 0  # (N, V)
    doc_freq = active.double().mean(0)  # (V,)
    mean_weight = active_weights.double().mean(0)  # (V,)
    overused = doc_freq > top_frac  # (V,)
    share = overused_mass_share(active_weights, overused)  # (N,)
    by_weight = torch.argsort(mean_weight, descending=True, stable=True)
    order = by_weight[torch.argsort(doc_freq[by_weight], descending=True, stable=True)][:top_n]
    return {
        "num_inputs": active_weights.shape[0],
        "active_words": float(active.sum(-1).double().mean()),
        "most_frequent": [
            {"word": words[i], "doc_freq": float(doc_freq[i]), "mean_weight": float(mean_weight[i])}
            for i in order.tolist()
            if doc_freq[i] > 0
        ],
        "overused_words": [words[i] for i in torch.nonzero(overused).flatten().tolist()],
        "overused_mass": _summary(share),
        "top_frac": top_frac,
    }


def _summary(values: Tensor) -> dict[str, float]:
    values = values.double()
    if not len(values):
        return {"mean": float("nan"), "median": float("nan"), "max": float("nan")}
    return {
        "mean": float(values.mean()),
        "median": float(values.median()),
        "max": float(values.max()),
    }


# ------------------------------------------------------------------------------ against ground truth
def discovery_against_truth(
    active_weights: Tensor,
    words: Sequence[str],
    truth: Sequence[Iterable[str]],
    *,
    top_n: int = 20,
) -> dict[str, Any]:
    """False-discovery share of each vector's active words against its ground-truth words.

    Args:
        active_weights: (N, V) sparsified weights.
        words: (V,) display words.
        truth: N collections of captions or words (tokenised with :func:`caption_words`).
        top_n: how many of the most frequent false discoveries to list (by number of vectors, then
            summed weight).
    """
    normalized = [normalize_word(w) for w in words]
    vocab_forms = set(normalized)
    shares, mass_shares, recalls = [], [], []
    false_counts: dict[str, tuple[int, float]] = {}  # word -> (vectors, summed weight)
    for row, gt in zip(active_weights, truth):
        gt_words = caption_words(gt)
        forms = truth_forms(gt_words)
        ids = torch.nonzero(row).flatten().tolist()
        if not ids:
            continue
        wrong = [i for i in ids if not word_in_caption(normalized[i], forms)]
        shares.append(len(wrong) / len(ids))
        mass_shares.append(float(row[wrong].sum() / row[ids].sum()) if wrong else 0.0)
        for i in wrong:
            count, mass = false_counts.get(words[i], (0, 0.0))
            false_counts[words[i]] = (count + 1, mass + float(row[i]))
        known = [w for w in gt_words if w in vocab_forms]
        if known:
            hit = {normalized[i] for i in ids}
            recalls.append(sum(w in hit for w in known) / len(known))
    top = sorted(false_counts.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:top_n]
    return {
        "false_discovery_share": _summary(torch.tensor(shares)),
        "false_discovery_mass": _summary(torch.tensor(mass_shares)),
        "gt_recall": _summary(torch.tensor(recalls)),
        "most_frequent_false": [{"word": w, "count": c, "weight": m} for w, (c, m) in top],
        "evaluated": len(shares),
    }


def false_discoveries(
    image_weights: Tensor,
    text_weights: Tensor | None,
    words: Sequence[str],
    gt_words_per_image: Sequence[Iterable[str]] | None = None,
    top_frac: float = 0.5,
    *,
    gt_words_per_text: Sequence[Iterable[str]] | None = None,
    threshold: float | None = None,
    top_n: int = 20,
) -> dict[str, Any]:
    """Overuse and false-discovery analysis of a dataset's lexical vectors (module docstring).

    Args:
        image_weights: (N_i, V) image vectors (dense or sparsified).
        text_weights: (N_t, V) text vectors, or None.
        words: (V,) display words (`model.vocab.words`).
        gt_words_per_image: per image, its captions or words; None: no false-discovery part.
        top_frac: a word active in more than this share of a modality's inputs is overused.
        gt_words_per_text: per text, its ground-truth words (usually its own caption).
        threshold: activation threshold; None = `1/sqrt(V)`.
        top_n: list lengths.

    Returns:
        `{"threshold", "image": {...}, "text": {...}}`; each modality as :func:`word_statistics`
        plus `"truth"` (:func:`discovery_against_truth`) when ground truth is given.
    """
    result: dict[str, Any] = {"threshold": threshold}
    for name, weights, truth in (
        ("image", image_weights, gt_words_per_image),
        ("text", text_weights, gt_words_per_text),
    ):
        if weights is None:
            continue
        active = sparsify_threshold(weights.float(), threshold)  # (N, V)
        stats = word_statistics(active, words, top_frac=top_frac, top_n=top_n)
        if truth is not None:
            if len(truth) != len(weights):
                raise ValueError(f"{len(truth)} ground-truth entries for {len(weights)} {name}s")
            stats["truth"] = discovery_against_truth(active, words, truth, top_n=top_n)
        result[name] = stats
    if result["threshold"] is None:
        result["threshold"] = 1.0 / image_weights.shape[-1] ** 0.5
    return result


def evaluate_false_discoveries(
    model: Any,
    dataset_or_pairs: RetrievalData | Iterable[Any],
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    top_frac: float = 0.5,
    limit: int | None = None,
) -> dict[str, Any]:
    """Encode a captioned dataset and run :func:`false_discoveries` with the captions as ground truth.

    An image's ground truth is the words of all its captions (plus the sample's `words` when the
    dataset provides them, as the synthetic one does); a text's is its own caption.
    """
    data = collect_retrieval_data(dataset_or_pairs, limit=limit)
    _, threshold = model_operating_point(model, "threshold")
    enc = encode_retrieval_data(
        model, data, batch_size=batch_size, cache_dir=cache_dir, progress=progress
    )
    per_image: list[list[str]] = [[] for _ in range(data.num_images)]
    for caption, owner in zip(data.captions, data.text_to_image.tolist()):
        per_image[owner].append(caption)
    for i, extra in enumerate(data.words or []):
        per_image[i].extend(extra or [])
    return false_discoveries(
        enc.image_weights,
        enc.text_weights,
        model.vocab.words,
        per_image,
        top_frac,
        gt_words_per_text=[[c] for c in data.captions],
        threshold=threshold,
    )


def discovery_table(result: dict[str, Any], top: int = 10) -> str:
    """Printable summary: most frequent words per modality, overuse and false-discovery shares."""
    lines = [f"active = weight >= {result['threshold']:.4g}"]
    for name in ("image", "text"):
        stats = result.get(name)
        if not stats:
            continue
        lines.append(
            f"\n{name}: {stats['num_inputs']} vectors, {stats['active_words']:.1f} active words; "
            f"{len(stats['overused_words'])} words active in > {100 * stats['top_frac']:.0f}% "
            f"carry {100 * stats['overused_mass']['mean']:.1f}% of the mass on average"
        )
        rows = [
            [e["word"], 100 * e["doc_freq"], f"{e['mean_weight']:.4f}"]
            for e in stats["most_frequent"][:top]
        ]
        lines.append(format_table(rows, ["word", "active in %", "mean weight"]))
        truth = stats.get("truth")
        if truth:
            false = ", ".join(
                f"{e['word']} ({e['count']})" for e in truth["most_frequent_false"][:top]
            )
            lines.append(
                f"false discoveries: {100 * truth['false_discovery_share']['mean']:.1f}% of active "
                f"words ({100 * truth['false_discovery_mass']['mean']:.1f}% of the mass) are in no "
                f"caption; caption words activated: {100 * truth['gt_recall']['mean']:.1f}%\n"
                f"most frequent: {false}"
            )
    return "\n".join(lines)


def run_false_discoveries(
    model: LexVLA,
    data: str | Path,
    *,
    images: str | Path | None = None,
    split: str = "test",
    holdout: int = 0,
    limit: int | None = None,
    top_frac: float = 0.5,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    model_ref: str | None = None,
) -> dict[str, Any]:
    """`lexvla eval discovery`: overuse and false discoveries on a data path, JSON report to `out`.

    Arguments as :func:`lexvla.eval.retrieval.run_retrieval`; print with :func:`discovery_table`.
    """
    from lexvla.eval.runs import run_on_captions

    def evaluate(pairs: RetrievalData) -> dict[str, Any]:
        return evaluate_false_discoveries(
            model,
            pairs,
            batch_size=batch_size,
            cache_dir=cache_dir,
            progress=progress,
            top_frac=top_frac,
        )

    def settings(result: dict[str, Any]) -> dict[str, Any]:
        return {"top_frac": top_frac, "threshold": result["threshold"], "batch_size": batch_size}

    return run_on_captions(
        model,
        data,
        evaluate,
        settings,
        images=images,
        split=split,
        holdout=holdout,
        limit=limit,
        out=out,
        model_ref=model_ref,
    )
