"""Benchmark: `lexvla serve` for a long stretch with a real model, loopback only: per-minute p50/p99
latency, the server's resident memory minute by minute, zero 5xx, zero wrong answers.

    .venv/bin/python bench/serve_soak.py                     # small-offline, 8 clients, 10 minutes
    .venv/bin/python bench/serve_soak.py --quick             # 4 clients, 3 windows of 10 s
    .venv/bin/python bench/serve_soak.py --minutes 60        # an hour

Starts the real server (`lexvla serve`, a separate process) over an index of generated images encoded
by the `small-offline` model (DINOv2-S + SmolLM2-135M, from `lexvla assets prepare`), then drives it
window by window (a minute each): N client threads with keep-alive connections send a fixed random mix
and two connections stall mid-request (bench/serve_load.py's driver), bounded by time and by
--max-requests. The mix: text, word and image-upload searches, explanations, grounding heatmaps,
upload descriptions, document lookups, thumbnails and autocomplete, every JSON answer compared with the
same call on an engine in this process (same documents in the same order, numbers within 1e-5);
oversized uploads (413), oversized JSON bodies (413, the JSON limit) and non-image uploads (415).

After each window the server's resident set size (VmRSS from /proc) is read. The figures: per window
the requests, requests/s, p50/p99 latency, statuses, 5xx, wrong answers and RSS; over the run the RSS
growth after the first window (warm-up: model caches, allocator pools) and its least-squares slope in
MiB per 1000 requests. The machine may be shared (2 cores): the report records the load average and the
CPU used by other processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Contention, machine_info, package_versions, write_json  # noqa: E402
from serve_load import (  # noqa: E402
    Planned,
    free_port,
    json_request,
    make_corpus,
    multipart,
    plan_requests,
    run_load,
    start_server,
)

MAX_RSS_GROWTH_MIB = 64.0  # target: after the first window, over the whole run


# ------------------------------------------------------------------------------ the mix
def same_json(expected: Any, rtol: float = 1e-5) -> Any:
    """A check: the answer equals `expected` (as JSON), numbers within `rtol` (atol 1e-7)."""
    want = json.loads(json.dumps(expected))

    def equal(a: Any, b: Any) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
        if isinstance(a, float | int) and isinstance(b, float | int):
            return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-7)
        return a == b

    return lambda body: equal(body, want)


def soak_plans(engine: Any, images: list[bytes], max_upload_mb: float) -> list[Planned]:
    """serve_load's mix plus every other endpoint, each answer known in advance."""
    plans = plan_requests(engine, images, max_upload_mb)
    words = [{"dog": 1.0, "grass": 0.5}, {"sea": 0.7, "boat": 0.4}]
    for doc, query_words in zip(range(min(3, engine.num_docs)), words * 2):
        query = engine.query_from_words(query_words)
        body = {"doc": doc, "words": query_words}
        plans.append(
            json_request("explain", "/api/explain", {**body, "k": 8},
                         check=same_json(engine.explain_match(query, doc, 8)), weight=0.5)
        )  # fmt: skip
        plans.append(
            json_request("grounding", "/api/grounding", body,
                         check=same_json(engine.grounding(query, doc=doc)), weight=0.25)
        )  # fmt: skip
        plans.append(Planned("thumbnail", "GET", f"/api/docs/{doc}/thumbnail?size=64", weight=0.5))
    upload, headers = multipart("d.png", images[1], "image/png", {})
    plans.append(
        Planned("describe", "POST", "/api/describe", upload, headers,
                check=same_json(engine.describe_image(images[1])), weight=0.25)
    )  # fmt: skip
    for prefix in ("do", "sn"):
        plans.append(
            Planned("vocab", "GET", f"/api/vocab?prefix={prefix}&limit=10",
                    check=lambda b, w=engine.complete(prefix, 10): b == {"words": w}, weight=0.5)
        )  # fmt: skip
    huge = {"text": "a dog on the grass " * 20_000}  # 380 KB: over the 256 KiB JSON limit
    plans.append(
        json_request("json-too-large", "/api/search", huge, status=413, weight=0.25,
                     expect_continue=True)
    )  # fmt: skip
    return plans


# ------------------------------------------------------------------------------ the server process
def rss_mib(pid: int) -> float | None:
    """Resident set size of process `pid` in MiB (Linux /proc), None where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def soak(
    port: int, server_pid: int, plans: list[Planned], *, clients: int, windows: int,
    window_seconds: float, max_requests: int,
) -> dict[str, Any]:  # fmt: skip
    """Run the load window by window, reading the server's memory after each one."""
    rows = []
    start_rss = rss_mib(server_pid)
    for window in range(windows):
        figures = run_load(
            "127.0.0.1", port, plans, clients=clients, seconds=window_seconds,
            max_requests=max(1, max_requests // windows), seed=window,
        )  # fmt: skip
        rows.append(
            {
                "window": window + 1,
                "requests": figures["requests"],
                "requests_per_second": figures["requests_per_second"],
                "p50_ms": figures["latency"].get("p50_ms"),
                "p99_ms": figures["latency"].get("p99_ms"),
                "max_ms": figures["latency"].get("max_ms"),
                "statuses": figures["statuses"],
                "server_errors_5xx": figures["server_errors_5xx"],
                "transport_errors": figures["transport_errors"],
                "wrong": figures["wrong"],
                "wrong_by_kind": {k: v["wrong"] for k, v in figures["by_kind"].items() if v["wrong"]},
                "kinds": {k: v["count"] for k, v in figures["by_kind"].items()},
                "rss_mib": rss_mib(server_pid),
            }
        )  # fmt: skip
        print(f"window {window + 1}/{windows}: {_row_text(rows[-1])}", flush=True)
    return {"rss_mib_before_load": start_rss, "windows": rows, **memory_growth(rows)}


def memory_growth(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS growth after the first window, and its slope in MiB per 1000 requests (least squares)."""
    rss = [r["rss_mib"] for r in rows]
    if len(rows) < 2 or any(v is None for v in rss):
        return {"rss_growth_after_first_window_mib": None, "rss_mib_per_1000_requests": None}
    done = np.cumsum([r["requests"] for r in rows])
    slope = float(np.polyfit(done[1:] / 1000.0, rss[1:], 1)[0]) if len(rows) > 2 else None
    return {
        "rss_growth_after_first_window_mib": round(rss[-1] - rss[0], 1),
        "rss_max_mib": round(max(rss), 1),
        "rss_mib_per_1000_requests": None if slope is None else round(slope, 3),
    }


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['requests']:>5} requests  {row['requests_per_second']:>6.1f}/s  "
        f"p50 {row['p50_ms'] or 0:>7.1f} ms  p99 {row['p99_ms'] or 0:>7.1f} ms  "
        f"5xx {row['server_errors_5xx']}  wrong {row['wrong']}  "
        f"transport {row['transport_errors']}  RSS {row['rss_mib'] or 0:.0f} MiB"
    )


# ------------------------------------------------------------------------------ the benchmark
def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small-offline")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0, help="windows of --window-seconds")
    parser.add_argument("--window-seconds", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=500_000)
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="4 clients, 3 windows of 10 s")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_soak.json")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.window_seconds, args.minutes, args.documents = 4, 10.0, 0.5, 24
    args.windows = max(1, round(args.minutes * 60 / args.window_seconds))
    return args


def main() -> None:
    args = _arguments()
    machine = {**machine_info(), "versions": package_versions("fastapi", "uvicorn", "torch")}
    from lexvla.index import build_index
    from lexvla.models.factory import create_model
    from lexvla.search import SearchEngine, encode_corpus

    max_upload_mb = 1
    with tempfile.TemporaryDirectory(prefix="lexvla-serve-soak-") as tmp:
        root = Path(tmp)
        paths = make_corpus(root / "images", args.documents)
        model = create_model(args.model).eval()
        encode_corpus(model, root / "images", root / "lex", progress=False, model_name=args.model)
        build_index(root / "lex", root / "index")
        engine = SearchEngine.open(root / "index", model)
        plans = soak_plans(engine, [p.read_bytes() for p in paths[:3]], max_upload_mb)
        port = free_port()
        server = start_server(root / "index", port, max_upload_mb)
        contention, server_cpu = Contention(), cpu_seconds(server.pid)
        try:
            figures = soak(
                port, server.pid, plans, clients=args.clients, windows=args.windows,
                window_seconds=args.window_seconds, max_requests=args.max_requests,
            )  # fmt: skip
        finally:
            load = contention.report()
            server_cores = (cpu_seconds(server.pid) - server_cpu) / load["seconds"]
            server.terminate()
            server.wait(timeout=30)
    load["server_cpu_cores"] = server_cores
    load["other_processes_cpu_cores"] = max(0.0, load["other_processes_cpu_cores"] - server_cores)
    write_report(args, machine, load, plans, figures, max_upload_mb)


def write_report(args: argparse.Namespace, machine: dict, load: dict, plans: list[Planned],
                 figures: dict, max_upload_mb: float) -> None:  # fmt: skip
    rows = figures["windows"]
    growth = figures["rss_growth_after_first_window_mib"]
    report = {
        "benchmark": "lexvla serve soak (bench/serve_soak.py)",
        "machine": machine,
        "contention": load,
        "inputs": {
            "model": args.model,
            "documents": args.documents,
            "clients": args.clients,
            "windows": args.windows,
            "window_seconds": args.window_seconds,
            "max_requests": args.max_requests,
            "max_upload_mb": max_upload_mb,
            "mix": dict(Counter(p.kind for p in plans)),
        },
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "results": {
            **figures,
            "requests": sum(r["requests"] for r in rows),
            "server_errors_5xx": sum(r["server_errors_5xx"] for r in rows),
            "wrong": sum(r["wrong"] for r in rows),
            "transport_errors": sum(r["transport_errors"] for r in rows),
            "worst_p99_ms": max((r["p99_ms"] or 0.0) for r in rows),
            "kinds_never_sent": sorted(
                {p.kind for p in plans} - {k for r in rows for k in r["kinds"]}
            ),
        },
        "targets": {
            "zero_5xx": all(r["server_errors_5xx"] == 0 for r in rows),
            "zero_wrong_answers": all(r["wrong"] == 0 for r in rows),
            "zero_transport_errors": all(r["transport_errors"] == 0 for r in rows),
            f"rss_growth_after_first_window_below_{MAX_RSS_GROWTH_MIB:g}_mib": None
            if growth is None
            else growth < MAX_RSS_GROWTH_MIB,
        },
    }
    write_json(args.out, report)
    res = report["results"]
    print(f"{res['requests']} requests in {len(rows)} windows; 5xx {res['server_errors_5xx']}, "
          f"wrong {res['wrong']}, transport errors {res['transport_errors']}; RSS "
          f"{res['rss_mib_before_load'] or 0:.0f} MiB before load, growth after window 1 "
          f"{growth} MiB, {res['rss_mib_per_1000_requests']} MiB per 1000 requests")  # fmt: skip
    print("targets:", json.dumps(report["targets"]))
    print(f"wrote {args.out}")
    sys.exit(0 if all(v is not False for v in report["targets"].values()) else 1)


if __name__ == "__main__":
    main()
