"""`lexvla explain IMAGE [--text CAPTION]`: why the model sees what it sees, in words and pictures.

:func:`image_report` encodes one image (resized whole, `crop=False`, so every pixel belongs to a patch and
the heatmap covers the whole picture) and optionally one caption, sparsifies both as at inference (the
model's default: threshold `1/sqrt(V)`), and writes to `out_dir`:

- `image_words.png`: word cloud of the image vector (`##pieces` merged into their words);
- `patch_words.png`: word cloud of chosen patches (max over them, as the image vector pools);
- with a caption: `text_words.png`, `grounding.png` (per-patch score `patch · text` over the image,
  chosen patches outlined) and `contributions.png` (top words of the image-text score);
- `explanation.json` (the numbers) and `index.html`: one self-contained page (images inlined as
  base64 data URIs, no external files or links).

The score explained is the dot product of the two sparsified vectors; its per-word contributions sum
to it exactly (the rest of the words as "(other words)").
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from lexvla.data.transforms import grid_side, load_image
from lexvla.interpret import plots
from lexvla.interpret.grounding import (
    PatchSpec,
    parse_patch,
    patches_weights,
    text_patch_scores,
    to_grid,
    top_patches,
    word_source_patches,
)
from lexvla.interpret.lexicon import merge_pieces, score_contributions

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA

logger = logging.getLogger(__name__)


@torch.no_grad()  # not inference_mode: model caches must stay usable in training
def encode_for_explanation(
    model: Any, image: Image.Image, caption: str | None, sparsify: str | None = None
) -> dict[str, Any]:
    """Sparsified image (V,), patch (P, V) and text (V,) vectors of one image (crop=False) and caption."""
    enc = model.encode_image([image], return_patches=True, crop=False)
    out = {
        "image": model.sparsify(enc.image_weights.float(), mode=sparsify)[0].cpu(),
        "patches": model.sparsify(enc.patch_weights[0].float(), mode=sparsify).cpu(),
        "text": None,
    }
    if caption is not None:
        text = model.encode_text([caption]).text_weights.float()
        out["text"] = model.sparsify(text, mode=sparsify)[0].cpu()
    return out


def _top(weights: torch.Tensor, words: Sequence[str], k: int) -> list[tuple[str, float]]:
    merged = sorted(merge_pieces(weights, words).items(), key=lambda kv: -kv[1])
    return merged[:k]


def image_report(
    model: LexVLA,
    image_path: str | Path | Image.Image,
    caption: str | None = None,
    out_dir: str | Path = "explain",
    *,
    k: int = 15,
    patches: Sequence[PatchSpec] | None = None,
    sparsify: str | None = None,
    model_ref: str | None = None,
) -> dict[str, Any]:
    """The report on what `model` reads in an image (and why it matches `caption`): PNGs and a page.

    Args:
        model: a LexVLA model (in eval mode).
        image_path: the image (path or PIL image).
        caption: optional text to score against the image and ground in it.
        out_dir: folder for the PNGs, `explanation.json` and `index.html` (created).
        k: number of words in the tables and contribution chart.
        patches: patches for the patch word cloud (indices or (row, col)); default: the 3 patches
            best grounded to the caption, or without caption the source patches of the top 3 words.
        sparsify: "threshold", "topk" or "none" (`lexvla.config.SPARSIFY_MODES`); None = the model's
            inference default.
        model_ref: the model's name for the page (e.g. "small-offline").

    Returns:
        `{"image", "caption", "score", "contributions", "image_words", "text_words", "patches",
        "grid", "files": {name: path}, "html": path}`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image = load_image(image_path)
    words = model.vocab.words
    vec = encode_for_explanation(model, image, caption, sparsify)
    side = grid_side(vec["patches"].shape[0])
    files = {"image_words": plots.save_word_cloud(vec["image"], words, out / "image_words.png")}
    result: dict[str, Any] = {
        "image": str(image_path) if not isinstance(image_path, Image.Image) else "<image>",
        "caption": caption,
        "model": model_ref,
        "grid": side,
        "image_words": _top(vec["image"], words, k),
        "image_active_words": int((vec["image"] != 0).sum()),
    }
    grounding = None
    if vec["text"] is not None:
        grounding = text_patch_scores(vec["patches"], vec["text"])  # (P,)
        result.update(_caption_part(vec, words, k, grounding, image, out, files))
    if patches is None:
        chosen = top_patches(grounding) if grounding is not None else None
        chosen = chosen or word_source_patches(vec["patches"], vec["image"])
    else:
        chosen = [parse_patch(p, side) for p in patches]
    result["patches"] = [{"index": i, "row": i // side, "col": i % side} for i in chosen]
    files["patch_words"] = plots.save_word_cloud(
        patches_weights(vec["patches"], chosen), words, out / "patch_words.png"
    )
    result["patch_words"] = _top(patches_weights(vec["patches"], chosen), words, k)
    result["files"] = {name: str(path) for name, path in files.items()}
    (out / "explanation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result["html"] = str(write_html(result, out / "index.html"))
    return result


def _caption_part(
    vec: dict[str, Any],
    words: Sequence[str],
    k: int,
    grounding: torch.Tensor,
    image: Image.Image,
    out: Path,
    files: dict[str, Path],
) -> dict[str, Any]:
    """Score, contributions, text cloud, grounding heatmap and contribution chart of the caption."""
    score = float(vec["image"].double() @ vec["text"].double())
    contributions = score_contributions(vec["image"], vec["text"], words, k, merge=True)
    files["text_words"] = plots.save_word_cloud(vec["text"], words, out / "text_words.png")
    files["grounding"] = plots.save_grounding_heatmap(
        image,
        to_grid(grounding),
        out / "grounding.png",
        title="text → patch grounding (patch · text)",
        boxes=top_patches(grounding),
    )
    files["contributions"] = plots.save_contribution_chart(
        contributions, out / "contributions.png", title=f"score {score:.4f} = Σ image[w] × text[w]"
    )
    return {
        "score": score,
        "contributions": contributions,
        "text_words": _top(vec["text"], words, k),
        "text_active_words": int((vec["text"] != 0).sum()),
        "grounding": {"min": float(grounding.min()), "max": float(grounding.max())},
    }


# ------------------------------------------------------------------------------ HTML
_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}"
    "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:8px 0}"
    "td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}"
    ".grid{display:flex;flex-wrap:wrap;gap:18px}.grid>div{flex:1 1 460px}"
)


def _data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(rows: Sequence[tuple[str, float]], header: tuple[str, str]) -> str:
    cells = "".join(f"<tr><td>{html.escape(w)}</td><td>{v:.4f}</td></tr>" for w, v in rows)
    return f"<table><tr><th>{header[0]}</th><th>{header[1]}</th></tr>{cells}</table>"


def _figure(result: dict[str, Any], name: str, caption: str) -> str:
    path = result["files"].get(name)
    if path is None:
        return ""
    return (
        f"<div><h3>{html.escape(caption)}</h3>"
        f'<img alt="{html.escape(name)}" src="{_data_uri(path)}"></div>'
    )


def render_html(result: dict[str, Any]) -> str:
    """One self-contained HTML page of an :func:`explain` result (PNGs inlined as base64)."""
    caption = result.get("caption")
    patch_names = ", ".join(f"({p['row']},{p['col']})" for p in result["patches"])
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>LexVLA explanation</title>",
        f"<style>{_STYLE}</style></head><body><h1>LexVLA explanation</h1>",
        f"<p>image: <code>{html.escape(result['image'])}</code>"
        + (
            f" · model: <code>{html.escape(str(result['model']))}</code>"
            if result.get("model")
            else ""
        )
        + f" · {result['grid']}×{result['grid']} patches · {result['image_active_words']} active words</p>",
    ]
    if caption is not None:
        parts.append(
            f"<p>caption: <b>{html.escape(caption)}</b> · score <b>{result['score']:.4f}</b> "
            f"(dot product of the sparsified vectors; contributions sum to it)</p>"
        )
    parts.append("<div class='grid'>")
    parts.append(_figure(result, "image_words", "What the image says"))
    parts.append(_figure(result, "text_words", "What the caption says"))
    parts.append(_figure(result, "grounding", "Where the caption is in the image"))
    parts.append(_figure(result, "contributions", "Why they match: words behind the score"))
    parts.append(_figure(result, "patch_words", f"What patches {patch_names} say"))
    parts.append("</div><div class='grid'>")
    parts.append(
        "<div><h3>Image words</h3>" + _table(result["image_words"], ("word", "weight")) + "</div>"
    )
    if caption is not None:
        parts.append(
            "<div><h3>Caption words</h3>"
            + _table(result["text_words"], ("word", "weight"))
            + "</div>"
        )
        parts.append(
            "<div><h3>Contributions</h3>"
            + _table(result["contributions"], ("word", "image × text"))
            + "</div>"
        )
    parts.append("</div></body></html>")
    return "\n".join(p for p in parts if p)


def write_html(result: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`render_html` to `path` and return it."""
    path = Path(path)
    path.write_text(render_html(result), encoding="utf-8")
    return path
