"""`lexvla serve`: a local JSON API and one plain page over a :class:`~lexvla.search.SearchEngine`.

Search by text or by an uploaded image, read why each image matched (per-word products), see the
patches a query selects, and steer the query (drop, boost, lower or add words) before searching again.
Images are only ever served by document id from the index's own metadata, never from a path in a
request. Binds 127.0.0.1 unless told otherwise.

API (JSON; errors are `{"error": message}` with a 4xx/5xx status):

- `GET  /api/info`: index size, vocabulary size, model.
- `POST /api/search`: `{"text": ...}` or `{"words": {word: weight}}`, `"k"` -> `{"query", "results"}`.
- `POST /api/search/image`: multipart `file` (+ form `k`) -> `{"query", "results"}`.
- `POST /api/explain`: `{"doc", "words"}` -> per-word contributions, remainder, document words.
- `POST /api/grounding`: `{"doc", "words"}` -> patch grid of scores.
- `POST /api/describe`: multipart `file` -> image words and per-patch words.
- `GET  /api/vocab?prefix=do&limit=10`: autocomplete over the vocabulary.
- `GET  /api/docs/{doc}`, `GET /api/docs/{doc}/thumbnail?size=256`: a document and its image.

Request bodies: the two upload endpoints take up to `max_upload_mb`, every other path up to
`max_json_kb` (256 KiB); a larger body answers 413 before it is read.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from lexvla.config import INFERENCE_WEIGHTS
from lexvla.data.transforms import load_image
from lexvla.errors import LexVLAError
from lexvla.search import SearchEngine
from lexvla.search.corpus import utf8_text
from lexvla.search.encode import clean_error
from lexvla.search.engine import EMPTY_QUERY_MESSAGE, query_text
from lexvla.serve.batching import TextBatcher
from lexvla.serve.limits import JSON_MAX_BYTES, BodySizeLimit, Worker

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
PRIVATE_METADATA = ("path", "tar", "member")  # server file locations stay on the server
MAX_K = 100
UPLOAD_PATHS = ("/api/search/image", "/api/describe")  # multipart uploads; all else is JSON or GET


class SearchRequest(BaseModel):
    text: str | None = Field(None, description="A text to encode as the query.")
    words: dict[str, float] | None = Field(None, description="An explicit word -> weight query.")
    k: int = Field(12, ge=1, le=MAX_K)


class DocQuery(BaseModel):
    doc: int
    words: dict[str, float]
    k: int = Field(10, ge=1, le=50)


@dataclass
class BatchingOptions:
    """How `lexvla serve` answers text queries (serve/batching.py).

    max_batch: the most texts in one forward; max_wait_ms: how long a text waits for others;
    query_cache: repeated texts answered from an LRU cache of this many (0: none); threads: torch
    threads of the server (0: torch's default). One thread by default: on a shared machine OpenMP
    with two threads stalls whenever another process holds a core, and batching gives the
    throughput.
    """

    max_batch: int = 16
    max_wait_ms: float = 3.0
    query_cache: int = 1024
    threads: int = 1


class ApiError(Exception):
    """An error with its HTTP status, rendered as `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(
    engine: SearchEngine,
    *,
    max_upload_mb: float = 8,
    timeout: float = 60.0,
    thumbnail_cache: int = 512,
    max_json_kb: float = JSON_MAX_BYTES / 2**10,
    batching: BatchingOptions | None = None,
) -> FastAPI:
    """The FastAPI app over `engine`.

    Args:
        engine: the search engine (model + index).
        max_upload_mb: the largest upload accepted (the `UPLOAD_PATHS`); larger answers 413.
        timeout: seconds a request may spend in the model or index before it answers 504.
        thumbnail_cache: how many encoded thumbnails to keep in memory.
        max_json_kb: the largest request body accepted by every other endpoint; larger answers 413.
        batching: how concurrent text queries share a forward, and the query cache.
    """
    worker = Worker(timeout)
    max_bytes = int(max_upload_mb * 2**20)
    options = batching or BatchingOptions()
    texts = TextBatcher(
        engine.queries_from_texts,
        check=query_text,
        max_batch=options.max_batch,
        max_wait_ms=options.max_wait_ms,
        cache_size=options.query_cache,
        threads=options.threads,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        yield
        worker.shutdown()
        texts.close()

    app = FastAPI(title="LexVLA search", lifespan=lifespan, docs_url="/api/docs-ui")
    app.state.engine = engine
    app.add_middleware(
        BodySizeLimit,
        max_bytes=max_bytes + 64 * 1024,  # + multipart framing
        json_max_bytes=int(max_json_kb * 2**10),
        upload_paths=UPLOAD_PATHS,
    )
    _add_error_handlers(app)
    _add_search_routes(app, engine, worker, texts, max_bytes)
    _add_document_routes(app, engine, worker, thumbnail_cache)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app


def error_response(message: str, status: int) -> JSONResponse:
    """`{"error": message}`; a message quoting a request's lone surrogate ("\\ud800") stays UTF-8."""
    return JSONResponse({"error": utf8_text(message)}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.message, err.status)

    @app.exception_handler(LexVLAError)
    async def user_error(_: Request, err: LexVLAError) -> JSONResponse:
        return error_response(str(err), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else "request failed"
        if err.status_code == 404 and message == "Not Found":
            message = "no such page or API endpoint"
        return error_response(message, err.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in err.errors()
        ]
        return error_response("invalid request: " + "; ".join(problems), 422)


def _add_search_routes(
    app: FastAPI, engine: SearchEngine, worker: Worker, texts: TextBatcher, max_bytes: int
) -> None:
    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {**engine.info(), "text_batching": texts.info()}

    @app.post("/api/search")
    async def search(body: SearchRequest) -> dict[str, Any]:
        if (body.text is None) == (body.words is None):
            raise ApiError(
                400, 'give exactly one of "text" (a query text) or "words" (word: weight)'
            )
        if body.text is not None:
            query = await worker.wait(texts(body.text))
        else:
            if not body.words:
                raise ApiError(400, EMPTY_QUERY_MESSAGE)
            query = engine.query_from_words(body.words)
        return await _search_response(engine, worker, query, body.k)

    @app.post("/api/search/image")
    async def search_image(
        file: UploadFile = File(...), k: int = Form(12, ge=1, le=MAX_K)
    ) -> dict[str, Any]:
        image = await _read_upload(file, max_bytes)
        query = await worker(engine.query_from_image, image)
        query.source = f"image: {_safe_name(file.filename)}"
        return await _search_response(engine, worker, query, k)

    @app.post("/api/explain")
    async def explain(body: DocQuery) -> dict[str, Any]:
        query = _words_query(engine, body.words)
        _require_doc(engine, body.doc)
        return await worker(engine.explain_match, query, body.doc, body.k)

    @app.post("/api/grounding")
    async def grounding(body: DocQuery) -> dict[str, Any]:
        query = _words_query(engine, body.words)
        _require_doc(engine, body.doc)
        return await worker(engine.grounding, query, doc=body.doc)

    @app.post("/api/describe")
    async def describe(file: UploadFile = File(...)) -> dict[str, Any]:
        image = await _read_upload(file, max_bytes)
        return await worker(engine.describe_image, image)

    @app.get("/api/vocab")
    def vocab(prefix: str = Query("", max_length=64), limit: int = Query(10, ge=1, le=50)) -> dict:
        return {"words": engine.complete(prefix, limit)}


async def _search_response(
    engine: SearchEngine, worker: Worker, query: Any, k: int
) -> dict[str, Any]:
    if query.is_empty:
        raise ApiError(400, EMPTY_QUERY_MESSAGE)
    hits = await worker(engine.search, query, k, explain=True)
    return {"query": query.to_dict(), "results": [_public_hit(hit) for hit in hits]}


def _public_hit(hit: dict[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in hit["metadata"].items() if k not in PRIVATE_METADATA}
    return {**hit, "metadata": metadata, "words": hit["words"][:12]}


def _words_query(engine: SearchEngine, words: dict[str, float]) -> Any:
    if not words:
        raise ApiError(400, EMPTY_QUERY_MESSAGE)
    return engine.query_from_words(words)


def _require_doc(engine: SearchEngine, doc: int | str) -> int:
    """The document id as an int, or 404 when it is not the id of a document of the index."""
    text = str(doc)
    shown = text[:40] + ("..." if len(text) > 40 else "")
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ApiError(404, f"document '{shown}' is not in the index: ids are integers")
    try:
        engine.check_doc(int(text))
    except LexVLAError as err:
        raise ApiError(404, str(err)) from None
    return int(text)


async def _read_upload(file: UploadFile, max_bytes: int) -> Any:
    """Read an uploaded image (size and type checked) and decode it safely with PIL."""
    name = _safe_name(file.filename)
    kind = (file.content_type or "").split(";")[0].strip().lower()
    if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
        raise ApiError(415, f"{name} is {kind}, not an image: upload a JPEG, PNG or WebP file")
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(
            413, f"{name} is larger than {max_bytes / 2**20:.1f} MiB: upload a smaller image"
        )
    if not data:
        raise ApiError(400, f"{name} is empty: choose an image file")
    try:
        return load_image(data)
    except LexVLAError as err:
        raise ApiError(415, f"{clean_error(err, name)} Upload a JPEG, PNG or WebP image.") from None


def _safe_name(filename: str | None) -> str:
    name = Path(filename or "upload").name
    return "".join(c for c in name if c.isprintable())[:80] or "upload"


def _add_document_routes(
    app: FastAPI, engine: SearchEngine, worker: Worker, cache_size: int
) -> None:
    cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def thumbnail_bytes(doc: int, size: int) -> bytes:
        if (doc, size) in cache:
            cache.move_to_end((doc, size))
            return cache[(doc, size)]
        image = engine.document_image(doc)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        cache[(doc, size)] = buffer.getvalue()
        while len(cache) > cache_size:
            cache.popitem(last=False)
        return cache[(doc, size)]

    @app.get("/api/docs/{doc}")
    def document(doc: str) -> dict[str, Any]:
        doc_id = _require_doc(engine, doc)
        metadata = engine.document(doc_id)
        public = {k: v for k, v in metadata.items() if k not in PRIVATE_METADATA}
        return {"doc": doc_id, "key": metadata.get("key", str(doc_id)), "metadata": public}

    @app.get("/api/docs/{doc}/thumbnail")
    async def thumbnail(doc: str, size: int = Query(256, ge=32, le=1024)) -> Response:
        doc_id = _require_doc(engine, doc)
        try:
            data = await worker(thumbnail_bytes, doc_id, size)
        except LexVLAError as err:
            raise ApiError(404, str(err)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def run(
    index: str | Path | None = None,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    milvus: str | None = None,
    collection: str = "lexvla",
    max_upload_mb: float = 8,
    timeout: float = 60.0,
    log_level: str = "info",
    batching: BatchingOptions | None = None,
    text_weights: str | None = None,
) -> None:
    """Open the index and its model, then serve the page and API until interrupted.

    Args:
        index: the index folder (`lexvla index build --out`); or
        milvus, collection: a Milvus URI and collection (`lexvla index build --milvus`).
        model: preset / run / checkpoint; None uses the model recorded in the index.
        host: the address to bind; keep 127.0.0.1 unless the machine's network is trusted.
        port: the TCP port.
        batching: text micro-batching, query cache and torch threads.
        text_weights: overrides the model's `model.text.inference_weights` (e.g. "auto").
    """
    import torch
    import uvicorn

    if text_weights is not None and text_weights not in INFERENCE_WEIGHTS:
        raise LexVLAError(
            f"--text-weights {text_weights!r}: use one of {', '.join(INFERENCE_WEIGHTS)}"
        )
    batching = batching or BatchingOptions()
    if batching.threads > 0:
        torch.set_num_threads(batching.threads)
    engine = SearchEngine.open(index, model, milvus=milvus, collection=collection)
    if text_weights is not None:
        engine.model.text.cfg.inference_weights = text_weights
    engine.query_from_text("warm up")  # packs the LLM's weights and caches the prompt prefix
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can search", host)
    app = create_app(engine, max_upload_mb=max_upload_mb, timeout=timeout, batching=batching)
    logger.info("LexVLA search on http://%s:%d (%d images)", host, port, len(engine))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
