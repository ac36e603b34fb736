"""Cross-entropy fused with a norm penalty and the classifier head (OPC's loss), DESIGN.md 4.3.

``fused_linear_ce_norm`` computes, from hidden states and the head's weight, cross-entropy on the
retained rows and ``norm_weight * ||z||^2`` (or ``||z||``) on the forgotten rows, ``z`` being the
row's logits, without materialising the ``[N, V]`` logits.

Backends: ``cpp`` (C++ CPU kernel: row chunks, gradients computed in the forward pass with ATen GEMMs
per chunk), ``triton`` (the same chunking with a Triton row kernel: online log-sum-exp over vocabulary
tiles and a second sweep writing the gradient; on the CPU only under ``TRITON_INTERPRET=1``), ``cuda``
(the same chunk driver with cuBLAS GEMMs and a CUDA row kernel; float32/float64 and bfloat16/float16
with float32 arithmetic), ``reference`` (plain PyTorch on full logits).
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

__all__ = ["fused_linear_ce_norm"]

OP = "fused_linear_ce_norm"
REDUCTIONS = ("mean", "sum", "none")

if HAS_TRITON:
    from unlearn_ext.ops import _ce_norm_triton
else:  # pragma: no cover - exercised only without Triton
    _ce_norm_triton = None


def fused_linear_ce_norm(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    forget_mask: torch.Tensor | None = None,
    norm_weight: float = 1.0,
    squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy on retained rows plus a norm penalty on forgotten rows, fused with the head.

    Args:
        hidden: ``[N, H]`` features (one row per sample or token).
        weight: ``[V, H]`` the head's weight (V classes or vocabulary entries); ``bias`` ``[V]``.
        target: integer ``[N]`` class ids. A row whose id is ``ignore_index`` contributes nothing
            (to either term); a forgotten row's id is otherwise unused.
        forget_mask: bool ``[N]``; True: the row is forgotten and contributes
            ``norm_weight * ||z_n||^2`` (``||z_n||`` when ``squared=False``), ``z_n = hidden_n @
            weight.T + bias``; False (default for every row): the row contributes ``CE(z_n, target_n)``.
        reduction: ``"mean"`` (each term divided by its own row count; an empty term is 0), ``"sum"``
            or ``"none"`` (``[N]`` per-row losses, 0 on ignored rows).
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns a scalar (mean/sum) or ``[N]`` (none) in the accumulation dtype (float64 for float64
    inputs, else float32). The unsquared norm's gradient at ``z = 0`` is 0.
    """
    _check_args(hidden, weight, target, bias, forget_mask, norm_weight, squared, ignore_index, reduction)
    be = resolve_backend(backend, hidden.device, OP)
    if be == "reference":
        return _reference.fused_linear_ce_norm_reference(
            hidden, weight, target, bias=bias, forget_mask=forget_mask, norm_weight=norm_weight, squared=squared,
            ignore_index=ignore_index, reduction=reduction,
        )  # fmt: skip
    op = (
        torch.ops.unlearn_ext.fused_linear_ce_norm_triton
        if be == "triton"
        else torch.ops.unlearn_ext.fused_linear_ce_norm
    )
    loss, _, _, _ = op(
        hidden, weight, bias, target, forget_mask, float(norm_weight), bool(squared), int(ignore_index), reduction,
        head_grad_mask(hidden, weight, bias, reduction),
    )  # fmt: skip
    return loss


def _check_args(hidden, weight, target, bias, forget_mask, norm_weight, squared, ignore_index, reduction) -> None:
    for t, name in ((hidden, "hidden"), (weight, "weight")):
        check_tensor(t, name)
        check_float(t, name)
        if t.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D {'[N, H]' if name == 'hidden' else '[V, H]'}, got shape {list(t.shape)}"
            )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight must be [V, {h}] (hidden's width), got {list(weight.shape)}")
    if v == 0:
        raise ValueError("weight must have at least one row (class)")
    check_tensor(target, "target")
    named = [("hidden", hidden), ("weight", weight), ("target", target)]
    for t, name, size, what in (
        (target, "target", n, "one class id per row"),
        (bias, "bias", v, "one entry per row of weight"),
        (forget_mask, "forget_mask", n, "one flag per row"),
    ):
        if t is None:
            continue
        check_tensor(t, name)
        if t.shape != (size,):
            raise ValueError(f"{name} must have shape [{size}] ({what}), got {list(t.shape)}")
        named.append((name, t))
    check_same_device(named)
    if bias is not None and bias.dtype != hidden.dtype:
        raise ValueError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    if forget_mask is not None and forget_mask.dtype != torch.bool:
        raise ValueError(f"forget_mask must be a bool tensor, got {forget_mask.dtype}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of class ids, got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if isinstance(norm_weight, bool) or not isinstance(norm_weight, (int, float)) or not math.isfinite(norm_weight):
        raise ValueError(f"norm_weight must be a finite number, got {norm_weight!r}")
    if not isinstance(squared, bool):
        raise ValueError(f"squared must be a bool, got {squared!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if n > 0 and not _is_tracing(target):
        ce_rows = target != ignore_index
        if forget_mask is not None:
            ce_rows &= ~forget_mask
        ids = target[ce_rows]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(
                f"target ids of retained rows must be in [0, {v}) or ignore_index ({ignore_index}), got {bad}"
            )


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops
# --------------------------------------------------------------------------------------------


def _forward_fake(hidden, weight, bias, target, forget_mask, norm_weight, squared, ignore_index, reduction, grad_mask):
    acc = accum_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    return loss, *head_grad_fakes(hidden, weight, bias, grad_mask)


def _backward_fake(
    grad_rows, hidden, weight, bias, target, forget_mask, norm_weight, squared, ignore_index, output_mask
):
    return head_grad_fakes(hidden, weight, bias, output_mask)


def make_autograd(backward_op):
    """(backward, setup_context) of a forward op whose recompute path calls ``backward_op``."""

    def setup_context(ctx, inputs, output) -> None:
        hidden, weight, bias, target, forget_mask, norm_weight, squared, ignore_index, reduction, grad_mask = inputs
        _, gh, gw, gb = output
        ctx.mark_non_differentiable(gh, gw, gb)
        ctx.has_bias = bias is not None
        ctx.grad_mask = output_mask(grad_mask, bias is not None)  # what the forward computed
        compute_grad = any(ctx.grad_mask)
        ctx.options = (norm_weight, squared, ignore_index, reduction, compute_grad)
        if compute_grad:  # the forward already computed the gradients of the loss: backward only scales them
            ctx.save_for_backward(gh, gw, gb)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, forget_mask)

    def backward(ctx, grad_loss, _gh, _gw, _gb):
        norm_weight, squared, ignore_index, reduction, compute_grad = ctx.options
        needs = ctx.needs_input_grad
        if compute_grad:
            dh, dw, db = scale_saved_grads(ctx.saved_tensors, grad_loss, needs, ctx.has_bias, ctx.grad_mask)
        else:
            hidden, weight, bias, target, forget_mask = ctx.saved_tensors
            n = hidden.shape[0]
            grad_rows = grad_loss.expand(n) if reduction != "none" else grad_loss
            if reduction == "mean":
                valid = target != ignore_index
                forget = forget_mask if forget_mask is not None else torch.zeros_like(valid)
                f_rows, c_rows = valid & forget, valid & ~forget
                div = torch.where(forget, f_rows.sum().clamp_min(1), c_rows.sum().clamp_min(1))
                grad_rows = grad_rows / div.to(grad_rows.dtype)
            dh, dw, db = backward_op(
                grad_rows.contiguous(), hidden, weight, bias, target, forget_mask, norm_weight, squared, ignore_index,
                output_mask(needs, ctx.has_bias),
            )  # fmt: skip
            dh = dh if needs[0] else None
            dw = dw if needs[1] else None
            db = db if ctx.has_bias and needs[2] else None
        return dh, dw, db, *([None] * 7)

    return backward, setup_context


def _register_compiled_ops() -> None:
    lib = "unlearn_ext::"
    torch.library.register_fake(lib + OP)(_forward_fake)
    torch.library.register_fake(lib + OP + "_backward")(_backward_fake)
    backward, setup = make_autograd(torch.ops.unlearn_ext.fused_linear_ce_norm_backward)
    torch.library.register_autograd(lib + OP, backward, setup_context=setup)


if _loader.extension_loaded():
    _register_compiled_ops()

if _ce_norm_triton is not None:
    _ce_norm_triton.register(_forward_fake, _backward_fake, make_autograd)
