"""Benchmark: the scale path. Building and searching the same shards with the embedded SparseIndex and
with Milvus (a `milvus-lite server` on a loopback port), one process each.

    .venv/bin/python bench/milvus_scale.py              # 20k and 100k docs, 50 queries, V = 33,116
    .venv/bin/python bench/milvus_scale.py --quick      # 5k docs, 20 queries: a smoke run

Data: the documents and queries of bench/index_search.py (50-200 non-zeros, Zipf(0.9) word ids over the
small-offline vocabulary size, log-normal weights, L2-normalised, float16), written as corpus shards of
5,000 vectors, the format `lexvla encode-corpus` writes. Measured:

- build: `build_index` (embedded, fsync on) and `build_milvus_index` (inserts of 1,000 rows, a flush
  per shard) of the same shards: vectors per second, wall clock;
- search: top-10 of each query one at a time with metadata (`search(..., k=10)`: what `lexvla search`
  and the server call; 1 thread for the embedded index), and as one batch (`search_batch`); queries
  per second, the two backends interleaved round-robin over `--repeats` passes;
- agreement: the share of queries whose top-10 keys are identical in both.

Each corpus size (`--docs`, default 20k and 100k: how the cost grows with the collection) is built and
searched in turn against one server.

The milvus-lite server is a separate process: its CPU time is read from /proc and reported beside ours.
Writes bench/results/milvus_scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import Contention, machine_info, median, package_versions, print_table, write_json
from index_search import make_vectors
from lexvla.index import SparseIndex, build_index, init_shard_dir, write_shard  # noqa: E402
from lexvla.index.milvus import MilvusIndex, build_milvus_index, milvus_lite_server  # noqa: E402

K = 10
VOCAB_SIZE = 33_116  # small-offline
SHARD_ROWS = 5_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cpu_seconds(port: int) -> float:
    """CPU seconds (user + system) of the process listening on `port` (the milvus-lite server); 0
    for port 0 (a server elsewhere)."""
    if not port:
        return 0.0

    pid = subprocess.run(
        ["fuser", f"{port}/tcp"], capture_output=True, text=True, check=False
    ).stdout.split()
    total = 0.0
    for p in pid:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / 100.0
    return total


def write_corpus(root: Path, docs: Any) -> Path:
    shards = root / "lex_emb"
    init_shard_dir(shards, [f"w{i}" for i in range(VOCAB_SIZE)], {"name": "bench"})
    for s in range(0, docs.shape[0], SHARD_ROWS):
        part = docs[s : s + SHARD_ROWS]
        meta = [{"key": f"img{s + i}", "path": f"img/{s + i}.jpg"} for i in range(part.shape[0])]
        write_shard(
            shards, f"part-{s // SHARD_ROWS:05d}", part.indptr, part.indices, part.data, meta
        )
    return shards


def one_by_one(index: Any, queries: Any) -> list[list[str]]:
    out = []
    for q in range(queries.shape[0]):
        s, e = queries.indptr[q], queries.indptr[q + 1]
        kwargs = {"threads": 1} if isinstance(index, SparseIndex) else {}
        hits = index.search(queries.indices[s:e], queries.data[s:e], K, **kwargs)
        out.append([h.key for h in hits])
    return out


def timed_searches(
    sparse: SparseIndex, milvus: MilvusIndex, queries: Any, repeats: int
) -> tuple[dict[str, list[float]], float]:
    """Seconds per pass of each method (interleaved), and the share of identical top-10 key lists."""
    batch = (queries.indptr, queries.indices, queries.data, K)
    methods = {
        "embedded": lambda: one_by_one(sparse, queries),
        "milvus": lambda: one_by_one(milvus, queries),
        "embedded_batch": lambda: sparse.search_batch(*batch, num_threads=1),
        "milvus_batch": lambda: milvus.search_batch(*batch),
    }
    one_by_one(sparse, queries[:5])  # warm-up: JIT, loading the collection and its index
    one_by_one(milvus, queries[:5])
    sparse.search_batch(*batch, num_threads=1)
    times: dict[str, list[float]] = {name: [] for name in methods}
    keys: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            keys[name] = fn()
            times[name].append(time.perf_counter() - t0)
    same = np.mean([a == b for a, b in zip(keys["embedded"], keys["milvus"])])
    return times, float(same)


def run_size(n: int, queries: Any, repeats: int, tmp: Path, uri: str, port: int) -> dict[str, Any]:
    """Build both indexes of n documents from the same shards, then time their searches."""
    docs = make_vectors(n, VOCAB_SIZE, "zipf", 0)
    shards = write_corpus(tmp / f"corpus-{n}", docs)
    t0 = time.perf_counter()
    sparse = build_index(shards, tmp / f"index-{n}")
    build_sparse = time.perf_counter() - t0
    cpu0, t0 = _server_cpu_seconds(port), time.perf_counter()
    build_milvus_index(shards, uri, collection=f"bench_{n}").close()
    build_milvus, build_cpu = time.perf_counter() - t0, _server_cpu_seconds(port) - cpu0
    print(f"{n:,} docs: built in {build_sparse:.1f} s (embedded), {build_milvus:.1f} s (Milvus)")
    milvus = MilvusIndex.open(uri, sparse.vocab, collection=f"bench_{n}")
    cpu0 = _server_cpu_seconds(port)
    times, same = timed_searches(sparse, milvus, queries, repeats)
    search_cpu = _server_cpu_seconds(port) - cpu0
    milvus.close()
    q = queries.shape[0]
    return {
        "docs": n,
        "nnz_per_doc_mean": float(np.diff(docs.indptr).mean()),
        "build": {
            "embedded_vectors_per_s": n / build_sparse,
            "embedded_s": build_sparse,
            "milvus_vectors_per_s": n / build_milvus,
            "milvus_s": build_milvus,
            "milvus_server_cpu_s": build_cpu,
        },
        "search": {
            name: {"median_s": median(t), "queries_per_s": q / median(t), "times_s": t}
            for name, t in times.items()
        },
        "milvus_server_cpu_s_during_search": search_cpu,
        "top10_identical_fraction": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--uri", help="an existing Milvus server instead of a milvus-lite one (its CPU is not read)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "milvus_scale.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.docs, args.queries, args.repeats = [5_000], 20, 1
    info = machine_info()
    contention = Contention()
    queries = make_vectors(args.queries, VOCAB_SIZE, "zipf", 1)
    with tempfile.TemporaryDirectory(prefix="milvus-bench-") as tmp_dir:
        tmp, port = Path(tmp_dir), _free_port()
        with (
            contextlib.nullcontext(args.uri)
            if args.uri
            else milvus_lite_server(tmp / "milvus", port) as uri
        ):
            port = 0 if args.uri else port
            sizes = [run_size(n, queries, args.repeats, tmp, uri, port) for n in args.docs]
    report = {
        "benchmark": "embedded SparseIndex vs Milvus (milvus-lite server) on the same shards"
        " (bench/milvus_scale.py)",
        "machine": {**info, "versions": package_versions("numpy", "numba", "pymilvus", "milvus-lite")},
        "contention": contention.report(),
        "inputs": {"docs": args.docs, "queries": args.queries, "vocab_size": VOCAB_SIZE, "k": K,
                   "repeats": args.repeats, "shard_rows": SHARD_ROWS},
        "results": sizes,
    }  # fmt: skip
    write_json(args.out, report)
    rows = []
    for r in sizes:
        b, s = r["build"], r["search"]
        rows += [
            {"docs": r["docs"], "what": "build (vectors/s)", "embedded": b["embedded_vectors_per_s"],
             "milvus": b["milvus_vectors_per_s"]},
            {"docs": r["docs"], "what": "search one by one (queries/s)",
             "embedded": s["embedded"]["queries_per_s"], "milvus": s["milvus"]["queries_per_s"]},
            {"docs": r["docs"], "what": "search batch (queries/s)",
             "embedded": s["embedded_batch"]["queries_per_s"],
             "milvus": s["milvus_batch"]["queries_per_s"]},
            {"docs": r["docs"], "what": "top-10 identical (%)",
             "embedded": 100 * r["top10_identical_fraction"], "milvus": ""},
        ]  # fmt: skip
    print_table(rows, ["docs", "what", "embedded", "milvus"], "{:,.1f}")
    print(f"machine load: {report['contention']}; wrote {args.out}")


if __name__ == "__main__":
    main()
