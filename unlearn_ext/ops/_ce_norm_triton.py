"""Triton backend of fused_linear_ce_norm (DESIGN.md 4.3), wrapped as ``torch.library`` custom ops.

The launcher walks the rows in chunks, as the C++ kernel does: a chunk's logits come from one GEMM
(cuBLAS on GPUs), then ``_ce_norm_rows_kernel`` runs one program per row:

  1. one sweep over vocabulary tiles: an online log-sum-exp and the target logit (retained row), or
     the sum of squares (forgotten row);
  2. when gradients are wanted, a second sweep that writes ``coef * dvalue/dz`` over the logits.

The chunk's gradient then feeds two more GEMMs (``dL/dh``, ``dL/dW``), so the forward returns the
gradients too and the autograd backward only scales them; ``reduction="none"`` and float16 (whose
``dLoss/dz`` needs the upstream gradient to stay clear of underflow) recompute in the backward op
instead (nothing ``[V, H]``-sized is saved). Under ``TRITON_INTERPRET=1`` every tile is upcast to
float32 (the interpreter's bf16 arithmetic is broken).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearn_ext.ops._common import accum_dtype
from unlearn_ext.ops._head_chunks import (
    Float16Overflow,
    GradMask,
    HeadGradSums,
    accumulate_grads,
    block_v,
    check_finite,
    grads_or_empty,
    logits_into,
    rows_for_grad,
    rows_per_chunk,
    zero_grads,
)


@triton.jit
def _ce_norm_rows_kernel(
    z_ptr, tgt_ptr, forget_ptr, coef_ptr, out_ptr, V, stride_z,
    SQUARED: tl.constexpr, GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    tgt = tl.load(tgt_ptr + row)
    forget = tl.load(forget_ptr + row) != 0
    neg = -1.0e30
    m = tl.full([], neg, ACC)
    se = tl.full([], 0.0, ACC)
    ss = tl.full([], 0.0, ACC)
    z_tgt = tl.full([], 0.0, ACC)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(z_row + offs, mask=inb, other=0.0).to(ACC)
        if forget:
            ss += tl.sum(z * z, 0)
        else:
            z_d = tl.where(inb, z, neg)
            new_m = tl.maximum(m, tl.max(z_d, 0))
            se = se * tl.exp(m - new_m) + tl.sum(tl.where(inb, tl.exp(z_d - new_m), 0.0), 0)
            m = new_m
            z_tgt += tl.sum(tl.where(offs == tgt, z, 0.0), 0)
    norm = tl.sqrt(ss)
    lse = m + tl.log(tl.where(se > 0, se, 1.0))
    if SQUARED:
        pen = ss
    else:
        pen = norm
    value = tl.where(forget, pen, lse - z_tgt)
    tl.store(out_ptr + row, value)

    if GRAD:
        c = tl.load(coef_ptr + row).to(ACC)
        if SQUARED:
            scale = 2.0 * c
        else:
            scale = tl.where(norm > 0, c / tl.where(norm > 0, norm, 1.0), 0.0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            inb = offs < V
            z = tl.load(z_row + offs, mask=inb, other=0.0).to(ACC)
            if forget:
                g = scale * z
            else:
                g = c * (tl.exp(tl.minimum(z - lse, 0.0)) - (offs == tgt).to(ACC))
            tl.store(z_row + offs, g.to(z_ptr.dtype.element_ty), mask=inb)


def _check_targets(target, forget_mask, vocab: int, ignore_index: int) -> None:
    """Class ids of retained rows must be in [0, V) (a forgotten row's id is unused)."""
    rows = target != ignore_index
    if forget_mask is not None:
        rows &= ~forget_mask
    ids = target[rows]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(
            f"target ids of retained rows must be in [0, {vocab}) or ignore_index ({ignore_index}), got {bad}"
        )


def _run(hidden, weight, bias, target, forget_mask, squared: bool, want: GradMask, coef, ignore_index: int):
    """Per-row values (``[N]``, accumulation dtype: CE_n or the norm, 0 on ignored rows) and the
    gradients ``want`` asks for (None for the others) for ``coef`` (``[N]``, dLoss/d value_n; used
    when any is wanted): the C++ driver's ``run``."""
    n, h_dim = hidden.shape
    v = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    acc = accum_dtype(dt)
    grad = want.any()
    values = torch.zeros(n, dtype=acc, device=dev)
    active = target != ignore_index
    if grad:
        active &= coef != 0
    idx = active.nonzero().flatten()
    n_act = idx.numel()
    if n_act == 0:
        return values, *zero_grads(want, n, h_dim, v, dt, dev)
    gather = n_act < n

    def take(t):
        return t.index_select(0, idx) if gather else t

    forget = forget_mask if forget_mask is not None else torch.zeros(n, dtype=torch.bool, device=dev)
    h = take(hidden).contiguous()
    tgt_a = take(target).long().contiguous()
    forget_a = take(forget).to(torch.int32).contiguous()
    coef_a = take(coef).to(acc).contiguous() if grad else values
    val_a = torch.zeros(n_act, dtype=acc, device=dev)
    gh = gw = gb = gh_a = None
    if want.hidden:
        gh = torch.zeros(n, h_dim, dtype=dt, device=dev) if gather else torch.empty(n, h_dim, dtype=dt, device=dev)
        gh_a = torch.empty(n_act, h_dim, dtype=dt, device=dev) if gather else gh
    env = "UNLEARN_EXT_CE_CHUNK_ROWS"
    rows = rows_for_grad(
        rows_per_chunk(v, env, hidden.element_size()), n_act, h_dim, dt, want.weight, env, gpu=dev.type == "cuda"
    )
    sums = None
    if want.weight or want.bias:
        sums = HeadGradSums(v, h_dim, want.weight, want.bias, dt, dev, -(-n_act // rows))
    zbuf = torch.empty(rows, v, dtype=dt, device=dev)
    w = weight.contiguous()
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    overflow = Float16Overflow(hidden)
    for n0 in range(0, n_act, rows):
        m = min(rows, n_act - n0)
        z = zbuf[:m]
        hc = h[n0 : n0 + m]
        logits_into(z, hc, w, bias)
        overflow.add(z)
        _ce_norm_rows_kernel[(m,)](
            z, tgt_a[n0:], forget_a[n0:], coef_a[n0:], val_a[n0:], v, z.stride(0),
            SQUARED=bool(squared), GRAD=grad, ACC=acc_tl, BLOCK_V=block_v(v),
        )  # fmt: skip
        if grad:
            accumulate_grads(z, hc, w, gh_a[n0 : n0 + m] if want.hidden else None, sums)
    overflow.check()
    if sums is not None:
        z = zbuf = None  # freed before the sums are rounded
        gw, gb = sums.result()
    if gather:
        values.index_copy_(0, idx, val_a)
        if want.hidden:
            gh.index_copy_(0, idx, gh_a)
    else:
        values = val_a
    return values, gh, gw, gb


def _row_weights(target, forget_mask, norm_weight: float, ignore_index: int, reduction: str, acc):
    """(weight of value_n in the loss [N], per-row multiplier of value_n in reduction 'none' [N])."""
    valid = target != ignore_index
    forget = forget_mask if forget_mask is not None else torch.zeros_like(valid)
    f_rows, c_rows = (valid & forget).to(acc), (valid & ~forget).to(acc)
    per_row = c_rows + f_rows * norm_weight
    if reduction == "mean":
        return c_rows / c_rows.sum().clamp_min(1) + f_rows * norm_weight / f_rows.sum().clamp_min(1), per_row
    return per_row, per_row


@torch.library.custom_op("unlearn_ext::fused_linear_ce_norm_triton", mutates_args=())
def fused_linear_ce_norm_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    forget_mask: torch.Tensor | None,
    norm_weight: float,
    squared: bool,
    ignore_index: int,
    reduction: str,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton twin of ``torch.ops.unlearn_ext.fused_linear_ce_norm`` (same arguments and results;
    ``grad_mask`` is ``bool[]`` here, of length 3)."""
    check_finite({"hidden": hidden, "weight": weight, "bias": bias})
    _check_targets(target, forget_mask, weight.shape[0], ignore_index)
    want = GradMask.of(grad_mask, bias is not None)
    if want.any() and reduction == "none":
        raise ValueError("grad_mask is for reduction 'mean' or 'sum'; 'none' computes gradients in backward")
    acc = accum_dtype(hidden.dtype)
    row_w, per_row = _row_weights(target, forget_mask, norm_weight, ignore_index, reduction, acc)
    values, gh, gw, gb = _run(hidden, weight, bias, target, forget_mask, squared, want, row_w, ignore_index)
    loss = values * per_row if reduction == "none" else (values * row_w).sum()
    return loss, *grads_or_empty(hidden, gh, gw, gb)


@torch.library.custom_op("unlearn_ext::fused_linear_ce_norm_backward_triton", mutates_args=())
def fused_linear_ce_norm_backward_triton(
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    forget_mask: torch.Tensor | None,
    norm_weight: float,
    squared: bool,
    ignore_index: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton twin of ``torch.ops.unlearn_ext.fused_linear_ce_norm_backward``."""
    check_finite({"hidden": hidden, "weight": weight, "bias": bias, "the incoming gradient": grad_rows})
    _check_targets(target, forget_mask, weight.shape[0], ignore_index)
    want = GradMask.of(output_mask, bias is not None)
    if not want.any():
        return grads_or_empty(hidden, None, None, None)
    acc = accum_dtype(hidden.dtype)
    scale = torch.ones_like(grad_rows, dtype=acc)
    if forget_mask is not None:
        scale = torch.where(forget_mask, torch.full_like(scale, norm_weight), scale)
    coef = grad_rows.to(acc) * scale
    _, gh, gw, gb = _run(hidden, weight, bias, target, forget_mask, squared, want, coef, ignore_index)
    return grads_or_empty(hidden, gh, gw, gb)


def register(forward_fake, backward_fake, make_autograd) -> None:
    """Fake kernels and autograd (shared with the C++ op; ``make_autograd(backward_op)``)."""
    fused_linear_ce_norm_triton.register_fake(forward_fake)
    fused_linear_ce_norm_backward_triton.register_fake(backward_fake)
    backward, setup = make_autograd(torch.ops.unlearn_ext.fused_linear_ce_norm_backward_triton)
    fused_linear_ce_norm_triton.register_autograd(backward, setup_context=setup)
