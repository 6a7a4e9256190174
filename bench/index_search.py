"""Benchmark: SparseIndex exact top-10 search vs scipy, sparse_dot_topn, Seismic and splade-index.

    .venv/bin/python bench/index_search.py             # 100k docs, 1,000 queries, V = 32,000
    .venv/bin/python bench/index_search.py --quick     # 10k docs, 200 queries: a smoke run

Data (per variant): documents and queries with 50-200 non-zeros each (uniform count), word ids drawn
uniformly or from Zipf(0.9) over the vocabulary (distinct within a vector), log-normal(0, 1) weights
L2-normalised per vector and rounded to float16 (the corpus shard format), so every method sees the very
same weights. Methods, all returning the 10 best (id, score) of each query:

- scipy (baseline): one query per call, the 1 x V query CSR times the V x N term-major CSR, then
  `argpartition` of the result's non-zeros (and a sort of those 10);
- lexvla single: `SparseIndex.search_ids`, one query per call (ids + scores, no metadata), with the
  default threads (all cores: each query's documents are split among threads) and with 1 thread, and
  `SparseIndex.search` (Hit objects with metadata, default threads) for reference;
- sparse_dot_topn (2 threads): `sp_matmul_topn(Q, X, top_n=10, sort=True, n_threads=2)` on the batch;
- lexvla batch: `SparseIndex.search_batch(..., num_threads=2)` (and 1 thread);
- Seismic (`pyseismic-lsr`, approximate; optional): a `SeismicIndex` built from the same CSR
  (`SeismicDataset.add_documents_by_id`, then `build_from_dataset` with the default build settings,
  2 threads), searched with k=10 at each (query_cut, heap_factor) of SEISMIC_SETTINGS, one query per
  `search` call (single-threaded) and all at once with `batch_search(..., num_threads=2)`; reported
  with its recall@10 against the exact (scipy) top-10;
- splade-index (optional): exact, exhaustive term-at-a-time scoring in numba over a term-major CSC.
  Its `SPLADE` class needs a sentence-transformers model to encode texts, so the bench gives it the
  arrays `SPLADE.index` would store and calls the retrieval `SPLADE.retrieve` runs after encoding
  (`_retrieve_numba_functional`), per query (1 thread) and for the batch (2 threads).

A missing peer prints "skipped: <package> not installed (pip install <package>)" and the bench carries
on. Both are in the `bench` extra (`pip install -e .[bench]`, not needed by the tests); they install
from wheels on Linux x86-64 / Python 3.11 and leave the
pinned CPU torch alone (splade-index pulls sentence-transformers and scikit-learn, and imports torch).
The goal line (`vs_seismic` in the JSON): lexvla's exact QPS over Seismic's at the cheapest setting
whose recall@10 is >= 0.95, single-query and batched. Build times of all are in `build_times_s`
(splade-index's and scipy's "build" is the term-major conversion of the document CSR).

Timings are medians over `--repeats` passes over all queries, the methods interleaved round-robin so
load from other processes on the (shared) machine hits them alike. Numba compilation happens in a
warm-up on a tiny index before any timing; its duration is reported (`jit`). Results are checked against
scipy (identical top-10 lists, score differences); every method's recall@10 against it is reported.
The machine is shared: the CPU other processes used during the run is recorded
(`machine.contention.other_processes_cpu_cores`). Writes bench/results/index_search.json.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from numba import njit
from sparse_dot_topn import sp_matmul_topn

from _common import (
    Contention,
    interleaved_times,
    machine_info,
    median,
    package_versions,
    print_table,
    timed,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lexvla.index import SparseIndex, build_index, init_shard_dir, write_shard  # noqa: E402
from lexvla.index import _kernels as kernels  # noqa: E402

K = 10
THREADS = 2
RECALL_GOAL = 0.95
# Seismic's query-time knobs (query_cut: the query's largest weights kept; heap_factor: a block is
# skipped when its summary's score is below the heap's k-th score / heap_factor), cheapest first.
# Chosen from a sweep on these data (query_cut 3-80, heap_factor 0.7-1.0): heap_factor 1.0 was the
# fastest at the same recall, query_cut sets the recall.
SEISMIC_SETTINGS = [(3, 1.0), (5, 1.0), (10, 1.0), (20, 1.0)]
SEISMIC_BUILD = {"n_postings": 3500, "summary_energy": 0.4, "centroid_fraction": 0.1}  # defaults


def optional_peer(module: str, package: str) -> Any:
    """The peer's module, or None (with a notice) when it is not installed: the bench carries on."""
    try:
        return importlib.import_module(module)
    except ImportError:
        print(f"skipped: {package} not installed (pip install {package})")
        return None


# ------------------------------------------------------------------------------------------- data
@njit(cache=False)
def _sample_ids(nnz: np.ndarray, vocab_size: int, cdf: np.ndarray, seed: int) -> np.ndarray:
    """Distinct word ids per row: i.i.d. draws (uniform, or by `cdf`) until the row has nnz[r] ids."""
    np.random.seed(seed)
    out = np.empty(nnz.sum(), np.int32)
    stamp = np.full(vocab_size, -1, np.int64)
    p = 0
    for r in range(nnz.shape[0]):
        start = p
        while p - start < nnz[r]:
            if cdf.shape[0]:
                t = min(np.searchsorted(cdf, np.random.random(), side="right"), vocab_size - 1)
            else:
                t = np.random.randint(0, vocab_size)
            if stamp[t] != r:
                stamp[t] = r
                out[p] = t
                p += 1
        out[start:p].sort()
    return out


def make_vectors(n: int, vocab_size: int, dist: str, seed: int) -> sp.csr_matrix:
    """(n, V) CSR of lexical-like vectors (see the module docstring), float32 values of float16."""
    rng = np.random.default_rng(seed)
    nnz = np.minimum(rng.integers(50, 201, size=n), vocab_size)  # distinct ids: at most V per row
    cdf = np.zeros(0)
    if dist == "zipf":
        p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -0.9
        cdf = np.cumsum(p / p.sum())
    indices = _sample_ids(nnz, vocab_size, cdf, seed)
    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    values = rng.lognormal(0.0, 1.0, size=len(indices))
    norms = np.sqrt(np.add.reduceat(values**2, indptr[:-1]))
    values = (values / np.repeat(norms, nnz)).astype(np.float16).astype(np.float32)
    return sp.csr_matrix((values, indices, indptr), shape=(n, vocab_size))


# -------------------------------------------------------------------------------------- measuring
def jit_warmup(tmp: Path) -> dict[str, float]:
    """First calls of every kernel on a tiny index (create, add, commit, search, explain, batch).

    The kernels are compiled with `cache=True`: the first process ever compiles them (measured in a
    subprocess with an empty cache), later ones load the machine code from __pycache__.
    """
    docs = make_vectors(50, 300, "zipf", 0)
    seconds, _ = timed(lambda: _tiny_round_trip(tmp / "warmup", docs))
    again, _ = timed(lambda: _tiny_round_trip(tmp / "warmup-again", docs))
    return {
        "cold_compile_round_trip_s": cold_compile_s(),
        "first_round_trip_this_process_s": seconds,  # numba cache already on disk: loads, no compile
        "second_round_trip_s": again,
    }


def cold_compile_s() -> float:
    """The warm-up in a fresh process with an empty numba cache: what a first use really costs."""
    code = (
        "import sys, time, tempfile, pathlib; sys.path[:0] = sys.argv[1:3];"
        "import index_search as b; d = pathlib.Path(tempfile.mkdtemp());"
        "b.make_vectors(3, 300, 'zipf', 0);"  # compile the data generator outside the timing
        "t = time.perf_counter(); b._tiny_round_trip(d / 'i', b.make_vectors(50, 300, 'zipf', 0));"
        "print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        argv = [sys.executable, "-c", code, str(ROOT / "bench"), str(ROOT / "src")]
        out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _tiny_round_trip(path: Path, docs: sp.csr_matrix) -> None:
    index = SparseIndex.create(path, [f"w{i}" for i in range(docs.shape[1])], {"model": "warmup"})
    index.add(docs.indptr, docs.indices, docs.data, [{"key": str(i)} for i in range(docs.shape[0])])
    index.commit()
    index.search(docs.indices[:60], docs.data[:60], k=5, explain=True)
    min_chunk, kernels.MIN_CHUNK_DOCS = kernels.MIN_CHUNK_DOCS, 10  # the threaded path runs too
    try:
        index.search_ids(docs.indices[:60], docs.data[:60], k=5, threads=THREADS)
    finally:
        kernels.MIN_CHUNK_DOCS = min_chunk
    for threads in (1, THREADS):
        index.search_batch(docs.indptr, docs.indices, docs.data, k=5, num_threads=threads)


def bench_build(
    tmp: Path, vocab: list[str], docs: sp.csr_matrix
) -> tuple[SparseIndex, dict[str, Any]]:
    """Build times: in-memory arrays -> index, and a shard directory -> index (build_index)."""
    meta = [{"key": f"doc{i}", "path": f"images/{i}.jpg"} for i in range(docs.shape[0])]

    def direct() -> SparseIndex:
        index = SparseIndex.create(tmp / "direct", vocab, {"model": "bench"})
        index.add(docs.indptr, docs.indices, docs.data, meta)
        index.commit()
        return index

    build_s, _ = timed(direct)
    shards = tmp / "lex_emb"
    init_shard_dir(shards, vocab, {"model": "bench"})
    bounds = np.linspace(0, docs.shape[0], 11).astype(int)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = docs[a:b]
        write_shard(shards, f"part-{s:02d}", part.indptr, part.indices, part.data, meta[a:b])
    shards_s, index = timed(lambda: build_index(shards, tmp / "index"))
    gen = index._gen.path
    files = {f.name: f.stat().st_size for f in gen.iterdir()}
    return index, {
        "build_s": build_s,
        "build_from_shards_s": shards_s,
        "shards": 10,
        "index_bytes": sum(files.values()),
        "dense_bytes": files["dense.npy"],
        "num_dense_terms": index.manifest["num_dense_terms"],
        "dense_min_df": index.manifest["dense_min_df"],
    }


def bench_open(path: Path, repeats: int) -> dict[str, float]:
    times, _ = interleaved_times(
        {
            "verify": lambda: SparseIndex.open(path),
            "no_verify": lambda: SparseIndex.open(path, verify=False),
        },
        repeats,
    )
    return {"open_s": median(times["verify"]), "open_no_verify_s": median(times["no_verify"])}


def scipy_topk(q: sp.csr_matrix, term_major: sp.csr_matrix) -> np.ndarray:
    """The baseline: (1, V) @ (V, N), argpartition of the non-zeros, sort of the best K."""
    r = q @ term_major
    data, idx = r.data, r.indices
    if len(data) > K:
        part = np.argpartition(-data, K)[:K]
        data, idx = data[part], idx[part]
    return idx[np.lexsort((idx, -data))]


def make_methods(
    index: SparseIndex, term_major: sp.csr_matrix, queries: sp.csr_matrix
) -> dict[str, Any]:
    rows = [queries[i] for i in range(queries.shape[0])]  # 1 x V CSR each, built before timing
    pairs = [(r.indices.astype(np.int32), r.data.astype(np.float32)) for r in rows]
    qp, qi, qv = queries.indptr, queries.indices, queries.data
    return {
        "scipy_single": lambda: [scipy_topk(r, term_major) for r in rows],
        "lexvla_single": lambda: [index.search_ids(t, w, K)[0] for t, w in pairs],
        "lexvla_single_1t": lambda: [index.search_ids(t, w, K, threads=1)[0] for t, w in pairs],
        "lexvla_single_hits": lambda: [index.search(t, w, K) for t, w in pairs],
        "sparse_dot_topn_2t": lambda: sp_matmul_topn(
            queries, term_major, top_n=K, sort=True, n_threads=THREADS
        ),
        "lexvla_batch_2t": lambda: index.search_batch(qp, qi, qv, K, num_threads=THREADS)[0],
        "lexvla_batch_1t": lambda: index.search_batch(qp, qi, qv, K, num_threads=1)[0],
    }


def id_lists(name: str, out: Any) -> list[np.ndarray] | None:
    """Each query's returned document ids, from a method's output (None: not comparable)."""
    if name == "lexvla_single_hits":
        return None
    if name.startswith(("scipy", "lexvla_single")):
        return [np.asarray(a) for a in out]
    if name.startswith("lexvla_batch"):
        return [r[r >= 0] for r in out]
    if name.startswith("sparse_dot_topn"):
        return [out.indices[out.indptr[i] : out.indptr[i + 1]] for i in range(out.shape[0])]
    if name.startswith("seismic"):  # (query id, score, doc id) tuples; batch_search's lists come
        by_query = {int(q[0][0]): q for q in out if q}  # in completion order, not query order
        return [
            np.array([int(h[2]) for h in by_query.get(i, [])], np.int64) for i in range(len(out))
        ]
    if name.startswith("splade_index"):
        docs, scores = out
        return [d[s > 0] for d, s in zip(docs, scores)]
    raise KeyError(name)


def recall_at_k(lists: list[np.ndarray], exact: list[np.ndarray]) -> float:
    """Mean over queries of |returned top-k ∩ exact top-k| / |exact top-k|."""
    return float(
        np.mean([len(np.intersect1d(a, b)) / max(len(b), 1) for a, b in zip(lists, exact)])
    )


# ---------------------------------------------------------------------------------------- peers
def seismic_methods(
    seismic: Any, docs: sp.csr_matrix, queries: sp.csr_matrix
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seismic (approximate): index built from the same CSR, searched at each SEISMIC_SETTINGS.

    Integer components go in through `SeismicDataset.add_documents_by_id`; a query addresses
    component 42 as the string "42" (the query arrays are made before any timing).
    """

    def build() -> Any:
        dataset = seismic.SeismicDataset(dim=docs.shape[1])
        dataset.add_documents_by_id(
            [str(i) for i in range(docs.shape[0])],
            docs.indices.astype(np.int64),
            docs.data.astype(np.float32),
            docs.indptr.astype(np.int64),
        )
        return seismic.SeismicIndex.build_from_dataset(
            dataset, **SEISMIC_BUILD, num_threads=THREADS
        )

    build_s, index = timed(build)
    string_type = seismic.get_seismic_string()
    ids = np.array([str(i) for i in range(queries.shape[0])], dtype=string_type)
    comps, vals = [], []
    for i in range(queries.shape[0]):
        row = queries[i]
        comps.append(row.indices.astype(str).astype(string_type))
        vals.append(row.data.astype(np.float32))
    methods: dict[str, Any] = {}
    for cut, hf in SEISMIC_SETTINGS:
        tag = f"c{cut}_h{hf:g}"

        def single(cut: int = cut, hf: float = hf) -> list[Any]:
            return [
                index.search(q, c, v, k=K, query_cut=cut, heap_factor=hf)
                for q, c, v in zip(ids, comps, vals)
            ]

        def batch(cut: int = cut, hf: float = hf) -> list[Any]:
            return index.batch_search(
                ids, comps, vals, k=K, query_cut=cut, heap_factor=hf, num_threads=THREADS
            )

        methods[f"seismic_single_{tag}"] = single
        methods[f"seismic_batch_2t_{tag}"] = batch
    return methods, {"build_s": build_s, "nnz": index.nnz, "build_params": SEISMIC_BUILD}


def splade_index_methods(
    retrieve: Any, term_major: sp.csr_matrix, queries: sp.csr_matrix
) -> tuple[dict[str, Any], dict[str, Any]]:
    """splade-index (exact, exhaustive): its numba retrieval on the same term-major CSC arrays.

    `SPLADE.index`/`retrieve` encode texts with a sentence-transformers model; without a model the
    index is its `scores` dict (what `SPLADE.index` stores: term-major data/indices/indptr, float32
    and int32) and retrieval is `_retrieve_numba_functional`, the function `retrieve` calls after
    encoding the queries (backend "numba"): one call per query (1 thread) or one for the batch.
    """

    def build() -> dict[str, Any]:
        return {
            "data": term_major.data.astype(np.float32),
            "indices": term_major.indices.astype(np.int32),
            "indptr": term_major.indptr.astype(np.int32),
            "num_docs": term_major.shape[1],
        }

    build_s, scores = timed(build)
    ids = [queries[i].indices.astype(np.int32) for i in range(queries.shape[0])]
    vals = [queries[i].data.astype(np.float32) for i in range(queries.shape[0])]
    kw = {"k": K, "sorted": True, "return_as": "tuple", "show_progress": False}

    def single() -> tuple[np.ndarray, np.ndarray]:
        out = [retrieve([t], [w], scores, n_threads=1, **kw) for t, w in zip(ids, vals)]
        return np.concatenate([d for d, _ in out]), np.concatenate([s for _, s in out])

    retrieve(ids[:2], vals[:2], scores, n_threads=THREADS, **kw)  # numba compilation
    retrieve(ids[:1], vals[:1], scores, n_threads=1, **kw)
    return {
        "splade_index_single": single,
        "splade_index_batch_2t": lambda: retrieve(ids, vals, scores, n_threads=THREADS, **kw),
    }, {"build_s": build_s}


def peers_goal(qps: dict[str, float], recall: dict[str, float]) -> dict[str, Any] | None:
    """lexvla exact vs Seismic at its cheapest setting with recall@10 >= RECALL_GOAL."""
    out: dict[str, Any] = {}
    for mode, seismic_prefix, ours in (
        ("single", "seismic_single_", ("lexvla_single", "lexvla_single_1t")),
        ("batch", "seismic_batch_2t_", ("lexvla_batch_2t", "lexvla_batch_1t")),
    ):
        ok = {
            m: q
            for m, q in qps.items()
            if m.startswith(seismic_prefix) and recall[m] >= RECALL_GOAL
        }
        if not ok:
            out[mode] = None
            continue
        best = max(ok, key=ok.get)
        out[mode] = {
            "seismic_method": best,
            "seismic_recall_at_10": recall[best],
            "seismic_qps": ok[best],
            **{f"{m}_qps": qps[m] for m in ours},
            **{f"ratio_{m}_vs_seismic": qps[m] / ok[best] for m in ours},
        }
    return out


def agreement(
    methods: dict[str, Any], index: SparseIndex, queries: sp.csr_matrix
) -> dict[str, float]:
    """How often each method's top-10 list equals scipy's, and the largest relative score gap."""
    ref = methods["scipy_single"]()
    single = methods["lexvla_single"]()
    single_1t = methods["lexvla_single_1t"]()
    batch = methods["lexvla_batch_2t"]()
    sdt = methods["sparse_dot_topn_2t"]()
    sdt_lists = [sdt.indices[sdt.indptr[i] : sdt.indptr[i + 1]] for i in range(queries.shape[0])]
    gap = 0.0
    for i in range(queries.shape[0]):
        ids, scores = index.search_ids(queries[i].indices, queries[i].data, K)
        exact = (queries[i] @ index_docs_T(index)[:, ids]).toarray().ravel()
        gap = max(gap, float(np.max(np.abs(exact - scores) / exact)) if len(ids) else 0.0)
    same = np.mean
    return {
        "single_equals_scipy": float(same([np.array_equal(a, b) for a, b in zip(single, ref)])),
        "single_1thread_equals_single": float(
            same([np.array_equal(a, b) for a, b in zip(single_1t, single)])
        ),
        "batch_equals_single": float(
            same([np.array_equal(b[b >= 0], a) for a, b in zip(single, batch)])
        ),
        "sparse_dot_topn_equals_scipy": float(
            same([np.array_equal(a, b) for a, b in zip(sdt_lists, ref)])
        ),
        "max_relative_score_error_vs_float64": gap,
    }


def index_docs_T(index: SparseIndex) -> sp.csc_matrix:  # noqa: N802
    """(V, N) float64 CSC of the index's stored document weights (cached on the index)."""
    cached = getattr(index, "_bench_docs_T", None)
    if cached is None:
        a = index._gen.arrays
        n, v = index.num_docs, len(index.vocab)
        docs = sp.csr_matrix(
            (np.asarray(a["doc_weights"], np.float64), a["doc_terms"], a["doc_indptr"]),
            shape=(n, v),
        )
        cached = index._bench_docs_T = docs.T.tocsc()
    return cached


# ------------------------------------------------------------------------------------------ main
def recalls(methods: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Recall@10 of every method against the exact (scipy) top-10, and how often its list is equal."""
    exact = methods["scipy_single"]()
    recall, equal = {}, {}
    for name, fn in methods.items():
        lists = id_lists(name, fn())
        if lists is not None:
            recall[name] = recall_at_k(lists, exact)
            equal[name] = float(np.mean([np.array_equal(a, b) for a, b in zip(lists, exact)]))
    return recall, equal


def run_variant(
    dist: str, args: argparse.Namespace, tmp: Path, peers: dict[str, Any]
) -> dict[str, Any]:
    vocab = [f"w{i}" for i in range(args.vocab)]
    gen_s, docs = timed(lambda: make_vectors(args.docs, args.vocab, dist, seed=1))
    queries = make_vectors(args.queries, args.vocab, dist, seed=2)
    df = np.diff(docs.T.tocsr().indptr)
    index, build = bench_build(tmp / dist, vocab, docs)
    opened = bench_open(index.path, args.repeats)

    def term_major_csr() -> sp.csr_matrix:
        tm = docs.T.tocsr()  # (V, N)
        tm.sort_indices()
        return tm

    build_times = {"lexvla": build["build_s"]}
    build_times["scipy_term_major"], term_major = timed(term_major_csr)
    methods = make_methods(index, term_major, queries)
    checks = agreement(methods, index, queries)
    peer_info: dict[str, Any] = {}
    if peers.get("seismic") is not None:
        extra, peer_info["seismic"] = seismic_methods(peers["seismic"], docs, queries)
        build_times["seismic"] = peer_info["seismic"]["build_s"]
        methods.update(extra)
    if peers.get("splade_index") is not None:
        extra, peer_info["splade_index"] = splade_index_methods(
            peers["splade_index"], term_major, queries
        )
        build_times["splade_index"] = peer_info["splade_index"]["build_s"]
        methods.update(extra)
    recall, equal = recalls(methods)
    times, cpu = interleaved_times(methods, args.repeats)
    qps = {name: args.queries / median(t) for name, t in times.items()}
    cpu_qps = {name: args.queries / median(t) for name, t in cpu.items()}
    goal = peers_goal(qps, recall) if "seismic" in peer_info else None
    targets = {
        "speedup_vs_scipy >= 10": qps["lexvla_single"] >= 10 * qps["scipy_single"],
        "speedup_vs_scipy_1thread >= 10": qps["lexvla_single_1t"] >= 10 * qps["scipy_single"],
        "batch >= sparse_dot_topn (2 threads)": qps["lexvla_batch_2t"] >= qps["sparse_dot_topn_2t"],
        "build < 10 s": max(build["build_s"], build["build_from_shards_s"]) < 10,
        "open < 1 s": opened["open_s"] < 1,
    }
    if goal is not None:
        for mode, key in (("single", "lexvla_single"), ("batch", "lexvla_batch_2t")):
            g = goal[mode]
            targets[f"{key} > seismic {mode} (recall@10 >= {RECALL_GOAL})"] = (
                None if g is None else g[f"ratio_{key}_vs_seismic"] > 1
            )
    return {
        "data_generation_s": gen_s,
        "postings_per_query_mean": float(df[queries.indices].sum() / args.queries),
        "doc_nnz_mean": docs.nnz / args.docs,
        **build,
        **opened,
        "build_times_s": build_times,
        "peers": peer_info,
        "queries_per_s": qps,
        "queries_per_cpu_s": cpu_qps,
        "recall_at_10": recall,
        "top10_equals_exact": equal,
        "pass_times_s": times,
        "pass_cpu_times_s": cpu,
        "speedup_vs_scipy": qps["lexvla_single"] / qps["scipy_single"],
        "speedup_vs_scipy_1thread": qps["lexvla_single_1t"] / qps["scipy_single"],
        "speedup_vs_scipy_cpu_time": cpu_qps["lexvla_single"] / cpu_qps["scipy_single"],
        "speedup_vs_sparse_dot_topn": qps["lexvla_batch_2t"] / qps["sparse_dot_topn_2t"],
        "vs_seismic": goal,
        "checks": checks,
        "targets_met": targets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"]
    )
    parser.add_argument("--quick", action="store_true", help="10k docs, 200 queries (smoke run)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "index_search.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.docs, args.queries = 10_000, 200
    contention = Contention()
    peers = {"seismic": optional_peer("seismic", "pyseismic-lsr")}
    retrieve = optional_peer("splade_index.numba.retrieve_utils", "splade-index")
    peers["splade_index"] = retrieve and retrieve._retrieve_numba_functional
    report: dict[str, Any] = {
        "benchmark": "index_search",
        "machine": {**machine_info(), "numba_threads": kernels.get_num_threads()},
        "versions": package_versions(
            "numpy",
            "scipy",
            "numba",
            "llvmlite",
            "sparse_dot_topn",
            "pyseismic-lsr",
            "splade-index",
        ),
        "inputs": {
            "docs": args.docs,
            "queries": args.queries,
            "vocab": args.vocab,
            "k": K,
            "repeats": args.repeats,
            "nnz_per_vector": "uniform 50-200",
            "word_ids": {"uniform": "uniform", "zipf": "Zipf(0.9), id = rank - 1"},
            "weights": "lognormal(0, 1), L2-normalised, rounded to float16",
            "threads": THREADS,
            "single_query_threads": "default (numba's thread count)",
            "seismic_settings": [{"query_cut": c, "heap_factor": h} for c, h in SEISMIC_SETTINGS],
            "seismic_build": {**SEISMIC_BUILD, "num_threads": THREADS},
            "recall_goal": RECALL_GOAL,
        },  # fmt: skip
    }
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        report["jit"] = jit_warmup(Path(tmp))
        report["variants"] = {}
        for dist in args.variants:
            report["variants"][dist] = run_variant(dist, args, Path(tmp), peers)
            shutil.rmtree(Path(tmp) / dist)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["machine"]["shared"] = (
        "the machine was shared with other jobs during the run: see other_processes_cpu_cores"
    )
    report["machine"]["contention"] = contention.report()
    write_json(args.out, report)
    print_report(report, args.out)


def print_report(report: dict[str, Any], out: Path) -> None:
    rows = []
    for dist, v in report["variants"].items():
        for method, qps in v["queries_per_s"].items():
            rows.append(
                {
                    "variant": dist,
                    "method": method,
                    "queries/s": qps,
                    "vs scipy": qps / v["queries_per_s"]["scipy_single"],
                    "recall@10": v["recall_at_10"].get(method, ""),
                }
            )
    print_table(rows, ["variant", "method", "queries/s", "vs scipy", "recall@10"])
    print()
    keys = [
        "postings_per_query_mean", "build_s", "build_from_shards_s", "open_s", "open_no_verify_s", "index_bytes",
        "num_dense_terms", "speedup_vs_scipy", "speedup_vs_scipy_1thread", "speedup_vs_scipy_cpu_time",
        "speedup_vs_sparse_dot_topn",
    ]  # fmt: skip
    table = [{"key": k, **{d: float(v[k]) for d, v in report["variants"].items()}} for k in keys]
    for name in next(iter(report["variants"].values()))["build_times_s"]:
        table.append(
            {
                "key": f"build_s[{name}]",
                **{d: v["build_times_s"][name] for d, v in report["variants"].items()},
            }
        )
    print_table(table, ["key", *report["variants"]])
    for dist, v in report["variants"].items():
        print(f"\n{dist}: checks {v['checks']}\n{dist}: targets {v['targets_met']}")
        for mode, g in (v["vs_seismic"] or {}).items():
            if g is None:
                print(f"{dist}: vs seismic ({mode}): no setting reached recall@10 >= {RECALL_GOAL}")
                continue
            ours = "lexvla_single" if mode == "single" else "lexvla_batch_2t"
            ours_1t = "lexvla_single_1t" if mode == "single" else "lexvla_batch_1t"
            print(
                f"{dist}: vs seismic ({mode}): {ours} {g[f'{ours}_qps']:,.0f} q/s (exact) vs "
                f"{g['seismic_method']} {g['seismic_qps']:,.0f} q/s (recall@10 "
                f"{g['seismic_recall_at_10']:.3f}): x{g[f'ratio_{ours}_vs_seismic']:.2f}; "
                f"{ours_1t} x{g[f'ratio_{ours_1t}_vs_seismic']:.2f}"
            )
    print(f"\nother processes' CPU: {report['machine']['contention']}")
    print(f"jit warm-up: {report['jit']}\nwrote {out}")


if __name__ == "__main__":
    main()
