"""Benchmark: the Flickr8k recipe (`lexvla train --preset small-offline`) at the new scale, on a subset.

    .venv/bin/python bench/train_flickr8k.py             # 128 images (640 captions), 10 steps per setting
    .venv/bin/python bench/train_flickr8k.py --images 64 --steps 4 --profile-steps 1  # shorter

What is measured, in one run, on the first `--images` images of the Karpathy train split of
/work/shared/data/flickr8k (the data of the full recipe run), with the preset's settings (frozen DINOv2-S/14
and SmolLM2-135M, text head "mlp", vocabulary "words", batch 32, float16 image feature table):

- feature caching: `lexvla.train.features.image_feature_table` (decode, preprocess, DINOv2 in batches of
  32, write the float16 table) and `text_feature_table` (every caption of those images through the frozen
  LLM in batches of 64), the functions the trainer runs before its first step, into a temporary cache
  root so nothing is reused: first in float32, then at the recipe's `train.feature_cache_compute`
  ("auto": bf16 where native), side by side, with the relative error of the recipe's tables against the
  float32 ones; the steps then run on the recipe's tables. One untimed DINOv2 forward of one image and
  one LLM forward of one caption come first, so the rates are steady-state rates (the full run
  amortises that one-off cost).
- seconds per step: the trainer's step (`lexvla.train.loop.train_step`: batch from the cached tables,
  heads' forward, caption-word targets, objective, backward, gradient clipping, AdamW, schedule) on a
  `Trainer` holding the cached tables of the subset, patch_keep 0.25 (the recipe) and 1.0 (every patch)
  alternating step by step so both see the same machine load. `--warmup` untimed `train_step` calls per
  setting, then `--steps` timed steps per setting taken apart by phase (below; the median of their sum is
  `step_median_s`, with the process CPU time `step_cpu_median_s`, less sensitive to other load), then
  `--check-steps` timed plain `train_step` calls per setting as a cross-check that the timers cost nothing.
- where a step's time goes: the step taken apart with explicit timers (the library pieces of
  `train_step`: `BatchSource.batch`, `loop._forward_losses` with the heads' methods wrapped by timers,
  `backward`, `loop._grad_norm` + AdamW + scheduler). The image head is split into the adapter
  (`forward_adapter`) and the fused max-pool over the vocabulary (`pooled_logits`, incl. the logit
  affine), the text head is `text.activations` (MLP head + codebook matmul); "losses" is the objective plus
  the caption-word targets, the patch sampling and the L2 normalisation. Medians over the timed steps.
  Then torch.profiler (CPU) over `--profile-steps` of these steps per setting: the top operators by self
  CPU time and the phases' CPU time (record_function labels).

`measured_by_full_run` holds the lead's numbers of the full recipe on all of Flickr8k (not measured here);
`projected_full_run_min` puts this run's rates to the full run's sizes for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _common import Contention, torch_machine_info, write_json  # noqa: E402

FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
KARPATHY = FLICKR8K / "annotations" / "dataset_flickr8k.json"
PATCH_KEEPS = (0.25, 1.0)
PHASES = ("batch", "image_adapter", "image_pool", "text_head", "losses", "backward", "optimizer")

MEASURED_BY_FULL_RUN = [
    {
        "what": "`lexvla train --preset small-offline` on all of Flickr8k (train split), measured by "
        "the lead, from nothing (no cached features), not by this script; features cached at "
        "train.feature_cache_compute=auto (bf16)",
        "machine": "2-core Intel Xeon with AMX, nothing else running",
        "date": "2026-12-03",
        "wall_min": 34.7,
        "image_caching": {"images": 5999, "seconds": 119, "images_per_s": 50.4},
        "caption_caching": {"captions": 29995, "seconds": 309, "captions_per_s": 97.1},
        "steps": 1800,
        "seconds_per_step_approx": 0.91,
        "before": "with float32 caching: 15.5 images/s and 33.5 captions/s (6:26 and 14:55), 48.3 min",
    },
    {
        "what": "the same with the 4,000-step recipe (experiments/results/issue13_steps4000.json), "
        "before the pool's numba kernels and fused AdamW",
        "machine": "2-core AMD EPYC with AVX512-BF16, no AMX; tests and benchmarks beside about 25 "
        "min of the steps",
        "date": "2026-12-04",
        "wall_min": 89.4,
        "image_caching": {"images": 5999, "seconds": 467, "images_per_s": 12.8},
        "caption_caching": {"captions": 29995, "seconds": 820, "captions_per_s": 36.6},
        "steps": 4000,
        "seconds_per_step_median": 0.87,
    },
    {
        "what": "the 4,000-step recipe again from nothing (a fresh $LEXVLA_CACHE), after the bf16 "
        "search's arg-max kernel, the threaded pool kernels and length-sorted caption caching",
        "machine": "2-core AMD EPYC with AVX512-BF16, no AMX; nothing else running",
        "date": "2026-12-04",
        "wall_min": 53.7,
        "image_caching": {"images": 5999, "seconds": 426, "images_per_s": 14.1},
        "caption_caching": {"captions": 29995, "seconds": 486, "captions_per_s": 61.7},
        "steps": 4000,
        "seconds_per_step_approx": 0.48,
    },
    {
        "what": "the 4,500-step recipe (validation every 1,500) from nothing (a fresh $LEXVLA_CACHE)",
        "machine": "2-core AMD EPYC with AVX512-BF16, no AMX; nothing else running",
        "date": "2026-12-04",
        "wall_min": 58.7,
        "image_caching": {"images": 5999, "seconds": 484, "images_per_s": 12.4},
        "caption_caching": {"captions": 29995, "seconds": 526, "captions_per_s": 57.0},
        "steps": 4500,
        "seconds_per_step_median": 0.48,
    },
]


# ------------------------------------------------------------------------------ timers
class Phases:
    """Wall time per named phase of the current step, each phase also a profiler label."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return fn(*args, **kwargs)

        return timed


def _cache_tables(model, subset, root: Path, dtype: torch.dtype, compute: str) -> dict[str, Any]:
    """Both frozen-feature tables of `subset` made at `compute`, timed; "tables" holds them."""
    from lexvla.train.features import image_feature_table, text_feature_table

    start = time.perf_counter()
    images = image_feature_table(model, subset, root, dtype=dtype, compute=compute, progress=False)
    image_s = time.perf_counter() - start
    start = time.perf_counter()
    texts, offsets = text_feature_table(model, subset, root, compute=compute, progress=False)
    text_s = time.perf_counter() - start
    print(f"caching ({compute}): {len(subset)} images in {image_s:.1f} s = "
          f"{len(subset) / image_s:.1f} images/s; {len(texts)} captions in {text_s:.1f} s = "
          f"{len(texts) / text_s:.1f} captions/s", flush=True)  # fmt: skip
    return {
        "images": {"count": len(subset), "seconds": image_s, "images_per_s": len(subset) / image_s,
                   "table_shape": list(images.features.shape),
                   "table_dtype": str(images.features.dtype)},
        "captions": {"count": len(texts), "seconds": text_s,
                     "captions_per_s": len(texts) / text_s,
                     "table_shape": list(texts.features.shape)},
        "tables": (images, texts, offsets),
    }  # fmt: skip


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over a whole table."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def build(args: argparse.Namespace, cache_root: Path) -> tuple[Any, dict[str, Any], Phases]:
    """The trainer of the recipe on the subset, with its feature tables cached (and timed)."""
    from lexvla.losses import LexVLAObjective
    from lexvla.models.lexvla import LexVLA
    from lexvla.presets import get_preset
    from lexvla.train.batches import BatchSource
    from lexvla.train.distributed import DistInfo
    from lexvla.train.loop import Trainer, TrainState
    from lexvla.train.optim import create_optimizer, create_scheduler
    from lexvla.train.targets import CaptionWordTargets

    cfg = get_preset("small-offline")
    cfg.data.path, cfg.data.images = str(KARPATHY), str(FLICKR8K / "images")
    start = time.perf_counter()
    model = LexVLA(cfg.model, device=torch.device("cpu"))
    load_s = time.perf_counter() - start
    batches = BatchSource(cfg.data, cfg.train, 0, 1, model.image_processor)
    full_train = len(batches.train_set)
    batches.train_set = batches.train_set.subset(range(min(args.images, full_train)))
    subset = batches.train_set
    n_captions = sum(len(subset[i].captions) for i in range(len(subset)))
    print(f"model built in {load_s:.1f} s; {len(subset)} of {full_train} training images, "
          f"{n_captions} captions", flush=True)  # fmt: skip

    with torch.no_grad():  # one-off warm-up of both frozen towers (not timed)
        side = model.image_processor.image_size
        model.vision.forward_features(torch.zeros(1, 3, side, side))
        model.text.forward_features(["a dog runs on the grass"])
    dtype = {"float16": torch.float16, "float32": torch.float32}[cfg.train.feature_cache_dtype]
    compute = cfg.train.feature_cache_compute
    # The float32 tables first, side by side with the recipe's (`train.feature_cache_compute`).
    reference = _cache_tables(model, subset, cache_root / "float32", dtype, "float32")
    recipe = _cache_tables(model, subset, cache_root / compute, dtype, compute)
    image_table, text_table, offsets = recipe.pop("tables")
    image_ref, text_ref, _ = reference.pop("tables")
    caching = {
        **recipe,
        "compute": compute,
        "float32": reference,
        "speedup_vs_float32": {
            "images": recipe["images"]["images_per_s"] / reference["images"]["images_per_s"],
            "captions": recipe["captions"]["captions_per_s"]
            / reference["captions"]["captions_per_s"],
        },
        "relative_error_vs_float32": {
            "images": _relative_error(image_table.features, image_ref.features),
            "captions": _relative_error(text_table.features, text_ref.features),
        },
        "model_build_s": load_s,
    }
    batches.use_tables(image_table, text_table, offsets)

    model.train()
    optimizer = create_optimizer(model.trainable_parameters(), cfg.train)
    trainer = Trainer(
        cfg=cfg,
        run_dir=cache_root,
        dist=DistInfo(),
        model=model,
        ddp_model=model,
        objective=LexVLAObjective(cfg.loss, max_scale=cfg.model.logit_scale_max),
        word_targets=CaptionWordTargets(model.vocab),
        optimizer=optimizer,
        scheduler=create_scheduler(optimizer, cfg.train),
        batches=batches,
        image_cache=None,
        text_cache=None,
        log=None,  # type: ignore[arg-type]  # train_step does not log
        state=TrainState(),
    )
    # Timers around the heads' methods (instance attributes: the library classes are untouched).
    phases = Phases()
    vision, text = model.vision, model.text
    vision.forward_adapter = phases.wrap("image_adapter", vision.forward_adapter)
    vision.pooled_logits = phases.wrap("image_pool", vision.pooled_logits)
    text.activations = phases.wrap("text_head", text.activations)
    info = {
        "full_train_images": full_train,
        "vocabulary_words": len(model.vocab.words),
        "trainable": model.num_trainable(),
        "pool_search_dtype": cfg.model.lexical.pool_search_dtype,
    }
    return trainer, {"caching": caching, "info": info}, phases


def phased_step(t: Any, step: int, phases: Phases) -> dict[str, float]:
    """`loop.train_step` (grad_accum 1, one process) with each phase timed."""
    from lexvla.train import loop

    phases.times = {}
    torch.manual_seed(t.cfg.train.seed * 1_000_003 + step)
    with phases("batch"):
        batch = t.batches.batch(step)
    with phases("forward_and_losses"), loop._autocast(t):
        losses = loop._forward_losses(t, batch, step)
    with phases("backward"):
        losses["loss"].backward()
    with phases("optimizer"):
        grad_norm = loop._grad_norm(t)
        if math.isfinite(float(losses["loss"].detach())) and math.isfinite(grad_norm):
            t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
    times = dict(phases.times)
    heads = sum(times.get(k, 0.0) for k in ("image_adapter", "image_pool", "text_head"))
    times["losses"] = times.pop("forward_and_losses") - heads
    times["step"] = sum(times[p] for p in PHASES)
    return times


def run_steps(t: Any, phases: Phases, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up with the trainer's `train_step`, then timed phased steps, then `train_step` again
    (`--check-steps`, the cross-check that the timers cost nothing); settings alternate."""
    from lexvla.train.loop import train_step

    step = 0
    rounds = [("warmup", args.warmup), ("phased", args.steps), ("train_step", args.check_steps)]
    wall: dict[str, dict[float, list[float]]] = {k: {p: [] for p in PATCH_KEEPS} for k, _ in rounds}
    cpu: dict[str, dict[float, list[float]]] = {k: {p: [] for p in PATCH_KEEPS} for k, _ in rounds}
    split: dict[float, list[dict[str, float]]] = {k: [] for k in PATCH_KEEPS}
    for kind, count in rounds:
        for r in range(count):
            for keep in PATCH_KEEPS if r % 2 == 0 else PATCH_KEEPS[::-1]:
                t.cfg.train.patch_keep = keep
                start, start_cpu = time.perf_counter(), time.process_time()
                if kind == "phased":
                    split[keep].append(phased_step(t, step, phases))
                else:
                    train_step(t, step)  # the trainer's own step
                wall[kind][keep].append(time.perf_counter() - start)
                cpu[kind][keep].append(time.process_time() - start_cpu)
                step += 1
            print(f"  {kind} {r + 1}: " + "   ".join(
                f"patch_keep {k}: {wall[kind][k][-1]:.2f} s (CPU {cpu[kind][k][-1]:.2f} s)"
                for k in PATCH_KEEPS), flush=True)  # fmt: skip
    out: dict[str, Any] = {}
    for keep in PATCH_KEEPS:
        med = {p: statistics.median(s[p] for s in split[keep]) for p in (*PHASES, "step")}
        check = wall["train_step"][keep]
        out[f"patch_keep_{keep}"] = {
            "step_median_s": statistics.median(wall["phased"][keep]),
            "step_times_s": wall["phased"][keep],
            "step_cpu_median_s": statistics.median(cpu["phased"][keep]),
            "phases_median_s": {p: med[p] for p in PHASES},
            "phases_share": {p: med[p] / sum(med[q] for q in PHASES) for p in PHASES},
            "train_step_check_times_s": check,
            "train_step_check_median_s": statistics.median(check) if check else None,
            "warmup_times_s": wall["warmup"][keep],
        }
    return out


def profile_steps(t: Any, phases: Phases, args: argparse.Namespace, top: int) -> dict[str, Any]:
    """torch.profiler over a few phased steps per patch_keep: top operators and phase CPU times."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    step = 10_000
    for keep in PATCH_KEEPS:
        t.cfg.train.patch_keep = keep
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                phased_step(t, step, phases)
                step += 1
        events = prof.key_averages()
        n = args.profile_steps
        labels = {e.key: e for e in events if e.key in (*PHASES, "forward_and_losses")}
        ops = sorted(
            (e for e in events if e.key not in labels and not e.key.startswith("ProfilerStep")),
            key=lambda e: e.self_cpu_time_total,
            reverse=True,
        )
        total_self = sum(e.self_cpu_time_total for e in events)
        out[f"patch_keep_{keep}"] = {
            "steps": n,
            "phases_cpu_ms_per_step": {
                k: labels[k].cpu_time_total / 1e3 / n
                for k in (*PHASES, "forward_and_losses")
                if k in labels
            },
            "top_ops_by_self_cpu": [
                {
                    "op": e.key,
                    "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n,
                    "share_of_self_cpu": e.self_cpu_time_total / total_self,
                    "calls_per_step": e.count / n,
                }
                for e in ops[:top]
            ],  # fmt: skip
        }
        print(f"  profiled patch_keep {keep}: top ops " + ", ".join(
            f"{e.key} {e.self_cpu_time_total / 1e3 / n:.0f} ms" for e in ops[:5]), flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="training images of the subset")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument(
        "--check-steps", type=int, default=2, help="timed `train_step` calls per setting"
    )
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per setting")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default). On a shared machine 1 avoids the stalls of two "
        "OpenMP threads when another process holds a core",
    )
    parser.add_argument("--top", type=int, default=15, help="operators listed per profile")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "train_flickr8k.json"
    )
    args = parser.parse_args()
    if not KARPATHY.is_file() or not (FLICKR8K / "images").is_dir():
        reason = f"Flickr8k not found ({KARPATHY} and {FLICKR8K / 'images'}): benchmark skipped"
        print(reason)
        if not args.out.exists():  # never replace a real report by a skip
            write_json(args.out, {"benchmark": "train_flickr8k", "skipped": reason, "targets": {}})
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    machine_at_start = torch_machine_info()
    contention = Contention()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="lexvla-bench-features-") as tmp:
        trainer, built, phases = build(args, Path(tmp))
        steps = run_steps(trainer, phases, args)
        profiles = profile_steps(trainer, phases, args, args.top)
    caching = built["caching"]
    full = MEASURED_BY_FULL_RUN[0]  # the sizes (all of Flickr8k's train split)
    recipe = steps["patch_keep_0.25"]["step_median_s"]
    projected = {
        "image_caching_min": full["image_caching"]["images"] / caching["images"]["images_per_s"] / 60,
        "caption_caching_min": full["caption_caching"]["captions"]
        / caching["captions"]["captions_per_s"] / 60,
        "steps_min": trainer.cfg.train.steps * recipe / 60,  # the preset's steps
    }  # fmt: skip
    projected["total_min_without_eval_and_checkpoints"] = sum(projected.values())
    report = {
        "benchmark": "the Flickr8k recipe (small-offline) on a subset: feature caching throughput, "
        "seconds per step, where a step's time goes (bench/train_flickr8k.py)",
        "machine": machine_at_start,
        "contention": contention.report(),
        "inputs": {
            "preset": "small-offline",
            "data": f"{KARPATHY} (split train), first {caching['images']['count']} images",
            "batch": trainer.cfg.train.batch_size,
            "patch_keep": list(PATCH_KEEPS),
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "train_step_check_steps": args.check_steps,
            "profile_steps": args.profile_steps,
            **built["info"],
        },
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "results": {"feature_caching": caching, "steps": steps, "profile": profiles},
        "projected_full_run_min": projected,
        "measured_by_full_run": full,
        "targets": {},
    }
    write_json(args.out, report)
    print_summary(report)
    busy = report["contention"]["other_processes_cpu_cores"]
    print(f"other processes used {busy:.2f} of {os.cpu_count()} cores during the run")
    print(f"wrote {args.out}")


def print_summary(report: dict) -> None:
    steps = report["results"]["steps"]
    print(
        f"\n{'setting':<16}{'step':>8}{'CPU':>8}{'train_step':>11}"
        + "".join(f"{p:>14}" for p in PHASES)
    )
    for name, r in steps.items():
        phases = "".join(f"{r['phases_median_s'][p]:>14.3f}" for p in PHASES)
        check = r["train_step_check_median_s"] or float("nan")
        print(
            f"{name:<16}{r['step_median_s']:>8.3f}{r['step_cpu_median_s']:>8.3f}{check:>11.3f}{phases}"
        )
    projected = report["projected_full_run_min"]
    print("projected full run (min): " + ", ".join(f"{k} {v:.1f}" for k, v in projected.items()))


if __name__ == "__main__":
    main()
