"""Helper threads for multi-threaded single-query search.

A search of T threads hands one job to T - 1 helper threads and works on it itself: every thread
claims chunks of documents from the job's atomic counter (`_kernels.search_chunks`) until none is
left. The searching thread then waits only for chunks a helper has claimed and is still scoring, never
for a helper that has not started (busy, or not scheduled on a loaded machine): that one finds no
chunk left and returns. Several Python threads may search at once; they share the helpers.

numba's own parallel loops are not used here: with them the caller waits at a barrier for every worker
to start, which on a shared machine (workers descheduled by other load) measured 10-50x slower than
one thread; and the `workqueue` threading layer aborts on concurrent calls from several threads.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from lexvla.errors import LexVLAError
from lexvla.index import _kernels


class _Job:
    __slots__ = ("args", "finished", "error")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args  # search_chunks arguments
        self.finished = threading.Condition()
        self.error: BaseException | None = None


class _Helpers:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.count = 0
        self.lock = threading.Lock()

    def ensure(self, count: int) -> None:
        """Start helper threads until there are `count`."""
        with self.lock:
            while self.count < count:
                threading.Thread(target=self._serve, name="lexvla-search", daemon=True).start()
                self.count += 1

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                _kernels.search_chunks(*job.args)
            except BaseException as err:  # noqa: BLE001 - re-raised by the searching thread
                job.error = err
            with job.finished:  # the searching thread may be waiting for chunks scored here
                job.finished.notify_all()


_helpers = _Helpers()


def _reset_after_fork() -> None:
    global _helpers
    _helpers = _Helpers()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_reset_after_fork)


def run(args: tuple[Any, ...], counters: Any, num_chunks: int, threads: int) -> None:
    """Run `_kernels.search_chunks(*args)` on this thread and up to `threads - 1` helpers; return
    when all `num_chunks` chunks are scored."""
    helpers = _helpers
    helpers.ensure(threads - 1)
    job = _Job(args)
    for _ in range(threads - 1):
        helpers.jobs.put(job)
    _kernels.search_chunks(*args)
    if _kernels.chunks_finished(counters) < num_chunks:
        with job.finished:  # a helper notifies after counting its chunks finished: no lost wake-up
            while _kernels.chunks_finished(counters) < num_chunks:
                if job.error is not None:
                    raise LexVLAError(f"search helper thread failed: {job.error!r}") from job.error
                job.finished.wait()
