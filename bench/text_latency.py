"""Benchmark: the latency of one text query (`encode_text`) on small-offline, by inference path.

    .venv/bin/python bench/text_latency.py                  # 60 timed queries, 500 captions compared
    .venv/bin/python bench/text_latency.py --queries 20 --captions 100

Paths (`model.text.inference_weights`), all in this process on the same captions: "transformers" (the
model's own forward with the prompt-prefix cache: the reference), "float32" (the packed inference path
of models/text_inference.py) and "bfloat16" (the same with bf16 weights, where this CPU multiplies
bf16 natively). Each is timed with 1 and with 2 torch threads.

Profile first (with the fewest threads): `torch.profiler` over single queries of the reference and
the packed float32 path; the summary splits each query's CPU time into matrix products (the LLM's
projections; the codebook product), attention, element-wise work and the rest, and names the top
operators.

Timing: one caption per call (the first --queries COCO captions), wall clock of `encode_text` under
`torch.no_grad()`, the paths interleaved round-robin so that load from other processes hits them
alike, one thread count after the other; p50/p90 per path and thread count. With 2 threads every
product waits for both: when another process holds a core, that thread is descheduled and the
query stalls, which the 1-thread figures do not show. The process CPU time per query is recorded
too: with 1 thread it is what the wall clock would be on a quiet machine (time spent descheduled by
other processes is not in it). Also the time per query in a batch of
32. The machine is shared: the report records the other processes' CPU use (bench/_common.py).

Floor: for each packed dtype and thread count, the LLM's 150 packed products alone for one query
(18 rows each, as a COCO caption's new tokens) and one plain read of the same weights (a sum over
each weight matrix): the read is what the weight traffic alone costs per query on this machine, the
products' floor.

Batch invariance: the float32 path's weights of each caption encoded alone against the same caption
inside batches of 8 and of 32 (fraction of captions bit-identical): what lets `lexvla serve` batch
concurrent queries and still answer each as if it came alone.

Equality: the (N, V) text weights of the first --captions captions through each path against the
reference: the fraction of captions whose 20 heaviest words are the same set (and the same order),
the mean overlap of those sets, and the largest weight difference.

Trained model (--trained-model, the bundled Flickr8k head): the same comparison of bfloat16 against
float32, where users query, and where the difference comes from, by emulation on the float32 path:
the LLM's weights rounded to bf16 with float32 activations, the same with each product's input
rounded to bf16 too (what bf16 products need), and the same two with fp16 (what fp16 products
would give, on a CPU that has them: oneDNN needs AVX512-FP16 or AVX-NE-CONVERT).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lexvla  # noqa: E402
from _common import (  # noqa: E402
    Contention,
    median_time,
    timed_cpu,
    torch_machine_info,
    write_json,
)
from lexvla.layers.lexical import native_bf16_matmul  # noqa: E402
from lexvla.models.text_inference import PackedDecoder  # noqa: E402
from text_encoding import COCO_CAPTIONS, load_captions  # noqa: E402

PATHS = ("transformers", "float32", "bfloat16")
TARGETS_MS = {"float32": 30.0, "bfloat16": 20.0}
TOP_K = 20


def encode(model, texts: list[str], path: str) -> torch.Tensor:
    model.text.cfg.inference_weights = path
    with torch.no_grad():
        return model.encode_text(texts).text_weights


# ------------------------------------------------------------------------------ profile
def _category(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm") or "linear_pointwise" in name:
        return "matmul"
    if "attention" in name:
        return "attention"
    if name in ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::mean", "aten::rsqrt",
                "aten::neg", "aten::elu", "aten::div", "aten::div_", "aten::sum", "aten::norm",
                "aten::linalg_vector_norm", "aten::add_", "aten::mul_", "aten::sub"):  # fmt: skip
        return "elementwise"
    return "other (copies, views, cat, masks, ...)"


def profile_path(model, texts: list[str], path: str) -> dict[str, object]:
    """Per-query CPU milliseconds by category and the top operators of `path`."""
    from torch.profiler import ProfilerActivity, profile

    encode(model, texts[:2], path)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for text in texts:
            encode(model, [text], path)
    wall = (time.perf_counter() - start) / len(texts) * 1000
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    by_category: dict[str, float] = defaultdict(float)
    for e in events:
        by_category[_category(e.key)] += e.self_cpu_time_total / 1000 / len(texts)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    operators = sum(by_category.values())
    return {
        "wall_ms_per_query": round(wall, 2),
        "cpu_ms_per_query_by_category": {k: round(v, 2) for k, v in sorted(by_category.items())},
        "cpu_ms_in_operators": round(operators, 2),
        "top_operators": [
            {
                "name": e.key,
                "calls_per_query": e.count / len(texts),
                "cpu_ms_per_query": round(e.self_cpu_time_total / 1000 / len(texts), 2),
            }
            for e in top
        ],  # fmt: skip
    }


# ------------------------------------------------------------------------------ timing
def time_single(model, texts: list[str], threads: list[int]) -> dict[str, dict[str, object]]:
    """p50/p90 ms of one-caption `encode_text` per path, the paths interleaved, for each thread
    count in turn (switching threads between calls would time the switch: oneDNN re-plans)."""
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    cpu: dict[tuple[str, int], list[float]] = defaultdict(list)
    for n in threads:
        torch.set_num_threads(n)
        for path in PATHS:  # warm-up: packing, prefix cache, kernels
            encode(model, texts[:2], path)
        for text in texts:
            for path in PATHS:
                wall, used, _ = timed_cpu(lambda: encode(model, [text], path))  # noqa: B023
                times[path, n].append(wall * 1000)
                cpu[path, n].append(used * 1000)
    out: dict[str, dict[str, object]] = defaultdict(dict)
    for (path, n), ms in times.items():
        q = statistics.quantiles(ms, n=10)
        out[path][f"threads_{n}"] = {
            "p50_ms": round(statistics.median(ms), 2),
            "p90_ms": round(q[-1], 2),
            "cpu_p50_ms": round(statistics.median(cpu[path, n]), 2),
            "queries": len(ms),
        }
    return dict(out)


def time_batch(model, texts: list[str], threads: list[int], repeats: int = 3) -> dict:
    """Milliseconds per query when 32 captions are encoded in one call (median of `repeats`)."""
    batch = texts[:32]
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for n in threads:
        torch.set_num_threads(n)
        runs: dict[str, list[float]] = defaultdict(list)
        for _ in range(repeats):
            for path in PATHS:
                start = time.perf_counter()
                encode(model, batch, path)
                runs[path].append((time.perf_counter() - start) * 1000 / len(batch))
        for path, ms in runs.items():
            out[path][f"threads_{n}"] = round(statistics.median(ms), 2)
    return dict(out)


# ------------------------------------------------------------------------------ floor
def _median_ms(run, repeats: int = 9) -> float:
    return round(median_time(run, repeats)[0] * 1000, 2)


def weight_floor(model, threads: list[int], rows: int = 18) -> dict[str, dict[str, object]]:
    """Per packed dtype: ms of the 150 products alone for one query, ms of one read of weights of
    the same sizes, and that read's GB/s, for each thread count."""
    text, out = model.text, {}
    for path in ("float32", "bfloat16"):
        text.cfg.inference_weights = path
        try:
            decoder = text._packed_decoder()
        finally:
            text.cfg.inference_weights = "float32"
        products = [(b.products, i) for b in decoder.blocks for i in range(len(b.products.weights))]
        shapes = [tuple(block.weights[i].shape) for block, i in products]  # (N, K) each
        inputs = {k: torch.randn(rows, k).to(decoder.dtype) for _, k in shapes}
        plain = [torch.randn(shape).to(decoder.dtype) for shape in shapes]  # the read's weights
        total = sum(w.numel() * w.element_size() for w in plain)
        entry: dict[str, object] = {"weight_mb": round(total / 1e6, 1)}
        for n in threads:
            torch.set_num_threads(n)
            with torch.no_grad():
                product_ms = _median_ms(
                    lambda: [b._linear(inputs[s[1]], i) for (b, i), s in zip(products, shapes)]  # noqa: B023
                )
                read_ms = _median_ms(lambda: [w.sum() for w in plain])  # noqa: B023
            entry[f"threads_{n}"] = {
                "products_ms": product_ms,
                "weight_read_ms": read_ms,
                "read_gb_per_s": round(total / read_ms / 1e6, 1),
            }
        out[path] = entry
    return out


def _encode_all(model, captions: list[str], path: str, batch: int = 32) -> torch.Tensor:
    """(N, V) text weights of `captions` through `path`, in batches."""
    return torch.cat(
        [encode(model, captions[i : i + batch], path) for i in range(0, len(captions), batch)]
    )


def batch_invariance(model, captions: list[str]) -> dict[str, float]:
    """Fraction of captions whose float32 weights alone equal, bit for bit, their row in batches."""
    alone = _encode_all(model, captions, "float32", batch=1)
    out = {"captions": len(captions)}
    for size in (8, 32):
        batched = _encode_all(model, captions, "float32", batch=size)
        out[f"identical_in_batches_of_{size}"] = float((alone == batched).all(1).float().mean())
    return out


# ------------------------------------------------------------------------------ equality
def _top_words_agreement(weights: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Share of rows whose TOP_K heaviest words are the same set as the reference's; largest |Δw|."""
    top, ref_top = weights.topk(TOP_K).indices, reference.topk(TOP_K).indices
    same_set = [set(a.tolist()) == set(b.tolist()) for a, b in zip(top, ref_top)]
    return {
        "top20_same_set_fraction": sum(same_set) / len(same_set),
        "max_abs_weight_diff": float((weights - reference).abs().max()),
    }


def _rank20_gap_median(reference: torch.Tensor) -> float:
    """Median gap between each row's 20th and 21st heaviest weight (how near-tied the 20th is)."""
    gaps = reference.topk(TOP_K + 1).values
    return float((gaps[:, -2] - gaps[:, -1]).median())


def compare(model, captions: list[str]) -> dict[str, dict[str, float]]:
    """Each packed path's weights against the reference's on the same captions."""
    weights = {path: _encode_all(model, captions, path) for path in PATHS}
    reference = weights["transformers"]
    ref_top = reference.topk(TOP_K).indices
    out = {}
    for path in PATHS[1:]:
        top = weights[path].topk(TOP_K).indices
        overlap = [len(set(a.tolist()) & set(b.tolist())) / TOP_K for a, b in zip(top, ref_top)]
        agreement = _top_words_agreement(weights[path], reference)
        out[path] = {
            "top20_same_set_fraction": agreement["top20_same_set_fraction"],
            "top20_same_order_fraction": float((top == ref_top).all(1).float().mean()),
            "top20_mean_overlap": sum(overlap) / len(captions),
            "max_abs_weight_diff": agreement["max_abs_weight_diff"],
        }
    out["reference_gap_rank20_rank21_median"] = _rank20_gap_median(reference)
    return out


def _emulated(
    model, round_weights: torch.dtype, round_inputs: torch.dtype | None, captions: list[str]
):
    """The float32 path's weights for `captions` with the LLM's projection weights rounded to
    `round_weights` (and each product's input rounded to `round_inputs` unless None), everything else
    float32: which rounding moves the top words. Installs a packed decoder built from a rounded copy
    of the LLM in the tower's packed-copy slot for float32 and removes it after (bench only)."""
    text = model.text
    decoder = copy.deepcopy(text._decoder())
    with torch.no_grad():
        for layer in decoder.layers:
            for lin in (*(getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj",
                        "o_proj")), layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):  # fmt: skip
                lin.weight.copy_(lin.weight.to(round_weights).float())
    packed = PackedDecoder(decoder, torch.float32)
    if round_inputs is not None:
        for block in packed.blocks:
            linear = block.products._linear
            block.products._linear = lambda x, i, *a, _f=linear, _d=round_inputs: _f(
                x.to(_d).float(), i, *a
            )
    text.cfg.inference_weights = "float32"
    text._packed_decoder()  # the real copy exists; replace it for the block below
    key = (torch.float32, text.codebook.device)
    real, text._packed[key] = text._packed[key], packed
    try:
        return _encode_all(model, captions, "float32")
    finally:
        text._packed[key] = real


def trained_head_agreement(name: str, captions: list[str]) -> dict[str, object]:
    """On a trained model (`name`, the bundled Flickr8k head): bfloat16 against float32 top-20 words,
    and where the difference comes from (emulated roundings on the float32 path)."""
    model = lexvla.create_model(name).eval()
    weights = {p: _encode_all(model, captions, p) for p in ("float32", "bfloat16")}
    reference = weights["float32"]
    out: dict[str, object] = {"model": name, "captions": len(captions)}
    out["bfloat16"] = _top_words_agreement(weights["bfloat16"], reference)
    variants = {
        "bf16_weights_float32_activations": (torch.bfloat16, None),
        "bf16_weights_and_product_inputs": (torch.bfloat16, torch.bfloat16),
        "fp16_weights_float32_activations": (torch.float16, None),
        "fp16_weights_and_product_inputs": (torch.float16, torch.float16),
    }
    out["emulated"] = {
        label: _top_words_agreement(_emulated(model, dtype, inputs, captions), reference)
        for label, (dtype, inputs) in variants.items()
    }
    out["reference_gap_rank20_rank21_median"] = _rank20_gap_median(reference)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=60, help="timed single-caption queries")
    parser.add_argument("--captions", type=int, default=500, help="captions compared")
    parser.add_argument("--profile-queries", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--model", default="small-offline")
    parser.add_argument(
        "--trained-model",
        default="flickr8k",
        help="also compare bfloat16 with float32 on this trained model ('' to skip)",
    )
    parser.add_argument("--captions-file", type=Path, default=COCO_CAPTIONS)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "text_latency.json"
    )
    args = parser.parse_args()
    captions, source = load_captions(max(args.captions, args.queries, 32), args.captions_file)
    machine = torch_machine_info()
    contention = Contention()
    model = lexvla.create_model(args.model).eval()
    print(
        f"{args.model}: {args.queries} timed queries, {args.captions} captions compared ({source})"
    )
    torch.set_num_threads(min(args.threads))
    profiles = {p: profile_path(model, captions[: args.profile_queries], p)
                for p in ("transformers", "float32")}  # fmt: skip
    for path, prof in profiles.items():
        print(f"profile {path}: {prof['wall_ms_per_query']} ms/query, CPU ms by category "
              f"{prof['cpu_ms_per_query_by_category']}")  # fmt: skip
    single = time_single(model, captions[: args.queries], args.threads)
    batched = time_batch(model, captions, args.threads)
    floor = weight_floor(model, args.threads)
    invariance = batch_invariance(model, captions[: min(args.captions, 128)])
    equality = compare(model, captions[: args.captions])
    trained = (
        trained_head_agreement(args.trained_model, captions[: args.captions])
        if args.trained_model
        else None
    )
    best = {p: min(single[p][f"threads_{n}"]["p50_ms"] for n in args.threads) for p in PATHS}
    bf16 = equality["bfloat16"]
    targets = {
        "float32_p50_at_most_30ms": best["float32"] <= TARGETS_MS["float32"],
        "bfloat16_p50_at_most_20ms": best["bfloat16"] <= TARGETS_MS["bfloat16"],
        "float32_top20_equal_all": equality["float32"]["top20_same_set_fraction"] == 1.0,
        "float32_batch_invariant": all(
            v == 1.0 for k, v in invariance.items() if k.startswith("identical")
        ),
        "bfloat16_top20_equal_95pct": bf16["top20_same_set_fraction"] >= 0.95,
        "bfloat16_weights_within_1e-2": bf16["max_abs_weight_diff"] <= 1e-2,
    }
    if trained is not None:
        targets["bfloat16_top20_equal_95pct_trained_model"] = (
            trained["bfloat16"]["top20_same_set_fraction"] >= 0.95
        )
    report = {
        "benchmark": "text query latency by inference path (bench/text_latency.py)",
        "machine": machine,
        "contention": contention.report(),
        "inputs": {
            "model": args.model,
            "queries": args.queries,
            "captions": args.captions,
            "caption_source": source,
            "threads": args.threads,
            "native_bf16": native_bf16_matmul(torch.device("cpu")),
        },  # fmt: skip
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "profile": profiles,
        "single_query": single,
        "batch_32_ms_per_query": batched,
        "floor": floor,
        "batch_invariance": invariance,
        "best_p50_ms": best,
        "equality_vs_reference": equality,
        "trained_model_bfloat16_vs_float32": trained,
        "targets": targets,
    }
    write_json(args.out, report)
    print(f"\n{'path':<14}" + "".join(f"{'p50 ' + str(n) + 't':>10}{'p90':>8}" for n in args.threads)
          + "".join(f"{'b32 ' + str(n) + 't':>9}" for n in args.threads))  # fmt: skip
    for path in PATHS:
        row = "".join(
            f"{single[path][f'threads_{n}']['p50_ms']:>10.1f}"
            f"{single[path][f'threads_{n}']['p90_ms']:>8.1f}"
            for n in args.threads
        )
        row += "".join(f"{batched[path][f'threads_{n}']:>9.1f}" for n in args.threads)
        print(f"{path:<14}{row}")  # fmt: skip
    print("floor (products alone, one read of the weights):", json.dumps(floor, indent=1))
    print("batch invariance:", json.dumps(invariance))
    print("equality:", json.dumps(equality, indent=1))
    if trained is not None:
        print("trained model, bfloat16 vs float32:", json.dumps(trained, indent=1))
    print("targets:", json.dumps(targets))
    busy = report["contention"]["other_processes_cpu_cores"]
    print(f"other processes used {busy:.2f} of {os.cpu_count()} cores during the run")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
