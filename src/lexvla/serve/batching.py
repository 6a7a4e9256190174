"""Micro-batching of text queries: concurrent requests share one forward of the text tower.

A query is ~20 tokens through the LLM, so one forward of 8 queries costs little more than one of a
single query (the weights are read once). :class:`TextBatcher` runs one thread that takes the first
waiting text, waits at most `max_wait_ms` for more (up to `max_batch`), encodes them together and
answers each request with its own query. Repeated texts are answered from a bounded LRU cache.

Failure stays with its request: a text that is refused before encoding (empty) fails at once, and when
a batch fails, each of its texts is encoded alone, so only the one that fails gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from lexvla.search.query import Query

logger = logging.getLogger(__name__)

EncodeMany = Callable[[Sequence[str]], list[Query]]


@dataclass
class _Pending:
    text: str
    future: Future = field(default_factory=Future)


class QueryCache:
    """The last `size` text -> query answers (least recently used evicted first); 0 keeps none.
    Returns copies: a query is steered (edited) by its caller."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Query] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> Query | None:
        with self._lock:
            query = self._items.get(text)
            if query is None:
                return None
            self._items.move_to_end(text)
            return query.copy()

    def put(self, text: str, query: Query) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[text] = query.copy()
            self._items.move_to_end(text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class TextBatcher:
    """Answers text queries through `encode_many` (texts -> one query each, in order), batching the
    requests that arrive together.

    Args:
        encode_many: encodes a list of texts in one forward (`SearchEngine.queries_from_texts`).
        check: called on each text before it is queued; raises (LexVLAError) for a text that cannot
            be a query, so it fails alone and at once. Returns the text to encode (cleaned).
        max_batch: the most texts in one forward.
        max_wait_ms: how long the first text of a batch waits for others.
        cache_size: repeated texts answered from an LRU cache of this many; 0: no cache.
        threads: torch threads of the batching thread (0: leave torch's setting).
    """

    def __init__(
        self,
        encode_many: EncodeMany,
        *,
        check: Callable[[str], str] = str,
        max_batch: int = 16,
        max_wait_ms: float = 3.0,
        cache_size: int = 1024,
        threads: int = 0,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or cache_size < 0:
            raise ValueError("max_batch >= 1, max_wait_ms >= 0 and cache_size >= 0 are required")
        self.encode_many = encode_many
        self.check = check
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.cache = QueryCache(cache_size)
        self.threads = threads
        self.stats = {"queries": 0, "cache_hits": 0, "batches": 0, "encoded": 0, "retried": 0}
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lexvla-text-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ requests
    def submit(self, text: str) -> Future:
        """A future of the query of `text` (its error, if it has one)."""
        text = self.check(text)
        self.stats["queries"] += 1
        cached = self.cache.get(text)
        future: Future = Future()
        if cached is not None:
            self.stats["cache_hits"] += 1
            future.set_result(cached)
            return future
        pending = _Pending(text, future)
        self._queue.put(pending)
        return pending.future

    async def __call__(self, text: str) -> Query:
        return await asyncio.wrap_future(self.submit(text))

    def info(self) -> dict[str, Any]:
        """Counters, for /api/info: queries, cache hits, forwards (batches), texts encoded, mean batch."""
        stats = dict(self.stats)
        stats["mean_batch"] = (
            round(stats["encoded"] / stats["batches"], 2) if stats["batches"] else 0
        )
        stats.update(max_batch=self.max_batch, max_wait_ms=self.max_wait * 1000.0)
        stats["cache_size"], stats["cached"] = self.cache.size, len(self.cache)
        return stats

    def close(self) -> None:
        """Stop the batching thread once the queued texts are answered."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        if self.threads > 0:
            import torch

            torch.set_num_threads(self.threads)
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            closing = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            self._answer(batch)
            if closing:
                return

    def _answer(self, batch: list[_Pending]) -> None:
        texts = list(dict.fromkeys(p.text for p in batch))  # a repeated text is encoded once
        self.stats["batches"] += 1
        self.stats["encoded"] += len(texts)
        try:
            answers = dict(zip(texts, self.encode_many(texts), strict=True))
        except Exception:  # noqa: BLE001 - one text's failure must not fail the others
            if len(texts) == 1:
                answers = {texts[0]: _failure()}
            else:
                self.stats["retried"] += 1
                answers = {text: self._encode_alone(text) for text in texts}
        for pending in batch:
            answer = answers[pending.text]
            if isinstance(answer, BaseException):
                pending.future.set_exception(answer)
            else:
                pending.future.set_result(answer.copy())
        for text, answer in answers.items():
            if not isinstance(answer, BaseException):
                self.cache.put(text, answer)

    def _encode_alone(self, text: str) -> Query | BaseException:
        try:
            return self.encode_many([text])[0]
        except Exception:  # noqa: BLE001
            return _failure()


def _failure() -> BaseException:
    """The exception being handled (logged when it is not a user error)."""
    import sys

    from lexvla.errors import LexVLAError

    err = sys.exc_info()[1]
    assert err is not None
    if not isinstance(err, LexVLAError):
        logger.exception("text query failed")
    return err
