"""Small helpers shared by the benchmark scripts: machine info, versions, timing, JSON and tables.

Nothing here imports torch or lexvla at module level, so any benchmark can use it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """Platform, CPU model, core count, load average (the machine may be shared), Python."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed version of each distribution (None if missing), without importing it."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall-clock seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall-clock seconds, CPU seconds of this process (all threads), result) of one call.

    On a shared machine the CPU time of a single-threaded call is much less sensitive to other load
    than its wall-clock time.
    """
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - cpu, result


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median and all timings of `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = [timed(fn)[0] for _ in range(repeats)]
    return statistics.median(times), times


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time several functions round-robin, so load from other processes hits them all alike.

    Returns:
        ({name: wall-clock seconds per repeat}, {name: process CPU seconds per repeat}).
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    used: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c, _ = timed_cpu(fn)
            wall[name].append(w)
            used[name].append(c)
    return wall, used


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def write_json(path: str | Path, obj: Any) -> Path:
    """Write a results file atomically (indent 1, trailing newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], floatfmt: str = "{:,.3g}"
) -> None:
    """Print rows as an aligned text table (floats formatted with `floatfmt`)."""

    def cell(v: Any) -> str:
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(
            "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
        )


def torch_machine_info() -> dict[str, object]:
    """`machine_info()` plus torch's thread count and the model libraries' versions."""
    import torch  # only the model benchmarks call this

    return {
        **machine_info(),
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions("torch", "transformers", "numpy"),
    }


class Contention:
    """CPU used by other processes while the benchmark runs (the machine is shared), from /proc/stat."""

    def __init__(self) -> None:
        self.start = self.sample()

    @staticmethod
    def sample() -> tuple[float, float, float]:
        """(wall clock, busy CPU seconds of the whole machine, CPU seconds of this process)."""
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, steal included
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def report(self) -> dict[str, object]:
        (wall0, busy0, own0), (wall, busy, own) = self.start, self.sample()
        elapsed = wall - wall0
        return {
            "seconds": elapsed,
            "own_cpu_cores": (own - own0) / elapsed,
            "other_processes_cpu_cores": max(0.0, (busy - busy0) - (own - own0)) / elapsed,
            "load_average_at_end": list(os.getloadavg()),
        }


def profiled_memory(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Run fn under torch's CPU memory profiler: (result, peak bytes, bytes still allocated at the end)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return result, peak, running
