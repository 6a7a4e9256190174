"""The demo's HTML report (self-contained) and its JSON twin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lexvla._atomic import atomic_write_text
from lexvla.demo import html


def write(run: Any) -> Path:
    """Write `report.html` and `report.json` into the run's output folder; returns the HTML path."""
    results = {**run.results, "timings_s": run.timings}
    atomic_write_text(run.out_dir / "report.json", json.dumps(results, indent=2, default=str))
    sections = [("Run", _run_section(run))]
    sections.append(("Retrieval on held-out images", _retrieval_section(run.results)))
    if "sparsity" in run.figures:
        sections.append(
            ("Recall vs sparsity", html.image_tag(run.figures["sparsity"], "sparsity curve"))
        )
    if "patchdis" in run.results:
        sections.append(("PatchDis (patch-level interpretability)", _patchdis_section(run)))
    if run.results.get("searches"):
        sections.append(
            ("Searches, explained word by word", _search_section(run.results["searches"]))
        )
    if run.figures.get("inside"):
        sections.append(("Looking inside held-out images", _inside_section(run.figures["inside"])))
    intro = (
        f"LexVLA <code>small-offline</code> (DINOv2-S/14 + SmolLM2-135M) trained for "
        f"{len(run.results.get('training', []))} logged steps in {run.results.get('total_seconds', 0):.0f} s "
        "on this machine. Every score below is a sum of per-word products."
    )
    path = run.out_dir / "report.html"
    atomic_write_text(path, html.page("LexVLA demo report", sections, intro))
    return path


def _run_section(run: Any) -> str:
    rows = [(name, seconds) for name, seconds in run.timings.items()]
    losses = run.results.get("training", [])
    loss = (
        f"<p>training loss {losses[0]['loss']:.3f} → {losses[-1]['loss']:.3f}</p>" if losses else ""
    )
    return _data_line(run.results.get("data", {})) + loss + html.table(["step", "seconds"], rows)


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


def _retrieval_section(results: dict[str, Any]) -> str:
    keys = [f"{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    rows = []
    for label, name in (("untrained heads", "retrieval_untrained"), ("trained", "retrieval")):
        if name in results:
            rows.append([label] + [results[name][k] for k in keys])
    if "retrieval" in results:
        rows.append(["chance"] + [results["retrieval"]["chance"][k] for k in keys])
        n = results["retrieval"]
        note = f"<p class='muted'>{n['num_images']} images, {n['num_texts']} captions; values in %.</p>"
    else:
        note = ""
    return html.table(["model"] + keys, rows) + note


def _patchdis_section(run: Any) -> str:
    result = run.results["patchdis"]
    figures = "".join(html.figure(p, Path(p).stem) for p in run.figures.get("patchdis", []))
    return (
        f"<p>mIoU <b>{result['mIoU']:.3f}</b> over {result['num_images']} images — {result['rule']}</p>"
        f"<div class='grid'>{figures}</div>"
    )


def _search_section(searches: list[dict[str, Any]]) -> str:
    parts = []
    for search in searches:
        words = ", ".join(f"{w} {v:.2f}" for w, v in search["query_words"])
        rows = [
            (
                h["key"],
                h["score"],
                ", ".join(f"{w['word']} {w['contribution']:.3f}" for w in h["words"][:5]),
            )
            for h in search["hits"]
        ]
        parts.append(
            f"<h3>“{search['query']}”</h3><p class='words'>query words: {words}</p>"
            + html.table(["image", "score", "top contributing words"], rows)
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
        score = f"{result['score']:.3f}" if result.get("score") is not None else "-"
        parts.append(
            f"<h3>{html.escape(Path(result['image']).name)}: “{html.escape(result['caption'] or '')}” "
            f"(score {score})</h3><div class='grid'>{figures}</div>"
        )
    return "\n".join(parts)
