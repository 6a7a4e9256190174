"""Benchmark: `lexvla serve` under load, loopback only: throughput, p50/p99 latency, zero 5xx, zero
wrong results, upload limits that hold.

    .venv/bin/python bench/serve_load.py                          # 8 clients for 30 s
    .venv/bin/python bench/serve_load.py --clients 4 --seconds 10
    .venv/bin/python bench/serve_load.py --model small-offline    # text queries on the real model

Starts the real server (`lexvla serve`, a separate process, `tiny` model, `--max-upload-mb 1`) on a
free 127.0.0.1 port over an index of generated images, then runs N client threads for a fixed time (and
at most --max-requests requests), each with its own keep-alive connection, sending a fixed random mix:

- text searches, word searches and image-upload searches, each answer checked against the same search
  run in this process on the embedded index (`SparseIndex.search_ids` of the same query): same
  document ids in the same order, same scores;
- document lookups (checked against the index's key), oversized uploads (must answer 413) and
  non-image uploads (must answer 415);

while two "stalled" clients hold connections that sent half a request. The figures: requests/s, p50
and p99 latency per kind and overall, status counts, 5xx, wrong answers and transport errors. The
machine may be shared (2 cores): the report records the load average.

With `--model small-offline` (SmolLM2-135M) the mix is text searches only, each a distinct COCO caption
(--texts of them, expected answers from `query_from_text` in this process), sent by the clients while
the server batches them (`--max-batch`, `--max-wait-ms`) with its query cache off, so every query is
encoded: the figure is text queries/s with p50/p99. A second, short phase then sends a few repeated
texts to a server with its cache on and reads the cache hits from /api/info.

The load driver (`plan_requests`, `run_load`) is also used by tests/reliability/test_serve_load.py.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Contention, machine_info, package_versions, write_json  # noqa: E402

TEXTS = ["a dog on the grass", "the blue sea at dusk", "a red boat", "snow on stone", "forest"]
WORDS = [{"dog": 1.0}, {"sea": 0.7, "boat": 0.4}, {"grass": 1.0, "snow": 0.2, "sky": 0.5}]


# ------------------------------------------------------------------------------ requests
@dataclass
class Planned:
    """One request of the mix and how to judge its answer."""

    kind: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    check: Callable[[Any], bool] | None = None  # judges the JSON body of a 200
    weight: float = 1.0  # relative frequency in the random mix
    every: float = 0.0  # > 0: not in the mix; a client of its own sends it every `every` seconds
    expect_continue: bool = False  # send the body only after "100 Continue" (large uploads)


def json_request(kind: str, path: str, payload: dict, **kwargs: Any) -> Planned:
    headers = {"Content-Type": "application/json"}
    return Planned(kind, "POST", path, json.dumps(payload).encode(), headers, **kwargs)


def multipart(name: str, data: bytes, content_type: str, fields: dict[str, str]) -> tuple:
    """(body, headers) of a multipart/form-data upload of one file plus form fields."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def same_hits(ids: np.ndarray, scores: np.ndarray) -> Callable[[Any], bool]:
    """A check: the answer lists exactly these documents, in order, with these scores."""
    want_ids, want_scores = ids.tolist(), scores.astype(np.float64)

    def check(body: Any) -> bool:
        results = body.get("results", [])
        got = [r["doc"] for r in results]
        return got == want_ids and np.allclose(
            [r["score"] for r in results], want_scores, rtol=1e-6
        )

    return check


def plan_requests(
    engine: Any, images: list[bytes], max_upload_mb: float, k: int = 8
) -> list[Planned]:
    """The request mix over `engine` (model + index), with expected answers from the index itself."""
    plans: list[Planned] = []
    for text in TEXTS:
        query = engine.query_from_text(text)
        expected = same_hits(*engine.index.search_ids(*query.to_arrays(), k))
        plans.append(json_request("text", "/api/search", {"text": text, "k": k}, check=expected))
    for words in WORDS:
        query = engine.query_from_words(words)
        expected = same_hits(*engine.index.search_ids(*query.to_arrays(), k))
        plans.append(json_request("words", "/api/search", {"words": words, "k": k}, check=expected))
    for i, data in enumerate(images[:3]):
        query = engine.query_from_image(data)
        body, headers = multipart(f"q{i}.png", data, "image/png", {"k": str(k)})
        expected = same_hits(*engine.index.search_ids(*query.to_arrays(), k))
        plans.append(
            Planned(
                "image", "POST", "/api/search/image", body, headers, check=expected, weight=0.25
            )
        )
    for doc in range(min(3, engine.num_docs)):
        key = engine.document(doc)["key"]
        plans.append(
            Planned("doc", "GET", f"/api/docs/{doc}", check=lambda b, key=key: b["key"] == key)
        )
    big = images[0] + b"\0" * int(max_upload_mb * 2**20 * 1.2)
    plans.append(
        Planned(
            "too-large",
            "POST",
            "/api/search/image",
            *multipart("big.png", big, "image/png", {}),
            status=413,
            weight=0.25,
            expect_continue=True,
        )
    )
    plans.append(
        Planned(
            "not-image",
            "POST",
            "/api/describe",
            *multipart("a.txt", b"hello", "text/plain", {}),
            status=415,
            weight=0.25,
        )
    )
    return plans


# ------------------------------------------------------------------------------ the load
@dataclass
class Outcome:
    kind: str
    status: int  # 0: transport error
    seconds: float
    correct: bool


def _client(
    host: str, port: int, plans: list[Planned], seed: int, deadline: float, budget: list[int],
    lock: threading.Lock, out: list[Outcome],
) -> None:  # fmt: skip
    """One client: keep-alive requests until the deadline or the shared budget ends; random from
    the mix, or (a single plan with `every` > 0) that plan at its pace."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    while time.monotonic() < deadline:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        plan = rng.choices(plans, [p.weight for p in plans])[0]
        if plan.every > 0:
            time.sleep(min(plan.every, max(0.0, deadline - time.monotonic())))
        start = time.perf_counter()
        try:
            if plan.expect_continue:
                status, payload = _request_expecting_continue(host, port, plan)
            else:
                conn.request(plan.method, plan.path, body=plan.body or None, headers=plan.headers)
                response = conn.getresponse()
                payload = response.read()
                status = response.status
                if response.getheader("connection", "").lower() == "close":
                    conn.close()  # the server closed it: reconnect next time
        except (OSError, http.client.HTTPException, ValueError, IndexError):
            conn.close()
            out.append(Outcome(plan.kind, 0, time.perf_counter() - start, False))
            continue
        seconds = time.perf_counter() - start
        correct = status == plan.status
        if correct and status == 200 and plan.check is not None:
            try:
                correct = bool(plan.check(json.loads(payload)))
            except (ValueError, KeyError, TypeError):
                correct = False
        out.append(Outcome(plan.kind, status, seconds, correct))
    conn.close()


def _request_expecting_continue(host: str, port: int, plan: Planned) -> tuple[int, bytes]:
    """(status, body) of a request whose body is sent only if the server answers 100 Continue.

    What a careful client does with a large upload: a server that refuses it from its headers
    (413) answers before any of the body is sent, so the refusal cannot be lost to a reset.
    """
    head = [f"{plan.method} {plan.path} HTTP/1.1", f"Host: {host}:{port}",
            f"Content-Length: {len(plan.body)}", "Expect: 100-continue", "Connection: close",
            *(f"{k}: {v}" for k, v in plan.headers.items())]  # fmt: skip
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        data = sock.recv(65536)
        if data.split(b" ", 2)[1:2] == [b"100"]:
            sock.sendall(plan.body)
            data = data.split(b"\r\n\r\n", 1)[1]
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), body


def _stalled_connection(host: str, port: int) -> socket.socket:
    """A client that sent half a request and then says nothing (must not block anyone else)."""
    sock = socket.create_connection((host, port), timeout=5)
    sock.sendall(b'POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"te')
    return sock


def run_load(
    host: str,
    port: int,
    plans: list[Planned],
    *,
    clients: int = 8,
    seconds: float = 10.0,
    max_requests: int = 100_000,
    stalled: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Drive the server with `clients` threads for `seconds` (at most `max_requests` requests).

    Plans with `every` > 0 get a client each (one request per `every` seconds); the others are
    drawn at random by `weight`. Returns the figures: totals, per-kind latency percentiles, status
    counts, wrong answers.
    """
    mix = [p for p in plans if p.every <= 0]
    groups = [mix] * clients + [[p] for p in plans if p.every > 0]
    out: list[Outcome] = []
    lock, budget = threading.Lock(), [max_requests]
    held = [_stalled_connection(host, port) for _ in range(stalled)]
    deadline = time.monotonic() + seconds
    start = time.perf_counter()
    threads = [
        threading.Thread(
            target=_client,
            args=(host, port, group, seed * 1000 + i, deadline, budget, lock, out),
            daemon=True,
        )
        for i, group in enumerate(groups)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    elapsed = time.perf_counter() - start
    for sock in held:
        sock.close()
    return summarise(out, elapsed, clients, stalled)


def _latency(outcomes: list[Outcome]) -> dict[str, float]:
    ms = np.array([o.seconds for o in outcomes]) * 1000.0
    if not len(ms):
        return {"count": 0}
    return {
        "count": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def summarise(out: list[Outcome], elapsed: float, clients: int, stalled: int) -> dict[str, Any]:
    kinds = sorted({o.kind for o in out})
    statuses = Counter(str(o.status) for o in out)
    return {
        "clients": clients,
        "stalled_connections": stalled,
        "seconds": round(elapsed, 3),
        "requests": len(out),
        "requests_per_second": round(len(out) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency": _latency(out),
        "by_kind": {
            k: {**_latency([o for o in out if o.kind == k]),
                "statuses": dict(Counter(str(o.status) for o in out if o.kind == k)),
                "wrong": sum(not o.correct for o in out if o.kind == k)}
            for k in kinds
        },
        "statuses": dict(statuses),
        "server_errors_5xx": sum(500 <= o.status < 600 for o in out),
        "transport_errors": statuses.get("0", 0),
        "wrong": sum(not o.correct for o in out),
    }  # fmt: skip


# ------------------------------------------------------------------------------ the benchmark
def demo_photos(folder: Path) -> list[Path]:
    """The 80 COCO photos bundled with lexvla (resources/demo-coco), copied into `folder`."""
    from importlib.resources import files

    source = Path(str(files("lexvla") / "resources" / "demo-coco" / "train2017"))
    shutil.copytree(source, folder)
    return sorted(folder.glob("*.jpg"))


def make_corpus(folder: Path, count: int) -> list[Path]:
    """`count` small PNG scenes (two colours and a shape), deterministic."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (160, 120), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        box = (
            rng.randrange(100),
            rng.randrange(60),
            rng.randrange(110, 160),
            rng.randrange(70, 120),
        )
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        paths.append(folder / f"{i:04d}.png")
        image.save(paths[-1])
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    index: Path, port: int, max_upload_mb: int, extra: list[str] | None = None
) -> subprocess.Popen:
    """`lexvla serve` in its own process (`extra` options appended); returns once it answers
    /api/info."""
    command = [
        sys.executable, "-m", "lexvla.cli", "serve", "--index", str(index), "--port", str(port),
        "--max-upload-mb", str(max_upload_mb), *(extra or []),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lexvla serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/info")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("lexvla serve did not answer within 180 s")


def text_plans(engine: Any, texts: list[str], k: int = 8) -> list[Planned]:
    """One text search per text, each checked against its single-query answer in this process."""
    plans = []
    for text in texts:
        query = engine.query_from_text(text)
        expected = same_hits(*engine.index.search_ids(*query.to_arrays(), k))
        plans.append(json_request("text", "/api/search", {"text": text, "k": k}, check=expected))
    return plans


def server_info(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/info")
    return json.loads(conn.getresponse().read())


def run_phase(index: Path, plans: list[Planned], server_args: list[str], **load: Any) -> dict:
    """Start a server, drive it with `plans`, read its batching counters, stop it."""
    port = free_port()
    server = start_server(index, port, 1, server_args)
    try:
        figures = run_load("127.0.0.1", port, plans, **load)
        figures["text_batching"] = server_info(port).get("text_batching")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return figures


def real_model_phases(args: argparse.Namespace, root: Path, engine: Any) -> dict[str, Any]:
    """Distinct captions with the cache off (throughput), then repeated texts with it on."""
    from text_encoding import load_captions

    captions, source = load_captions(args.texts, args.captions_file)
    torch.set_num_threads(args.threads)  # the expected answers with the server's thread count
    start = time.perf_counter()
    plans = text_plans(engine, captions)
    single_s = (time.perf_counter() - start) / len(captions)
    batching = ["--threads", str(args.threads), "--max-batch", str(args.max_batch),
                "--max-wait-ms", str(args.max_wait_ms)]  # fmt: skip
    distinct = run_phase(
        root / "index", plans, [*batching, "--query-cache", "0"], clients=args.clients,
        seconds=args.seconds, max_requests=args.max_requests, stalled=0,
    )  # fmt: skip
    repeated = run_phase(
        root / "index", plans[:5], [*batching, "--query-cache", "1024"], clients=args.clients,
        seconds=min(10.0, args.seconds), max_requests=args.max_requests, stalled=0,
    )  # fmt: skip
    return {
        "caption_source": source,
        "single_query_in_process_ms": round(single_s * 1000, 1),
        "distinct_texts_cache_off": distinct,
        "repeated_texts_cache_on": repeated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="4 clients, 8 s, 60 documents")
    parser.add_argument("--model", default="tiny", help="tiny (the full mix) or small-offline")
    parser.add_argument("--texts", type=int, default=300, help="distinct captions (small-offline)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=3.0)
    parser.add_argument("--captions-file", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    real = args.model != "tiny"
    if args.quick:
        args.clients, args.seconds, args.documents, args.texts = 4, 8.0, 60, 60
    if args.captions_file is None:
        from text_encoding import COCO_CAPTIONS

        args.captions_file = COCO_CAPTIONS
    name = "serve_load_small_offline.json" if real else "serve_load.json"
    args.out = args.out or ROOT / "bench" / "results" / name
    machine = {**machine_info(), "versions": package_versions("fastapi", "uvicorn", "starlette")}
    contention = Contention()

    from lexvla.index import build_index
    from lexvla.models.factory import create_model
    from lexvla.search import SearchEngine, encode_corpus

    max_upload_mb = 1
    with tempfile.TemporaryDirectory(prefix="lexvla-serve-load-") as tmp:
        root = Path(tmp)
        if real:  # real photos: generated scenes look alike to DINOv2, so their scores tie
            paths = demo_photos(root / "images")
            args.documents = len(paths)
        else:
            paths = make_corpus(root / "images", args.documents)
        model = create_model(args.model).eval()
        encode_corpus(model, root / "images", root / "lex", progress=False, model_name=args.model)
        build_index(root / "lex", root / "index")
        engine = SearchEngine.open(root / "index", model)
        if real:
            figures = real_model_phases(args, root, engine)
        else:
            plans = plan_requests(engine, [p.read_bytes() for p in paths[:3]], max_upload_mb)
            port = free_port()
            server = start_server(root / "index", port, max_upload_mb)
            try:
                figures = run_load(
                    "127.0.0.1", port, plans, clients=args.clients, seconds=args.seconds,
                    max_requests=args.max_requests,
                )  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=30)
    inputs = {"model": args.model, "documents": args.documents, "clients": args.clients,
              "seconds": args.seconds}  # fmt: skip
    if real:
        inputs.update(texts=args.texts, threads=args.threads, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms)  # fmt: skip
        targets = real_model_targets(figures)
    else:
        inputs.update(max_upload_mb=max_upload_mb, mix=dict(Counter(p.kind for p in plans)))
        targets = tiny_targets(figures)
    report = {
        "benchmark": "lexvla serve under load (bench/serve_load.py)",
        "machine": machine,
        "contention": contention.report(),
        "inputs": inputs,
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "results": figures,
        "targets": targets,
    }
    write_json(args.out, report)
    for phase, rows in ([("distinct", figures["distinct_texts_cache_off"]),
                         ("repeated", figures["repeated_texts_cache_on"])] if real
                        else [("mix", figures)]):  # fmt: skip
        print(phase, json.dumps({k: v for k, v in rows.items() if k != "by_kind"}))
        for kind, row in rows["by_kind"].items():
            print(f"{kind:<10} {row['count']:>6} requests  p50 {row.get('p50_ms', 0):>7.1f} ms  "
                  f"p99 {row.get('p99_ms', 0):>7.1f} ms  wrong {row['wrong']}  {row['statuses']}")  # fmt: skip
    print("targets:", json.dumps(report["targets"]))
    print(f"wrote {args.out}")
    sys.exit(0 if all(report["targets"].values()) else 1)


def tiny_targets(figures: dict[str, Any]) -> dict[str, bool]:
    return {
        "zero_5xx": figures["server_errors_5xx"] == 0,
        "zero_wrong_answers": figures["wrong"] == 0,
        "zero_transport_errors": figures["transport_errors"] == 0,
        "uploads_over_the_limit_refused": figures["by_kind"].get("too-large", {}).get("wrong", 1)
        == 0,
    }


def real_model_targets(figures: dict[str, Any]) -> dict[str, bool]:
    distinct, repeated = figures["distinct_texts_cache_off"], figures["repeated_texts_cache_on"]
    return {
        "text_queries_per_s_at_least_30": distinct["requests_per_second"] >= 30,
        "zero_wrong_answers": distinct["wrong"] + repeated["wrong"] == 0,
        "zero_5xx": distinct["server_errors_5xx"] + repeated["server_errors_5xx"] == 0,
        "zero_transport_errors": distinct["transport_errors"] + repeated["transport_errors"] == 0,
        "repeated_texts_from_cache": (repeated.get("text_batching") or {}).get("cache_hits", 0) > 0,
    }


if __name__ == "__main__":
    main()
