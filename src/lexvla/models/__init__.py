"""LexVLA models: the two towers, the full model, checkpoints and the factory."""
