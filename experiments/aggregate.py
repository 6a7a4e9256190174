"""Per-experiment JSON (mean and spread over seeds) and figures from the per-run records.

Reads `<out>/runs/*.json` (written by run.py), writes `<out>/exp1_penalty.json`, `exp2_sparsity.json`,
`exp3_bow.json`, `exp4_patchdis.json`, `timings.json` and `<out>/figures/*.png`. Only numbers that are
in the run records are used, so re-aggregating never changes a value.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DIRECTIONS = ("image_to_text", "text_to_image")
RETRIEVAL_KEYS = tuple(f"{d}/R@{k}" for d in DIRECTIONS for k in (1, 5, 10))
PENALTY_ARMS = ("overuse", "flops")
LLM_ARM, BOW_ARM, COCO_ARM = "overuse", "bow", "coco-overuse"
DISCOVERY_POINTS = ("threshold", "top32", "top128")

Record = dict[str, Any]


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), n and the values themselves."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals), "values": vals}


def load_runs(out: Path) -> list[Record]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def by_arm(runs: list[Record], arm: str) -> list[Record]:
    return sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])


def point(ev: Record, name: str | int) -> Record:
    """A sparsity-curve point of an evaluation by operating point ("threshold", "dense" or k)."""
    for p in ev["curve"]["points"]:
        if p["point"] == name:
            return p
    raise KeyError(f"no operating point {name!r} in the curve")


def over(runs: list[Record], fn: Callable[[Record], float]) -> dict[str, Any]:
    return stat([fn(r) for r in runs])


# ------------------------------------------------------------------------------ experiment 1
def retrieval_block(runs: list[Record], where: str | int, key: str = "eval") -> Record:
    block = {m: over(runs, lambda r, m=m: point(r[key], where)[m]) for m in RETRIEVAL_KEYS}
    for side in ("image", "text"):
        block[f"active_words/{side}"] = over(
            runs, lambda r, s=side: point(r[key], where)["active_words"][s]
        )
    return block


def discovery_block(runs: list[Record], where: str) -> Record:
    def image(r: Record) -> Record:
        return r["eval"]["discovery"][where]["image"]

    return {
        "false_discovery_share": over(runs, lambda r: image(r)["truth"]["false_discovery_share"]["mean"]),
        "false_discovery_mass": over(runs, lambda r: image(r)["truth"]["false_discovery_mass"]["mean"]),
        "gt_recall": over(runs, lambda r: image(r)["truth"]["gt_recall"]["mean"]),
        "overused_words": over(runs, lambda r: len(image(r)["overused_words"])),
        "overused_mass": over(runs, lambda r: image(r)["overused_mass"]["mean"]),
        "active_words": over(runs, lambda r: image(r)["active_words"]),
    }  # fmt: skip


def exp1(runs: list[Record], figures: Path) -> Record:
    arms: Record = {}
    for arm in PENALTY_ARMS:
        rs = by_arm(runs, arm)
        if not rs:
            continue
        first = rs[0]["eval"]["discovery"]
        arms[arm] = {
            "seeds": [r["seed"] for r in rs],
            "penalty_weight": rs[0]["config"]["loss"]["penalty_weight"],
            "retrieval": {str(w): retrieval_block(rs, w) for w in ("threshold", 32, 128)},
            "discovery": {w: discovery_block(rs, w) for w in DISCOVERY_POINTS},
            "seed0_overused_words": first["top128"]["image"]["overused_words"][:30],
            "seed0_most_frequent_false": [
                e["word"] for e in first["top128"]["image"]["truth"]["most_frequent_false"][:15]
            ],
            "cloud": str(word_cloud(first["top128"]["cloud"], figures / f"exp1_cloud_{arm}.png")),
        }
    return {"experiment": "overuse vs FLOPs at matched sparsity", "arms": arms}


def word_cloud(frequencies: dict[str, float], path: Path) -> Path:
    from lexvla.interpret.plots import word_cloud_image

    path.parent.mkdir(parents=True, exist_ok=True)
    word_cloud_image(frequencies, width=560, height=320).save(path)
    return Path("figures") / path.name


# ------------------------------------------------------------------------------ experiment 2
def mean_curve(runs: list[Record]) -> Record:
    """The sparsity curve averaged over runs (same structure as one curve, plus `std`)."""
    base = runs[0]["eval"]["curve"]
    points = []
    for p in base["points"]:
        same = [point(r["eval"], p["point"]) for r in runs]
        entry: Record = {"point": p["point"], "label": p["label"]}
        for key in RETRIEVAL_KEYS:
            s = stat([q[key] for q in same])
            entry[key], entry.setdefault("std", {})[key] = s["mean"], s["std"]
        for group in ("active_words", "quadratic_sparsity"):
            entry[group] = {m: stat([q[group][m] for q in same])["mean"] for m in p[group]}
        points.append(entry)
    return {
        "vocab_size": base["vocab_size"],
        "num_images": base["num_images"],
        "num_texts": base["num_texts"],
        "chance": base["chance"],
        "seeds": [r["seed"] for r in runs],
        "points": points,
    }


def exp2(runs: list[Record], figures: Path) -> Record:
    from lexvla.eval.sparsity import plot_sparsity_curve

    curves: Record = {}
    for arm in (LLM_ARM, "flops", BOW_ARM, COCO_ARM):
        rs = by_arm(runs, arm)
        if not rs:
            continue
        curve = mean_curve(rs)
        title = (
            f"{arm}: recall vs sparsity (mean of {len(rs)} seed(s), {curve['num_images']} images)"
        )
        path = figures / f"exp2_sparsity_{arm}.png"
        plot_sparsity_curve(curve, path, title=title)
        curve["figure"] = str(Path("figures") / path.name)
        curves[arm] = curve
    return {"experiment": "recall vs number of active words", "curves": curves}


# ------------------------------------------------------------------------------ experiment 3
def exp3(runs: list[Record]) -> Record:
    arms: Record = {}
    for label, arm in (("llm", LLM_ARM), ("bow", BOW_ARM)):
        rs = by_arm(runs, arm)
        if not rs:
            continue
        arms[label] = {
            "run_arm": arm,
            "seeds": [r["seed"] for r in rs],
            "retrieval": {w: retrieval_block(rs, w) for w in ("threshold", "dense")},
            "discovery": {"threshold": discovery_block(rs, "threshold")},
            "text_discovery": {
                "false_discovery_share": over(
                    rs,
                    lambda r: r["eval"]["discovery"]["threshold"]["text"]["truth"][
                        "false_discovery_share"
                    ]["mean"],
                ),
                "active_words": over(
                    rs, lambda r: r["eval"]["discovery"]["threshold"]["text"]["active_words"]
                ),
            },
            "patchdis": patchdis_block(rs, "eval"),
        }
    return {"experiment": "LLM lexical prediction vs bag-of-words text side", "arms": arms}


# ------------------------------------------------------------------------------ experiment 4
def patchdis_block(runs: list[Record], key: str) -> Record:
    def pd(r: Record) -> Record:
        return r[key]["patchdis"] if key != "probe" else r["probe"]

    block = {
        "mIoU": over(runs, lambda r: pd(r)["mIoU"]),
        "mIoU/foreground": over(runs, lambda r: pd(r)["mIoU/foreground"]),
        "pixel_accuracy": over(runs, lambda r: pd(r)["pixel_accuracy"]),
    }
    if key != "probe":
        block["best_mIoU"] = over(runs, lambda r: pd(r)["best"]["mIoU"])
        block["best_threshold"] = over(runs, lambda r: pd(r)["best"]["threshold"])
    return block


def exp4(runs: list[Record]) -> Record:
    sets: Record = {}
    for name, arms in (("synthetic", (LLM_ARM, "flops", BOW_ARM)), ("coco-mini", (COCO_ARM,))):
        rows: Record = {}
        for arm in arms:
            rs = by_arm(runs, arm)
            if rs:
                rows[f"trained ({arm})"] = patchdis_block(rs, "eval")
        with_base = [r for r in runs if r["arm"] in arms and "untrained" in r]
        if with_base:
            rows["untrained (initial codebook)"] = patchdis_block(with_base, "untrained")
        with_probe = [r for r in runs if r["arm"] in arms and "probe" in r]
        if with_probe:
            rows["dense linear probe (upper reference)"] = patchdis_block(with_probe, "probe")
            rows["dense linear probe (upper reference)"]["trained_on"] = with_probe[0]["probe"][
                "trained_on"
            ]
        if rows:
            first = next(r for r in runs if r["arm"] in arms)
            rows["_info"] = {
                "pixels": first["eval"]["patchdis"]["pixels"],
                "classes": len(first["eval"]["patchdis"]["per_class_iou"]),
                "rule": first["eval"]["patchdis"]["rule"],
            }
            sets[name] = rows
    return {"experiment": "PatchDis against baselines", "sets": sets}


def timings(runs: list[Record]) -> Record:
    rows = {
        r["name"]: {
            **r["timing"],
            "steps": r["config"]["train"]["steps"],
            "mean_step_s": r["train"]["mean_step_s"],
            "first_loss": r["train"]["first"]["loss"],
            "last_loss": r["train"]["last"]["loss"],
        }
        for r in runs
    }
    total = sum(sum(v for k, v in t.items() if k.endswith("_s") and k != "mean_step_s")
                for t in rows.values())  # fmt: skip
    return {"runs": rows, "total_s": total}


def aggregate(out: Path) -> dict[str, Path]:
    """Write the experiment JSON files and figures from `<out>/runs/*.json`; returns their paths."""
    runs = load_runs(out)
    if not runs:
        raise SystemExit(f"no run records in {out / 'runs'}: run experiments/run.py first")
    figures = out / "figures"
    results = {
        "exp1_penalty": exp1(runs, figures),
        "exp2_sparsity": exp2(runs, figures),
        "exp3_bow": exp3(runs),
        "exp4_patchdis": exp4(runs),
        "timings": timings(runs),
    }
    paths = {}
    for name, result in results.items():
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(result, indent=1, default=float) + "\n")
    return paths
