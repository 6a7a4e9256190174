"""serve/batching.py: concurrent text queries share one forward, each gets its own answer, a failing
text fails alone, repeated texts come from a bounded cache."""

from __future__ import annotations

import threading
import time

import pytest

from lexvla.errors import LexVLAError
from lexvla.search.engine import query_text
from lexvla.search.query import Query
from lexvla.serve.batching import QueryCache, TextBatcher


class FakeEncoder:
    """texts -> one query each whose single word is chosen by the text (so answers are checkable);
    records every call; refuses a batch holding "boom" (alone too), "slow" takes 50 ms."""

    def __init__(self, vocab) -> None:
        self.vocab, self.calls, self.lock = vocab, [], threading.Lock()

    def word(self, text: str) -> str:
        return self.vocab.words[sum(map(ord, text)) % self.vocab.size]

    def __call__(self, texts):
        with self.lock:
            self.calls.append(list(texts))
        if "boom" in texts:
            raise LexVLAError("cannot encode 'boom'")
        if "slow" in texts:
            time.sleep(0.05)
        return [Query({self.word(t): 1.0}, self.vocab, f"text: {t}") for t in texts]


def _answers(batcher, texts):
    futures = [(t, batcher.submit(t)) for t in texts]
    out = {}
    for text, future in futures:
        try:
            out[text] = future.result(timeout=10)
        except LexVLAError as err:
            out[text] = err
    return out


def test_concurrent_texts_share_forwards_and_each_gets_its_own_answer(tiny_model):
    encoder = FakeEncoder(tiny_model.vocab)
    batcher = TextBatcher(encoder, max_batch=4, max_wait_ms=200, cache_size=0)
    texts = ["slow"] + [f"query {i}" for i in range(11)]
    answers = _answers(batcher, texts)
    batcher.close()
    for text in texts:
        assert answers[text].source == f"text: {text}"
        assert list(answers[text].words) == [encoder.word(text)]
    sizes = [len(call) for call in encoder.calls]
    assert max(sizes) == 4 and sum(sizes) == len(texts)  # batched, bounded, each text once
    assert batcher.info()["batches"] == len(encoder.calls)


def test_a_failing_text_fails_alone(tiny_model):
    encoder = FakeEncoder(tiny_model.vocab)
    batcher = TextBatcher(encoder, max_batch=8, max_wait_ms=200, cache_size=0)
    answers = _answers(batcher, ["slow", "a", "boom", "b"])
    batcher.close()
    assert isinstance(answers["boom"], LexVLAError) and "boom" in str(answers["boom"])
    for text in ("slow", "a", "b"):
        assert list(answers[text].words) == [encoder.word(text)]
    assert ["slow", "a", "boom", "b"] in encoder.calls  # one batch first, then each alone
    assert batcher.info()["retried"] == 1


def test_an_empty_text_is_refused_before_any_forward(tiny_model):
    encoder = FakeEncoder(tiny_model.vocab)
    batcher = TextBatcher(encoder, check=query_text, cache_size=0)
    for text in ("", "   ", "\n\t"):
        with pytest.raises(LexVLAError, match="empty"):
            batcher.submit(text)
    batcher.close()
    assert encoder.calls == []


def test_repeated_texts_come_from_the_bounded_cache(tiny_model):
    encoder = FakeEncoder(tiny_model.vocab)
    batcher = TextBatcher(encoder, max_wait_ms=0, cache_size=2)
    first = batcher.submit("a dog").result(timeout=10)
    again = batcher.submit("a dog").result(timeout=10)
    assert len(encoder.calls) == 1 and again.words == first.words
    again.drop(next(iter(again.words)))  # steering an answer does not change the cached one
    assert batcher.submit("a dog").result(timeout=10).words == first.words
    for text in ("b", "c"):  # two newer texts evict the oldest
        batcher.submit(text).result(timeout=10)
    batcher.submit("a dog").result(timeout=10)
    batcher.close()
    assert [c for c in encoder.calls if c == ["a dog"]] == [["a dog"], ["a dog"]]
    assert batcher.info()["cache_hits"] == 2 and len(batcher.cache) == 2


def test_query_cache_evicts_the_least_recently_used(tiny_model):
    cache = QueryCache(2)
    queries = {
        t: Query({tiny_model.vocab.words[i]: 1.0}, tiny_model.vocab, t) for i, t in enumerate("abc")
    }
    cache.put("a", queries["a"])
    cache.put("b", queries["b"])
    assert cache.get("a").words == queries["a"].words  # "a" is now the most recent
    cache.put("c", queries["c"])
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    assert QueryCache(0).get("a") is None
