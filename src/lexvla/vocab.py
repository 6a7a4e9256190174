"""The lexical vocabulary: which LLM tokens are dimensions of the lexical space, and their display words.

The vocabulary is the text LLM's tokenizer vocabulary filtered to meaningful tokens (docs/method.md):

- rule ``"pieces"`` (default): the token, with an optional word-start marker, is 2+ lower-case ASCII
  letters (``▁?[a-z]{2,}`` / ``Ġ?[a-z]{2,}``): 17,182 ids on Llama 2, 33,116 on SmolLM2;
- rule ``"word-start"``: only tokens that start a word (``▁[a-z]{2,}`` / ``Ġ[a-z]{2,}``): 21,504 on SmolLM2;
- rule ``"words"``: ``word-start`` without English function words (:func:`stop_words`: "the", "with",
  "her"): what is left names things, actions and qualities (21,247 on SmolLM2). The paper keeps only
  "meaningful" tokens; fragments (``##de``) and stop words cannot carry a score here.

Works for SentencePiece (``▁``), byte-level BPE (``Ġ``) and word-level tokenizers (no marker: every
token starts a word). A word-start token displays as the plain word ("room"); a continuation piece as
``##room``, so every kept id has a unique display string (used by the index and exports).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lexvla.config import VOCAB_RULES
from lexvla.errors import LexVLAError

SENTENCEPIECE_MARKER = "\u2581"  # ▁
BYTE_LEVEL_MARKER = "\u0120"  # Ġ
CONTINUATION_PREFIX = "##"
_LETTERS = re.compile(r"[a-z]{2,}")


@functools.cache
def stop_words() -> frozenset[str]:
    """English function words (`resources/stop_words.txt`): never a dimension of the "words" rule."""
    text = (
        importlib.resources.files("lexvla.resources").joinpath("stop_words.txt").read_text("utf-8")
    )
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


_WORD = re.compile(r"[a-z]+")
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth"}
_IRREGULAR.update({"mice": "mouse", "geese": "goose", "people": "people", "oxen": "ox"})
_KEEP_S = ("ss", "us", "is", "ous")


def fold_word(word: str) -> str:
    """The form words are compared in: lower-cased, no `##`, singular (a rule of thumb, applied to
    both sides, so it only needs to be consistent): dogs → dog, puppies → puppy, boxes → box."""
    word = word.lower().removeprefix(CONTINUATION_PREFIX)
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word.endswith(_KEEP_S):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def fold_groups(words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Group words by :func:`fold_word`: `(group_of_index, folded_form_of_group)`, groups numbered in
    order of first appearance."""
    index: dict[str, int] = {}
    groups = [index.setdefault(fold_word(w), len(index)) for w in words]
    return groups, list(index)


def display_groups(words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Group display words that are forms of one word (:func:`fold_groups`).

    Returns `(group_of_index, group_words)`. A group is shown as its folded form when that form is
    itself one of the words ("dog" for "dog", "dogs", "##dog"), else as its first word without "##"
    ("puppies" alone stays "puppies").
    """
    groups, keys = fold_groups(words)
    plain = {w.removeprefix(CONTINUATION_PREFIX).lower() for w in words}
    first: dict[int, str] = {}
    for word, group in zip(words, groups):
        first.setdefault(group, word.removeprefix(CONTINUATION_PREFIX))
    return groups, [key if key in plain else first[g] for g, key in enumerate(keys)]


def caption_tokens(text: str) -> list[str]:
    """The lower-cased alphabetic words of a caption, as written ("T-shirt" gives "t", "shirt")."""
    return _WORD.findall(str(text).lower())


def caption_words(captions: Iterable[str]) -> set[str]:
    """The folded words of some captions (:func:`fold_word` of :func:`caption_tokens`)."""
    return {fold_word(w) for text in captions for w in caption_tokens(text)}


def detect_marker(tokens: Iterable[str]) -> str:
    """The word-start marker of a tokenizer's vocabulary: "▁", "Ġ", or "" for word-level vocabularies."""
    counts = {SENTENCEPIECE_MARKER: 0, BYTE_LEVEL_MARKER: 0}
    for token in tokens:
        if token[:1] in counts:
            counts[token[:1]] += 1
    marker, count = max(counts.items(), key=lambda item: item[1])
    return marker if count > 0 else ""


@dataclass(frozen=True)
class LexicalVocabulary:
    """Kept token ids (the lexical dimensions, in increasing id order) and their display words."""

    token_ids: tuple[int, ...]  # (V,) tokenizer ids of the kept tokens
    words: tuple[str, ...]  # (V,) unique display strings
    rule: str
    tokenizer_size: int

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.words):
            raise ValueError("token_ids and words must have the same length")
        if len(set(self.words)) != len(self.words):
            raise ValueError("display words must be unique")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def size(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_token_map(
        cls, token_to_id: Mapping[str, int], rule: str = "pieces"
    ) -> LexicalVocabulary:
        """Filter a tokenizer's `{token: id}` map with `rule` ("pieces", "word-start" or "words")."""
        if rule not in VOCAB_RULES:
            raise LexVLAError(
                f"unknown vocabulary rule {rule!r}: use one of {', '.join(VOCAB_RULES)}"
            )
        marker = detect_marker(token_to_id)
        stops = stop_words() if rule == "words" else frozenset()
        kept: list[tuple[int, str]] = []
        for token, token_id in token_to_id.items():
            starts_word = not marker or token.startswith(marker)
            body = token[len(marker) :] if marker and starts_word else token
            if not _LETTERS.fullmatch(body) or (rule != "pieces" and not starts_word):
                continue
            if body in stops:
                continue
            kept.append((token_id, body if starts_word else CONTINUATION_PREFIX + body))
        kept.sort()
        if not kept:
            raise LexVLAError(
                "the tokenizer has no token made of 2+ lower-case letters: cannot build a vocabulary"
            )
        ids, words = zip(*kept)
        return cls(tuple(ids), tuple(words), rule, max(token_to_id.values()) + 1)

    @classmethod
    def from_tokenizer(cls, tokenizer: object, rule: str = "pieces") -> LexicalVocabulary:
        """Build from any Hugging Face tokenizer (anything with `get_vocab()`)."""
        get_vocab = getattr(tokenizer, "get_vocab", None)
        if get_vocab is None:
            raise LexVLAError(f"{type(tokenizer).__name__} has no get_vocab(): not a tokenizer")
        return cls.from_token_map(get_vocab(), rule)

    def word_groups(self) -> tuple[list[int], list[str]]:
        """Merge the forms of one word for display: a continuation piece with its word ("##dog",
        "dog") and a plural with its singular ("dogs", "dog"), by :func:`fold_word`.

        Returns `(group_of_id, group_words)`: for every lexical dimension the index of its merged word,
        and the merged words (see :func:`display_groups`).
        """
        cached = self.__dict__.get("_groups_cache")
        if cached is None:
            cached = display_groups(self.words)
            object.__setattr__(self, "_groups_cache", cached)
        return cached

    def merge_forms(self, parts: Iterable[tuple[str | int, float]]) -> list[tuple[str, str, float]]:
        """Sum per-word values over the forms of one word (:meth:`word_groups`): `parts` are
        (word or dimension, value) pairs; returns `(group word, heaviest form, total)` per word,
        largest total first. The heaviest form is a vocabulary word (it can steer a query); the
        group word is what a person reads ("dog" for "dog" + "dogs")."""
        groups, labels = self.word_groups()
        merged: dict[int, tuple[float, float, str]] = {}  # group -> (total, largest part, its form)
        for word, value in parts:
            form = word if isinstance(word, str) else self.words[int(word)]
            group = groups[self.index_of(form)]
            total, top, name = merged.get(group, (0.0, float("-inf"), form))
            value = float(value)
            merged[group] = (total + value, max(top, value), form if value > top else name)
        rows = [(labels[g], name, total) for g, (total, _, name) in merged.items()]
        return sorted(rows, key=lambda row: -row[2])

    def word_dims(self, word: str) -> list[int]:
        """The dimensions a written word stands for: every vocabulary word of its folded form
        ("dogs" -> "dog" and "dogs"); [] for a stop word, a one-letter word or an unknown word."""
        folded = self.__dict__.get("_folded_cache")
        if folded is None:
            folded = {}
            for index, display in enumerate(self.words):
                folded.setdefault(fold_word(display), []).append(index)
            object.__setattr__(self, "_folded_cache", folded)
        if len(word) < 2 or word in stop_words():
            return []
        return folded.get(fold_word(word), [])

    def fingerprint(self) -> str:
        """A short hash of (ids, words): two vocabularies with the same fingerprint are interchangeable."""
        payload = json.dumps([self.token_ids, self.words], separators=(",", ":")).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def index_of(self, word: str) -> int:
        """Lexical dimension of a display word (raises LexVLAError with suggestions when unknown)."""
        lookup = self._lookup()
        if word in lookup:
            return lookup[word]
        close = [w for w in (word.lower(), word.lower().strip("#")) if w in lookup]
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise LexVLAError(f"'{word}' is not in the lexical vocabulary ({self.size} words).{hint}")

    def _lookup(self) -> dict[str, int]:
        cached = self.__dict__.get("_lookup_cache")
        if cached is None:
            cached = {word: i for i, word in enumerate(self.words)}
            object.__setattr__(self, "_lookup_cache", cached)
        return cached

    def to_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "tokenizer_size": self.tokenizer_size,
            "size": self.size,
            "fingerprint": self.fingerprint(),
            "token_ids": list(self.token_ids),
            "words": list(self.words),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LexicalVocabulary:
        try:
            return cls(
                tuple(int(i) for i in data["token_ids"]),  # type: ignore[union-attr]
                tuple(str(w) for w in data["words"]),  # type: ignore[union-attr]
                str(data["rule"]),
                int(data["tokenizer_size"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LexVLAError(f"invalid vocabulary record: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LexicalVocabulary:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, RecursionError) as err:  # ValueError: JSON or UTF-8
            raise LexVLAError(f"cannot read vocabulary file {path}: {err}") from None
