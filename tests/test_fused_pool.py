"""Fused lexical max-pool against the naive (B, P, V) reference: values, gradients, ties, gradcheck."""

from __future__ import annotations

import pytest
import torch

from lexvla.layers.fused_pool import fused_lexical_max_pool
from lexvla.layers.lexical import lexical_max_pool, naive_lexical_max_pool


def _inputs(b: int, p: int, d: int, v: int, *, seed: int = 0, dtype=torch.float32):
    """Random hidden (b, p, d), codebook (v, d) and upstream gradient (b, v)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, p, d, generator=gen, dtype=dtype)
    codebook = torch.randn(v, d, generator=gen, dtype=dtype)
    grad_out = torch.randn(b, v, generator=gen, dtype=dtype)
    return hidden, codebook, grad_out


def _value_and_grads(fn, hidden, codebook, grad_out, *, need=(True, True)):
    h = hidden.clone().requires_grad_(need[0])
    z = codebook.clone().requires_grad_(need[1])
    out = fn(h, z)
    out.backward(grad_out)
    return out.detach(), h.grad, z.grad


def _assert_matches_naive(hidden, codebook, grad_out, chunk_size, *, need=(True, True)):
    ref = _value_and_grads(naive_lexical_max_pool, hidden, codebook, grad_out, need=need)
    fused = _value_and_grads(
        lambda h, z: fused_lexical_max_pool(h, z, chunk_size), hidden, codebook, grad_out, need=need
    )
    for name, r, f in zip(("values", "grad_hidden", "grad_codebook"), ref, fused):
        if r is None:
            assert f is None, name
            continue
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    ("b", "p", "d", "v", "chunk"),
    [
        (3, 7, 5, 23, 4),  # chunk does not divide V
        (2, 16, 8, 50, 50),  # one chunk
        (2, 16, 8, 50, 64),  # chunk larger than V
        (1, 9, 6, 31, 10),  # B = 1
        (4, 1, 6, 31, 7),  # P = 1: every word picks patch 0
        (2, 5, 3, 1, 4),  # V = 1
        (2, 12, 16, 37, 1),  # chunk of one word
    ],
)
def test_values_and_gradients_match_naive(b, p, d, v, chunk):
    hidden, codebook, grad_out = _inputs(b, p, d, v)
    _assert_matches_naive(hidden, codebook, grad_out, chunk)


def test_exact_ties_pick_lowest_patch_in_both_paths():
    hidden, codebook, grad_out = _inputs(3, 10, 8, 41)
    hidden[:, 7] = hidden[:, 2]  # duplicated patches: exact ties wherever patch 2 wins
    hidden[:, 9] = hidden[:, 2]
    hidden[1] = hidden[1, 4]  # image 1: all patches identical, every word ties on all patches
    _assert_matches_naive(hidden, codebook, grad_out, 6)
    h = hidden.clone().requires_grad_(True)
    fused_lexical_max_pool(h, codebook, 6).backward(grad_out)
    assert torch.all(h.grad[:, 7] == 0) and torch.all(h.grad[:, 9] == 0)
    assert torch.all(h.grad[1, 1:] == 0)  # all gradient of image 1 on its first patch
    torch.testing.assert_close(h.grad[1, 0], grad_out[1] @ codebook)


def test_integer_valued_ties_are_exact():
    """Small integers make every score exact, so ties are common and arithmetic is exact."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randint(-1, 2, (4, 6, 3), generator=gen).float()
    codebook = torch.randint(-1, 2, (29, 3), generator=gen).float()
    grad_out = torch.randint(-3, 4, (4, 29), generator=gen).float()
    _assert_matches_naive(hidden, codebook, grad_out, 5)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_requires_grad_on_one_input(need):
    hidden, codebook, grad_out = _inputs(2, 6, 4, 19, seed=1)
    _assert_matches_naive(hidden, codebook, grad_out, 5, need=need)


def test_no_grad_and_dispatch_through_lexical_max_pool():
    hidden, codebook, _ = _inputs(2, 6, 4, 19, seed=2)
    with torch.no_grad():
        fused = lexical_max_pool(hidden, codebook, impl="fused", chunk_size=4)
    torch.testing.assert_close(fused, naive_lexical_max_pool(hidden, codebook))
    assert fused.dtype == hidden.dtype


def test_gradcheck_float64():
    hidden, codebook, _ = _inputs(2, 4, 3, 7, seed=4, dtype=torch.float64)
    hidden.requires_grad_(True)
    codebook.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, z: fused_lexical_max_pool(h, z, 3), (hidden, codebook), eps=1e-6, atol=1e-5
    )


def test_dtype_preserved_bfloat16():
    hidden, codebook, grad_out = _inputs(2, 5, 4, 13, seed=5)
    h = hidden.bfloat16().requires_grad_(True)
    z = codebook.bfloat16().requires_grad_(True)
    out = fused_lexical_max_pool(h, z, 4)
    out.backward(grad_out.bfloat16())
    assert out.dtype == h.grad.dtype == z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, naive_lexical_max_pool(h, z).detach())


def test_fast_search_mode_rarely_changes_selection():
    """bf16 search + exact recompute: values never exceed the exact max, rarely pick another patch."""
    hidden, codebook, grad_out = _inputs(4, 64, 32, 300, seed=6)
    exact = naive_lexical_max_pool(hidden, codebook)  # (B, V)
    h = hidden.clone().requires_grad_(True)
    fast = fused_lexical_max_pool(h, codebook, 128, search_dtype=torch.bfloat16)
    assert fast.dtype == torch.float32
    assert torch.all(fast <= exact + 1e-5)
    differs = (fast < exact - 1e-5).float().mean().item()
    assert differs < 0.05, f"bf16 search changed {differs:.1%} of the selections"
    # A changed selection is a near-tie: the loss in value is within bf16 score error.
    scale = hidden.norm(dim=-1).max() * codebook.norm(dim=-1).max()
    assert torch.all(exact - fast <= 2 * 2**-8 * scale)
    # Exactly the patch value at the chosen patch: recompute by hand.
    logits = hidden @ codebook.t()  # (B, P, V)
    assert torch.isclose(logits, fast[:, None, :], rtol=1e-5, atol=1e-5).any(dim=1).all()
    fast.backward(grad_out)
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="expected hidden"):
        fused_lexical_max_pool(torch.zeros(2, 3), torch.zeros(4, 3), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_lexical_max_pool(torch.zeros(1, 2, 3), torch.zeros(4, 3), 0)


def test_autocast_bfloat16_matches_naive():
    """Under autocast both paths score in bf16 (same values, same tie rule); gradients agree to bf16."""
    hidden, codebook, grad_out = _inputs(3, 20, 16, 50, seed=7)
    results = []
    for fn in (naive_lexical_max_pool, lambda h, z: fused_lexical_max_pool(h, z, 7)):
        h, z = hidden.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(h, z)
        out.backward(grad_out.bfloat16())
        results.append((out.detach(), h.grad, z.grad))
    (ref, ref_h, ref_z), (out, grad_h, grad_z) = results
    assert out.dtype == torch.bfloat16 and grad_h.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # naive back-propagates through bf16 matmuls, fused accumulates in fp32: bf16-level agreement
    for got, want in ((grad_h, ref_h), (grad_z, ref_z)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_search_dtype_setting_selects_the_fast_search():
    """`lexical_max_pool(search_dtype=...)` (the config's `lexical.pool_search_dtype`) reaches the
    fused pool: "bfloat16" gives the fast search's values, "float32" the exact ones; others fail."""
    hidden, codebook, _ = _inputs(2, 32, 16, 200, seed=7)
    exact = naive_lexical_max_pool(hidden, codebook)
    fast = fused_lexical_max_pool(hidden, codebook, 64, search_dtype=torch.bfloat16)
    pool = lexical_max_pool
    torch.testing.assert_close(pool(hidden, codebook, chunk_size=64, search_dtype="float32"), exact)
    assert torch.equal(pool(hidden, codebook, chunk_size=64, search_dtype="bfloat16"), fast)
    with pytest.raises(ValueError, match="pool search dtype 'float16'"):
        pool(hidden, codebook, search_dtype="float16")


def test_auto_search_dtype_is_bf16_only_where_native(monkeypatch):
    """ "auto" searches in bf16 exactly when bf16 matmuls are native on the device, else exactly."""
    from lexvla.layers import lexical

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(lexical, "native_bf16_matmul", lambda device, native=native: native)
        assert lexical.pool_search_dtype("auto", cpu) == (torch.bfloat16 if native else None)
        assert lexical.pool_search_dtype("float32", cpu) is None
        assert lexical.pool_search_dtype("bfloat16", cpu) == torch.bfloat16
    assert lexical.native_bf16_matmul(torch.device("meta")) is False


@pytest.mark.parametrize("search", [None, torch.bfloat16])
def test_numba_kernels_match_the_torch_path(monkeypatch, search):
    """On the CPU in float32 the backward and the bf16 search's re-scoring run as numba loops
    (`_pool_kernels`); they give the torch path's values and gradients (words with a zero gradient
    included) on sizes that cover several vocabulary chunks."""
    pytest.importorskip("numba")
    from lexvla.layers import fused_pool

    hidden, codebook, grad_out = _inputs(5, 37, 24, 203, seed=11)
    grad_out[:, :40] = 0.0  # skipped entries must still leave zeros, not stale values
    calls = []
    real = fused_pool._numba_kernels

    def counting(*tensors):
        kernels = real(*tensors)
        calls.append(kernels is not None)
        return kernels

    def run():
        return _value_and_grads(
            lambda h, z: fused_lexical_max_pool(h, z, 64, search_dtype=search),
            hidden,
            codebook,
            grad_out,
        )

    monkeypatch.setattr(fused_pool, "_numba_kernels", counting)
    fast = run()
    assert calls and all(calls), "the float32 CPU path must use the numba kernels"
    monkeypatch.setattr(fused_pool, "_numba_kernels", lambda *t: None)
    reference = run()
    for name, f, r in zip(("values", "grad_hidden", "grad_codebook"), fast, reference):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(fast[2][:40], torch.zeros(40, 24))  # words with no gradient


def test_numba_kernels_leave_parameter_storage_resizable():
    """FSDP frees a gathered parameter by resizing its storage to 0 after use; `Tensor.numpy()`
    would pin the size for good ("Trying to resize storage that is not resizable")."""
    pytest.importorskip("numba")
    hidden, codebook, grad_out = _inputs(2, 9, 8, 30, seed=3)
    h, z = hidden.requires_grad_(True), codebook.requires_grad_(True)
    fused_lexical_max_pool(h, z, 16, search_dtype=torch.bfloat16).backward(grad_out)
    for tensor in (h, z, h.grad, z.grad):
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        storage.resize_(0)
        storage.resize_(size)


def test_bf16_search_argmax_kernel_equals_torch_max():
    """The bf16 search's arg-max loop (`first_max_index_bf16`, integer compares of the bf16 bits)
    picks torch.max's patch: the first maximal one, over negatives, infinities and many exact ties."""
    pytest.importorskip("numba")
    from lexvla.layers import _pool_kernels
    from lexvla.layers.fused_pool import _run_kernel

    gen = torch.Generator().manual_seed(5)
    scores = (torch.randn(6, 33, 300, generator=gen) * 4).round().bfloat16()  # few levels: ties
    scores[0, 7, :50] = float("inf")
    scores[1, :, :50] = float("-inf")  # every patch -inf: the first
    scores[2] = -scores[2].abs() - 1  # all negative
    index = torch.empty(6, 300, dtype=torch.int32)
    _run_kernel(_pool_kernels.first_max_index_bf16, scores.view(torch.int16), index)
    assert torch.equal(index.long(), scores.max(dim=1).indices)


def test_numba_backward_threads_agree():
    """The kernels split the words between threads; one and two threads give the same gradients
    (up to float32 summation order), and each thread count repeats its result exactly."""
    pytest.importorskip("numba")
    from lexvla.layers import _pool_kernels

    hidden, codebook, grad_out = _inputs(4, 16, 8, 301, seed=2)
    results, before = {}, torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)  # the kernels follow torch's thread count
            for repeat in range(2):
                results[threads, repeat] = _value_and_grads(
                    lambda h, z: fused_lexical_max_pool(h, z, 128), hidden, codebook, grad_out
                )
    finally:
        torch.set_num_threads(before)
    for threads in (1, 2):
        for a, b in zip(results[threads, 0], results[threads, 1]):
            assert torch.equal(a, b)
    for a, b in zip(results[1, 0], results[2, 0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _pool_kernels.use_threads(1) == 1
