"""Evaluation: retrieval recall, sparsity curves, PatchDis, false discoveries."""
