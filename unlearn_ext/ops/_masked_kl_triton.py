"""Triton backend of fused_linear_masked_kl (DESIGN.md 4.2), wrapped as ``torch.library`` custom ops.

The launcher walks the tokens in chunks, as the C++ kernel does: both heads' logits of a chunk come
from one GEMM each (cuBLAS on GPUs), then ``_masked_kl_rows_kernel`` runs one program per token:

  1. one sweep over vocabulary tiles with an online softmax for both models at once: running maxima
     and rescaled sums of ``e^(s - m_s)``, ``e^(t - m_t)``, the masked ``e^(t - m_t)`` and the masked
     ``e^(t - m_t) (t - s)`` (s, t: current and reference logits / T), plus the temperature-1
     log-sum-exp and target logit of the cross-entropy;
  2. when gradients are wanted, a second sweep that writes ``dLoss/dz`` over the logits in place.

The chunk's gradient then feeds two more GEMMs (``dL/dh``, ``dL/dW``), so the forward returns the
gradients too and the autograd backward only scales them; ``reduction="none"`` and float16 (whose
``dLoss/dz`` needs the upstream gradient to stay clear of underflow) recompute in the backward op
instead (the memory mode: nothing ``[V, H]``-sized is saved). Under ``TRITON_INTERPRET=1`` every tile
is upcast to float32 (the interpreter's bf16 arithmetic is broken).
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
def _masked_kl_rows_kernel(
    z_ptr, r_ptr, vm_ptr, tgt_ptr, klrow_ptr, klc_ptr, cec_ptr, kl_out_ptr, ce_out_ptr,
    inv_t_ptr, V, stride_z, stride_r,
    HAS_MASK: tl.constexpr, RENORM: tl.constexpr, GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    r_row = r_ptr + row * stride_r
    tgt = tl.load(tgt_ptr + row)
    want_kl = tl.load(klrow_ptr + row) != 0
    want_ce = tgt >= 0
    neg = -1.0e30
    inv_t = tl.load(inv_t_ptr)  # a tensor, not a scalar argument: float64 runs need it exact

    m_s = tl.full([], neg, ACC)
    m_t = tl.full([], neg, ACC)
    m_c = tl.full([], neg, ACC)
    sum_s = tl.full([], 0.0, ACC)
    sum_t = tl.full([], 0.0, ACC)
    sum_m = tl.full([], 0.0, ACC)
    sum_x = tl.full([], 0.0, ACC)
    sum_c = tl.full([], 0.0, ACC)
    z_tgt = tl.full([], 0.0, ACC)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(z_row + offs, mask=inb, other=0.0).to(ACC)
        r = tl.load(r_row + offs, mask=inb, other=0.0).to(ACC)
        if HAS_MASK:
            kf = tl.load(vm_ptr + offs, mask=inb, other=0.0).to(ACC)
        else:
            kf = inb.to(ACC)
        if RENORM:
            dom = inb & (kf != 0)
        else:
            dom = inb
        s = z * inv_t
        t = r * inv_t
        s_d = tl.where(dom, s, neg)
        t_d = tl.where(dom, t, neg)
        new_s = tl.maximum(m_s, tl.max(s_d, 0))
        new_t = tl.maximum(m_t, tl.max(t_d, 0))
        e_s = tl.where(dom, tl.exp(s_d - new_s), 0.0)
        e_t = tl.where(dom, tl.exp(t_d - new_t), 0.0)
        scale_t = tl.exp(m_t - new_t)
        sum_s = sum_s * tl.exp(m_s - new_s) + tl.sum(e_s, 0)
        sum_t = sum_t * scale_t + tl.sum(e_t, 0)
        sum_m = sum_m * scale_t + tl.sum(kf * e_t, 0)
        sum_x = sum_x * scale_t + tl.sum(kf * e_t * (t - s), 0)
        m_s = new_s
        m_t = new_t
        # Cross-entropy at temperature 1 over every entry.
        z_c = tl.where(inb, z, neg)
        new_c = tl.maximum(m_c, tl.max(z_c, 0))
        sum_c = sum_c * tl.exp(m_c - new_c) + tl.sum(tl.where(inb, tl.exp(z_c - new_c), 0.0), 0)
        m_c = new_c
        z_tgt += tl.sum(tl.where(offs == tgt, z, 0.0), 0)

    kl_ok = want_kl & (sum_t > 0)
    sum_t_safe = tl.where(sum_t > 0, sum_t, 1.0)
    sum_s_safe = tl.where(sum_s > 0, sum_s, 1.0)
    lse_s = m_s + tl.log(sum_s_safe)
    lse_t = m_t + tl.log(sum_t_safe)
    pm = sum_m / sum_t_safe
    kl = sum_x / sum_t_safe - (lse_t - lse_s) * pm
    kl = tl.where(kl_ok, kl, 0.0)
    lse_c = m_c + tl.log(sum_c)
    ce = tl.where(want_ce, lse_c - z_tgt, 0.0)
    tl.store(kl_out_ptr + row, kl)
    tl.store(ce_out_ptr + row, ce)

    if GRAD:
        a = tl.where(kl_ok, tl.load(klc_ptr + row).to(ACC) * inv_t, 0.0)
        c = tl.where(want_ce, tl.load(cec_ptr + row).to(ACC), 0.0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            inb = offs < V
            z = tl.load(z_row + offs, mask=inb, other=0.0).to(ACC)
            r = tl.load(r_row + offs, mask=inb, other=0.0).to(ACC)
            if HAS_MASK:
                kf = tl.load(vm_ptr + offs, mask=inb, other=0.0).to(ACC)
            else:
                kf = inb.to(ACC)
            q = tl.exp(tl.minimum(z * inv_t - lse_s, 0.0))
            p = tl.exp(tl.minimum(r * inv_t - lse_t, 0.0))
            if RENORM:
                g = a * kf * (q - p)
            else:
                g = a * (pm * q - kf * p)
            g += c * (tl.exp(tl.minimum(z - lse_c, 0.0)) - (offs == tgt).to(ACC))
            tl.store(z_row + offs, g.to(z_ptr.dtype.element_ty), mask=inb)


def _run(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
    want_kl: bool, want_ce: bool, want: GradMask, kl_coef, ce_coef, temperature: float, ignore_index: int,
    renormalize: bool,
):  # fmt: skip
    """Per-token KL and CE (``[N]``, accumulation dtype) and the gradients ``want`` asks for (None for
    the others), for the per-token coefficients ``kl_coef`` / ``ce_coef`` (the C++ kernel's ``run``,
    chunk by chunk)."""
    n, h_dim = hidden.shape
    v = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    acc = accum_dtype(dt)
    grad = want.any()
    kl = torch.zeros(n, dtype=acc, device=dev)
    ce = torch.zeros(n, dtype=acc, device=dev)
    gh = gw = gb = gh_a = None
    if n == 0 or not (want_kl or want_ce):
        return kl, ce, *zero_grads(want, n, h_dim, v, dt, dev)
    kl_row = (token_mask if token_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)) & want_kl
    tgt = torch.full((n,), -1, dtype=torch.long, device=dev)
    if want_ce:
        tgt = torch.where(target != ignore_index, target.long(), tgt)
    if grad:
        kl_row = kl_row & (kl_coef != 0)
        tgt = torch.where(ce_coef != 0, tgt, -1)
    active = kl_row | (tgt >= 0)
    idx = active.nonzero().flatten()
    n_act = idx.numel()
    if n_act == 0:
        return kl, ce, *zero_grads(want, n, h_dim, v, dt, dev)
    gather = n_act < n

    def take(t):
        return t.index_select(0, idx) if gather else t

    h = take(hidden).contiguous()
    any_kl = bool(kl_row.any())
    hr = take(ref_hidden).contiguous() if any_kl else None
    kl_row_a = take(kl_row).to(torch.int32).contiguous()
    tgt_a = take(tgt).contiguous()
    klc_a = take(kl_coef).to(acc).contiguous() if grad else kl
    cec_a = take(ce_coef).to(acc).contiguous() if grad else ce
    kl_a = torch.zeros(n_act, dtype=acc, device=dev)
    ce_a = torch.zeros(n_act, dtype=acc, device=dev)
    if want.hidden:
        gh = torch.zeros(n, h_dim, dtype=dt, device=dev) if gather else torch.empty(n, h_dim, dtype=dt, device=dev)
        gh_a = torch.empty(n_act, h_dim, dtype=dt, device=dev) if gather else gh
    vm = vocab_mask.to(acc).contiguous() if vocab_mask is not None else kl_a
    env = "UNLEARN_EXT_KL_CHUNK_ROWS"
    rows = rows_for_grad(
        rows_per_chunk(v, env, hidden.element_size()), n_act, h_dim, dt, want.weight, env, gpu=dev.type == "cuda"
    )
    sums = None
    if want.weight or want.bias:
        sums = HeadGradSums(v, h_dim, want.weight, want.bias, dt, dev, -(-n_act // rows))
    zbuf = torch.empty(rows, v, dtype=dt, device=dev)
    rbuf = torch.empty(rows, v, dtype=dt, device=dev) if any_kl else None
    w = weight.contiguous()
    rw = ref_weight.contiguous() if any_kl else None
    block = block_v(v)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    inv_t = torch.full((1,), 1.0 / temperature, dtype=acc, device=dev)
    overflow = Float16Overflow(hidden)
    for n0 in range(0, n_act, rows):
        m = min(rows, n_act - n0)
        z = zbuf[:m]
        hc = h[n0 : n0 + m]
        logits_into(z, hc, w, bias)
        overflow.add(z)
        r = z
        if any_kl:
            r = rbuf[:m]
            logits_into(r, hr[n0 : n0 + m], rw, ref_bias)
            overflow.add(r)
        _masked_kl_rows_kernel[(m,)](
            z, r, vm, tgt_a[n0:], kl_row_a[n0:], klc_a[n0:], cec_a[n0:], kl_a[n0:], ce_a[n0:],
            inv_t, v, z.stride(0), r.stride(0),
            HAS_MASK=vocab_mask is not None, RENORM=bool(renormalize) and vocab_mask is not None, GRAD=grad,
            ACC=acc_tl, BLOCK_V=block,
        )  # fmt: skip
        if grad:
            accumulate_grads(z, hc, w, gh_a[n0 : n0 + m] if want.hidden else None, sums)
    overflow.check()
    if sums is not None:
        z = r = zbuf = rbuf = None  # freed before the sums are rounded
        gw, gb = sums.result()
    if gather:
        kl.index_copy_(0, idx, kl_a)
        ce.index_copy_(0, idx, ce_a)
        if want.hidden:
            gh.index_copy_(0, idx, gh_a)
    else:
        kl, ce = kl_a, ce_a
    return kl, ce, gh, gw, gb


def _validate(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature):
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    check_finite(
        {"hidden": hidden, "weight": weight, "ref_hidden": ref_hidden, "ref_weight": ref_weight, "bias": bias,
         "ref_bias": ref_bias}
    )  # fmt: skip


@torch.library.custom_op("unlearn_ext::fused_linear_masked_kl_triton", mutates_args=())
def fused_linear_masked_kl_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None,
    token_mask: torch.Tensor | None,
    vocab_mask: torch.Tensor | None,
    target: torch.Tensor | None,
    kl_weight: float,
    ce_weight: float,
    temperature: float,
    ignore_index: int,
    renormalize: bool,
    reduction: str,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton twin of ``torch.ops.unlearn_ext.fused_linear_masked_kl`` (same arguments and results;
    ``grad_mask`` is ``bool[]`` here, of length 3)."""
    _validate(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature)
    want = GradMask.of(grad_mask, bias is not None)
    compute_grad = want.any()
    if compute_grad and reduction == "none":
        raise ValueError("grad_mask is for reduction 'mean' or 'sum'; 'none' computes gradients in backward")
    n = hidden.shape[0]
    dev = hidden.device
    acc = accum_dtype(hidden.dtype)
    kl_tok = token_mask.to(acc) if token_mask is not None else torch.ones(n, dtype=acc, device=dev)
    ce_tok = (target != ignore_index).to(acc) if target is not None else torch.zeros(n, dtype=acc, device=dev)
    kl_div = kl_tok.sum().clamp_min(1) if reduction == "mean" else torch.ones((), dtype=acc, device=dev)
    ce_div = ce_tok.sum().clamp_min(1) if reduction == "mean" else torch.ones((), dtype=acc, device=dev)
    kl_coef = kl_tok * kl_weight / kl_div if compute_grad else None
    ce_coef = ce_tok * ce_weight / ce_div if compute_grad else None
    kl, ce, gh, gw, gb = _run(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
        kl_weight != 0, ce_weight != 0 and target is not None, want, kl_coef, ce_coef, temperature,
        ignore_index, renormalize,
    )  # fmt: skip
    if reduction == "none":
        loss = kl * kl_weight + ce * ce_weight
    else:
        loss = kl.sum() * kl_weight / kl_div + ce.sum() * ce_weight / ce_div
    return loss, *grads_or_empty(hidden, gh, gw, gb)


@torch.library.custom_op("unlearn_ext::fused_linear_masked_kl_backward_triton", mutates_args=())
def fused_linear_masked_kl_backward_triton(
    grad_kl: torch.Tensor,
    grad_ce: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None,
    token_mask: torch.Tensor | None,
    vocab_mask: torch.Tensor | None,
    target: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    renormalize: bool,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton twin of ``torch.ops.unlearn_ext.fused_linear_masked_kl_backward``."""
    _validate(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature)
    check_finite({"the incoming gradient": grad_kl, "the incoming gradient (CE)": grad_ce})
    want = GradMask.of(output_mask, bias is not None)
    if not want.any():
        return grads_or_empty(hidden, None, None, None)
    want_kl = bool((grad_kl != 0).any())
    want_ce = target is not None and bool((grad_ce != 0).any())
    _, _, gh, gw, gb = _run(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
        want_kl, want_ce, want, grad_kl, grad_ce, temperature, ignore_index, renormalize,
    )  # fmt: skip
    return grads_or_empty(hidden, gh, gw, gb)


def register(forward_fake, backward_fake, make_autograd) -> None:
    """Fake kernels and autograd (shared with the C++ op; ``make_autograd(backward_op)``)."""
    fused_linear_masked_kl_triton.register_fake(forward_fake)
    fused_linear_masked_kl_backward_triton.register_fake(backward_fake)
    backward, setup = make_autograd(torch.ops.unlearn_ext.fused_linear_masked_kl_backward_triton)
    fused_linear_masked_kl_triton.register_autograd(backward, setup_context=setup)
