"""Run every benchmark in bench/ (each in its own process) and print a summary of their reports.

    .venv/bin/python bench/run_all.py                      # all, full size (about 25 minutes on 2 cores)
    .venv/bin/python bench/run_all.py --quick              # small sizes, reports go to a temp folder
    .venv/bin/python bench/run_all.py --only train_step text_encoding
    .venv/bin/python bench/run_all.py --summary-only       # summarise the reports in bench/results
    .venv/bin/python bench/run_all.py --wait-quiet 1.0     # start each one when the machine is quiet

Each benchmark writes bench/results/<name>.json (with --quick: a temporary folder, so the committed
reports keep the full-size numbers). A benchmark that is not present is skipped; one that fails is
reported and the others still run. The exit code is 1 when a benchmark failed or a target was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# name -> extra arguments of a quick run
BENCHMARKS: dict[str, list[str]] = {
    "paper_memory": ["--no-check"],
    "text_encoding": ["--captions", "64", "--repeats", "1"],
    "train_step": ["--repeats", "1"],
    "encode_throughput": ["--batches", "16", "--repeats", "1"],
    "lexical_pool": ["--quick"],
    "index_search": ["--quick"],
    "serve_load": ["--quick"],
    "milvus_scale": ["--quick"],
    "serve_soak": ["--quick"],
    "text_latency": ["--queries", "12", "--captions", "64", "--profile-queries", "3"],
    "serve_load_small_offline": ["--quick"],
    "train_flickr8k": "--images 40 --warmup 1 --steps 1 --check-steps 1 --profile-steps 1".split(),
    "encode_corpus": ["--images", "32", "--repeats", "1"],
}
# name -> (script, arguments of every run) where the report's name is not the script's
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "serve_load_small_offline": ("serve_load", ["--model", "small-offline"]),
}


def wait_for_quiet(max_load: float, timeout_s: float) -> float:
    """Wait (up to `timeout_s`) until the 1-minute load average is at most `max_load`; returns it."""
    deadline = time.monotonic() + timeout_s
    load = os.getloadavg()[0]
    while load > max_load and time.monotonic() < deadline:
        time.sleep(10)
        load = os.getloadavg()[0]
    return load


def run(name: str, quick: bool, out_dir: Path) -> tuple[bool, float]:
    """Run one benchmark script; (succeeded, seconds)."""
    script_name, base_args = VARIANTS.get(name, (name, []))
    script = BENCH / f"{script_name}.py"
    cmd = [sys.executable, str(script), *base_args]
    if quick:
        source = script.read_text()
        quick_args = BENCHMARKS[name]
        if all(f'"{a}"' in source for a in quick_args if a.startswith("--")):
            cmd += quick_args  # only when the script knows every flag
        if '"--out"' in source:
            cmd += ["--out", str(out_dir / f"{name}.json")]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=BENCH.parent).returncode
    return code == 0, time.perf_counter() - start


# ------------------------------------------------------------------------------ summaries
def _fmt_targets(report: dict) -> str:
    targets = report.get("targets", {})
    return ", ".join(
        f"{k}={'yes' if v else ('n/a' if v is None else 'NO')}" for k, v in targets.items()
    )


def _text_encoding(r: dict) -> list[str]:
    return [
        f"{name}: prefix cache {row['prefix_cache_on']['total_s']:.1f} s vs "
        f"{row['prefix_cache_off']['total_s']:.1f} s for {r['inputs']['captions']} captions = "
        f"{row['speedup']:.2f}x (target {row['target_speedup']}x), max |Δw| {row['weights_max_abs_diff']:.1e}"
        for name, row in r["results"].items()
    ]


def _train_step(r: dict) -> list[str]:
    med = {k: v["median_s"]["step"] for k, v in r["results"].items()}
    split = ", ".join(f"{k} {v:.2f} s" for k, v in r["split_s"].items())
    return [
        f"step: cached features {med['cached']:.2f} s vs recompute DINOv2 {med['recompute']:.2f} s "
        f"= {r['speedup']:.2f}x (target 1.8x)",
        f"pool arg-max search {r.get('preset_pool_search', '?')}; exact fp32 search "
        f"{r.get('speedup_exact_fp32_search', float('nan')):.2f}x, bf16 search "
        f"{r.get('speedup_bf16_search', float('nan')):.2f}x",
        f"split: {split}",
    ]


def _encode_throughput(r: dict) -> list[str]:
    return [
        f"{what} batch {b}: {row['ours']['per_s']:.1f}/s (reference {row['reference']['per_s']:.1f}/s)"
        for what, rows in r["results"].items()
        for b, row in rows.items()
    ]


def _paper_memory(r: dict) -> list[str]:
    lines = []
    for dtype in ("fp32", "bf16"):
        rows = r["computed"][dtype]
        lines.append(
            f"{dtype} MiB/image: naive {rows['naive']['peak_mib']:.2f}, activate-then-max "
            f"{rows['naive_activate_then_max']['peak_mib']:.2f}, fused {rows['fused']['peak_mib']:.2f}"
        )
    return lines


def _lexical_pool(r: dict) -> list[str]:
    return [
        f"{name}: {row['median_s']:.2f} s, {row.get('allocator_mib', float('nan')):.0f} MiB"
        for name, row in r.get("results", {}).items()
    ]


def _serve_load(r: dict) -> list[str]:
    res = r["results"]
    return [
        f"{res['clients']} clients, {res['seconds']:.0f} s: {res['requests_per_second']:.0f} req/s, "
        f"p50 {res['latency']['p50_ms']:.1f} ms, p99 {res['latency']['p99_ms']:.1f} ms, "
        f"5xx {res['server_errors_5xx']}, wrong {res['wrong']}, transport errors "
        f"{res['transport_errors']}"
    ]


def _milvus_scale(r: dict) -> list[str]:
    return [
        f"{size['docs']:,} docs: build {size['build']['embedded_vectors_per_s']:,.0f} vs "
        f"{size['build']['milvus_vectors_per_s']:,.0f} vectors/s, search "
        f"{size['search']['embedded']['queries_per_s']:,.0f} vs "
        f"{size['search']['milvus']['queries_per_s']:,.1f} queries/s (embedded vs Milvus), "
        f"top-10 identical {size['top10_identical_fraction']:.0%}"
        for size in r["results"]
    ]


def _serve_soak(r: dict) -> list[str]:
    res, inputs = r["results"], r["inputs"]
    windows = res["windows"]
    p50 = ", ".join(f"{w['p50_ms'] or 0:.0f}" for w in windows)
    p99 = ", ".join(f"{w['p99_ms'] or 0:.0f}" for w in windows)
    return [
        f"{inputs['model']}, {inputs['clients']} clients, {len(windows)} x "
        f"{inputs['window_seconds']:.0f} s: {res['requests']} requests, 5xx "
        f"{res['server_errors_5xx']}, wrong {res['wrong']}, transport errors "
        f"{res['transport_errors']}",
        f"p50 per window (ms): {p50}",
        f"p99 per window (ms): {p99}",
        f"RSS {res['rss_mib_before_load'] or 0:.0f} MiB before load, growth after window 1 "
        f"{res['rss_growth_after_first_window_mib']} MiB, {res['rss_mib_per_1000_requests']} MiB "
        "per 1000 requests",
    ]


def _text_latency(r: dict) -> list[str]:
    lines = []
    for path, rows in r["single_query"].items():
        cells = ", ".join(
            f"{n.replace('threads_', '')} thread(s) p50 {row['p50_ms']:.0f} ms (CPU {row['cpu_p50_ms']:.0f})"
            for n, row in rows.items()
        )
        lines.append(f"{path}: one query {cells}")
    for path, row in r["equality_vs_reference"].items():
        if isinstance(row, dict):
            lines.append(
                f"{path} vs transformers: top-20 same set {row['top20_same_set_fraction']:.0%} of "
                f"{r['inputs']['captions']} captions, max |Δw| {row['max_abs_weight_diff']:.1e}"
            )
    for path, row in r.get("floor", {}).items():
        cells = ", ".join(
            f"{n.replace('threads_', '')} thread(s) products {v['products_ms']:.0f} ms, read "
            f"{v['weight_read_ms']:.0f} ms ({v['read_gb_per_s']} GB/s)"
            for n, v in row.items()
            if n.startswith("threads_")
        )
        lines.append(f"floor {path} ({row['weight_mb']} MB of weights): {cells}")
    if "batch_invariance" in r:
        lines.append(f"float32 batch invariance: {r['batch_invariance']}")
    trained = r.get("trained_model_bfloat16_vs_float32")
    if trained:
        emulated = ", ".join(
            f"{k} {v['top20_same_set_fraction']:.0%}" for k, v in trained["emulated"].items()
        )
        lines.append(
            f"{trained['model']}: bfloat16 vs float32 top-20 same set "
            f"{trained['bfloat16']['top20_same_set_fraction']:.0%}; emulated: {emulated}"
        )
    return lines


def _serve_load_small_offline(r: dict) -> list[str]:
    lines = []
    for phase in ("distinct_texts_cache_off", "repeated_texts_cache_on"):
        res = r["results"][phase]
        batching = res.get("text_batching") or {}
        lines.append(
            f"{phase}: {res['requests_per_second']:.1f} text queries/s, p50 "
            f"{res['latency']['p50_ms']:.0f} ms, p99 {res['latency']['p99_ms']:.0f} ms, wrong "
            f"{res['wrong']}, mean batch {batching.get('mean_batch', 0)}, cache hits "
            f"{batching.get('cache_hits', 0)}"
        )
    return lines


def _train_flickr8k(r: dict) -> list[str]:
    if "skipped" in r:
        return [r["skipped"]]
    res = r["results"]
    caching = res["feature_caching"]
    images, captions = caching["images"], caching["captions"]
    lines = [
        f"caching ({caching.get('compute', 'float32')}): {images['images_per_s']:.1f} images/s "
        f"({images['count']}), {captions['captions_per_s']:.1f} captions/s ({captions['count']})"
    ]
    if "float32" in caching:
        ref, err = caching["float32"], caching["relative_error_vs_float32"]
        lines.append(
            f"caching (float32): {ref['images']['images_per_s']:.1f} images/s, "
            f"{ref['captions']['captions_per_s']:.1f} captions/s; features within "
            f"{err['images']:.1%} / {err['captions']:.1%} of float32"
        )
    for name, row in res["steps"].items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases_median_s"].items())
        lines.append(
            f"{name}: {row['step_median_s']:.2f} s/step (CPU {row['step_cpu_median_s']:.2f} s); {phases}"
        )
    for full in r.get("measured_by_full_run", []):  # the lead's full runs, oldest first
        per_step = full.get("seconds_per_step_median", full.get("seconds_per_step_approx"))
        lines.append(
            f"full run {full['date']} ({full['steps']} steps): {full['wall_min']} min, "
            f"{full['image_caching']['images_per_s']} images/s, "
            f"{full['caption_caching']['captions_per_s']} captions/s, ~{per_step} s/step"
        )
    return lines


def _encode_corpus(r: dict) -> list[str]:
    res = r["results"]
    rates = ", ".join(f"{row['arm']} {row['images_per_s']:.1f}" for row in res["arms"])
    words = res["bf16_top256_overlap"]
    return [
        f"encode-corpus images/s: {rates}",
        f"bf16 top-256 words vs float32: mean overlap {words['mean']:.2%}, min {words['min']:.2%}, "
        f"identical sets {words['exactly_equal_share']:.0%} of images",
    ]


SUMMARIES: dict[str, Callable[[dict], list[str]]] = {
    "text_encoding": _text_encoding,
    "train_step": _train_step,
    "encode_throughput": _encode_throughput,
    "paper_memory": _paper_memory,
    "lexical_pool": _lexical_pool,
    "serve_load": _serve_load,
    "milvus_scale": _milvus_scale,
    "serve_soak": _serve_soak,
    "text_latency": _text_latency,
    "serve_load_small_offline": _serve_load_small_offline,
    "train_flickr8k": _train_flickr8k,
    "encode_corpus": _encode_corpus,
}


def summarise(name: str, path: Path) -> bool:
    """Print a report's key numbers and targets; True when no target was missed."""
    if not path.is_file():
        print(f"{name}: no report at {path}")
        return False
    report = json.loads(path.read_text())
    machine = report.get("machine", {})
    date = report.get("date") or machine.get("date", "?")
    load = [round(x, 2) for x in machine.get("load_average_at_start") or []]
    busy = report.get("contention", {}).get("other_processes_cpu_cores")
    others = "" if busy is None else f", other processes used {busy:.2f} cores"
    print(f"{name} ({date}, load average at start {load}{others})")
    try:
        lines = SUMMARIES.get(name, lambda _: [])(report)
    except (KeyError, TypeError) as err:  # another engineer's report format changed
        lines = [f"(summary unavailable: {err!r})"]
    for line in lines:
        print(f"  {line}")
    print(f"  targets: {_fmt_targets(report) or 'none'}")
    return all(v is not False for v in report.get("targets", {}).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, reports to a temp folder"
    )
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run these only")
    parser.add_argument(
        "--summary-only", action="store_true", help="only summarise existing reports"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="LOAD",
        help="before each benchmark, wait (up to 10 minutes) for the 1-minute load average to drop "
        "to LOAD (the machine is shared; 0: do not wait)",
    )
    args = parser.parse_args()
    names = [
        n for n in (args.only or BENCHMARKS) if (BENCH / f"{VARIANTS.get(n, (n,))[0]}.py").is_file()
    ]
    out_dir = Path(tempfile.mkdtemp(prefix="lexvla-bench-")) if args.quick else RESULTS
    status: dict[str, tuple[bool, float]] = {}
    if not args.summary_only:
        for name in names:
            if args.wait_quiet > 0:
                print(f"load average {wait_for_quiet(args.wait_quiet, 600):.2f}", flush=True)
            status[name] = run(name, args.quick, out_dir)
    print("\n=== summary")
    all_ok = True
    for name in names:
        if name in status and not status[name][0]:
            print(f"{name}: FAILED after {status[name][1]:.0f} s")
            all_ok = False
            continue
        all_ok &= summarise(name, out_dir / f"{name}.json")
        if name in status:
            print(f"  ran in {status[name][1]:.0f} s")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
