"""Evaluate a finished run of the default recipe (issue 13's targets) and write one JSON report.

    .venv/bin/python experiments/flickr8k.py --run runs/flickr8k \
        [--coco ../shared/data/coco-mini] [--out experiments/results/flickr8k_recipe.json]

On the run's validation split (Flickr8k `val`), through the frozen-feature tables the run cached:
- the trained model and the untrained one (same towers): R@1/5/10 both ways at the default
  sparsification and at the top 300 words, word quality (`lexvla.eval.words`), active words;
- the sparsity curve (recall at top-k, k from the whole vocabulary down to 32);
- the dense baseline (train/baseline.py) trained on the same frozen features, batches, steps,
  optimiser and schedule;
- PatchDis on coco-mini (relative background rule) for both models, beside the dense linear probe.
Everything else about the run (wall time, its validation log) is read from its folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.datasets import coco_set  # noqa: E402
from experiments.evaluate import FeatureStore, linear_probe, patchdis  # noqa: E402

from lexvla.config import ExperimentConfig, apply_overrides, load_config  # noqa: E402
from lexvla.eval.sparsity import sparsity_curve_from_encodings  # noqa: E402
from lexvla.models.factory import create_model  # noqa: E402
from lexvla.models.lexvla import LexVLA  # noqa: E402
from lexvla.train.baseline import dense_retrieval, fit_dense_baseline  # noqa: E402
from lexvla.train.batches import BatchSource  # noqa: E402
from lexvla.train.features import image_feature_table, text_feature_table  # noqa: E402
from lexvla.train.state import feature_cache_root  # noqa: E402
from lexvla.train.validate import (  # noqa: E402
    encodings_from_tables,
    validate,
    validation_metrics,
)

CURVE = ("threshold", "dense", 4096, 2048, 1024, 512, 300, 128, 64, 32)


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


@torch.no_grad()
def lexical_block(model: LexVLA, holdout: Any, root: Path) -> dict[str, Any]:
    """Validation metrics (retrieval at threshold and top 300, word quality) and the sparsity curve."""
    enc, captions = encodings_from_tables(model, holdout, root, torch.float16, 32)
    result = validation_metrics(model, enc, captions)
    result["curve"] = sparsity_curve_from_encodings(enc, CURVE)
    return result


def compact_block(path: Path, holdout: Any, root: Path) -> dict[str, Any]:
    """The compact checkpoint's validation metrics, and the size of its weights."""
    result = validate(create_model(path).eval(), holdout, tables_root=root)
    result["weights_bytes"] = (path / "model.safetensors").stat().st_size
    return result


def dense_block(cfg: ExperimentConfig, model: LexVLA, holdout: Any, root: Path) -> dict[str, Any]:
    """The dense baseline on the same cached features, batches and steps as the run."""
    batches = BatchSource(cfg.data, cfg.train, processor=model.image_processor)
    compute = cfg.train.feature_cache_compute  # the run's own training features
    images = image_feature_table(model, batches.train_set, root, compute=compute, progress=False)
    texts, offsets = text_feature_table(
        model, batches.train_set, root, compute=compute, progress=False
    )
    batches.use_tables(images, texts, offsets)
    start = time.perf_counter()
    with torch.enable_grad():
        baseline = fit_dense_baseline(cfg, batches, max_scale=cfg.model.logit_scale_max)
    seconds = time.perf_counter() - start
    val_images = image_feature_table(model, holdout, root, progress=False)
    val_texts, val_offsets = text_feature_table(model, holdout, root, progress=False)
    owner = torch.repeat_interleave(torch.arange(len(holdout)), val_offsets.diff())
    kept = val_images.ok.bool()
    remap = torch.cumsum(kept.long(), 0) - 1
    text_kept = kept[owner]
    result = dense_retrieval(
        baseline,
        val_images.features[kept],
        val_texts.features[text_kept],
        remap[owner[text_kept]],
    )
    result["train_seconds"] = round(seconds, 1)
    return result


def patchdis_block(model: LexVLA, untrained: LexVLA, coco: Path) -> dict[str, Any]:
    """PatchDis on coco-mini (relative background rule) for both models and the dense probe."""
    cfg = apply_overrides(
        ExperimentConfig(),
        [
            f"data.path={coco / 'annotations' / 'captions_train2017.json'}",
            f"data.images={coco / 'train2017'}",
            "data.holdout=16",
        ],
    )
    data = coco_set(cfg)
    store = FeatureStore(on_disk=False)
    return {
        "trained": patchdis(model, data, store, rule="relative"),
        "untrained": patchdis(untrained, data, store, rule="relative"),
        "dense_probe": linear_probe(model, data, store),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `lexvla train` folder")
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco-mini")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "experiments" / "results" / "flickr8k_recipe.json"
    )
    parser.add_argument(
        "--wall-seconds", type=float, help="the run's wall time (measured around it)"
    )
    parser.add_argument(
        "--caching-seconds", type=float, help="the part of it spent caching features"
    )
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    parser.add_argument(
        "--compact",
        type=Path,
        help="also evaluate this compact checkpoint (`lexvla compact`) on val",
    )
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    cfg = load_config(ExperimentConfig, args.run / "config.json")
    model = create_model(args.run).eval()
    torch.manual_seed(cfg.train.seed)
    untrained = LexVLA(cfg.model).eval()
    holdout = BatchSource(cfg.data, cfg.train).holdout
    root = feature_cache_root()
    report: dict[str, Any] = {
        "run": str(args.run),
        "config": json.loads((args.run / "config.json").read_text()),
    }
    report["timing"] = {
        "wall_seconds": args.wall_seconds,
        "caching_seconds": args.caching_seconds,
        "note": args.note,
    }
    summary = args.run / "summary.json"
    if summary.is_file():
        report["summary"] = json.loads(summary.read_text())
    _say("trained model on val")
    report["trained"] = lexical_block(model, holdout, root)
    _say("untrained model on val")
    report["untrained"] = lexical_block(untrained, holdout, root)
    if args.compact:
        _say(f"compact checkpoint {args.compact} on val")
        report["compact"] = compact_block(args.compact, holdout, root)
    _say(f"dense baseline: {cfg.train.steps} steps on the same features")
    report["dense_baseline"] = dense_block(cfg, model, holdout, root)
    if (args.coco / "annotations" / "instances_train2017.json").is_file():
        _say("PatchDis on coco-mini")
        report["patchdis"] = patchdis_block(model, untrained, args.coco)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    _say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
