"""The objective against hand-computed values and naive loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lexvla.config import LossConfig
from lexvla.errors import LexVLAError
from lexvla.losses import (
    LexVLAObjective,
    PenaltySchedule,
    flops_penalty,
    info_nce,
    overuse_penalty,
)


def _weights(b: int, v: int, seed: int = 0) -> torch.Tensor:
    """Non-negative L2-normalised (b, v) vectors, like the model's lexical weights."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(F.elu(torch.randn(b, v, generator=gen) * 2) + 1, dim=-1)


def _naive_info_nce(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Loop reference: -log softmax of the positive, per row, both directions."""
    n = image.shape[0]
    sims = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]
    i2t = t2i = 0.0
    for i in range(n):
        i2t -= sims[i][i] - math.log(sum(math.exp(sims[i][j]) for j in range(n)))
        t2i -= sims[i][i] - math.log(sum(math.exp(sims[j][i]) for j in range(n)))
    return 0.5 * (i2t + t2i) / n


def test_info_nce_uniform_scores_is_log_b():
    b, v = 6, 10
    same = torch.full((b, v), 1 / math.sqrt(v))  # every pair has the same score
    loss = info_nce(same, same, torch.tensor([14.3]))
    assert loss.item() == pytest.approx(math.log(b), rel=1e-6)


def test_info_nce_matches_loop_and_clamps_scale():
    image, text = _weights(5, 12, seed=1), _weights(5, 12, seed=2)
    got = info_nce(image, text, torch.tensor([7.0]), max_scale=100.0)
    assert got.item() == pytest.approx(_naive_info_nce(image, text, 7.0), rel=1e-5)
    clamped = info_nce(image, text, torch.tensor([500.0]), max_scale=30.0)
    assert clamped.item() == pytest.approx(_naive_info_nce(image, text, 30.0), rel=1e-5)


def test_info_nce_rejects_unpaired_batches():
    with pytest.raises(ValueError, match="paired"):
        info_nce(torch.rand(3, 4), torch.rand(2, 4), torch.tensor([1.0]))


def test_flops_by_hand():
    w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]])
    # column means 2, 2, 1 -> 4 + 4 + 1
    assert flops_penalty(w).item() == pytest.approx(9.0)


def test_overuse_by_hand():
    w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]])
    a = [2.0, 2.0, 1.0]
    p = [x / 5.0 for x in a]
    assert overuse_penalty(w).item() == pytest.approx(sum(pi * ai for pi, ai in zip(p, a)))
    assert overuse_penalty(w, "square").item() == pytest.approx(sum(pi**2 for pi in p))
    with pytest.raises(ValueError, match="overuse form"):
        overuse_penalty(w, "cube")


@pytest.mark.parametrize("form", ["share", "square"])
def test_overuse_gradient_pushes_most_used_entries_hardest(form):
    w = _weights(16, 40, seed=3).clone()
    w[:, 7] += 0.5  # word 7 used by every sample: the overused word
    w.requires_grad_(True)
    overuse_penalty(w, form).backward()
    column_grad = w.grad[0]  # the gradient is the same for every row: dL/da_j / B
    torch.testing.assert_close(w.grad, column_grad.expand_as(w.grad))
    assert int(column_grad.argmax()) == 7
    assert column_grad[7] > 0  # gradient descent lowers the overused word
    usage = w.detach().mean(0)
    order = usage.argsort()
    assert torch.all(column_grad[order].diff() >= -1e-9)  # monotone in usage


def test_overuse_share_gradient_formula():
    w = _weights(8, 9, seed=4).requires_grad_(True)
    overuse_penalty(w, "share").backward()
    a = w.detach().mean(0)
    s, q = a.sum(), (a**2).sum()
    expected = (2 * a / s - q / s**2) / w.shape[0]  # dL/dw_ij = dL/da_j / B (p_j not detached)
    torch.testing.assert_close(w.grad[0], expected)


def test_penalty_schedule_quadratic_warmup():
    sched = PenaltySchedule(0.01, 100)
    assert sched(0) == 0.0
    assert sched(50) == pytest.approx(0.0025)
    assert sched(100) == pytest.approx(0.01)
    assert sched(200) == pytest.approx(0.01)
    assert PenaltySchedule(0.5, 0)(0) == 0.5


@pytest.mark.parametrize(
    ("penalty", "key", "fn"),
    [
        ("overuse", "overuse_loss", lambda w: overuse_penalty(w, "share")),
        ("overuse-square", "overuse_loss", lambda w: overuse_penalty(w, "square")),
        ("flops", "flops_loss", flops_penalty),
        ("none", None, None),
    ],
)
def test_objective_keys_and_total(penalty, key, fn):
    cfg = LossConfig(penalty=penalty, penalty_weight=0.2, penalty_warmup_steps=10)
    objective = LexVLAObjective(cfg, max_scale=100.0)
    image, text = _weights(4, 64, seed=5), _weights(4, 64, seed=6)
    scale = torch.tensor([20.0], requires_grad=True)
    out = objective(image, text, scale, step=5)
    stats = {"sparsity/image_active", "sparsity/text_active", "penalty_weight", "logit_scale"}
    expected_keys = {"contrastive_loss", "loss"} | stats | ({key} if key else set())
    assert set(out) == expected_keys
    nce = _naive_info_nce(image, text, 20.0)
    assert out["contrastive_loss"].item() == pytest.approx(nce, rel=1e-5)
    lam = 0.2 * (5 / 10) ** 2
    assert out["penalty_weight"].item() == pytest.approx(lam)
    penalty_value = (fn(image) + fn(text)).item() if fn else 0.0
    if key:
        assert out[key].item() == pytest.approx(penalty_value, rel=1e-6)
    assert out["loss"].item() == pytest.approx(nce + lam * penalty_value, rel=1e-5)
    assert out["loss"].requires_grad
    for name in stats:
        assert not out[name].requires_grad and out[name].dim() == 0
    threshold = 1 / math.sqrt(64)
    assert out["sparsity/image_active"].item() == pytest.approx(
        float((image >= threshold).sum(1).float().mean())
    )


def test_objective_rejects_unknown_penalty():
    with pytest.raises(LexVLAError, match="loss.penalty"):
        LexVLAObjective(LossConfig(penalty="l2"))


def test_objective_penalises_the_given_inputs_instead_of_the_weights():
    """`penalty_inputs` (loss.penalty_on="activations") replace the weights in the penalty only."""
    objective = LexVLAObjective(
        LossConfig(penalty="overuse", penalty_weight=0.5, penalty_warmup_steps=0)
    )
    image, text = _weights(4, 32, seed=1), _weights(4, 32, seed=2)
    image_act, text_act = image * 3.0, text * 0.5  # unnormalised activations of the same vectors
    scale = torch.tensor([10.0])
    plain = objective(image, text, scale, step=1)
    on_act = objective(image, text, scale, step=1, penalty_inputs=(image_act, text_act))
    assert on_act["contrastive_loss"].item() == pytest.approx(plain["contrastive_loss"].item())
    expected = (overuse_penalty(image_act) + overuse_penalty(text_act)).item()
    assert on_act["overuse_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert on_act["loss"].item() == pytest.approx(
        on_act["contrastive_loss"].item() + 0.5 * expected, rel=1e-6
    )
    with pytest.raises(LexVLAError, match="penalty_on"):
        LexVLAObjective(LossConfig(penalty_on="logits"))


def test_penalties_on_unit_vectors_cannot_reward_sparsity():
    """Why `penalty_on="activations"` exists: on L2-normalised vectors FLOPs scores a batch of
    identical dense vectors like a batch of identical one-hots, and overuse even prefers the dense
    batch (1/sqrt(V)) to distinct one-hots (1/B)."""
    B, V = 8, 1000
    dense = F.normalize(torch.ones(B, V), dim=-1)
    shared_one_hot = torch.zeros(B, V).index_fill_(1, torch.tensor([0]), 1.0)
    distinct_one_hots = torch.eye(B, V)
    assert flops_penalty(dense).item() == pytest.approx(flops_penalty(shared_one_hot).item())
    assert overuse_penalty(dense).item() == pytest.approx(1 / math.sqrt(V), rel=1e-5)
    assert overuse_penalty(distinct_one_hots).item() == pytest.approx(1 / B)
    assert overuse_penalty(dense) < overuse_penalty(distinct_one_hots)


def test_caption_word_loss_is_cross_entropy_of_the_mass_share():
    from lexvla.losses import caption_word_loss

    activations = torch.tensor([[1.0, 3.0, 4.0], [2.0, 2.0, 4.0]])
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])  # the second row has no target
    expected = -(0.5 * math.log(1 / 8) + 0.5 * math.log(3 / 8))
    assert caption_word_loss(activations, targets).item() == pytest.approx(expected)
    # all mass on the targeted words: the loss is the entropy of the target (its minimum)
    sharp = torch.tensor([[5.0, 5.0, 1e-9]])
    assert caption_word_loss(sharp, targets[:1]).item() == pytest.approx(math.log(2), rel=1e-6)
    assert caption_word_loss(activations, torch.zeros(2, 3)).item() == 0.0


def test_objective_adds_the_weighted_caption_word_loss():
    from lexvla.losses import caption_word_loss

    torch.manual_seed(0)
    image, text = torch.rand(4, 6) + 0.1, torch.rand(4, 6) + 0.1
    targets = torch.softmax(torch.randn(4, 6), dim=-1)
    objective = LexVLAObjective(LossConfig(penalty="none", caption_words_weight=0.5))
    out = objective(
        F.normalize(image, dim=-1),
        F.normalize(text, dim=-1),
        torch.tensor([10.0]),
        0,
        word_targets=targets,
        activations=(image, text),
    )
    words = caption_word_loss(image, targets) + caption_word_loss(text, targets)
    assert out["caption_word_loss"].item() == pytest.approx(words.item())
    assert out["loss"].item() == pytest.approx((out["contrastive_loss"] + 0.5 * words).item())


def test_caption_word_loss_on_the_image_side_only():
    from lexvla.errors import LexVLAError
    from lexvla.losses import caption_word_loss

    torch.manual_seed(1)
    image, text = torch.rand(4, 6) + 0.1, torch.rand(4, 6) + 0.1
    targets = torch.softmax(torch.randn(4, 6), dim=-1)
    cfg = LossConfig(penalty="none", caption_words_weight=2.0, caption_words_on="image")
    out = LexVLAObjective(cfg)(
        F.normalize(image, dim=-1),
        F.normalize(text, dim=-1),
        torch.tensor([10.0]),
        0,
        word_targets=targets,
        activations=(image, text.requires_grad_()),
    )
    words = caption_word_loss(image, targets)
    assert out["caption_word_loss"].item() == pytest.approx(words.item())
    assert out["loss"].item() == pytest.approx((out["contrastive_loss"] + 2.0 * words).item())
    with pytest.raises(LexVLAError, match="loss.caption_words_on"):
        LossConfig(caption_words_on="text")
