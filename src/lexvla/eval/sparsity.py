"""Recall against sparsity: how many active words a lexical vector needs (the paper's sparsity figure).

The dataset is encoded once (dense); every operating point then sparsifies the same vectors:
`"threshold"` (the model's threshold, by default the paper's `1/sqrt(V)`), top-k for each int k (a k
larger than V is skipped), and `"dense"`. For each point the curve reports Recall@K (dot product, and
cosine under `"cosine"`), the mean number of active words per vector for images and texts, the share of
each vector's L2 energy kept, and the paper's **quadratic sparsity** `(1 − k/V)²`, computed per modality
with k = that modality's mean active words and overall (`"mean"`) with k = the average of the two.

Paper claim to reproduce in miniature (docs/method.md): recall is nearly flat from ~13k down to ~300
active words and only collapses below ~70.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lexvla.config import RECALL_KS
from lexvla.eval.results import format_table
from lexvla.eval.retrieval import (
    Encodings,
    OperatingPoint,
    RetrievalData,
    active_words,
    chance_recall,
    collect_retrieval_data,
    describe_point,
    encode_retrieval_data,
    model_operating_point,
    parse_operating_point,
    recall_from_weights,
    sparsify_weights,
)
from lexvla.layers.lexical import default_threshold

logger = logging.getLogger(__name__)

DEFAULT_OPERATING_POINTS: tuple[OperatingPoint, ...] = (
    "threshold", 13000, 8192, 4096, 2048, 1024, 512, 300, 128, 70, 32, "dense",
)  # fmt: skip

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA


def quadratic_sparsity(k: float, vocab_size: int) -> float:
    """The paper's sparsity axis `(1 − k/V)²` for k active words out of V."""
    return (1.0 - k / vocab_size) ** 2


def energy_kept(sparse: Tensor, dense: Tensor) -> float:
    """Mean share of each vector's squared L2 norm kept by sparsification (1 = nothing lost)."""
    kept = sparse.float().pow(2).sum(-1) / dense.float().pow(2).sum(-1).clamp_min(1e-30)
    return float(kept.double().mean())


def curve_point(
    enc: Encodings, point: OperatingPoint, threshold: float | None, ks: Sequence[int]
) -> dict[str, Any]:
    """Recall, active words, quadratic sparsity and energy kept at one operating point."""
    vocab = enc.image_weights.shape[-1]
    images = sparsify_weights(enc.image_weights, point, threshold)  # (N_i, V)
    texts = sparsify_weights(enc.text_weights, point, threshold)  # (N_t, V)
    k_image, k_text = active_words(images), active_words(texts)
    k_mean = (k_image + k_text) / 2
    entry: dict[str, Any] = {
        "point": point,
        "label": describe_point(point, threshold, vocab),
        "active_words": {"image": k_image, "text": k_text, "mean": k_mean},
        "quadratic_sparsity": {
            "image": quadratic_sparsity(k_image, vocab),
            "text": quadratic_sparsity(k_text, vocab),
            "mean": quadratic_sparsity(k_mean, vocab),
        },
        "energy_kept": {
            "image": energy_kept(images, enc.image_weights),
            "text": energy_kept(texts, enc.text_weights),
        },
    }
    entry.update(recall_from_weights(images, texts, enc.text_to_image, ks))
    return entry


def sparsity_curve_from_encodings(
    enc: Encodings,
    operating_points: Iterable[OperatingPoint] = DEFAULT_OPERATING_POINTS,
    *,
    threshold: float | None = None,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, Any]:
    """The sparsity curve of already-encoded dense vectors.

    Args:
        enc: dense (N_i, V) image and (N_t, V) text vectors and the caption owners.
        operating_points: "threshold", "dense" and top-k ints; a k larger than V is skipped.
        threshold: the threshold point's value; None = `1/sqrt(V)`.
        ks: the K of Recall@K.

    Returns:
        `{"vocab_size", "threshold", "num_images", "num_texts", "chance", "points": [...],
        "skipped": [...]}`; each point as :func:`curve_point`, in the given order.
    """
    vocab = enc.image_weights.shape[-1]
    threshold = default_threshold(vocab) if threshold is None else threshold
    points: list[dict[str, Any]] = []
    skipped: list[OperatingPoint] = []
    for raw in operating_points:
        point = parse_operating_point(raw)
        if isinstance(point, int) and point > vocab:
            skipped.append(point)
            logger.info("skipping top-%d: larger than the vocabulary (V=%d)", point, vocab)
            continue
        points.append(curve_point(enc, point, threshold, ks))
    return {
        "vocab_size": vocab,
        "threshold": threshold,
        "num_images": enc.image_weights.shape[0],
        "num_texts": enc.text_weights.shape[0],
        "chance": chance_recall(enc.text_to_image, enc.image_weights.shape[0], ks),
        "points": points,
        "skipped": skipped,
    }


def sparsity_curve(
    model: Any,
    data: RetrievalData | Iterable[Any],
    operating_points: Iterable[OperatingPoint] = DEFAULT_OPERATING_POINTS,
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    ks: Sequence[int] = RECALL_KS,
    limit: int | None = None,
    plot_path: str | Path | None = None,
) -> dict[str, Any]:
    """Encode `data` once with `model`, then evaluate retrieval at every operating point.

    Args:
        model: a LexVLA model.
        data: dataset samples, (image, caption(s)) pairs or a :class:`RetrievalData`.
        operating_points: see :func:`sparsity_curve_from_encodings`.
        batch_size: encoding batch.
        cache_dir: on-disk cache of the dense encodings (shared with `evaluate_retrieval`).
        progress: show progress bars.
        ks: the K of Recall@K.
        limit: use only the first `limit` images.
        plot_path: also draw the recall-vs-sparsity figure there (PNG).

    Returns:
        the curve dict (see :func:`sparsity_curve_from_encodings`), plus `"plot"` when drawn.
    """
    data = collect_retrieval_data(data, limit=limit)
    _, threshold = model_operating_point(model, "threshold")
    enc = encode_retrieval_data(
        model, data, batch_size=batch_size, cache_dir=cache_dir, progress=progress
    )
    result = sparsity_curve_from_encodings(enc, operating_points, threshold=threshold, ks=ks)
    if plot_path is not None:
        result["plot"] = str(plot_sparsity_curve(result, plot_path))
    return result


def sparsity_table(result: dict[str, Any], k: int = 1) -> str:
    """A printable table: one row per operating point with active words and R@k both ways."""
    header = ["point", "img words", "txt words", "(1-k/V)^2", f"I→T R@{k}", f"T→I R@{k}"]
    header += [f"I→T R@{k} cos", f"T→I R@{k} cos"]
    rows = []
    for p in result["points"]:
        rows.append(
            [
                p["label"],
                f"{p['active_words']['image']:.1f}",
                f"{p['active_words']['text']:.1f}",
                f"{p['quadratic_sparsity']['mean']:.4f}",
                float(p[f"image_to_text/R@{k}"]),
                float(p[f"text_to_image/R@{k}"]),
                float(p["cosine"][f"image_to_text/R@{k}"]),
                float(p["cosine"][f"text_to_image/R@{k}"]),
            ]
        )
    table = format_table(rows, header)
    if result.get("skipped"):
        table += f"\nskipped (k > V={result['vocab_size']}): {result['skipped']}"
    return table


def plot_sparsity_curve(
    result: dict[str, Any], path: str | Path, *, title: str | None = None
) -> Path:
    """Draw Recall@K against quadratic sparsity (one panel per direction), like the paper's figure.

    Each marker is an operating point, labelled with its mean active words; the dashed lines are the
    chance levels. Uses matplotlib's Agg backend (imported here, so matplotlib stays optional).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    points = sorted(result["points"], key=lambda p: p["quadratic_sparsity"]["mean"])
    ks = sorted({int(key.split("@")[1]) for key in points[0] if key.startswith("image_to_text/R@")})
    xs = [p["quadratic_sparsity"]["mean"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, direction, name in zip(
        axes, ("image_to_text", "text_to_image"), ("image → text", "text → image")
    ):
        for k in ks:
            line = ax.plot(
                xs, [p[f"{direction}/R@{k}"] for p in points], marker="o", label=f"R@{k}"
            )
            chance = result.get("chance", {}).get(f"{direction}/R@{k}")
            if chance is not None:
                ax.axhline(chance, color=line[0].get_color(), linestyle=":", linewidth=0.8)
        top = [p[f"{direction}/R@{ks[-1]}"] for p in points]
        for x, y, tag, below in point_labels(xs, top, points):
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(0, -12 if below else 6),
                        ha="center", fontsize=7)  # fmt: skip
        ax.set_title(name)
        ax.set_xlabel("quadratic sparsity (1 − k/V)²  (k = mean active words)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(
        title or f"Recall vs sparsity (V={result['vocab_size']}, {result['num_images']} images)"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def point_labels(
    xs: list[float], ys: list[float], points: list[dict[str, Any]], min_gap: float = 0.06
) -> list[tuple[float, float, str, bool]]:
    """Labels that do not overlap: `(x, y, text, below_the_line)` for points sorted by x.

    Quadratic sparsity packs every sparse point near x = 1: a point closer than `min_gap` to the
    previous one joins its run, and a run shares one label ("1024–32": the mean active words at its
    two ends) at its mean position, so labels drawn above the line stay at least `min_gap` apart.
    The threshold point keeps its own label, under the line: the default operating point is always
    named.
    """
    labels: list[tuple[float, float, str, bool]] = []
    run: list[int] = []

    def close_run() -> None:
        if run:
            tags = [_point_tag(points[i]) for i in run]
            tag = tags[0] if len(run) == 1 else f"{tags[0]}–{tags[-1]}"
            x = sum(xs[i] for i in run) / len(run)
            labels.append((x, max(ys[i] for i in run), tag, False))
            run.clear()

    for i, point in enumerate(points):
        if point["point"] == "threshold":
            labels.append((xs[i], ys[i], _point_tag(point), True))
            continue
        if run and xs[i] - xs[run[-1]] >= min_gap:
            close_run()
        run.append(i)
    close_run()
    return labels


def _point_tag(point: dict[str, Any]) -> str:
    words = point["active_words"]["mean"]
    if point["point"] == "threshold":
        return f"thr ({words:.0f})"
    return (
        "dense" if point["point"] == "dense" else (f"{words:.0f}" if not math.isnan(words) else "?")
    )


def run_sparsity_curve(
    model: LexVLA,
    data: str | Path,
    *,
    images: str | Path | None = None,
    split: str = "test",
    holdout: int = 0,
    limit: int | None = None,
    operating_points: Iterable[OperatingPoint] = DEFAULT_OPERATING_POINTS,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    progress: bool = True,
    model_ref: str | None = None,
) -> dict[str, Any]:
    """`lexvla eval sparsity`: the curve of a model on a data path, JSON report to `out`, PNG to `plot`.

    Arguments as :func:`lexvla.eval.retrieval.run_retrieval` and :func:`sparsity_curve`; print the
    result with :func:`sparsity_table`.
    """
    from lexvla.eval.runs import run_on_captions

    points = list(operating_points)

    def evaluate(pairs: RetrievalData) -> dict[str, Any]:
        return sparsity_curve(
            model,
            pairs,
            points,
            batch_size=batch_size,
            cache_dir=cache_dir,
            progress=progress,
            plot_path=plot,
        )

    def settings(result: dict[str, Any]) -> dict[str, Any]:
        return {"operating_points": points, "batch_size": batch_size, "crop": True}

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
