"""The lexical mapper and sparsification against naive references."""

from __future__ import annotations

import math

import torch

from lexvla.layers.lexical import (
    lexical_activation,
    lexical_weights,
    naive_lexical_max_pool,
    sparsify,
    sparsify_threshold,
    sparsify_topk,
    to_sparse,
)


def test_max_then_activate_equals_activate_then_max():
    torch.manual_seed(0)
    hidden, codebook = torch.randn(3, 7, 16), torch.randn(50, 16)
    patch_logits = hidden @ codebook.t()  # (B, P, V)
    activate_then_max = lexical_activation(patch_logits).max(dim=1).values
    max_then_activate = lexical_activation(naive_lexical_max_pool(hidden, codebook))
    torch.testing.assert_close(max_then_activate, activate_then_max)


def test_activation_is_positive_and_weights_unit_norm():
    x = torch.tensor([[-10.0, -1.0, 0.0, 2.0]])  # far below 0, fp32 rounds elu+1 to 0
    act = lexical_activation(x)
    assert (act > 0).all()
    torch.testing.assert_close(act[0, 1:], torch.tensor([math.exp(-1.0), 1.0, 3.0]))
    assert torch.allclose(lexical_weights(torch.randn(4, 9)).norm(dim=-1), torch.ones(4))


def test_threshold_default_is_one_over_sqrt_v():
    v = 16  # threshold 0.25
    weights = torch.tensor([[0.1, 0.25, 0.3, 0.0] + [0.0] * 12])
    out = sparsify_threshold(weights)
    torch.testing.assert_close(out[0, :4], torch.tensor([0.0, 0.25, 0.3, 0.0]))
    assert out.shape[-1] == v


def test_topk_keeps_k_largest_with_lowest_index_on_ties():
    weights = torch.tensor([[0.5, 0.2, 0.5, 0.1, 0.5]])
    out = sparsify_topk(weights, 2)
    assert out.tolist() == [[0.5, 0.0, 0.5, 0.0, 0.0]]
    assert (sparsify_topk(torch.rand(3, 40), 7) > 0).sum(dim=-1).tolist() == [7, 7, 7]


def test_sparsify_is_not_renormalised_and_caps_words():
    weights = lexical_weights(torch.randn(2, 100))
    out = sparsify(weights, "threshold", max_words=5)
    assert ((out > 0).sum(dim=-1) <= 5).all()
    kept = out > 0
    torch.testing.assert_close(out[kept], weights[kept])  # surviving entries unchanged
    assert (out.norm(dim=-1) <= 1 + 1e-6).all()


def test_csr_round_trip():
    weights = sparsify_topk(torch.rand(4, 30), 5)
    weights[2] = 0  # an empty row
    sparse = to_sparse(weights)
    assert sparse.indptr.tolist()[-1] == 15 and sparse.indptr[3] == sparse.indptr[2]
    torch.testing.assert_close(sparse.to_dense(), weights)
