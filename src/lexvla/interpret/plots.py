"""Pictures of lexical vectors: word clouds, grounding heatmaps and contribution bars (PNG).

matplotlib and wordcloud (the `viz` extra) are imported inside the functions, so `lexvla.interpret`
imports without them. Figures use matplotlib's object API with the Agg canvas (no pyplot, no global
backend switch), so drawing works headless and from threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from lexvla.errors import LexVLAError
from lexvla.interpret.lexicon import merge_pieces


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LexVLAError(
            f"{module} is needed for pictures: pip install 'lexvla[viz]' (matplotlib, wordcloud)"
        ) from None


def _save(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def placeholder(text: str, size: tuple[int, int] = (640, 400)) -> Image.Image:
    """A plain image that says why there is nothing to draw."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((20, size[1] // 2), text, fill="gray")
    return image


def word_cloud_image(
    frequencies: Mapping[str, float], *, width: int = 640, height: int = 400, max_words: int = 80
) -> Image.Image:
    """A word cloud (PIL) with each word's size proportional to its weight; deterministic layout."""
    freqs = {w: float(v) for w, v in frequencies.items() if v > 0}
    if not freqs:
        return placeholder("no active words", (width, height))
    wordcloud = _require("wordcloud")
    cloud = wordcloud.WordCloud(
        width=width,
        height=height,
        background_color="white",
        max_words=max_words,
        prefer_horizontal=0.95,
        random_state=0,
        colormap="viridis",
        relative_scaling=0.6,
    )
    return cloud.generate_from_frequencies(freqs).to_image()


def save_word_cloud(
    weights: Tensor, words: Sequence[str], path: str | Path, *, max_words: int = 80, **kwargs: Any
) -> Path:
    """Word cloud of one (V,) lexical vector, each `##piece` summed into its word; returns the path."""
    return _save(
        word_cloud_image(merge_pieces(weights, words), max_words=max_words, **kwargs), path
    )


def _figure(width: float, height: float) -> tuple[Any, Any]:
    figure_mod = _require("matplotlib.figure")
    backend = _require("matplotlib.backends.backend_agg")
    fig = figure_mod.Figure(figsize=(width, height), dpi=110)
    backend.FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_grounding_heatmap(
    image: Image.Image,
    grid: Tensor | np.ndarray,
    path: str | Path,
    *,
    title: str = "",
    boxes: Sequence[int] = (),
    alpha: float = 0.5,
) -> Path:
    """Per-patch scores (g, g) over the whole image (nearest upsampling), with a colour bar.

    The grid covers the whole image because the image was resized whole to the square input
    (`crop=False`); `boxes` outlines chosen patches (row-major indices).
    """
    scores = np.asarray(grid, dtype=np.float64)
    side = scores.shape[0]
    width, height = image.size
    fig, ax = _figure(7.0, 7.0 * height / width + 0.6)
    ax.imshow(np.asarray(image.convert("RGB")), extent=(0, width, height, 0))
    shown = ax.imshow(
        scores,
        cmap="inferno",
        alpha=alpha,
        interpolation="nearest",
        extent=(0, width, height, 0),
    )
    cell_w, cell_h = width / side, height / side
    patches_mod = _require("matplotlib.patches")
    for index in boxes:
        row, col = divmod(int(index), side)
        ax.add_patch(
            patches_mod.Rectangle(
                (col * cell_w, row * cell_h), cell_w, cell_h, fill=False, edgecolor="cyan", lw=2
            )
        )
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="patch · text")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    return _save_fig(fig, path)


def save_contribution_chart(
    contributions: Sequence[tuple[str, float]], path: str | Path, *, title: str = ""
) -> Path:
    """Horizontal bars of per-word contributions to a score (largest on top)."""
    if not contributions:
        return _save(placeholder("no shared words: the score is 0"), path)
    fig, ax = _figure(6.5, 0.32 * len(contributions) + 1.2)
    labels = [w for w, _ in contributions][::-1]
    values = [v for _, v in contributions][::-1]
    colours = ["#bbbbbb" if w.startswith("(") else "#3b6ea8" for w in labels]
    ax.barh(labels, values, color=colours)
    named = [v for w, v in zip(labels, values) if not w.startswith("(")]
    limit = 1.3 * max(named) if named and max(named) > 0 else None
    if limit is not None and max(values) > limit:
        ax.set_xlim(0, limit)  # a long "(other words)" bar would flatten the named ones: clip it
    for y, value in enumerate(values):
        shown = min(value, limit) if limit is not None else value
        ax.text(shown, y, f" {value:.4g}", va="center", fontsize=7)
    ax.set_xlabel("contribution to the score (image[w] × text[w])")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save_fig(fig, path)


def _save_fig(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
