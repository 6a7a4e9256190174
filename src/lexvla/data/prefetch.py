"""Run an iterator ahead in a background thread, so decoding the next batch overlaps the model's work."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of `items` in order, each produced by one background thread up to `depth` ahead.

    PIL decoding and resizing release the GIL, so the next batch is decoded while the caller encodes
    the current one. An exception raised by `items` is raised here, at the item it failed on.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    source = iter(items)

    def pull() -> object:
        return next(source, _END)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lexvla-prefetch") as pool:
        pending: deque[Future] = deque(pool.submit(pull) for _ in range(depth))
        while True:
            item = pending.popleft().result()
            if item is _END:
                return
            pending.append(pool.submit(pull))
            yield item  # type: ignore[misc]
