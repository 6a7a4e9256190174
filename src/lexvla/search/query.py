"""A search query as an editable word -> weight mapping (steerable search).

A query is the sparsified lexical vector of a text or an image, kept as readable words so that a
person can drop a word, boost or lower it, or add one from the vocabulary, and search again with the
edited vector. Weights stay non-negative (the lexical space is); the vector is not re-normalised after
an edit, so a score stays the plain sum of per-word products.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from lexvla.errors import LexVLAError
from lexvla.vocab import LexicalVocabulary


class Query:
    """A sparse word -> weight mapping over one lexical vocabulary.

    Args:
        weights: word -> non-negative weight; zero weights are left out.
        vocab: the vocabulary the words must belong to.
        source: what the query was made from ("text: a dog", "image: dog.jpg", "words").
    """

    def __init__(
        self, weights: Mapping[str, float], vocab: LexicalVocabulary, source: str = ""
    ) -> None:
        self.vocab = vocab
        self.source = source
        self._weights: dict[str, float] = {}
        for word, weight in weights.items():
            self._set(word, weight)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_vector(cls, weights: np.ndarray, vocab: LexicalVocabulary, source: str = "") -> Query:
        """From a (V,) vector that is already sparsified (non-zero entries become the words)."""
        weights = np.asarray(weights, dtype=np.float32).reshape(-1)
        if weights.shape[0] != vocab.size:
            raise LexVLAError(
                f"a query vector has {weights.shape[0]} entries but the vocabulary has {vocab.size}"
            )
        ids = np.flatnonzero(weights > 0)
        ids = ids[np.argsort(-weights[ids], kind="stable")]
        return cls({vocab.words[i]: float(weights[i]) for i in ids}, vocab, source)

    # ------------------------------------------------------------------------------ reading
    @property
    def words(self) -> dict[str, float]:
        """Word -> weight, heaviest first (a copy)."""
        return dict(sorted(self._weights.items(), key=lambda item: -item[1]))

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, word: object) -> bool:
        return word in self._weights

    def __repr__(self) -> str:
        top = ", ".join(f"{w}={v:.3f}" for w, v in list(self.words.items())[:5])
        more = f", ... ({len(self)} words)" if len(self) > 5 else ""
        return f"Query({top}{more})"

    @property
    def is_empty(self) -> bool:
        return not self._weights

    def top(self, k: int = 20) -> list[tuple[str, float]]:
        """The `k` heaviest (word, weight) pairs."""
        return list(self.words.items())[:k]

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices int32 increasing, values float32) over the vocabulary, for the index."""
        pairs = sorted((self.vocab.index_of(w), v) for w, v in self._weights.items())
        indices = np.array([i for i, _ in pairs], dtype=np.int32)
        values = np.array([v for _, v in pairs], dtype=np.float32)
        return indices, values

    def to_dense(self) -> np.ndarray:
        """(V,) float32 vector."""
        dense = np.zeros(self.vocab.size, dtype=np.float32)
        indices, values = self.to_arrays()
        dense[indices] = values
        return dense

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: `{"source", "words": [{"word", "weight", "group"}, ...]}`, heaviest first.

        `group` names the word its forms share (`LexicalVocabulary.word_groups`: "dog" for "dog" and
        "dogs"), so a reader can show and edit the forms of one word together.
        """
        groups, labels = self.vocab.word_groups()
        return {
            "source": self.source,
            "words": [
                {"word": w, "weight": v, "group": labels[groups[self.vocab.index_of(w)]]}
                for w, v in self.words.items()
            ],
        }

    def copy(self) -> Query:
        return Query(self._weights, self.vocab, self.source)

    # ------------------------------------------------------------------------------ steering
    def drop(self, word: str) -> Query:
        """Remove `word` from the query (returns self, so edits chain)."""
        self._require_in_query(word)
        del self._weights[word]
        return self

    def boost(self, word: str, factor: float) -> Query:
        """Multiply the weight of `word` by `factor` (> 1 boosts, < 1 lowers, 0 drops)."""
        self._require_in_query(word)
        factor = _check_weight(factor, f"boost factor for '{word}'")
        return self._set(word, self._weights[word] * factor)

    def add(self, word: str, weight: float) -> Query:
        """Set `word` to `weight` (adds a vocabulary word that is not in the query, or replaces it)."""
        return self._set(word, weight)

    def edit(
        self,
        *,
        drop: Iterable[str] = (),
        boost: Mapping[str, float] | None = None,
        add: Mapping[str, float] | None = None,
    ) -> Query:
        """Apply several edits: drops first, then boosts, then additions."""
        for word in drop:
            self.drop(word)
        for word, factor in (boost or {}).items():
            self.boost(word, factor)
        for word, weight in (add or {}).items():
            self.add(word, weight)
        return self

    # ------------------------------------------------------------------------------ internals
    def _set(self, word: str, weight: float) -> Query:
        self.vocab.index_of(word)  # raises LexVLAError with a hint for unknown words
        weight = _check_weight(weight, f"weight of '{word}'")
        if weight > 0:
            self._weights[word] = weight
        else:
            self._weights.pop(word, None)
        return self

    def _require_in_query(self, word: str) -> None:
        if word in self._weights:
            return
        self.vocab.index_of(word)  # unknown to the vocabulary: that error first
        shown = ", ".join(list(self.words)[:10])
        raise LexVLAError(
            f"'{word}' is not a word of this query (its heaviest words: {shown or 'none'}); "
            f"use add('{word}', weight) to add it"
        )


def _check_weight(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LexVLAError(f"the {what} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise LexVLAError(
            f"the {what} must be a finite number >= 0 (lexical weights are non-negative), "
            f"got {value}"
        )
    return value
