"""Helper threads for multi-threaded single-query search.

A search with T threads hands its job to T - 1 helper threads and works on it itself: every thread
claims chunks of documents from the job's atomic counter (`_kernels.search_chunks`) until none is
left; the searching thread then scores any chunk a helper is too slow to finish itself (see
search_chunks), so it never waits for a helper that has not started (busy, or not scheduled on a
loaded machine) and at most about one chunk for one that stalls. Several Python threads may search at
once; they share the helpers.

numba's own parallel loops are not used here: with them the caller waits at a barrier for every worker
to start and finish, which on a shared machine (workers descheduled by other load) measured 10-25x
slower than one thread; and numba's `workqueue` threading layer aborts on concurrent calls.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

logger = logging.getLogger(__name__)


class _Helpers:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.count = 0
        self.lock = threading.Lock()

    def ensure(self, count: int) -> None:
        """Start helper threads until there are `count`."""
        with self.lock:
            while self.count < count:
                threading.Thread(target=self._serve, name="lexvla-search", daemon=True).start()
                self.count += 1

    def _serve(self) -> None:
        from lexvla.index import _kernels  # numba, imported on first use

        while True:
            args = self.jobs.get()
            try:
                _kernels.search_chunks(*args, False)
            except Exception:  # the searching thread scores what a failed helper left undone
                logger.exception("search helper thread failed")


_helpers = _Helpers()


def _reset_after_fork() -> None:
    global _helpers
    _helpers = _Helpers()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_reset_after_fork)


def run(args: tuple[Any, ...], threads: int) -> None:
    """`_kernels.search_chunks(*args, ...)` on this thread and up to `threads - 1` helpers; returns
    when every chunk is scored."""
    from lexvla.index import _kernels  # numba, imported on first use

    helpers = _helpers
    helpers.ensure(threads - 1)
    for _ in range(threads - 1):
        helpers.jobs.put(args)
    _kernels.search_chunks(*args, True)
