"""The reliability suite (docs/reliability.md): bad inputs, crash safety, untrusted files, load.

Every test here runs under a wall-clock guard: a test that hangs fails with a clear message instead
of blocking the suite (SIGALRM in the main thread; pytest runs tests there).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

HANG_SECONDS = 240  # far above the slowest test here on 2 busy cores; only a hang reaches it


class HangError(Exception):
    """Raised in a test that ran longer than HANG_SECONDS."""


@pytest.fixture(autouse=True)
def _no_hang(request: pytest.FixtureRequest) -> Iterator[None]:
    def fail(signum: int, frame: object) -> None:
        raise HangError(f"{request.node.nodeid} ran longer than {HANG_SECONDS} s: a hang")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
