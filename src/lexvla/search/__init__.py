"""Search a corpus of images by text or image, and read every match word by word.

- :func:`encode_corpus`: images (a folder or WebDataset tars) -> sparse lexical shard files,
  resumable and shardable across processes;
- :class:`SearchEngine`: a model plus an index; :class:`Query`: an editable word -> weight query;
- :func:`run_search`: one steered search, as `lexvla search` runs it.
"""

from __future__ import annotations

from lexvla.search.encode import encode_corpus
from lexvla.search.engine import SearchEngine
from lexvla.search.query import Query
from lexvla.search.run import parse_word_values, run_search

__all__ = ["Query", "SearchEngine", "encode_corpus", "parse_word_values", "run_search"]
