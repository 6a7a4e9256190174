"""Word quality: are a model's top words the words people use for the image?

Retrieval can be good while the words are noise (a dense vector of fragments still ranks images).
This module measures what a reader of the explanations sees, on any captioned data:

- **caption-word precision@k** per image: the share of its k heaviest words found in any of its
  captions; per caption: the same against its image's captions (its own included);
- **object recall@k** per image with instance annotations: the share of the object classes present
  whose name (any word of it) is among the image's k heaviest words;
- **active words** at the model's inference sparsification (the paper's 1/sqrt(V) threshold);
- the **overuse detector**: words in the top-10 of more than 10 % of the images, with their share,
  flagged when a stop word or a sub-word fragment;
- the **calibration** every number needs: the precision of one fixed answer for every image, the 10
  most frequent caption words of the set (stop words excluded).

Words are compared after :func:`fold_word`: lower-cased, a `##` continuation piece merged with its word,
plurals folded (dogs → dog, puppies → puppy, men → man). A vector's weights are summed over the
dimensions that fold to one word before its top k are taken, so "dog", "##dog" and "dogs" are one
entry. Stop words (`lexvla.vocab.stop_words`) never count as found: a top-10 slot spent on "the" is a
miss even though every caption has "the".

Tensors in, dict out: :func:`word_quality` takes dense (N, V) weights; :func:`evaluate_words` encodes
a dataset with a model first; :func:`run_words` is the CLI's `lexvla eval words`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lexvla.errors import LexVLAError
from lexvla.eval.results import format_table
from lexvla.layers.lexical import sparsify_threshold
from lexvla.vocab import CONTINUATION_PREFIX, caption_words, fold_groups, fold_word, stop_words

if TYPE_CHECKING:
    from lexvla.eval.retrieval import RetrievalData
    from lexvla.models.lexvla import LexVLA


def fold_vocabulary(words: Sequence[str]) -> tuple[Tensor, list[str]]:
    """Group a vocabulary's display words by folded form: `((V,) group of each dimension, (W,) words)`."""
    groups, folded = fold_groups(words)
    return torch.tensor(groups, dtype=torch.long), folded


def top_word_ids(weights: Tensor, groups: Tensor, num_groups: int, k: int) -> Tensor:
    """The `k` heaviest folded words of each vector: (N, V) weights -> (N, k) group ids, -1 where a
    vector has fewer than k words of non-zero weight.

    A vector's weight on a folded word is the sum over the dimensions folding to it.
    """
    folded = weights.new_zeros(weights.shape[0], num_groups).index_add_(1, groups, weights)
    values, ids = folded.topk(min(k, num_groups), dim=-1)  # (N, k)
    return torch.where(values > 0, ids, torch.full_like(ids, -1))


def precision_at_k(
    top_ids: Tensor, group_words: Sequence[str], truths: Sequence[set[str]]
) -> Tensor:
    """Share of each row's top words found in its truth set (stop words never count; words of zero
    weight are not words a vector shows, so they are left out of its count): (N,) float."""
    stops = stop_words()
    found = []
    for row, truth in zip(top_ids.tolist(), truths):
        shown = [group_words[i] for i in row if i >= 0]
        hits = sum(word in truth and word not in stops for word in shown)
        found.append(hits / len(shown) if shown else 0.0)
    return torch.tensor(found, dtype=torch.float64)


def frequent_caption_words(truths: Sequence[set[str]], n: int = 10) -> list[str]:
    """The `n` words found in the captions of the most images, stop words excluded (ties: a-z)."""
    counts = Counter(w for truth in truths for w in truth if w not in stop_words() and len(w) > 1)
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def fixed_answer_precision(answer: Sequence[str], truths: Sequence[set[str]]) -> float:
    """Mean precision of giving the same `answer` words for every image (the calibration floor)."""
    if not truths:
        return math.nan
    return sum(sum(w in t for w in answer) / max(len(answer), 1) for t in truths) / len(truths)


def frequent_top_words(
    top_ids: Tensor,
    group_words: Sequence[str],
    fragments: set[str],
    min_share: float = 0.1,
    truths: Sequence[set[str] | None] | None = None,
) -> list[dict[str, Any]]:
    """Words in the top k of more than `min_share` of the rows, most frequent first, with flags.

    With `truths` (per row, its caption words; None for a row without captions) each word also gets
    `right`: the share of the captioned rows showing it whose captions have it (a word shown from a
    learnt prior, "dog" on every animal, is often wrong), and `in_captions`: the share of captioned
    rows whose captions have it (what a calibrated model would show). A stop word is never right, as
    in :func:`precision_at_k`.
    """
    rows = max(top_ids.shape[0], 1)
    shown = top_ids.flatten()
    counts = torch.bincount(shown[shown >= 0], minlength=len(group_words)).tolist()
    stops = stop_words()
    frequent = [
        {
            "word": group_words[i],
            "share": c / rows,
            "stop_word": group_words[i] in stops,
            "fragment": group_words[i] in fragments,
            **(_word_truth(top_ids, i, group_words[i], truths) if truths is not None else {}),
        }
        for i, c in enumerate(counts)
        if c / rows > min_share
    ]
    return sorted(frequent, key=lambda row: (-row["share"], row["word"]))


def _word_truth(
    top_ids: Tensor, group: int, word: str, truths: Sequence[set[str] | None]
) -> dict[str, float]:
    """`right` and `in_captions` of one word (see :func:`frequent_top_words`), over captioned rows."""
    showing = (top_ids == group).any(-1).tolist()  # (N,)
    counts = word not in stop_words()
    captioned = [
        (show, counts and word in truth)
        for show, truth in zip(showing, truths)
        if truth is not None
    ]
    shown_right = [has for show, has in captioned if show]
    return {
        "right": sum(shown_right) / len(shown_right) if shown_right else math.nan,
        "in_captions": sum(has for _, has in captioned) / max(len(captioned), 1),
    }


def fragment_words(words: Sequence[str]) -> set[str]:
    """Folded forms of continuation pieces with no whole-word twin ("##ing" without "ing")."""
    whole = {fold_word(w) for w in words if not w.startswith(CONTINUATION_PREFIX)}
    return {
        fold_word(w)
        for w in words
        if w.startswith(CONTINUATION_PREFIX) and fold_word(w) not in whole
    }


def object_recall(
    top_ids: Tensor, group_words: Sequence[str], objects: Sequence[Sequence[str]]
) -> Tensor:
    """Per image with objects: share of its object class names (any word of the name) among its top
    words. Rows without objects are left out: (N_with_objects,) float."""
    recalls = []
    for row, names in zip(top_ids.tolist(), objects):
        if not names:
            continue
        top = {group_words[i] for i in row if i >= 0}
        hits = [bool(caption_words([name]) & top) for name in names]
        recalls.append(sum(hits) / len(hits))
    return torch.tensor(recalls, dtype=torch.float64)


def _mean(values: Tensor) -> float:
    return float(values.mean()) * 100.0 if len(values) else math.nan


def word_quality(
    image_weights: Tensor,
    text_weights: Tensor,
    text_to_image: Tensor,
    captions: Sequence[str],
    words: Sequence[str],
    *,
    k: int = 10,
    objects: Sequence[Sequence[str]] | None = None,
    object_k: int = 20,
    threshold: float | None = None,
    overuse_share: float = 0.1,
) -> dict[str, Any]:
    """Word-quality measures of dense lexical vectors against captions (module docstring).

    Args:
        image_weights: (N_i, V) dense image vectors.
        text_weights: (N_t, V) dense text vectors.
        text_to_image: (N_t,) index of each caption's image.
        captions: (N_t,) the captions.
        words: (V,) the model's display words.
        k: the k of precision@k (and of the overuse detector's top-k).
        objects: per image, the names of the object classes present (instances); None: no recall.
        object_k: the k of object recall@k.
        threshold: active-word threshold; None: the paper's 1/sqrt(V).
        overuse_share: a word in the top k of more than this share of images is listed.

    Returns:
        A dict of percentages (`image_precision`, `text_precision`, `fixed_answer_precision`,
        `object_recall`), `active_words` (image, text), `overused_words` (image, text), the
        `fixed_answer` words and counts. Precision values are means over images / captions, in %.
    """
    if len(captions) != text_weights.shape[0] or len(text_to_image) != len(captions):
        raise LexVLAError(
            "word quality: captions, text vectors and text_to_image disagree in length"
        )
    groups, group_words = fold_vocabulary(words)
    num_images = image_weights.shape[0]
    per_image: list[list[str]] = [[] for _ in range(num_images)]
    for caption, owner in zip(captions, text_to_image.tolist()):
        per_image[owner].append(caption)
    truths = [caption_words(c) for c in per_image]
    known = {w for t in truths for w in t} & set(group_words) - stop_words()
    if not known:
        raise LexVLAError(
            "no caption word is in the model's vocabulary (after removing stop words): word "
            "quality cannot be measured; check that the captions are English text"
        )
    image_top = top_word_ids(image_weights.float(), groups, len(group_words), max(k, object_k))
    text_top = top_word_ids(text_weights.float(), groups, len(group_words), k)
    captioned = [i for i, c in enumerate(per_image) if c]  # an image without captions has no truth
    image_precision = precision_at_k(
        image_top[captioned, :k], group_words, [truths[i] for i in captioned]
    )
    text_truths = [truths[owner] for owner in text_to_image.tolist()]
    text_precision = precision_at_k(text_top, group_words, text_truths)
    answer = frequent_caption_words([truths[i] for i in captioned], k)
    fragments = fragment_words(words)
    image_truths = [truths[i] if c else None for i, c in enumerate(per_image)]
    result: dict[str, Any] = {
        "k": k,
        "image_precision": _mean(image_precision),
        "text_precision": _mean(text_precision),
        "fixed_answer_precision": 100.0
        * fixed_answer_precision(answer, [truths[i] for i in captioned]),
        "fixed_answer": answer,
        "active_words": {
            "image": _active(image_weights, threshold),
            "text": _active(text_weights, threshold),
        },
        "overused_words": {
            "image": frequent_top_words(
                image_top[:, :k], group_words, fragments, overuse_share, image_truths
            ),
            "text": frequent_top_words(
                text_top, group_words, fragments, overuse_share, text_truths
            ),
        },
        "overuse_share": overuse_share,
        "num_images": num_images,
        "images_without_captions": num_images - len(captioned),
        "num_texts": len(captions),
        "caption_words_in_vocab": len(known),
    }
    if objects is not None:
        recall = object_recall(image_top[:, :object_k], group_words, objects)
        result.update(
            object_recall=_mean(recall), object_k=object_k, images_with_objects=len(recall)
        )
    result["meaningless_overused"] = sorted(
        {
            row["word"]
            for rows in result["overused_words"].values()
            for row in rows
            if row["stop_word"] or row["fragment"]
        }
    )
    return result


def _active(weights: Tensor, threshold: float | None) -> float:
    return float((sparsify_threshold(weights.float(), threshold) != 0).sum(-1).double().mean())


def top_words_of(weights: Tensor, words: Sequence[str], k: int = 10) -> list[list[str]]:
    """The k heaviest folded words of each vector, as words (for examples in reports)."""
    groups, group_words = fold_vocabulary(words)
    ids = top_word_ids(weights.float(), groups, len(group_words), k)
    return [[group_words[i] for i in row if i >= 0] for row in ids.tolist()]


def words_table(result: dict[str, Any]) -> str:
    """A short printable summary of a :func:`word_quality` result."""
    k = result["k"]
    rows = [
        ["image", result["image_precision"], result["active_words"]["image"]],
        ["text", result["text_precision"], result["active_words"]["text"]],
        ["fixed answer", result["fixed_answer_precision"], math.nan],
    ]
    table = format_table(rows, ["side", f"caption-word precision@{k} %", "active words"])
    if "object_recall" in result:
        table += (
            f"\nobject recall@{result['object_k']}: {result['object_recall']:.1f} % "
            f"({result['images_with_objects']} images with objects)"
        )
    table += f"\nfixed answer: {', '.join(result['fixed_answer'])}"
    for side in ("image", "text"):
        listed = result["overused_words"][side]
        shown = ", ".join(overused_word_text(row) for row in listed[:12])
        share = 100 * result["overuse_share"]
        table += f"\n{side} top-{k} words in > {share:.0f}% of {side}s: {shown or 'none'}"
    if result["meaningless_overused"]:
        table += f"\n* stop word or fragment: {', '.join(result['meaningless_overused'])}"
    table += "\n(right: the share of the vectors showing the word whose captions have it)"
    return table


def overused_word_text(row: dict[str, Any]) -> str:
    """One overused word as a reader sees it: "dog 38% (right 15%)", "ing* 20% (never right)"."""
    flag = "*" if row["stop_word"] or row["fragment"] else ""
    right = row.get("right")
    if right is None or math.isnan(right):
        tail = ""
    elif right == 0:
        tail = " (never right)"
    else:  # a word right now and then never reads as "right 0%"
        tail = f" (right {max(100 * right, 1):.0f}%)"
    return f"{row['word']}{flag} {100 * row['share']:.0f}%{tail}"


# ------------------------------------------------------------------------------ with a model
def instance_names(
    instances: str | Path, keys: Sequence[str], paths: Sequence[Any]
) -> tuple[list[list[str]], int]:
    """Object class names present in each image, from a COCO instances JSON.

    Images are matched by file name. Returns (names per image, images of the instances file that are
    not in the captioned data), so a caller can say how many were ignored.
    """
    from lexvla.data.masks import read_coco_instance_names

    by_file = read_coco_instance_names(instances)
    names = {Path(str(p)).name for p in paths} | {Path(str(k)).name for k in keys}
    per_image = [
        sorted(by_file.get(Path(str(p)).name, by_file.get(Path(str(key)).name, set())))
        for key, p in zip(keys, paths)
    ]
    unmatched = sum(1 for name in by_file if name not in names)
    return per_image, unmatched


def evaluate_words(
    model: Any,
    dataset_or_pairs: Any,
    *,
    k: int = 10,
    instances: str | Path | None = None,
    object_k: int = 20,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode a captioned dataset with `model` (a LexVLA) and measure its word quality.

    Images without captions are left out and counted (`images_without_captions`); instance
    annotations for images not in the data are ignored and counted (`instances_unmatched`).
    """
    from lexvla.eval.retrieval import (
        collect_retrieval_data,
        encode_retrieval_data,
        model_operating_point,
    )

    data = collect_retrieval_data(dataset_or_pairs, limit=limit)
    enc = encode_retrieval_data(
        model, data, batch_size=batch_size, cache_dir=cache_dir, progress=progress
    )
    _, threshold = model_operating_point(model, "threshold")
    objects = None
    unmatched = 0
    if instances is not None:
        objects, unmatched = instance_names(instances, data.keys, data.images)
    result = word_quality(
        enc.image_weights,
        enc.text_weights,
        data.text_to_image,
        data.captions,
        model.vocab.words,
        k=k,
        objects=objects,
        object_k=object_k,
        threshold=threshold,
    )
    result["examples"] = _examples(enc.image_weights, data, model.vocab.words)
    if instances is not None:
        result["instances_unmatched"] = unmatched
    return result


def _examples(image_weights: Tensor, data: Any, words: Sequence[str], n: int = 5) -> list[dict]:
    """A few images with their top words and first caption, for a reader to check by eye."""
    picks = torch.linspace(0, data.num_images - 1, min(n, data.num_images)).long().tolist()
    tops = top_words_of(image_weights[picks], words)
    first = {}
    for t, owner in enumerate(data.text_to_image.tolist()):
        first.setdefault(owner, data.captions[t])
    return [
        {"image": data.keys[i], "top_words": top, "caption": first.get(i, "")}
        for i, top in zip(picks, tops)
    ]


def run_words(
    model: LexVLA,
    data: str | Path,
    *,
    images: str | Path | None = None,
    split: str = "test",
    instances: str | Path | None = None,
    k: int = 10,
    object_k: int = 20,
    limit: int | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    model_ref: str | None = None,
) -> dict[str, Any]:
    """`lexvla eval words`: word quality of `model` on a captioned data file; the JSON report goes to
    `out`, naming the model `model_ref`. Print it with :func:`words_table`."""
    from lexvla.eval.runs import run_on_captions

    def evaluate(pairs: RetrievalData) -> dict[str, Any]:
        return evaluate_words(
            model,
            pairs,
            k=k,
            instances=instances,
            object_k=object_k,
            batch_size=batch_size,
            cache_dir=cache_dir,
            progress=progress,
        )

    def settings(result: dict[str, Any]) -> dict[str, Any]:
        return {"k": k, "object_k": object_k, "batch_size": batch_size}

    return run_on_captions(
        model,
        data,
        evaluate,
        settings,
        images=images,
        split=split,
        limit=limit,
        out=out,
        model_ref=model_ref,
        data_extra={"instances": str(instances or "")},
    )
