"""The demo run's report: one self-contained HTML page and its JSON twin."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lexvla._atomic import atomic_write_text
from lexvla.demo import html
from lexvla.eval.words import overused_word_text

MODELS = (  # (results key, row label)
    ("untrained", "untrained heads"),
    ("trained", "briefly trained (this run)"),
    ("head", "Flickr8k head (bundled)"),
)
OTHER_WORDS = "(other words)"


def share_text(share: float) -> str:
    """A share of a score as a percentage with the digits it needs: a share above zero never reads
    as 0 (`0.4213` -> '42%', `0.0734` -> '7.3%', `0.0042` -> '0.42%', `1e-6` -> '<0.01%')."""
    pct = 100.0 * share
    if pct >= 9.95:
        return f"{pct:.0f}%"
    if pct >= 0.995:
        return f"{pct:.1f}%"
    if pct >= 0.01:
        return f"{pct:.2f}%"
    return "<0.01%" if pct > 0 else "0%"


def shares_text(contributions: list[Any], score: float) -> str:
    """'dog 23%, grass 7.1%, (other words) 40%' from (word, contribution) pairs and their score."""
    if not score or score <= 0:
        return ", ".join(str(word) for word, _ in contributions)
    return ", ".join(f"{word} {share_text(value / score)}" for word, value in contributions)


def write(run: Any) -> Path:
    """Write `report.html` and `report.json` into the run's output folder; returns the HTML path."""
    results = {**run.results, "timings_s": run.timings}
    atomic_write_text(run.out_dir / "report.json", json.dumps(results, indent=2, default=str))
    head = run.results.get("head", {})
    head_name = "Flickr8k head" if head.get("bundled") else "briefly trained model"
    sections = [("Run", _run_section(run))]
    sections.append(("Retrieval on held-out images", _retrieval_section(run.results)))
    if run.results.get("words"):
        sections.append(("Word quality on held-out images", _words_section(run.results)))
    if "sparsity" in run.figures:
        sections.append(
            (
                f"Recall vs sparsity ({head_name})",
                html.image_tag(run.figures["sparsity"], "sparsity curve"),
            )
        )
    if "patchdis" in run.results:
        sections.append(("PatchDis (patch-level interpretability)", _patchdis_section(run)))
    if run.results.get("searches"):
        sections.append(
            (
                f"Searches with the {head_name}, explained word by word",
                _search_section(run.results["searches"]),
            )
        )
    if run.figures.get("inside"):
        sections.append(
            (
                f"Looking inside held-out images ({head_name})",
                _inside_section(run.figures["inside"]),
            )
        )
    path = run.out_dir / "report.html"
    atomic_write_text(path, html.page("LexVLA demo report", sections, _intro(run)))
    return path


def _intro(run: Any) -> str:
    results = run.results
    head = results.get("head", {})
    steps = results.get("training", [])
    trained = (
        f"<code>small-offline</code> (DINOv2-S/14 + SmolLM2-135M, both frozen) was trained briefly "
        f"on this machine{_steps(steps, ' ({} steps)')} to show the trainer works"
    )
    if head.get("bundled"):
        used = (
            "; the searches, explanations and pictures below come from the <b>Flickr8k head</b> "
            "bundled with lexvla (<code>--model flickr8k</code>: the same architecture trained on "
            "Flickr8k's training photos). "
        )
    elif head:
        note = head.get("note", "")
        used = f". <span class='warn'>{html.escape(note[:1].upper() + note[1:])}.</span> "
    else:
        used = "; the searches and pictures below come from the briefly trained model. "
    total = f"The whole run took {results.get('total_seconds', 0):.0f} s. "
    return trained + used + total + "Every score below is a sum of per-word products."


def _steps(logged: list[dict[str, Any]], template: str) -> str:
    """`template` with the last logged training step, or '' when the log has no step numbers."""
    step = logged[-1].get("step") if logged else None
    return template.format(step) if step is not None else ""


def _run_section(run: Any) -> str:
    rows = [(name, seconds) for name, seconds in run.timings.items()]
    losses = run.results.get("training", [])
    loss = (
        f"<p>brief training: loss {losses[0]['loss']:.3f} → {losses[-1]['loss']:.3f}"
        f"{_steps(losses, ' in {} steps')}</p>"
        if losses
        else ""
    )
    head = run.results.get("head", {})
    if head.get("bundled"):
        model = (
            f"<p>head model: <code>flickr8k</code> — <code>{html.escape(head['path'])}</code></p>"
        )
    elif head:
        model = f"<p class='warn'>{html.escape(head['note'])}</p>"
    else:
        model = ""
    table = html.table(["step", "seconds"], rows + [("total", run.results.get("total_seconds", 0))])
    return _data_line(run.results.get("data", {})) + loss + model + table


def _data_line(data: dict[str, Any]) -> str:
    """Which images the demo used (the bundled set names its licence file)."""
    if not data:
        return ""
    where = {
        "demo-coco": "COCO images bundled with lexvla (downscaled; licences: LICENSES.md there)",
        "coco-mini": "coco-mini (../shared)",
        "synthetic": "synthetic shapes (no COCO images found)",
    }.get(data["source"], data["source"])
    counts = (
        f": {data['train_images']} training images, {data['held_out_images']} held out"
        if "train_images" in data
        else ""
    )
    return f"<p>data: {html.escape(where)} — <code>{html.escape(data['path'])}</code>{counts}</p>"


def _compared(results: dict[str, Any], key: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, label, result) of each model with a `results[key]` entry, in table order."""
    found = results.get(key, {})
    return [(name, label, found[name]) for name, label in MODELS if name in found]


def _retrieval_section(results: dict[str, Any]) -> str:
    keys = [f"{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    compared = _compared(results, "retrieval")
    rows = [
        [label] + [r[k] for k in keys] + [r["active_words"]["image"]] for _, label, r in compared
    ]
    if not compared:
        return "<p class='muted'>not evaluated</p>"
    first = compared[0][2]
    rows.append(["chance"] + [first["chance"][k] for k in keys] + [""])
    note = (
        f"<p class='muted'>{first['num_images']} held-out images, {first['num_texts']} captions; "
        f"recall in %; vectors sparsified at {html.escape(str(first.get('sparsify', '')))}.</p>"
    )
    header = [
        k.replace("image_to_text/", "image→text ").replace("text_to_image/", "text→image ")
        for k in keys
    ]
    return html.table(["model", *header, "active words / image"], rows) + note


def _pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _words_section(results: dict[str, Any]) -> str:
    compared = [(n, label, w) for n, label, w in _compared(results, "words") if "error" not in w]
    errors = [
        f"<p class='warn'>{label}: {html.escape(w['error'])}</p>"
        for _, label, w in _compared(results, "words")
        if "error" in w
    ]
    if not compared:
        return "".join(errors)
    first = compared[0][2]
    k = first["k"]
    object_k = first.get("object_k", 20)
    header = [
        "model",
        f"image caption-word P@{k}",
        f"text P@{k}",
        f"object recall@{object_k}",
        "active words / image",
        "active words / text",
    ]
    rows = [
        [
            label,
            w["image_precision"],
            w["text_precision"],
            _pct(w.get("object_recall")),
            w["active_words"]["image"],
            w["active_words"]["text"],
        ]
        for _, label, w in compared
    ]
    rows.append(["one fixed answer (calibration)", first["fixed_answer_precision"], "", "", "", ""])
    note = (
        f"<p class='muted'>Caption-word precision@{k}: the share of an image's (a caption's) {k} "
        "heaviest words found in that image's captions (stop words never count); object "
        f"recall@{object_k}: the share of the COCO objects present named among an image's "
        f"{object_k} heaviest words; in %. The calibration row gives every image the same {k} "
        f"words, the most frequent caption words of these images: "
        f"<i>{html.escape(', '.join(first['fixed_answer']))}</i>. Active words at the model's "
        "inference threshold.</p>"
    )
    overuse = []
    for _, label, w in compared:
        sides = []
        for side in ("image", "text"):
            listed = w["overused_words"][side][:10]
            shown = ", ".join(overused_word_text(row) for row in listed)
            sides.append(f"{side}s: {html.escape(shown or 'none')}")
        overuse.append(f"<li><b>{html.escape(label)}</b> — {'; '.join(sides)}</li>")
    share = 100 * first.get("overuse_share", 0.1)
    overused = (
        f"<p>Overused words (in the top {k} of more than {share:.0f}% of the images or captions; "
        "* a stop word or a word fragment; right: the share of the images or captions showing the "
        "word whose captions have it):</p><ul class='words'>" + "".join(overuse) + "</ul>"
    )
    examples = _examples(compared)
    return html.table(header, rows) + note + overused + examples + "".join(errors)


def _examples(compared: list[tuple[str, str, dict[str, Any]]]) -> str:
    """Top words of a few held-out images by the last (best) model, beside a caption."""
    name, label, w = compared[-1]
    if not w.get("examples"):
        return ""
    rows = [
        (Path(str(e["image"])).name, ", ".join(e["top_words"]), e["caption"]) for e in w["examples"]
    ]
    return f"<p>Top {w['k']} words of held-out images ({html.escape(label)}):</p>" + html.table(
        ["image", "top words", "a caption"], rows, text=True
    )


def _patchdis_section(run: Any) -> str:
    compared = _compared(run.results, "patchdis")
    if not compared:
        return ""
    rows = [
        [label, r["mIoU"], r["mIoU/foreground"], r["pixel_accuracy"], r["num_images"]]
        for _, label, r in compared
    ]
    table = html.table(  # in % with 2 decimals: a small non-zero mIoU does not read as 0.000
        ["model", "mIoU %", "mIoU % (foreground)", "pixel accuracy %", "images"],
        [[row[0], *(f"{100 * v:.2f}" for v in row[1:4]), row[4]] for row in rows],
    )
    figures = "".join(html.figure(p, Path(p).stem) for p in run.figures.get("patchdis", []))
    last = compared[-1][1]
    return (
        table
        + f"<p class='muted'>{html.escape(compared[-1][2]['rule'])}. mIoU counts background as a "
        "class, so a model that calls most patches background scores on it; the foreground "
        f"column leaves it out. Overlays: {html.escape(last)} (prediction | ground truth).</p>"
        + f"<div class='grid'>{figures}</div>"
    )


def _search_section(searches: list[dict[str, Any]]) -> str:
    parts = []
    for search in searches:
        words = ", ".join(f"{w} {v:.3g}" for w, v in search["query_words"])
        rows = [
            (
                h["key"],
                f"{h['score']:.3g}",
                shares_text(
                    [(w["word"], w["contribution"]) for w in h.get("shares", h["words"])[:5]],
                    h["score"],
                ),
            )
            for h in search["hits"]
        ]
        parts.append(
            f"<h3>“{html.escape(search['query'])}”</h3>"
            f"<p class='words'>query words (weight): {html.escape(words)}</p>"
            + html.table(["image", "score", "top words, share of the score"], rows)
        )
    return "\n".join(parts)


def _inside_section(pages: list[dict[str, Any]]) -> str:
    labels = {
        "image_words": "image words",
        "patch_words": "words of the most grounded patches",
        "text_words": "caption words",
        "grounding": "patches the caption selects",
        "contributions": "the score, word by word",
    }
    parts = []
    for result in pages:
        figures = "".join(
            html.figure(path, labels.get(name, name))
            for name, path in result["files"].items()
            if Path(path).is_file()
        )
        score = result.get("score")
        shown = f"{score:.3g}" if score is not None else "-"
        contributions = list(result.get("contributions") or [])
        top = [c for c in contributions if c[0] != OTHER_WORDS][:6]
        rest = sum(v for w, v in contributions if w == OTHER_WORDS)
        if rest and score:
            top.append(("all other words", rest))
        shares = (
            f"<p class='words'>score {shown} = {html.escape(shares_text(top, score))}</p>"
            if top and score
            else ""
        )
        image_words = ", ".join(f"{w} {v:.3g}" for w, v in result.get("image_words", [])[:12])
        parts.append(
            f"<h3>{html.escape(Path(result['image']).name)}: “{html.escape(result['caption'] or '')}” "
            f"(score {shown})</h3>{shares}"
            f"<p class='words'>image words (weight): {html.escape(image_words)}</p>"
            f"<div class='grid'>{figures}</div>"
        )
    return "\n".join(parts)
