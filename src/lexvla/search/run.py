"""One-shot search for the command line: `lexvla search INDEX|--milvus URI --text ... [--boost w=2]`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lexvla.errors import LexVLAError
from lexvla.search.engine import EMPTY_QUERY_MESSAGE, SearchEngine


def parse_word_values(items: Sequence[str], option: str) -> dict[str, float]:
    """`["dog=2", "cat=0.5"]` -> `{"dog": 2.0, "cat": 0.5}` (the CLI's `--boost` / `--add` values).

    Raises:
        LexVLAError: an item is not `word=number` with a finite number >= 0.
    """
    values: dict[str, float] = {}
    for item in items:
        word, sep, number = item.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not sep or not word.strip() or not math.isfinite(value) or value < 0:
            raise LexVLAError(f"{option} {item!r}: write it as WORD=NUMBER, e.g. {option} dog=2")
        values[word.strip()] = value
    return values


def run_search(
    index: str | Path | None = None,
    *,
    milvus: str | None = None,
    collection: str = "lexvla",
    text: str | None = None,
    image: str | Path | None = None,
    model: str | None = None,
    k: int = 10,
    explain: bool = False,
    drop: Sequence[str] = (),
    boost: Sequence[str] = (),
    add: Sequence[str] = (),
    engine: SearchEngine | None = None,
) -> dict[str, Any]:
    """Open an index, make a query from a text or an image, steer it, and search.

    Args:
        index: the index folder; or
        milvus, collection: a Milvus URI and the collection in it (`lexvla index build --milvus`).
        text, image: exactly one of them is the query.
        model: preset / run / checkpoint; None uses the model the index records.
        k: number of results.
        explain: add each hit's per-word explanation (`engine.explain_match`, what `lexvla search
            --explain` prints).
        drop: query words to remove; boost: `word=factor`; add: `word=weight`.
        engine: an already opened engine (then `index`, `milvus` and `model` are ignored).

    Returns:
        `{"query": {"source", "words"}, "results": [hit dicts], "message": str | None}`.
    """
    if (text is None) == (image is None):
        raise LexVLAError("give exactly one of --text TEXT or --image PATH")
    engine = engine or SearchEngine.open(index, model, milvus=milvus, collection=collection)
    query = engine.query_from_text(text) if text is not None else engine.query_from_image(image)
    query.edit(
        drop=drop,
        boost=parse_word_values(boost, "--boost"),
        add=parse_word_values(add, "--add"),
    )
    results = engine.search(query, k=k, explain=True)
    if explain:
        for hit in results:
            hit["explanation"] = engine.explain_match(query, hit["doc"])
    return {
        "query": query.to_dict(),
        "results": results,
        "message": EMPTY_QUERY_MESSAGE if query.is_empty else None,
    }
