"""Single-concept building blocks (tensors in, tensors out): lexical mapper, adapter, LoRA."""
