"""Benchmark: fused vs naive lexical max-pool, forward + backward, time and peak extra memory.

    .venv/bin/python bench/lexical_pool.py            # B=32, P=256, D=576, V=33,116 (SmolLM2 vocab)
    .venv/bin/python bench/lexical_pool.py --quick    # small shapes, a smoke run

Both implementations run in this process on the same inputs. For each: one profiled run (which also
serves as warm-up) measures the peak extra memory, then `--repeats` timed runs give the median time.
Outputs and gradients are compared with the naive reference. On the CPU each fused variant also runs
without the numba kernels of its backward and bf16 re-scoring (`..._torch`: sparse products and
gathers), on the same inputs. Writes bench/results/lexical_pool.json.

Memory on CPU is measured twice:
- allocator: `torch.profiler` with `profile_memory=True` records every allocation and free of
  PyTorch's CPU allocator (`[memory]` events with +/- bytes); the peak of their running sum over the
  forward + backward is the peak extra memory (the CPU analogue of `torch.cuda.max_memory_allocated`
  minus the baseline, which is what is used on CUDA).
- rss: the process's resident-set high-water mark (`VmHWM`, reset through /proc/self/clear_refs
  after `malloc_trim`) minus the resident set before the run: what the OS actually had to provide.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _common import profiled_memory, torch_machine_info  # noqa: E402
from lexvla.layers import fused_pool  # noqa: E402
from lexvla.layers.fused_pool import fused_lexical_max_pool  # noqa: E402
from lexvla.layers.lexical import naive_lexical_max_pool  # noqa: E402

Pool = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MIB = 2**20


# ------------------------------------------------------------------------------ measurement helpers
def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, object]:
    return {
        **torch_machine_info(),
        "load_average": _load(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def run_once(
    pool: Pool, hidden: torch.Tensor, codebook: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """One forward + backward with fresh .grad; returns the detached output."""
    hidden.grad = codebook.grad = None
    out = pool(hidden, codebook)
    out.backward(grad)
    if hidden.is_cuda:
        torch.cuda.synchronize()
    return out.detach()


def peak_memory(pool: Pool, hidden, codebook, grad) -> dict[str, float | None]:
    """Peak extra MiB of one forward + backward: allocator-level and (CPU) resident-set level."""
    hidden.grad = codebook.grad = None
    if hidden.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(pool, hidden, codebook, grad)
        return {"allocator_mib": (torch.cuda.max_memory_allocated() - base) / MIB, "rss_mib": None}
    rss_ok = _reset_rss_peak()
    rss_base = _rss_bytes("VmRSS")
    _, peak, _ = profiled_memory(lambda: run_once(pool, hidden, codebook, grad))
    rss_peak = _rss_bytes("VmHWM") - rss_base if rss_ok else None
    return {"allocator_mib": peak / MIB, "rss_mib": None if rss_peak is None else rss_peak / MIB}


def timed_run(pool: Pool, hidden, codebook, grad) -> tuple[float, float, torch.Tensor]:
    """Wall time and process CPU time (all threads) of one forward + backward, and its output."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = run_once(pool, hidden, codebook, grad)
    return time.perf_counter() - start, time.process_time() - cpu_start, out


# ----------------------------------------------------------------------------------- the benchmark
def paper_memory(
    chunks: list[int], p: int = 256, v: int = 17_182, d: int = 4096
) -> dict[str, object]:
    """Computed (not measured) pooling memory per image for the paper configuration.

    Naive: the (P, V) scores live through the forward, their (P, V) gradient through the backward
    (never both: torch.max saves only its int64 indices), so the peak is one (P, V) block. Fused: one
    (P, chunk) block of scores at a time, plus the saved int32 (V,) arg-max. Both also hold the (V,)
    output and the inputs, which are the same for both and left out.
    """
    out: dict[str, object] = {"P": p, "V": v, "D": d}
    for name, size in (("fp32", 4), ("bf16", 2)):
        naive = p * v * size + v * 8
        entry: dict[str, float] = {
            "naive_peak_per_image_mib": naive / MIB,
            "naive_scores_per_image_mib": p * v * size / MIB,
            "naive_saved_indices_per_image_kib": v * 8 / 1024,
            "fused_saved_indices_per_image_kib": v * 4 / 1024,
        }
        for chunk in chunks:
            fused = p * chunk * size + v * 4
            entry[f"fused_chunk{chunk}_peak_per_image_mib"] = fused / MIB
            entry[f"fused_chunk{chunk}_ratio_vs_naive"] = fused / naive
            # (chunk, D) backward temporary: once per step, independent of the batch size
            entry[f"fused_chunk{chunk}_backward_temporary_per_step_mib"] = chunk * d * size / MIB
        out[name] = entry
    return out


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, object]:
    """Closeness to the naive outputs.

    `allclose` is `|got - ref| <= 1e-5 * |ref| + 1e-5 * max|ref|`: relative 1e-5, with the absolute
    floor scaled to the tensor's magnitude. The gradients are sums of many terms (grad_hidden: about
    V/P words per patch) added in a different order by the two paths, so entries that cancel to near
    zero differ by float32 rounding of the *summands*; `allclose_strict` (atol=1e-5) is reported too.
    """
    report: dict[str, object] = {}
    for key in ref:
        diff = (ref[key] - got[key]).abs()
        scale = float(ref[key].abs().max())
        report[key] = {
            "allclose": bool(torch.allclose(got[key], ref[key], rtol=1e-5, atol=1e-5 * scale)),
            "allclose_strict": bool(torch.allclose(got[key], ref[key], rtol=1e-5, atol=1e-5)),
            "max_abs_diff": float(diff.max()),
            "max_abs_ref": scale,
            "max_abs_diff_over_max_abs_ref": float(diff.max()) / max(scale, 1e-30),
        }
    return report


def _torch_path(pool: Pool) -> Pool:
    """`pool` with the fused pool's numba kernels switched off (its torch backward and re-scoring)."""

    def run(hidden: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        kernels = fused_pool._numba_kernels  # the forward's choice holds for its backward
        fused_pool._numba_kernels = lambda *tensors: None
        try:
            return pool(hidden, codebook)
        finally:
            fused_pool._numba_kernels = kernels

    return run


def bench_all(variants: dict[str, Pool], inputs, repeats: int) -> dict[str, dict]:
    """Memory of each variant (one profiled run, which is also its warm-up), then timed repeats.

    The timed runs are interleaved (naive, fused, ..., naive, fused, ...) so that load from other
    processes on a shared machine affects every variant alike; the median is reported.
    """
    hidden, codebook, grad = inputs
    results: dict[str, dict] = {}
    for name, pool in variants.items():
        results[name] = {**peak_memory(pool, hidden, codebook, grad), "times_s": [], "cpu_s": []}
        print(f"  {name:<28} alloc {results[name]['allocator_mib']:9.1f} MiB", flush=True)
    for _ in range(max(repeats, 1)):
        for name, pool in variants.items():
            seconds, cpu_seconds, values = timed_run(pool, hidden, codebook, grad)
            results[name]["times_s"].append(seconds)
            results[name]["cpu_s"].append(cpu_seconds)
            results[name]["outputs"] = {
                "values": values,
                "grad_hidden": hidden.grad.clone(),
                "grad_codebook": codebook.grad.clone(),
            }
    for name, res in results.items():
        res["median_s"] = statistics.median(res["times_s"])
        res["median_cpu_s"] = statistics.median(res["cpu_s"])
        walls = ", ".join(f"{t:.2f}" for t in res["times_s"])
        print(f"  {name:<28} {res['median_s']:8.3f} s wall [{walls}]", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=33_116)
    parser.add_argument("--chunk", type=int, default=4096, help="fused chunk (config default 4096)")
    parser.add_argument("--extra-chunks", type=int, nargs="*", default=[2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-fast", action="store_true", help="skip the bf16-search variant")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument(
        "--no-torch-path",
        action="store_true",
        help="skip the fused variants re-run without the numba kernels (CPU only)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "lexical_pool.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.batch, args.patches, args.dim, args.vocab, args.chunk = 4, 32, 64, 3000, 512
        args.extra_chunks = [256]
    machine = machine_info()  # before the runs: the load average is the one at the start
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    b, p, d, v = args.batch, args.patches, args.dim, args.vocab
    hidden = torch.randn(b, p, d, generator=gen).to(device).requires_grad_(True)
    codebook = torch.randn(v, d, generator=gen).to(device).requires_grad_(True)
    grad = torch.randn(b, v, generator=gen).to(device)
    inputs = (hidden, codebook, grad)
    print(f"B={b} P={p} D={d} V={v} fp32 on {device}, {args.repeats} timed repeats")

    variants: dict[str, Pool] = {"naive": naive_lexical_max_pool}
    for chunk in [args.chunk, *args.extra_chunks]:
        variants[f"fused_chunk{chunk}"] = lambda h, z, c=chunk: fused_lexical_max_pool(h, z, c)
    if not args.no_fast:
        variants[f"fused_bf16search_chunk{args.chunk}"] = lambda h, z: fused_lexical_max_pool(
            h, z, args.chunk, search_dtype=torch.bfloat16
        )
    if device.type == "cpu" and not args.no_torch_path:  # the same, without the numba kernels
        for name in [n for n in variants if n.startswith("fused")]:
            variants[f"{name}_torch"] = _torch_path(variants[name])
    tiny = [torch.randn(2, 4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)]
    for pool in variants.values():  # load BLAS / profiler libraries before measuring anything
        peak_memory(pool, *tiny, torch.randn(2, 16))
    results = bench_all(variants, inputs, args.repeats)
    write_report(args, results, device, machine)


def write_report(
    args: argparse.Namespace, results: dict, device: torch.device, machine: dict
) -> None:
    ref = results["naive"].pop("outputs")
    main_fused = f"fused_chunk{args.chunk}"
    for name, res in results.items():
        if name != "naive":
            res["check_vs_naive"] = compare(ref, res.pop("outputs"))
            res["time_ratio_vs_naive"] = res["median_s"] / results["naive"]["median_s"]
            res["cpu_time_ratio_vs_naive"] = res["median_cpu_s"] / results["naive"]["median_cpu_s"]
            res["memory_ratio_vs_naive"] = res["allocator_mib"] / results["naive"]["allocator_mib"]
    fused = results[main_fused]
    checks = fused["check_vs_naive"]
    targets = {
        "memory_at_most_1/8_of_naive": fused["memory_ratio_vs_naive"] <= 1 / 8,
        "time_no_worse_than_naive": fused["median_s"] <= results["naive"]["median_s"],
        "values_and_grads_allclose": all(c["allclose"] for c in checks.values()),
    }
    report = {
        "benchmark": "lexical max-pool over patches, forward + backward (bench/lexical_pool.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "inputs": {
            "B": args.batch,
            "P": args.patches,
            "D": args.dim,
            "V": args.vocab,
            "dtype": "float32",
            "device": str(device),
            "seed": 0,
            "distribution": "standard normal hidden, codebook and upstream gradient",
            "requires_grad": "hidden and codebook",
        },  # fmt: skip
        "method": {
            "time": f"median wall time of {args.repeats} forward+backward runs per variant, "
            "interleaved across variants, after one warm-up (the profiled memory run)",
            "memory": __doc__.split("Memory on CPU is measured twice:")[1].strip()
            if device.type == "cpu"
            else "torch.cuda.max_memory_allocated() - memory_allocated() before the run",
            "memory_includes": "every tensor allocated during the run: outputs, saved indices, "
            "temporaries and the freshly allocated .grad of hidden and codebook (same for both)",
        },
        "load_average_1_5_15min": {"start": machine.pop("load_average"), "end": _load()},
        "results": results,
        "main_fused_variant": main_fused,
        "targets": targets,
        "paper_configuration_memory_computed": paper_memory([args.chunk, 2048, 1024]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print("targets:", json.dumps(targets))
    print(f"wrote {args.out}")


def print_table(results: dict) -> None:
    header = ["variant", "wall s", "cpu s", "alloc MiB", "RSS MiB", "t/naive", "mem/naive"]
    print(f"\n{header[0]:<30}" + "".join(f"{h:>11}" for h in header[1:]))
    for name, res in results.items():
        rss = res["rss_mib"] if res["rss_mib"] is not None else float("nan")
        cells = [res["median_s"], res["median_cpu_s"], res["allocator_mib"], rss]
        cells += [res.get("time_ratio_vs_naive", 1.0), res.get("memory_ratio_vs_naive", 1.0)]
        print(f"{name:<30}" + "".join(f"{c:>11.3f}" for c in cells))


if __name__ == "__main__":
    main()
