"""Zero-shot image-text retrieval: encode a captioned dataset, score every pair, Recall@K both ways.

Protocol (Karpathy & Fei-Fei 2015; CLIP, VDR and LexVLA on Flickr30K / COCO, see `lexvla.eval.metrics`):
a text query is right at K when its own image is among the K best images; an image query is right when
*any* of its captions is among the K best texts; ties count against the model.

Scores are the dot product of the (sparsified) lexical vectors, as the model scores at inference. The
vectors are L2-normalised before sparsification and not re-normalised after, so after sparsification
the dot product and the cosine differ; both are reported (the cosine under `"cosine"`).

Operating points (`sparsify`): `None` = the model's configured inference sparsification
(`cfg.lexical.sparsify`, by default the paper's threshold `1/sqrt(V)`), `"threshold"`, `"dense"`
(or `"none"`), or an int `k` = the `k` heaviest words of each vector (top-k, also `"topk:k"`). These
are the config's words (`lexvla.config.SPARSIFY_MODES`) with the top-k given by its k; results write
no sparsification as `"dense"`. :func:`parse_operating_point` is the one mapping (the CLI's
`--sparsify threshold|dense|K` goes through it).

Encodings are cached on disk when `cache_dir` is given: one safetensors file per (model fingerprint,
data fingerprint, crop), dense float32 (4·V bytes per vector), never pickle.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from lexvla._atomic import atomic_file
from lexvla.config import RECALL_KS
from lexvla.errors import LexVLAError
from lexvla.eval.metrics import retrieval_recall
from lexvla.eval.results import format_table, model_fingerprint
from lexvla.layers.lexical import default_threshold, sparsify_threshold, sparsify_topk

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA

logger = logging.getLogger(__name__)

OperatingPoint = str | int
DIRECTIONS = ("image_to_text", "text_to_image")


@dataclass
class RetrievalData:
    """A captioned image set flattened for retrieval.

    `images[i]` is a path (re-read when encoded) or a PIL image; `captions[t]` belongs to image
    `text_to_image[t]`.
    """

    images: list[str | Path | Image.Image]  # (N_i,)
    captions: list[str]  # (N_t,)
    text_to_image: Tensor  # (N_t,) int64
    keys: list[str]  # (N_i,) stable identifiers (key, path or position)
    words: list[list[str]] | None = None  # (N_i,) ground-truth words when the dataset has them

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_texts(self) -> int:
        return len(self.captions)

    def fingerprint(self) -> str:
        """Hash of keys, captions and image identities (file path, size and mtime; or pixels)."""
        digest = hashlib.sha256()
        for key, image in zip(self.keys, self.images):
            digest.update(f"{key}\0{_image_identity(image)}\0".encode())
        for caption, owner in zip(self.captions, self.text_to_image.tolist()):
            digest.update(f"{owner}\0{caption}\0".encode())
        return digest.hexdigest()[:16]


@dataclass
class Encodings:
    """Dense lexical vectors of a :class:`RetrievalData` (before any sparsification)."""

    image_weights: Tensor  # (N_i, V)
    text_weights: Tensor  # (N_t, V)
    text_to_image: Tensor  # (N_t,)


def _image_identity(image: str | Path | Image.Image) -> str:
    if isinstance(image, Image.Image):
        return hashlib.sha256(image.tobytes()).hexdigest()[:16] + f"{image.size}"
    stat = os.stat(image)
    return f"{Path(image).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _sample_fields(item: Any, index: int) -> tuple[str, str | Path | Image.Image, list[str]]:
    """(key, image or path, captions) of a dataset sample or an (image, caption(s)) pair.

    A sample's image is kept as its `path` when that file exists (re-read when encoded, so a large
    dataset is never held in memory), else as the PIL image.
    """
    if hasattr(item, "captions"):  # a dataset sample (`.image` not touched when `.path` exists)
        path = getattr(item, "path", None) or None
        image = path if path is not None and Path(str(path)).is_file() else item.image
        key = getattr(item, "key", None) or (str(path) if path is not None else str(index))
        captions = item.captions
    elif isinstance(item, Sequence) and len(item) == 2 and not isinstance(item, str):
        image, captions = item
        key = str(image) if isinstance(image, str | Path) else f"#{id(image)}"
    else:
        raise LexVLAError(
            f"retrieval item {index} is a {type(item).__name__}: give dataset samples (with .image "
            "and .captions) or (image, caption) / (image, [captions]) pairs"
        )
    captions = [captions] if isinstance(captions, str) else list(captions)
    if image is None:
        raise LexVLAError(f"retrieval item {index} ({key}) has no image")
    return str(key), image, [str(c) for c in captions]


def collect_retrieval_data(
    dataset_or_pairs: RetrievalData | Iterable[Any], *, limit: int | None = None
) -> RetrievalData:
    """Flatten a dataset (samples with `.image`, `.captions`; `None` items skipped) or pairs.

    Pairs that name the same image (same path or the same PIL object) are merged into one image with
    several captions. `limit` keeps the first `limit` images.
    """
    if isinstance(dataset_or_pairs, RetrievalData):
        return dataset_or_pairs
    records = getattr(dataset_or_pairs, "records", None)
    if isinstance(records, Sequence) and records and hasattr(records[0], "path"):
        # File datasets (lexvla.data.ImageTextDataset): read keys, paths and captions without
        # decoding every image; an unreadable image then fails when encoded, naming its file.
        dataset_or_pairs = records
    index_of: dict[str, int] = {}
    images: list[str | Path | Image.Image] = []
    keys: list[str] = []
    captions: list[str] = []
    owners: list[int] = []
    words: list[list[str]] = []
    for position, item in enumerate(dataset_or_pairs):
        if item is None:  # a dataset's undecodable image (counted and logged by the dataset)
            continue
        key, image, texts = _sample_fields(item, position)
        if key not in index_of:
            if limit is not None and len(images) >= limit:
                # Samples carry all their captions: stop. Pairs may revisit earlier images: go on.
                if hasattr(item, "captions"):
                    break
                continue
            index_of[key] = len(images)
            images.append(image)
            keys.append(key)
            words.append([str(w) for w in getattr(item, "words", None) or []])
        captions.extend(texts)
        owners.extend([index_of[key]] * len(texts))
    if not images or not captions:
        raise LexVLAError("the retrieval data holds no image with a caption: check --data")
    owner = torch.tensor(owners, dtype=torch.long)
    return RetrievalData(images, captions, owner, keys, words if any(words) else None)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False)


@torch.no_grad()  # not inference_mode: model caches must stay usable in training
def encode_images(
    model: Any,
    images: Sequence[Any],
    *,
    batch_size: int = 32,
    crop: bool = True,
    progress: bool = True,
) -> Tensor:
    """Dense image lexical vectors in batches: N images (paths or PIL) -> (N, V) float32 on CPU."""
    out: list[Tensor] = []
    with _progress(len(images), "images", progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = list(images[start : start + batch_size])
            out.append(model.encode_image(batch, crop=crop).image_weights.float().cpu())
            bar.update(len(batch))
    return torch.cat(out)


@torch.no_grad()  # not inference_mode: model caches must stay usable in training
def encode_texts(
    model: Any, texts: Sequence[str], *, batch_size: int = 32, progress: bool = True
) -> Tensor:
    """Dense text lexical vectors in batches: N captions -> (N, V) float32 on CPU."""
    out: list[Tensor] = []
    with _progress(len(texts), "texts", progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            out.append(model.encode_text(batch).text_weights.float().cpu())
            bar.update(len(batch))
    return torch.cat(out)


def encode_retrieval_data(
    model: Any,
    data: RetrievalData,
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    crop: bool = True,
) -> Encodings:
    """Encode every image and caption once (dense), reading/writing the on-disk cache when given.

    The cache file is `cache_dir/<model fingerprint>/<data fingerprint>-crop<0|1>.safetensors`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = None
    if cache_dir is not None:
        name = f"{data.fingerprint()}-crop{int(crop)}.safetensors"
        path = Path(cache_dir) / model_fingerprint(model) / name
        if path.is_file():
            try:
                tensors = load_file(str(path))
                logger.info("encodings read from cache %s", path)
                return Encodings(tensors["image"], tensors["text"], data.text_to_image)
            except (SafetensorError, OSError, KeyError):
                logger.warning("discarding unreadable cached encodings %s", path)
    image_weights = encode_images(
        model, data.images, batch_size=batch_size, crop=crop, progress=progress
    )
    text_weights = encode_texts(model, data.captions, batch_size=batch_size, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:  # readers never see a half-written file
            save_file(
                {"image": image_weights.contiguous(), "text": text_weights.contiguous()}, str(tmp)
            )
    return Encodings(image_weights, text_weights, data.text_to_image)


# ------------------------------------------------------------------------------ operating points
def parse_operating_point(point: OperatingPoint) -> OperatingPoint:
    """Normalise an operating point to "threshold", "dense" or a top-k int: takes the config's words
    ("threshold", "none" = "dense"), "dense", an int, a digit string or "topk:K"."""
    if isinstance(point, bool):
        raise LexVLAError(f"invalid sparsity operating point {point!r}")
    if isinstance(point, int):
        if point <= 0:
            raise LexVLAError(f"top-k operating point must be positive, got {point}")
        return point
    text = str(point).strip().lower()
    if text in ("dense", "none"):
        return "dense"
    if text == "threshold":
        return "threshold"
    if text.removeprefix("topk").removeprefix(":").isdigit():
        return parse_operating_point(int(text.removeprefix("topk").removeprefix(":")))
    raise LexVLAError(
        f"unknown sparsity operating point {point!r}: use 'threshold', 'dense' or a number of words"
    )


def model_operating_point(
    model: Any, sparsify: OperatingPoint | None
) -> tuple[OperatingPoint, float]:
    """(operating point, threshold) for a model: `None` means its configured inference sparsification.

    The threshold is `cfg.lexical.threshold` when positive, else the paper's `1/sqrt(V)`.
    """
    lex = model.cfg.lexical
    threshold = lex.threshold if lex.threshold > 0 else default_threshold(model.vocab_size)
    if sparsify is None:
        sparsify = config_operating_point(lex.sparsify, lex.top_k)
    return parse_operating_point(sparsify), threshold


def config_operating_point(mode: str, top_k: int) -> OperatingPoint:
    """The operating point of config sparsification `mode` (one of `SPARSIFY_MODES`; "topk" keeps
    `top_k` words): "threshold", the int `top_k`, or "dense" for "none"."""
    return {"threshold": "threshold", "topk": top_k, "none": "dense"}[mode]


def sparsify_weights(
    weights: Tensor, point: OperatingPoint, threshold: float | None = None
) -> Tensor:
    """Apply an operating point to (N, V) weights; not re-normalised (docs/method.md)."""
    point = parse_operating_point(point)
    if point == "dense":
        return weights
    if point == "threshold":
        return sparsify_threshold(weights, threshold)
    return sparsify_topk(weights, int(point))


def describe_point(point: OperatingPoint, threshold: float | None, vocab_size: int) -> str:
    """Human-readable operating point, e.g. "threshold 0.00549 (1/sqrt(V))" or "top-512"."""
    if point == "threshold":
        thr = default_threshold(vocab_size) if threshold is None else threshold
        paper = " (1/sqrt(V))" if math.isclose(thr, default_threshold(vocab_size)) else ""
        return f"threshold {thr:.4g}{paper}"
    return "dense" if point == "dense" else f"top-{point}"


# ------------------------------------------------------------------------------ metrics
def chance_recall(
    text_to_image: Tensor, num_images: int, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Expected Recall@K (%) of a random ranking: the floor an untrained model should beat."""
    n_texts = len(text_to_image)
    counts = torch.bincount(text_to_image, minlength=num_images)
    counts = counts[counts > 0].tolist()
    out: dict[str, float] = {}
    for k in ks:
        misses = [
            math.prod((n_texts - c - j) / (n_texts - j) for j in range(min(k, n_texts - c)))
            if k <= n_texts - c
            else 0.0
            for c in counts
        ]
        out[f"image_to_text/R@{k}"] = 100.0 * (1.0 - sum(misses) / max(len(misses), 1))
    for k in ks:
        out[f"text_to_image/R@{k}"] = 100.0 * min(k, num_images) / num_images
    return out


def active_words(weights: Tensor) -> float:
    """Mean number of non-zero entries per (N, V) vector."""
    return float((weights != 0).sum(dim=-1).double().mean()) if len(weights) else math.nan


def recall_from_weights(
    image_weights: Tensor,
    text_weights: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, Any]:
    """Recall@K (%) with dot-product scores at the top level and cosine scores under `"cosine"`.

    Args:
        image_weights: (N_i, V) image vectors (already sparsified).
        text_weights: (N_t, V) text vectors (already sparsified).
        text_to_image: (N_t,) index of each text's image.
    """
    image_weights, text_weights = image_weights.float(), text_weights.float()
    dot = image_weights @ text_weights.t()  # (N_i, N_t)
    norms = image_weights.norm(dim=-1)[:, None] * text_weights.norm(dim=-1)[None, :]
    cosine = dot / norms.clamp_min(1e-12)  # (N_i, N_t)
    result: dict[str, Any] = dict(retrieval_recall(dot, text_to_image, ks))
    result["cosine"] = retrieval_recall(cosine, text_to_image, ks)
    return result


def evaluate_retrieval(
    model: Any,
    dataset_or_pairs: RetrievalData | Iterable[Any],
    *,
    batch_size: int = 32,
    sparsify: OperatingPoint | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    ks: Sequence[int] = RECALL_KS,
    limit: int | None = None,
) -> dict[str, Any]:
    """Zero-shot image↔text retrieval of `model` on a captioned dataset.

    Args:
        model: a LexVLA model (anything with `encode_image`, `encode_text`, `cfg`, `vocab_size`).
        dataset_or_pairs: dataset samples (`.image`, `.captions`), (image, caption(s)) pairs, or a
            :class:`RetrievalData`.
        batch_size: encoding batch.
        sparsify: operating point (module docstring); `None` = the model's inference default.
        cache_dir: folder for cached encodings (keyed by model and data fingerprints); None: no cache.
        progress: show tqdm progress bars.
        ks: the K of Recall@K.
        limit: evaluate only the first `limit` images (and their captions).

    Returns:
        `{"image_to_text/R@1": %, …, "text_to_image/R@10": %, "cosine": {same keys},
        "chance": {same keys}, "num_images", "num_texts", "active_words": {"image", "text"},
        "sparsify": description}`.
    """
    data = collect_retrieval_data(dataset_or_pairs, limit=limit)
    point, threshold = model_operating_point(model, sparsify)
    enc = encode_retrieval_data(
        model, data, batch_size=batch_size, cache_dir=cache_dir, progress=progress
    )
    return retrieval_metrics(enc, point, threshold, ks)


def retrieval_metrics(
    enc: Encodings,
    point: OperatingPoint = "threshold",
    threshold: float | None = None,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, Any]:
    """The result of :func:`evaluate_retrieval` from dense encodings: sparsify at `point`, recall."""
    images = sparsify_weights(enc.image_weights, point, threshold)  # (N_i, V)
    texts = sparsify_weights(enc.text_weights, point, threshold)  # (N_t, V)
    num_images = images.shape[0]
    result = recall_from_weights(images, texts, enc.text_to_image, ks)
    result["chance"] = chance_recall(enc.text_to_image, num_images, ks)
    result.update(
        num_images=num_images,
        num_texts=texts.shape[0],
        active_words={"image": active_words(images), "text": active_words(texts)},
        sparsify=describe_point(point, threshold, images.shape[-1]),
    )
    return result


def retrieval_table(result: dict[str, Any], ks: Sequence[int] | None = None) -> str:
    """A printable table of an :func:`evaluate_retrieval` result (dot, cosine and chance rows)."""
    if ks is None:
        ks = sorted({int(k.split("@")[1]) for k in result if k.startswith("image_to_text/R@")})
    header = ["score"] + [
        f"{'I→T' if d == DIRECTIONS[0] else 'T→I'} R@{k}" for d in DIRECTIONS for k in ks
    ]
    rows = []
    for name, values in (
        ("dot", result),
        ("cosine", result.get("cosine")),
        ("chance", result.get("chance")),
    ):
        if values:
            rows.append([name] + [float(values[f"{d}/R@{k}"]) for d in DIRECTIONS for k in ks])
    table = format_table(rows, header)
    if "sparsify" in result:
        words = result.get("active_words", {})
        table += (
            f"\n{result.get('num_images')} images, {result.get('num_texts')} texts; "
            f"{result['sparsify']}; active words: image {words.get('image', math.nan):.1f}, "
            f"text {words.get('text', math.nan):.1f}"
        )
    return table


# ------------------------------------------------------------------------------ CLI entry points
def run_retrieval(
    model: LexVLA,
    data: str | Path,
    *,
    images: str | Path | None = None,
    split: str = "test",
    holdout: int = 0,
    limit: int | None = None,
    sparsify: OperatingPoint | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    model_ref: str | None = None,
) -> dict[str, Any]:
    """`lexvla eval retrieval`: evaluate `model` on a data path, write the JSON report to `out`.

    `model_ref` is the model's name for the report; the other arguments are those of
    :func:`lexvla.eval.runs.run_on_captions` and :func:`evaluate_retrieval`. Print the result with
    :func:`retrieval_table`.
    """
    from lexvla.eval.runs import run_on_captions

    def evaluate(pairs: RetrievalData) -> dict[str, Any]:
        return evaluate_retrieval(
            model,
            pairs,
            batch_size=batch_size,
            sparsify=sparsify,
            cache_dir=cache_dir,
            progress=progress,
        )

    def settings(result: dict[str, Any]) -> dict[str, Any]:
        return {"sparsify": result["sparsify"], "batch_size": batch_size, "crop": True}

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
