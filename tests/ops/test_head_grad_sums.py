"""The LM-head weight gradient summed over chunks of tokens (unlearn_ext.ops._head_chunks, mirrored
by csrc/include/unlearn_ext/linear_head.h): in bfloat16/float16 the error must stay within 2x one
GEMM's (DESIGN.md 6) however many chunks there are, and the chunk-size policy that keeps few chunks."""

from __future__ import annotations

import pytest
import torch

from unlearn_ext.ops._common import head_grad_mask, output_mask, scale_saved_grads
from unlearn_ext.ops._head_chunks import (
    MAX_LOW_PRECISION_CHUNKS,
    MIN_GPU_CHUNK_ROWS,
    HeadGradSums,
    rows_for_grad,
    rows_per_chunk,
)

ENV = "UNLEARN_EXT_TEST_CHUNK_ROWS"


def _shared_direction_inputs(n, h, v, dtype, seed=0):
    """Hidden states with a common direction (as LM hidden states have) and a softmax-shaped dLoss/dz:
    their column sums grow with n, so each rounding of a partial sum costs as much as the final one."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) + 1.0
    logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    dz = (torch.softmax(logits, 1) - torch.softmax(logits + 0.3 * torch.randn(n, v, generator=g), 1)) / n
    return dz.to(dtype), hidden.to(dtype)


def _err(a, want):
    return float((a.double() - want).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunks", [1, 2, 3, 8, 64])
def test_low_precision_sums_stay_within_twice_one_gemm(dtype, chunks):
    n, h, v = 1024, 48, 300
    dz, hidden = _shared_direction_inputs(n, h, v, dtype)
    want_w = dz.double().T @ hidden.double()
    want_b = dz.double().sum(0)
    one_gemm = dz.T @ hidden  # plain PyTorch: one GEMM, one rounding
    one_sum = dz.sum(0)
    sums = HeadGradSums(v, h, True, True, dtype, "cpu", chunks)
    m = -(-n // chunks)
    for n0 in range(0, n, m):
        sums.add(dz[n0 : n0 + m], hidden[n0 : n0 + m])
    gw, gb = sums.result()
    assert gw.dtype == dtype and gb.dtype == dtype
    assert _err(gw, want_w) <= 2 * _err(one_gemm, want_w)
    assert _err(gb, want_b) <= 2 * _err(one_sum, want_b) + 1e-12


@pytest.mark.parametrize("chunks", [8, 64])
def test_summing_many_chunks_in_bfloat16_would_break_the_bound(chunks):
    """The control: the same data summed in place in bfloat16 is past 2x at 8 and 64 chunks, so the
    test above can fail (this is what the float32 sums fix)."""
    n, h, v = 1024, 48, 300
    dz, hidden = _shared_direction_inputs(n, h, v, torch.bfloat16)
    want = dz.double().T @ hidden.double()
    m = n // chunks
    acc = dz[:m].T @ hidden[:m]
    for n0 in range(m, n, m):
        acc.addmm_(dz[n0 : n0 + m].T, hidden[n0 : n0 + m])
    assert _err(acc, want) > 2 * _err(dz.T @ hidden, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sums_with_no_chunk_are_zero_and_without_bias_none(dtype):
    sums = HeadGradSums(7, 3, True, False, dtype, "cpu", 20)
    gw, gb = sums.result()
    assert gb is None and gw.dtype == dtype and not gw.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_head_allocates_no_weight_gradient(dtype):
    """With weight=False only the bias gradient is summed (what a frozen head's loss needs: none, or
    the bias alone); with neither, nothing is allocated."""
    g = torch.Generator().manual_seed(3)
    dz, h = torch.randn(9, 7, generator=g).to(dtype), torch.randn(9, 3, generator=g).to(dtype)
    sums = HeadGradSums(7, 3, False, True, dtype, "cpu", 1000)
    assert sums.gw is None
    for n0 in range(0, 9, 4):
        sums.add(dz[n0 : n0 + 4], h[n0 : n0 + 4])
    gw, gb = sums.result()
    assert gw is None and gb.dtype == dtype
    torch.testing.assert_close(gb, dz.double().sum(0).to(dtype))  # float32 sums: one rounding at the end
    none = HeadGradSums(7, 3, False, False, dtype, "cpu", 1000)
    none.add(dz, h)
    assert none.gw is None and none.gb is None and none.result() == (None, None)


def test_a_gradient_the_forward_did_not_compute_is_an_error():
    saved = (torch.ones(5, 4), torch.empty(0), torch.empty(0))
    dh, dw, db = scale_saved_grads(saved, torch.tensor(2.0), (True, False, False), True, (True, False, False))
    assert torch.equal(dh, torch.full((5, 4), 2.0)) and dw is None and db is None
    with pytest.raises(RuntimeError, match="gradient of weight is needed but the forward did not compute it"):
        scale_saved_grads(saved, torch.tensor(2.0), (True, True, False), True, (True, False, False))
    # No bias: a bias flag in needs is not an error.
    scale_saved_grads(saved, torch.tensor(2.0), (True, False, True), False, (True, False, False))


def test_float32_heads_sum_in_place_whatever_the_chunk_count():
    sums = HeadGradSums(7, 3, True, True, torch.float32, "cpu", 1000)
    assert sums.gw.dtype == torch.float32 and sums.gb.dtype == torch.float32
    low = HeadGradSums(7, 3, True, True, torch.bfloat16, "cpu", MAX_LOW_PRECISION_CHUNKS)
    assert low.gw.dtype == torch.bfloat16 and low.gb.dtype == torch.float32
    assert HeadGradSums(7, 3, True, True, torch.bfloat16, "cpu", MAX_LOW_PRECISION_CHUNKS + 1).gw.dtype == torch.float32


def test_rows_for_grad_takes_a_quarter_of_the_weight_per_chunk(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    v, h, n = 128256, 4096, 8192
    rows = rows_per_chunk(v, ENV, elem_size=2)
    assert rows == (32 << 20) // (v * 2)  # 130: 64 chunks at the default budget
    raised = rows_for_grad(rows, n, h, torch.bfloat16, True, ENV)
    assert raised == h // 4 and raised * v * 2 == v * h * 2 // 4  # 8 chunks, each a quarter of |W|
    # Not raised: float32, or no weight gradient; never more than n.
    assert rows_for_grad(rows, n, h, torch.float32, True, ENV) == rows
    assert rows_for_grad(rows, n, h, torch.bfloat16, False, ENV) == rows
    assert rows_for_grad(rows, 50, h, torch.bfloat16, True, ENV) == 50
    # Up to hidden_dim / 2 tokens fit in MAX_LOW_PRECISION_CHUNKS chunks: no float32 sums.
    assert -(-(h // 2) // rows_for_grad(rows, h // 2, h, torch.float16, True, ENV)) == MAX_LOW_PRECISION_CHUNKS


def test_rows_set_in_the_environment_are_kept(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert rows_per_chunk(1000, ENV) == 3
    assert rows_for_grad(3, 8192, 4096, torch.bfloat16, True, ENV) == 3
    monkeypatch.setenv(ENV, "0")
    with pytest.raises(ValueError, match=ENV):
        rows_per_chunk(1000, ENV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upstream_gradient_scales_in_full_precision(dtype):
    """A fused loss's saved gradients times the upstream gradient: one rounding of the exact product
    (0.3 rounded to bfloat16 first would scale every entry by 0.30078)."""
    g = torch.Generator().manual_seed(0)
    saved = tuple(torch.randn(*s, generator=g).to(dtype) for s in ((5, 4), (7, 4), (7,)))
    up = torch.tensor(0.3, dtype=torch.float32)
    gh, gw, gb = scale_saved_grads(saved, up, (True, True, True), True, (True, True, True))
    for got, t in zip((gh, gw, gb), saved, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, (t.double() * 0.3).to(dtype))
    unit = scale_saved_grads(saved, torch.tensor(1.0), (True, True, False), True, (True, True, True))
    assert unit[0] is saved[0] and unit[1] is saved[1] and unit[2] is None  # no copy at exactly 1


def test_head_grad_mask_follows_requires_grad_and_grad_mode():
    h = torch.zeros(2, 3, requires_grad=True)
    w, b = torch.zeros(4, 3), torch.zeros(4, requires_grad=True)
    assert head_grad_mask(h, w, b, "mean") == [True, False, True]
    assert head_grad_mask(h, w, None, "sum") == [True, False, False]
    assert head_grad_mask(h, w, b, "none") == [False, False, False]  # computed in the backward op
    half = h.detach().half().requires_grad_(True)
    assert head_grad_mask(half, w.half(), None, "mean") == [False, False, False]  # float16: in the backward too
    assert head_grad_mask(h.detach().bfloat16().requires_grad_(True), w, None, "mean") == [True, False, False]
    with torch.no_grad():
        assert head_grad_mask(h, w, b, "mean") == [False, False, False]
    assert output_mask((True, True, True, False), has_bias=False) == [True, True, False]
    assert output_mask([False, True, True], has_bias=True) == [False, True, True]


def test_rows_on_a_gpu_are_at_least_min_gpu_chunk_rows(monkeypatch):
    """On a GPU a chunk is at least MIN_GPU_CHUNK_ROWS tokens (GEMMs of 130 rows would be bound by
    reading the weight); the quarter-weight rule of a low-precision weight gradient can be larger."""
    monkeypatch.delenv(ENV, raising=False)
    rows = rows_per_chunk(128256, ENV, elem_size=2)
    assert rows == 130
    assert rows_for_grad(rows, 8192, 4096, torch.bfloat16, False, ENV, gpu=True) == MIN_GPU_CHUNK_ROWS
    assert rows_for_grad(rows, 8192, 4096, torch.bfloat16, True, ENV, gpu=True) == 4096 // 4
    assert rows_for_grad(rows, 300, 4096, torch.float32, False, ENV, gpu=True) == 300  # never more than n
    assert rows_for_grad(rows, 8192, 4096, torch.float32, False, ENV) == rows  # the CPU keeps its budget
    monkeypatch.setenv(ENV, "7")
    assert rows_for_grad(7, 8192, 4096, torch.bfloat16, False, ENV, gpu=True) == 7
