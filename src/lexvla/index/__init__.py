"""Sparse lexical index and search (arrays in, ids and scores out; never imports models)."""
