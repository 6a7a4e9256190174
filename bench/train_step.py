"""Benchmark: one training step of the `small-offline` heads, cached DINOv2 features vs recomputing them.

    .venv/bin/python bench/train_step.py                 # batch 32, 5 timed steps per variant
    .venv/bin/python bench/train_step.py --repeats 3     # shorter

What is trained, as in `small-offline`: the adapter, the image codebook and the temperature (the text
LLM is frozen, no LoRA; DINOv2 is frozen). One step = image features, text features, the heads' forward
(`LexVLA.forward` on features), the library objective (`lexvla.losses.LexVLAObjective`: InfoNCE +
overuse penalty), backward, gradient clipping and the AdamW step (`lexvla.train.optim`), all fp32 on CPU.

- cached (ours): the image features come from `lexvla.train.features.ImageFeatureCache` (in memory,
  warm, keyed by a hash of the preprocessed pixels), as the trainer does from its second epoch on.
- recompute (reference): DINOv2-S/14 runs on the 32 images at every step (fp32, no grad).

Both variants use the same text path as the trainer for a frozen LLM (`TextFeatureCache`, warm), the same
32 coco-mini images (first 32 file names, centre crop 224) and their first captions. The variants
alternate step by step so both see the same machine load; times are medians over `--repeats` steps.
The split reports each phase's median; the uncached text encoding of the 32 captions (zero-shot prompt,
prefix cache on) is measured apart, as the cost a step would pay without the text cache.

Both are run twice: with the exact float32 arg-max search of the fused pool (`speedup_exact_fp32_search`)
and with its bf16 search (`lexical.pool_search_dtype="bfloat16"`: the arg-max patch is searched with
bf16 scores, its value recomputed in float32), `speedup_bf16_search`. `speedup` (the target) is the
preset's own setting, "auto": bf16 where bf16 matmuls are native (AVX512-BF16/AMX CPUs), else exact.

Equality: from the same weights, loss and gradients with cached and recomputed features must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lexvla  # noqa: E402
from _common import Contention, torch_machine_info, write_json  # noqa: E402
from lexvla.layers.lexical import pool_search_dtype  # noqa: E402
from lexvla.losses import LexVLAObjective  # noqa: E402
from lexvla.models.lexvla import LexVLA  # noqa: E402
from lexvla.presets import get_preset  # noqa: E402
from lexvla.train.features import ImageFeatureCache, TextFeatureCache, module_fingerprint  # noqa: E402
from lexvla.train.optim import create_optimizer  # noqa: E402

COCO = ROOT.parent / "shared" / "data" / "coco-mini"
TARGET = 1.8
SEARCH_DTYPES = ("float32", "bfloat16")  # lexical.pool_search_dtype of the two runs
PHASES = ("image_features", "text_features", "heads_forward", "heads_backward", "optimizer")


# ------------------------------------------------------------------------------ helpers
def load_batch(model: LexVLA, n: int) -> tuple[Tensor, list[str], str]:
    """n coco-mini images (first file names) with their first captions, else random pixels."""
    images = sorted((COCO / "train2017").glob("*.jpg"))[:n]
    captions_file = COCO / "annotations" / "captions_train2017.json"
    if len(images) == n and captions_file.is_file():
        first: dict[int, str] = {}
        for a in sorted(
            json.loads(captions_file.read_text())["annotations"], key=lambda a: a["id"]
        ):
            first.setdefault(a["image_id"], a["caption"].strip())
        captions = [first[int(p.stem)] for p in images]
        return model.preprocess(images), captions, f"coco-mini train2017, first {n} files"
    size = model.cfg.vision.image_size
    pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return pixels, [f"A photo of object number {i}." for i in range(n)], "random pixels"


class Step:
    """One training step of the heads, with per-phase wall times."""

    def __init__(self, model: LexVLA, pixels: Tensor, captions: list[str]) -> None:
        preset = get_preset("small-offline")
        self.model, self.pixels, self.captions = model, pixels, captions
        self.objective = LexVLAObjective(preset.loss, model.cfg.logit_scale_max)
        self.train_cfg = preset.train
        self.optimizer = create_optimizer(model.trainable_parameters(), preset.train)
        vision = model.cfg.vision
        fingerprint = module_fingerprint(model.vision.backbone, [vision.image_size, vision.mean])
        self.image_cache = ImageFeatureCache(None, fingerprint, memory=True)
        self.text_cache = TextFeatureCache()
        self.step = 0

    def image_features(self, cached: bool) -> Tensor:
        if cached:
            return self.image_cache.get(self.pixels, self.model.vision.forward_features)
        return self.model.vision.forward_features(self.pixels)

    def loss(self, cached: bool, times: dict[str, float] | None = None) -> Tensor:
        """Features and the heads' forward; fills the phase times of `times`."""
        clock = _Clock(times)
        features = self.image_features(cached)
        clock.lap("image_features")
        text = self.text_cache.get(self.captions, self.model.text.forward_features)
        clock.lap("text_features")
        out = self.model(image_features=features, text_features=text)
        losses = self.objective(
            out["image_weights"], out["text_weights"], out["logit_scale"], self.step
        )
        clock.lap("heads_forward")
        return losses["loss"]

    def run(self, cached: bool) -> dict[str, float]:
        """One full step (forward, backward, clip, AdamW); returns the phase times."""
        times: dict[str, float] = {}
        loss = self.loss(cached, times)
        clock = _Clock(times)
        loss.backward()
        clock.lap("heads_backward")
        params = list(self.model.trainable_parameters().values())
        torch.nn.utils.clip_grad_norm_(params, self.train_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        self.step += 1
        times["step"] = sum(times.values())
        return times


class _Clock:
    def __init__(self, times: dict[str, float] | None) -> None:
        self.times, self.last = times, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.times is not None:
            self.times[name] = now - self.last
        self.last = now


# ------------------------------------------------------------------------------ benchmark
def gradients(step: Step, cached: bool) -> tuple[float, dict[str, Tensor]]:
    """Loss and gradients of the trainable parameters at the current weights (no update)."""
    loss = step.loss(cached)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in step.model.trainable_parameters().items()}
    step.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def equality(step: Step) -> dict[str, object]:
    """Cached vs recomputed features: features, loss and gradients from the same weights."""
    with torch.no_grad():
        diff = (step.image_features(True) - step.image_features(False)).abs().max()
    loss_c, grads_c = gradients(step, True)
    loss_r, grads_r = gradients(step, False)
    grad_diff = max(float((grads_c[n] - grads_r[n]).abs().max()) for n in grads_c)
    close = all(torch.allclose(grads_c[n], grads_r[n], rtol=1e-4, atol=1e-6) for n in grads_c)
    return {"features_max_abs_diff": float(diff), "loss_cached": loss_c, "loss_recompute": loss_r,
            "grads_max_abs_diff": grad_diff, "grads_allclose_rtol1e-4": close}  # fmt: skip


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(step: Step, repeats: int) -> dict[str, dict]:
    """`repeats` timed steps per variant, alternating, after one warm-up step each."""
    runs: dict[str, list[dict[str, float]]] = {"cached": [], "recompute": []}
    step.run(True), step.run(False)  # warm-up
    for r in range(repeats):
        for name in ("cached", "recompute") if r % 2 == 0 else ("recompute", "cached"):
            runs[name].append(step.run(name == "cached"))
        print(f"    step {r + 1}: cached {runs['cached'][-1]['step']:6.2f} s   "
              f"recompute {runs['recompute'][-1]['step']:6.2f} s", flush=True)  # fmt: skip
    return {
        name: {
            "median_s": {k: statistics.median(t[k] for t in times) for k in (*PHASES, "step")},
            "step_times_s": [t["step"] for t in times],
        }
        for name, times in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_step.json")
    args = parser.parse_args()
    machine_at_start = torch_machine_info()
    contention = Contention()
    torch.manual_seed(0)
    model = lexvla.create_model("small-offline").train()
    pixels, captions, source = load_batch(model, args.batch)
    step = Step(model, pixels, captions)
    print(f"batch {args.batch} ({source}), trainable {model.num_trainable()}")
    text_s = median_seconds(lambda: _encode_text(model, captions), 3)
    check = equality(step)
    print(f"  equality: {check}")
    runs = {}
    for search_dtype in SEARCH_DTYPES:
        print(f"  pool arg-max search in {search_dtype}:")
        model.vision.lexical.pool_search_dtype = search_dtype
        runs[search_dtype] = bench(step, args.repeats)
    speedups = {k: _speedup(r) for k, r in runs.items()}
    preset_search = "bfloat16" if pool_search_dtype("auto", torch.device("cpu")) else "float32"
    results = runs[preset_search]
    cached, recompute = results["cached"]["median_s"], results["recompute"]["median_s"]
    speedup = speedups[preset_search]
    report = {
        "benchmark": "training step of the small-offline heads, cached vs recomputed DINOv2 features "
        "(bench/train_step.py)",
        "machine": machine_at_start,
        "contention": contention.report(),
        "inputs": {
            "model": "small-offline",
            "batch": args.batch,
            "images": source,
            "dtype": "float32",
            "repeats": args.repeats,
            "trainable": model.num_trainable(),
            "loss": "lexvla.losses.LexVLAObjective (small-offline LossConfig)",
            "optimizer": "lexvla.train.optim.create_optimizer (AdamW), grad clip 1.0",
        },  # fmt: skip
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "equality": check,
        "preset_pool_search": f"auto -> {preset_search} on this machine",
        "results": results,
        "results_by_search": runs,
        "split_s": {
            "dinov2_forward": recompute["image_features"],
            "feature_cache_lookup": cached["image_features"],
            "heads_forward_backward": cached["heads_forward"] + cached["heads_backward"],
            "optimizer": cached["optimizer"],
            "text_cache_lookup": cached["text_features"],
            "text_encode_uncached_32_captions": text_s,
        },
        "speedup": speedup,
        "speedup_exact_fp32_search": speedups["float32"],
        "speedup_bf16_search": speedups["bfloat16"],
        "speedup_if_text_were_encoded_every_step_derived": (recompute["step"] + text_s)
        / (cached["step"] + text_s),
        "targets": {
            f"cached_step_at_least_{TARGET}x_faster": speedup >= TARGET,
            "grads_allclose": check["grads_allclose_rtol1e-4"],
        },
    }
    write_json(args.out, report)
    print_table(runs, report)
    print("targets:", json.dumps(report["targets"]))
    busy = report["contention"]["other_processes_cpu_cores"]
    print(f"other processes used {busy:.2f} of {os.cpu_count()} cores during the run")
    print(f"wrote {args.out}")


def _speedup(results: dict[str, dict]) -> float:
    return results["recompute"]["median_s"]["step"] / results["cached"]["median_s"]["step"]


def _encode_text(model: LexVLA, captions: list[str]) -> Tensor:
    with torch.inference_mode():
        return model.text.forward_features(captions)


def print_table(runs: dict[str, dict[str, dict]], report: dict) -> None:
    print(f"\n{'search':<9}{'variant':<11}" + "".join(f"{p:>16}" for p in (*PHASES, "step")))
    for search_dtype, results in runs.items():
        for name, r in results.items():
            times = "".join(f"{r['median_s'][p]:>16.3f}" for p in (*PHASES, "step"))
            print(f"{search_dtype:<9}{name:<11}{times}")
    print(f"speedup {report['speedup']:.2f}x ({report['preset_pool_search']}; exact fp32 search "
          f"{report['speedup_exact_fp32_search']:.2f}x, bf16 search "
          f"{report['speedup_bf16_search']:.2f}x; target {TARGET}x); text encoding of the batch "
          f"without the cache {report['split_s']['text_encode_uncached_32_captions']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
