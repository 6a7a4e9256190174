"""Benchmark: encoding throughput of `small-offline` (images/s, captions/s), batch 16 and 32.

    .venv/bin/python bench/encode_throughput.py               # batches 16 and 32, 3 repeats
    .venv/bin/python bench/encode_throughput.py --batches 32  # one batch size

Inference mode, fp32, torch's default threads, on the coco-mini images (first files, centre crop 224,
preprocessed once: preprocessing is not timed) and their captions (first by annotation id), or random
pixels / generated captions when coco-mini is missing.

- images: `LexVLA.encode_image(pixels)` (DINOv2-S/14 + adapter + lexical max-pool). Ours: the library
  default, fused pool (`lexical.pooling="fused"`); reference: the naive pool that materialises the
  (B, P, V) patch logits (`"naive"`).
- captions: `LexVLA.encode_text(captions)` (SmolLM2-135M, last prompt token, text codebook). Ours: the
  prompt-prefix cache on (library default); reference: off. Zero-shot (the default) and few-shot prompt.

Each configuration's batch is timed `--repeats` times, ours and the reference alternating, after one
warm-up; throughput = batch / median time. Outputs of ours and the reference are compared (allclose).
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
from lexvla.config import DEFAULT_PROMPT, FEW_SHOT_PROMPT  # noqa: E402
from lexvla.models.lexvla import LexVLA  # noqa: E402

COCO = ROOT.parent / "shared" / "data" / "coco-mini"
PROMPTS = {"zero_shot": DEFAULT_PROMPT, "few_shot": FEW_SHOT_PROMPT}


# ------------------------------------------------------------------------------ helpers
def load_inputs(model: LexVLA, n: int) -> tuple[Tensor, list[str], str]:
    """n preprocessed coco-mini images and n captions (first by annotation id), or synthetic ones."""
    images = sorted((COCO / "train2017").glob("*.jpg"))[:n]
    captions_file = COCO / "annotations" / "captions_train2017.json"
    if len(images) == n and captions_file.is_file():
        annotations = sorted(
            json.loads(captions_file.read_text())["annotations"], key=lambda a: a["id"]
        )
        captions = [a["caption"].strip() for a in annotations[:n]]
        return model.preprocess(images), captions, f"coco-mini: first {n} images and captions"
    size = model.cfg.vision.image_size
    pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return pixels, [f"A photo of a dog and object number {i}." for i in range(n)], "synthetic"


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return out, time.perf_counter() - start


def compare_pair(
    ours: Callable[[], Tensor], ref: Callable[[], Tensor], batch: int, repeats: int
) -> dict[str, object]:
    """Ours and the reference alternating `repeats` times after a warm-up: throughput and closeness."""
    out_ours, _ = timed(ours)
    out_ref, _ = timed(ref)
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for r in range(repeats):
        for name in ("ours", "reference") if r % 2 == 0 else ("reference", "ours"):
            times[name].append(timed(ours if name == "ours" else ref)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ours": {"median_s": med["ours"], "per_s": batch / med["ours"], "times_s": times["ours"]},
        "reference": {"median_s": med["reference"], "per_s": batch / med["reference"],
                      "times_s": times["reference"]},
        "speedup": med["reference"] / med["ours"],
        "max_abs_diff": float((out_ours - out_ref).abs().max()),
        "allclose_atol1e-4": bool(torch.allclose(out_ours, out_ref, rtol=0, atol=1e-4)),
    }  # fmt: skip


# ------------------------------------------------------------------------------ benchmark
def bench_images(model: LexVLA, pixels: Tensor, batch: int, repeats: int) -> dict[str, object]:
    lexical = model.vision.lexical

    def encode(pooling: str) -> Tensor:
        lexical.pooling = pooling
        try:
            return model.encode_image(pixels[:batch]).image_weights
        finally:
            lexical.pooling = "fused"

    return compare_pair(lambda: encode("fused"), lambda: encode("naive"), batch, repeats)


def bench_captions(
    model: LexVLA, captions: list[str], prompt: str, batch: int, repeats: int
) -> dict[str, object]:
    text = model.text
    text.cfg.prompt, text._prefix_token_ids, text._prefix_cache = prompt, None, None

    def encode(cached: bool) -> Tensor:
        text.cfg.prefix_cache = cached
        try:
            return model.encode_text(captions[:batch]).text_weights
        finally:
            text.cfg.prefix_cache = True

    return compare_pair(lambda: encode(True), lambda: encode(False), batch, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "encode_throughput.json"
    )
    args = parser.parse_args()
    machine_at_start = torch_machine_info()
    contention = Contention()
    model = lexvla.create_model("small-offline").eval()
    pixels, captions, source = load_inputs(model, max(args.batches))
    print(f"small-offline, {source}, batches {args.batches}, {args.repeats} repeats")
    print(f"{'what':<20}{'batch':>6}{'ours /s':>10}{'ref /s':>10}{'speedup':>9}{'max |Δ|':>10}")
    results: dict[str, dict] = {"images": {}, **{f"captions_{p}": {} for p in PROMPTS}}
    for batch in args.batches:
        results["images"][str(batch)] = bench_images(model, pixels, batch, args.repeats)
        _print_row("images", batch, results["images"][str(batch)])
        for name, prompt in PROMPTS.items():
            row = bench_captions(model, captions, prompt, batch, args.repeats)
            results[f"captions_{name}"][str(batch)] = row
            _print_row(f"captions_{name}", batch, row)
    report = {
        "benchmark": "encoding throughput of small-offline (bench/encode_throughput.py)",
        "machine": machine_at_start,
        "contention": contention.report(),
        "inputs": {
            "model": "small-offline",
            "source": source,
            "batches": args.batches,
            "repeats": args.repeats,
            "mode": "torch.inference_mode, fp32",
            "image_size": model.cfg.vision.image_size,
            "vocab_size": model.vocab_size,
        },  # fmt: skip
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "results": results,
        "targets": {
            "outputs_allclose_atol1e-4": all(
                r["allclose_atol1e-4"] for rows in results.values() for r in rows.values()
            )
        },  # fmt: skip
    }
    write_json(args.out, report)
    print("targets:", json.dumps(report["targets"]))
    busy = report["contention"]["other_processes_cpu_cores"]
    print(f"other processes used {busy:.2f} of {os.cpu_count()} cores during the run")
    print(f"wrote {args.out}")


def _print_row(what: str, batch: int, row: dict) -> None:
    print(f"{what:<20}{batch:>6}{row['ours']['per_s']:>10.2f}{row['reference']['per_s']:>10.2f}"
          f"{row['speedup']:>8.2f}x{row['max_abs_diff']:>10.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
