"""Helpers shared by several test modules: data makers, naive references, fixtures, checks.

Test modules import from here (`from helpers.index import no_fsync`), never from one another:
tests/ is on sys.path through tests/conftest.py (pytest's default `prepend` import mode). No tests
here: pytest collects only test_*.py files.

- `helpers.index`: random sparse matrices, a brute-force top-k and its comparison, `no_fsync`.
- `helpers.search`: synthetic images, the tiny encoded corpus and index, a brute-force ranking.
- `helpers.encode`: the reference `encode_corpus` run (`corpus` fixture) and its shard checks.
- `helpers.training`: a briefly trained `tiny` model and its optimiser state.
- `helpers.bad_inputs`: the zoo of bad images and captions, a pickle bomb (reliability tests).
"""
