"""`prefetched`: the same items in the same order, produced ahead in a background thread."""

from __future__ import annotations

import threading

import pytest

from lexvla.data.prefetch import prefetched


def test_same_items_in_order_from_another_thread():
    threads = []

    def items():
        for i in range(7):
            threads.append(threading.current_thread().name)
            yield i

    assert list(prefetched(items(), depth=3)) == list(range(7))
    assert all(name.startswith("lexvla-prefetch") for name in threads)
    assert list(prefetched(iter([]))) == []


def test_runs_at_most_depth_ahead():
    pulled = []

    def items():
        for i in range(10):
            pulled.append(i)
            yield i

    stream = prefetched(items(), depth=2)
    assert next(stream) == 0
    threading.Event().wait(0.05)  # give the thread time to run ahead if it would
    assert len(pulled) <= 3  # the item taken, plus at most `depth` ahead
    stream.close()


def test_an_error_is_raised_at_the_item_it_failed_on():
    def items():
        yield 1
        raise OSError("disk gone")

    stream = prefetched(items())
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)
    with pytest.raises(ValueError, match="depth"):
        list(prefetched([1], depth=0))
