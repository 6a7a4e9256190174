"""Datasets and preprocessing: caption JSON, CSV/TSV, WebDataset shards and a synthetic dataset."""
