"""Benchmark: text encoding with the prompt-prefix cache on vs off (SmolLM2-135M, `small-offline`).

    .venv/bin/python bench/text_encoding.py                 # 256 captions, batch 32, both prompts
    .venv/bin/python bench/text_encoding.py --captions 64   # a shorter run

Both paths of `TextTower.forward_features` run in this process on the same captions: the prefix cache
(`model.text.cfg.prefix_cache = True`: the prompt text before the caption runs once, its keys/values are
reused) and the reference (`False`: every caption runs through the whole prompt). Captions are the first
N COCO train2017 captions of ../shared/data/coco-mini (by annotation id), read in place, or generated
ones when that file is missing. Prompts: the few-shot `FEW_SHOT_PROMPT` (a long fixed prefix with three
worked examples) and the zero-shot `DEFAULT_PROMPT`.

Timing: inference mode, torch's default threads. Each batch runs through the two paths back to back, in
alternating order, so both see the same machine load; this is repeated `--repeats` times. A path's time
for the N captions is the sum over batches of each batch's median time; the cached path also pays once
for building the prefix keys/values (its median time is added). Per-batch ratios (off / on) are reported
too. The machine is shared, so medians (not means) absorb the load spikes of other processes.

Equality: the (N, V) lexical weights of the two paths must be allclose (atol 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lexvla  # noqa: E402
from _common import Contention, torch_machine_info, write_json  # noqa: E402
from lexvla.config import DEFAULT_PROMPT, FEW_SHOT_PROMPT  # noqa: E402
from lexvla.models.lexvla import LexVLA  # noqa: E402

COCO_CAPTIONS = (
    ROOT.parent / "shared" / "data" / "coco-mini" / "annotations" / "captions_train2017.json"
)
PROMPTS = {
    "few_shot": (FEW_SHOT_PROMPT, 2.0),
    "zero_shot": (DEFAULT_PROMPT, 1.15),
}  # prompt, target
ATOL = 1e-4


# ------------------------------------------------------------------------------ helpers
def load_captions(n: int, path: Path = COCO_CAPTIONS) -> tuple[list[str], str]:
    """The first n real COCO captions (by annotation id), else n generated COCO-like captions."""
    if path.is_file():
        annotations = json.loads(path.read_text())["annotations"]
        captions = [a["caption"].strip() for a in sorted(annotations, key=lambda a: a["id"])]
        if len(captions) >= n:
            return captions[:n], f"{path.name} (first {n} by annotation id)"
    return generated_captions(n), "generated (seed 0)"


def generated_captions(n: int) -> list[str]:
    """COCO-like captions from a fixed template grammar."""
    rng = random.Random(0)
    who = ["A man", "A woman", "Two children", "A dog", "A group of people", "A cat", "A young boy"]
    does = ["riding a bike", "sitting on a bench", "holding an umbrella", "playing with a frisbee",
            "eating a sandwich", "standing next to a red bus", "walking along the beach"]  # fmt: skip
    where = [
        "in a park.",
        "on a city street.",
        "near the water.",
        "in a kitchen.",
        "at night.",
        ".",
    ]
    return [
        f"{rng.choice(who)} {rng.choice(does)} {rng.choice(where)}".replace(" .", ".")
        for _ in range(n)
    ]


def set_prompt(model: LexVLA, prompt: str) -> None:
    """Switch the text tower's prompt and forget its prefix (ids and keys/values)."""
    model.text.cfg.prompt = prompt
    model.text._prefix_token_ids = None
    model.text._prefix_cache = None


def encode(model: LexVLA, captions: list[str], cached: bool) -> tuple[torch.Tensor, float]:
    """(B, D) features of one batch through one path, and the wall time."""
    model.text.cfg.prefix_cache = cached
    start = time.perf_counter()
    with torch.inference_mode():
        features = model.text.forward_features(captions)
    return features, time.perf_counter() - start


# ------------------------------------------------------------------------------ benchmark
def prefix_build_seconds(model: LexVLA, repeats: int) -> float:
    """Median time of computing the prompt prefix's keys/values once (the cache's one-time cost)."""
    times = []
    for _ in range(repeats):
        model.text._prefix_cache = None
        prefix_ids = model.text._prefix_ids()
        start = time.perf_counter()
        with torch.inference_mode():
            model.text._prefix_kv(prefix_ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_prompt(model: LexVLA, batches: list[list[str]], repeats: int) -> dict[str, object]:
    """Both paths on every batch, `repeats` times, interleaved per batch (alternating order)."""
    times: dict[bool, list[list[float]]] = {c: [[] for _ in batches] for c in (True, False)}
    features: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for rep in range(repeats):
        for i, batch in enumerate(batches):
            for cached in (True, False) if (i + rep) % 2 == 0 else (False, True):
                out, seconds = encode(model, batch, cached)
                times[cached][i].append(seconds)
                if rep == 0:
                    features[cached].append(out)
        passes = {c: sum(t[rep] for t in times[c]) for c in times}
        print(f"    pass {rep + 1}: cached {passes[True]:7.2f} s   uncached {passes[False]:7.2f} s",
              flush=True)  # fmt: skip
    prefix_s = prefix_build_seconds(model, repeats)
    medians = {c: [statistics.median(t) for t in times[c]] for c in times}
    on, off = sum(medians[True]) + prefix_s, sum(medians[False])
    captions = [c for b in batches for c in b]
    weights = {c: model.text(torch.cat(f), captions) for c, f in features.items()}
    n = sum(len(b) for b in batches)
    return {
        "prefix_cache_on": {"total_s": on, "prefix_build_s": prefix_s, "captions_per_s": n / on,
                            "batch_median_s": medians[True], "batch_times_s": times[True]},
        "prefix_cache_off": {"total_s": off, "captions_per_s": n / off,
                             "batch_median_s": medians[False], "batch_times_s": times[False]},
        "speedup": off / on,
        "speedup_median_of_batch_ratios": statistics.median(
            off_t / on_t for on_t, off_t in zip(medians[True], medians[False])
        ),
        "weights_max_abs_diff": float((weights[True] - weights[False]).abs().max()),
        "weights_allclose_atol1e-4": bool(torch.allclose(weights[True], weights[False], rtol=0, atol=ATOL)),
    }  # fmt: skip


def token_counts(model: LexVLA, captions: list[str]) -> dict[str, float]:
    """Prompt prefix length and mean prompt length in tokens (what the cache saves)."""
    prefix = model.text._prefix_ids()
    lengths = model.text.tokenize(captions).attention_mask.sum(1).float()
    k = 0 if prefix is None else len(prefix)
    mean = float(lengths.mean())
    return {
        "prefix_tokens": k,
        "mean_prompt_tokens": mean,
        "token_ratio_full_over_rest": mean / (mean - k),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each batch per path")
    parser.add_argument("--prompts", nargs="*", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument("--model", default="small-offline")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "text_encoding.json"
    )
    args = parser.parse_args()
    captions, source = load_captions(args.captions)
    batches = [captions[i : i + args.batch] for i in range(0, len(captions), args.batch)]
    machine_at_start = torch_machine_info()
    contention = Contention()
    model = lexvla.create_model(args.model).eval()
    print(
        f"{len(captions)} captions ({source}), batch {args.batch}, {args.repeats} repeats, {args.model}"
    )
    results: dict[str, dict] = {}
    for name in args.prompts:
        prompt, target = PROMPTS[name]
        set_prompt(model, prompt)
        encode(model, batches[0][:4], True)  # warm-up: kernels, tokenizer, allocator
        encode(model, batches[0][:4], False)
        print(f"  {name}:", flush=True)
        results[name] = {
            "prompt": prompt,
            **token_counts(model, captions),
            "target_speedup": target,
        }
        results[name].update(bench_prompt(model, batches, args.repeats))
    targets = {
        f"{name}_speedup_at_least_{r['target_speedup']}x": r["speedup"] >= r["target_speedup"]
        for name, r in results.items()
    }
    targets["weights_allclose_atol1e-4"] = all(
        r["weights_allclose_atol1e-4"] for r in results.values()
    )
    report = {
        "benchmark": "text encoding, prompt-prefix cache on vs off (bench/text_encoding.py)",
        "machine": machine_at_start,
        "contention": contention.report(),
        "inputs": {
            "model": args.model,
            "captions": len(captions),
            "caption_source": source,
            "batch": args.batch,
            "repeats": args.repeats,
            "mode": "torch.inference_mode",
            "llm_dtype": model.text.cfg.dtype,
        },  # fmt: skip
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "results": results,
        "targets": targets,
    }
    write_json(args.out, report)
    print_table(results)
    print("targets:", json.dumps(targets))
    busy = report["contention"]["other_processes_cpu_cores"]
    print(f"other processes used {busy:.2f} of {os.cpu_count()} cores during the run")
    print(f"wrote {args.out}")


def print_table(results: dict[str, dict]) -> None:
    print(f"\n{'prompt':<11}{'prefix tok':>11}{'cache on s':>12}{'cache off s':>13}{'speedup':>9}"
          f"{'batch-median':>14}{'target':>8}{'max |Δw|':>11}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:<11}{r['prefix_tokens']:>11}{r['prefix_cache_on']['total_s']:>12.2f}"
            f"{r['prefix_cache_off']['total_s']:>13.2f}{r['speedup']:>8.2f}x"
            f"{r['speedup_median_of_batch_ratios']:>13.2f}x{r['target_speedup']:>7.2f}x"
            f"{r['weights_max_abs_diff']:>11.1e}"
        )


if __name__ == "__main__":
    main()
