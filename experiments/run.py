"""Run the paper-claim experiments (docs/results.md) and write their JSON results and figures.

    python experiments/run.py                 # every run in experiments/configs/, then the tables
    python experiments/run.py --only syn-bow  # runs whose name (or experiment tag) starts with it
    python experiments/run.py --aggregate     # only rebuild results/exp*.json + figures from runs/
    python experiments/run.py --smoke --out /tmp/smoke   # CI: tiny random towers, a few steps

Each config in experiments/configs/ is one training run (a preset plus `--set` overrides, as for
`lexvla train`). A run trains, evaluates its model on the held-out images (retrieval over the sparsity
curve, false discoveries, PatchDis) and writes `results/runs/<name>.json` with its wall times. Baselines
(the untrained model, the patch-level linear probe) are evaluation-only passes of the runs that ask for
them. Then `aggregate` builds one JSON per experiment (mean and spread over seeds) and the figures, and
scripts/make_results_doc.py turns those into docs/results.md. Progress: one line per phase on stdout,
and each run's `metrics.jsonl` under the (uncommitted) work folder `experiments/work/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from experiments.aggregate import aggregate  # noqa: E402
from experiments.datasets import eval_set  # noqa: E402
from experiments.evaluate import FeatureStore, evaluate_model, linear_probe  # noqa: E402

from lexvla.config import ExperimentConfig, apply_overrides, to_dict  # noqa: E402
from lexvla.models.lexvla import LexVLA  # noqa: E402
from lexvla.presets import get_preset  # noqa: E402
from lexvla.train.distributed import cleanup  # noqa: E402
from lexvla.train.loop import build_trainer, run_steps  # noqa: E402

CONFIG_DIR = ROOT / "experiments" / "configs"
DEFAULT_OUT = ROOT / "experiments" / "results"
WORK = ROOT / "experiments" / "work"
PROBE_IMAGES = 128  # synthetic training images the linear probe is fit on
COCO_MINI = os.environ.get("LEXVLA_COCO_MINI", str(ROOT.parent / "shared" / "data" / "coco-mini"))

# --smoke: the same pipeline on the random `tiny` towers and a few synthetic images (CI, < 1 min).
SMOKE_SET: dict[str, Any] = {
    "data.path": "synthetic:40",
    "data.holdout": 12,
    "data.images": "",
    "train.steps": 3,
    "train.batch_size": 8,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "train.save_every": 0,
    "loss.penalty_warmup_steps": 1,
    "model.text.use_lora": False,
}
SMOKE_PROBE_IMAGES = 12

logger = logging.getLogger("experiments")


def load_specs() -> list[dict[str, Any]]:
    """The run configs in run order (seed 0 of every arm first, so a cut-short run still compares)."""
    specs = [json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob("*.json"))]
    return sorted(specs, key=lambda s: (s.get("order", 0), s["name"]))


def selected(spec: dict[str, Any], only: list[str]) -> bool:
    """Whether `--only` selects a run: by a prefix of its name or one of its experiment tags."""
    if not only:
        return True
    return any(spec["name"].startswith(o) or o in spec["experiments"] for o in only)


def resolve_config(spec: dict[str, Any], smoke: bool) -> ExperimentConfig:
    """The run's ExperimentConfig: preset + overrides (`{coco_mini}` filled in); tiny under --smoke."""
    overrides = {k: _fill(v) for k, v in spec["set"].items()}
    if not smoke:
        return apply_overrides(get_preset(spec["preset"]), overrides)
    kept = {
        k: v for k, v in overrides.items() if k.startswith(("model.seed", "model.text.encoder"))
    }
    kept |= {k: v for k, v in overrides.items() if k.startswith(("loss.", "train.seed"))}
    return apply_overrides(get_preset("tiny"), kept | SMOKE_SET)


def _fill(value: Any) -> Any:
    return value.replace("{coco_mini}", COCO_MINI) if isinstance(value, str) else value


def train(cfg: ExperimentConfig, run_dir: Path, store: FeatureStore) -> tuple[LexVLA, list[dict]]:
    """Train one run (shared frozen-text features across runs); returns the model and its log."""
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = build_trainer(cfg, run_dir, resume=False, progress=False)
    if trainer.text_cache is not None:
        trainer.text_cache = store.text_cache(trainer.model)  # same frozen LLM: same features
    try:
        run_steps(trainer)
    finally:
        trainer.log.close()
        cleanup()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return trainer.model, [json.loads(line) for line in lines]


def loss_summary(log: list[dict]) -> dict[str, Any]:
    keys = ("step", "loss", "contrastive_loss", "sparsity/image_active", "time/step_s")
    rows = [{k: r[k] for k in keys if k in r} for r in log]
    return {
        "first": rows[0],
        "last": rows[-1],
        "log": rows,
        "mean_step_s": sum(r["time/step_s"] for r in rows) / len(rows),
    }


def run_one(
    spec: dict[str, Any], smoke: bool, out: Path, work: Path, store: FeatureStore
) -> dict[str, Any]:
    """Train, evaluate (and the asked-for baselines) one run; write and return its JSON record."""
    cfg = resolve_config(spec, smoke)
    torch.manual_seed(cfg.train.seed)
    data = eval_set(cfg, SMOKE_PROBE_IMAGES if smoke else PROBE_IMAGES)
    _say(f"{spec['name']}: training {cfg.train.steps} steps")
    start = time.perf_counter()
    model, log = train(cfg, work / spec["name"], store)
    train_s = time.perf_counter() - start
    _say(f"{spec['name']}: trained in {train_s:.0f} s; evaluating")
    start = time.perf_counter()
    record: dict[str, Any] = {
        "name": spec["name"],
        "arm": spec["arm"],
        "seed": spec["seed"],
        "data": data.name,
        "experiments": spec["experiments"],
        "config": to_dict(cfg),
        "train": loss_summary(log),
        "eval": evaluate_model(model, data, store),
    }
    timing = {"train_s": train_s, "eval_s": time.perf_counter() - start}
    if spec.get("baselines"):
        start = time.perf_counter()
        untrained = LexVLA(cfg.model)
        record["untrained"] = evaluate_model(untrained, data, store)
        if spec.get("probe"):
            record["probe"] = linear_probe(untrained, data, store)
        timing["baselines_s"] = time.perf_counter() - start
    record["timing"] = timing
    path = out / "runs" / f"{spec['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    _say(f"{spec['name']}: done ({json.dumps({k: round(v) for k, v in timing.items()})})")
    return record


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny towers, a few steps (CI)")
    parser.add_argument("--only", default="", help="comma-separated run-name prefixes / exp tags")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--work", type=Path, default=WORK, help="run folders (not committed)")
    parser.add_argument("--aggregate", action="store_true", help="only rebuild tables and figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("LEXVLA_THREADS", "2")))
    only = [o for o in args.only.split(",") if o]
    if not args.aggregate:
        store = FeatureStore(on_disk=not args.smoke)
        specs = [s for s in load_specs() if selected(s, only)]
        if args.smoke:
            specs = _smoke_subset(specs)
        _say(f"{len(specs)} runs: {', '.join(s['name'] for s in specs)}")
        start = time.perf_counter()
        for spec in specs:
            run_one(spec, args.smoke, args.out, args.work, store)
        _say(f"all runs done in {time.perf_counter() - start:.0f} s")
    aggregate(args.out)
    _say(f"tables and figures written to {args.out}")
    if args.out.resolve() == DEFAULT_OUT.resolve() and not args.smoke:
        from scripts.make_results_doc import main as make_doc

        make_doc([])
    return 0


def _smoke_subset(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Under --smoke: seed 0 of each arm (every experiment still gets its inputs)."""
    seen: set[str] = set()
    kept = []
    for spec in specs:
        if spec["arm"] not in seen:
            seen.add(spec["arm"])
            kept.append(spec)
    return kept


if __name__ == "__main__":
    sys.exit(main())
