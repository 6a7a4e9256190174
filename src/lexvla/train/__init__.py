"""Training: the loop (`fit`), optimiser, checkpoints, frozen-feature caches and distributed helpers."""
