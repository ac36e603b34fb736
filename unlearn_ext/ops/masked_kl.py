"""Masked KL fused with the LM head (SIU's loss), DESIGN.md 4.2.

``fused_linear_masked_kl`` computes ``kl_weight * KL(p_ref || q)`` restricted to a token mask and a
vocabulary mask, plus ``ce_weight * CE``, from the hidden states and LM-head weights of both the
current and the reference (frozen) model, without materialising either model's ``[N, V]`` logits.

Backends: ``cpp`` (C++ CPU kernel: token chunks, gradients computed in the forward pass with ATen
GEMMs per chunk), ``triton`` (the same chunking with a Triton row kernel: online softmax over
vocabulary tiles for both models in one sweep; on the CPU only under ``TRITON_INTERPRET=1``),
``cuda`` (the same chunk driver with cuBLAS GEMMs and a CUDA row kernel; float32/float64 and
bfloat16/float16 with float32 arithmetic), ``reference`` (plain PyTorch on full logits).
"""

from __future__ import annotations

import math

import torch

from unlearn_ext import _loader
from unlearn_ext._triton import HAS_TRITON
from unlearn_ext.ops import _reference
from unlearn_ext.ops._common import (
    _is_tracing,
    accum_dtype,
    check_float,
    check_same_device,
    check_tensor,
    head_grad_fakes,
    head_grad_mask,
    output_mask,
    resolve_backend,
    scale_saved_grads,
)

__all__ = ["fused_linear_masked_kl"]

OP = "fused_linear_masked_kl"

if HAS_TRITON:
    from unlearn_ext.ops import _masked_kl_triton
else:  # pragma: no cover - exercised only without Triton
    _masked_kl_triton = None
REDUCTIONS = ("mean", "sum", "none")


def fused_linear_masked_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    vocab_mask: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    kl_weight: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    renormalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Masked ``KL(reference || current)`` plus optional cross-entropy, fused with both LM heads.

    Args:
        hidden: ``[N, H]`` hidden states of the model being trained (one row per token).
        weight: ``[V, H]`` its LM-head weight; ``bias`` ``[V]`` optional.
        ref_hidden: ``[N, H_ref]`` hidden states of the reference model (no gradient flows to them).
        ref_weight: ``[V, H_ref]`` the reference LM head; ``ref_bias`` ``[V]`` optional.
        token_mask: bool ``[N]``; True: the token is in the KL (default: every token).
        vocab_mask: bool ``[V]``; True: the vocabulary entry is in the KL sum (default: all).
        target: integer ``[N]`` class ids for the cross-entropy (``ignore_index`` skips a token).
        ce_weight, kl_weight: weights of the two terms (``ce_weight != 0`` needs ``target``).
        temperature: both models' logits are divided by it inside the KL (not the CE).
        renormalize: both softmaxes of the KL run over the kept vocabulary entries only.
        reduction: ``"mean"`` (each term divided by its own token count; an empty term is 0),
            ``"sum"`` or ``"none"`` (``[N]`` per-token losses).
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Per token n: ``KL_n = sum_v vocab_mask[v] * p_v * (log p_v - log q_v)`` with ``p``, ``q`` the
    softmaxes of the reference and current logits over all V entries (over the kept ones when
    ``renormalize``). Returns a scalar (mean/sum) or ``[N]`` (none) in the accumulation dtype.
    """
    _check_args(
        hidden, weight, ref_hidden, ref_weight, bias, ref_bias, token_mask, vocab_mask, target,
        ce_weight, kl_weight, temperature, ignore_index, renormalize, reduction,
    )  # fmt: skip
    be = resolve_backend(backend, hidden.device, OP)
    if be == "reference":
        return _reference.fused_linear_masked_kl_reference(
            hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, token_mask=token_mask,
            vocab_mask=vocab_mask, target=target, ce_weight=ce_weight, kl_weight=kl_weight,
            temperature=temperature, ignore_index=ignore_index, renormalize=renormalize, reduction=reduction,
        )  # fmt: skip
    op = (
        torch.ops.unlearn_ext.fused_linear_masked_kl_triton
        if be == "triton"
        else torch.ops.unlearn_ext.fused_linear_masked_kl
    )
    loss, _, _, _ = op(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
        float(kl_weight), float(ce_weight), float(temperature), int(ignore_index), bool(renormalize), reduction,
        head_grad_mask(hidden, weight, bias, reduction),
    )  # fmt: skip
    return loss


# --------------------------------------------------------------------------------------------
# Argument checks (shared by every backend)
# --------------------------------------------------------------------------------------------


def _check_args(
    hidden, weight, ref_hidden, ref_weight, bias, ref_bias, token_mask, vocab_mask, target,
    ce_weight, kl_weight, temperature, ignore_index, renormalize, reduction,
) -> None:  # fmt: skip
    for t, name in ((hidden, "hidden"), (weight, "weight"), (ref_hidden, "ref_hidden"), (ref_weight, "ref_weight")):
        check_tensor(t, name)
        check_float(t, name)
        if t.dim() != 2:
            layout = {"hidden": "[N, H]", "weight": "[V, H]", "ref_hidden": "[N, H_ref]", "ref_weight": "[V, H_ref]"}
            raise ValueError(f"{name} must be 2-D {layout[name]}, got shape {list(t.shape)}")
    for t, name in ((weight, "weight"), (ref_hidden, "ref_hidden"), (ref_weight, "ref_weight")):
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight must be [V, {h}] (hidden's width), got {list(weight.shape)}")
    if ref_hidden.shape[0] != n:
        raise ValueError(f"ref_hidden must have hidden's {n} rows, got {list(ref_hidden.shape)}")
    if tuple(ref_weight.shape) != (v, ref_hidden.shape[1]):
        raise ValueError(
            f"ref_weight must be [{v}, {ref_hidden.shape[1]}] (weight's vocabulary, ref_hidden's width), "
            f"got {list(ref_weight.shape)}"
        )
    if v == 0:
        raise ValueError("weight must have at least one vocabulary row")
    named = [("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight)]
    for t, name, size, what in (
        (bias, "bias", v, "one entry per vocabulary row"),
        (ref_bias, "ref_bias", v, "one entry per vocabulary row"),
        (token_mask, "token_mask", n, "one flag per token"),
        (vocab_mask, "vocab_mask", v, "one flag per vocabulary entry"),
        (target, "target", n, "one class id per token"),
    ):
        if t is None:
            continue
        check_tensor(t, name)
        if t.shape != (size,):
            raise ValueError(f"{name} must have shape [{size}] ({what}), got {list(t.shape)}")
        named.append((name, t))
    check_same_device(named)
    for t, name in ((bias, "bias"), (ref_bias, "ref_bias")):
        if t is not None and t.dtype != hidden.dtype:
            raise ValueError(f"{name} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
    for t, name in ((token_mask, "token_mask"), (vocab_mask, "vocab_mask")):
        if t is not None and t.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    if target is not None and (target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool):
        raise ValueError(f"target must be an integer tensor of class ids, got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    for value, name in ((kl_weight, "kl_weight"), (ce_weight, "ce_weight"), (temperature, "temperature")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if ce_weight != 0 and target is None:
        raise ValueError(f"ce_weight={ce_weight} needs target (the class id of every token)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be a bool, got {renormalize!r}")
    if target is not None and n > 0 and not _is_tracing(target):
        valid = target[target != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= v):
            bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
            raise ValueError(f"target ids must be in [0, {v}) or ignore_index ({ignore_index}), got {bad}")


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops
# --------------------------------------------------------------------------------------------


def _forward_fake(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
    kl_weight, ce_weight, temperature, ignore_index, renormalize, reduction, grad_mask,
):  # fmt: skip
    acc = accum_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    return loss, *head_grad_fakes(hidden, weight, bias, grad_mask)


def _backward_fake(
    grad_kl, grad_ce, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
    temperature, ignore_index, renormalize, output_mask,
):  # fmt: skip
    return head_grad_fakes(hidden, weight, bias, output_mask)


def make_autograd(backward_op):
    """(backward, setup_context) of a forward op whose recompute path calls ``backward_op``."""

    def setup_context(ctx, inputs, output) -> None:
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
         kl_weight, ce_weight, temperature, ignore_index, renormalize, reduction, grad_mask) = inputs  # fmt: skip
        _, gh, gw, gb = output
        ctx.mark_non_differentiable(gh, gw, gb)
        ctx.has_bias = bias is not None
        ctx.grad_mask = output_mask(grad_mask, bias is not None)  # what the forward computed
        compute_grad = any(ctx.grad_mask)
        ctx.options = (kl_weight, ce_weight, temperature, ignore_index, renormalize, reduction, compute_grad)
        if compute_grad:  # the forward already computed the gradients of the loss: backward only scales them
            ctx.save_for_backward(gh, gw, gb)
        else:
            ctx.save_for_backward(
                hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target
            )

    def backward(ctx, grad_loss, _gh, _gw, _gb):
        kl_weight, ce_weight, temperature, ignore_index, renormalize, reduction, compute_grad = ctx.options
        needs = ctx.needs_input_grad
        if compute_grad:
            dh, dw, db = scale_saved_grads(ctx.saved_tensors, grad_loss, needs, ctx.has_bias, ctx.grad_mask)
        else:
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target = ctx.saved_tensors
            n = hidden.shape[0]
            acc = grad_loss.dtype
            tm = torch.ones(n, dtype=acc, device=hidden.device) if token_mask is None else token_mask.to(acc)
            valid = (
                torch.zeros(n, dtype=acc, device=hidden.device) if target is None else (target != ignore_index).to(acc)
            )
            gk, gc = grad_loss * kl_weight * tm, grad_loss * ce_weight * valid
            if reduction == "mean":
                gk, gc = gk / tm.sum().clamp_min(1), gc / valid.sum().clamp_min(1)
            dh, dw, db = backward_op(
                gk, gc, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
                temperature, ignore_index, renormalize, output_mask(needs, ctx.has_bias),
            )  # fmt: skip
            dh = dh if needs[0] else None
            dw = dw if needs[1] else None
            db = db if ctx.has_bias and needs[2] else None
        return dh, dw, db, *([None] * 13)

    return backward, setup_context


def _register_compiled_ops() -> None:
    lib = "unlearn_ext::"
    torch.library.register_fake(lib + OP)(_forward_fake)
    torch.library.register_fake(lib + OP + "_backward")(_backward_fake)
    backward, setup = make_autograd(torch.ops.unlearn_ext.fused_linear_masked_kl_backward)
    torch.library.register_autograd(lib + OP, backward, setup_context=setup)


if _loader.extension_loaded():
    _register_compiled_ops()

if _masked_kl_triton is not None:
    _masked_kl_triton.register(_forward_fake, _backward_fake, make_autograd)
