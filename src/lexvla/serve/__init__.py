"""A local web page and JSON API for searching an index (`lexvla serve`)."""
