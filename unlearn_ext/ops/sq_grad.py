"""Squared per-sample gradients (the diagonal empirical Fisher), DESIGN.md 4.1.

For a layer with weight ``W`` and per-sample losses ``l_b``, the per-sample gradient is
``P_b = dl_b/dW``; these ops return ``F[k] = sum over samples b of group k of w_b * P_b**2``
(elementwise square) directly from the layer inputs and output gradients, without ever holding the
``[B, *W.shape]`` per-sample gradients.

Backends: ``cpp`` (C++ CPU kernel), ``cuda`` (CUDA kernel), ``triton`` (Triton kernel; on the CPU
only under ``TRITON_INTERPRET=1``) and ``reference`` (``torch.func`` per-sample gradients).
``auto`` picks the fastest available kernel for the device and never falls back to the reference.
The ops are differentiable in ``x``, ``grad_out`` and ``sample_weight`` (the backward is written
with torch ops); the ``out=`` accumulating form is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from unlearn_ext import _loader
from unlearn_ext._triton import HAS_TRITON
from unlearn_ext.ops import _reference
from unlearn_ext.ops._common import (
    accum_dtype,
    check_accumulator,
    check_float,
    check_group_weight,
    check_same_device,
    check_tensor,
    resolve_backend,
)

__all__ = ["sq_grad_conv2d", "sq_grad_embedding", "sq_grad_linear"]

ALGORITHMS = ("auto", "segmented", "hadamard", "per_sample")
# Bytes of per-sample gradients the backward formulas may hold at once.
_BACKWARD_CHUNK_BYTES = 64 << 20

if HAS_TRITON:
    from unlearn_ext.ops import _sq_grad_triton
else:  # pragma: no cover - exercised only without Triton
    _sq_grad_triton = None

_OUT = Sequence[torch.Tensor] | torch.Tensor | None


# --------------------------------------------------------------------------------------------
# Argument normalisation
# --------------------------------------------------------------------------------------------


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(map(repr, ALGORITHMS))}, got {algorithm!r}")


def _linear_inputs(x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and flatten to x3 ``[B, T, d_in]`` and g3 ``[B, T, d_out]`` (views when possible)."""
    check_tensor(x, "x")
    check_tensor(grad_out, "grad_out")
    check_float(x, "x")
    check_float(grad_out, "grad_out")
    if x.dtype != grad_out.dtype:
        raise ValueError(f"x ({x.dtype}) and grad_out ({grad_out.dtype}) must have the same dtype")
    check_same_device([("x", x), ("grad_out", grad_out)])
    if x.dim() < 2:
        raise ValueError(f"x must be [B, *, d_in] with at least 2 dimensions, got shape {list(x.shape)}")
    if grad_out.dim() != x.dim():
        raise ValueError(
            f"grad_out must have the same rank as x ({x.dim()}): x is {list(x.shape)}, "
            f"grad_out is {list(grad_out.shape)}"
        )
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out has batch size {grad_out.shape[0]} but x has {x.shape[0]}")
    if grad_out.shape[1:-1] != x.shape[1:-1]:
        raise ValueError(
            f"grad_out's middle (sequence) dimensions {list(grad_out.shape[1:-1])} must equal x's {list(x.shape[1:-1])}"
        )
    if x.dim() == 2:
        return x.unsqueeze(1), grad_out.unsqueeze(1)
    if x.dim() == 3:
        return x, grad_out
    return x.flatten(1, -2), grad_out.flatten(1, -2)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    vals = tuple(value)
    if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return vals  # type: ignore[return-value]


def _split_out(out: _OUT, with_bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if out is None:
        return None, None
    if isinstance(out, torch.Tensor):
        if with_bias:
            raise ValueError("with_bias=True needs out=(weight_out, bias_out), got a single tensor")
        return out, None
    parts = tuple(out)
    if len(parts) != 2 or not with_bias:
        raise ValueError("out must be a tensor, or a pair (weight_out, bias_out) when with_bias=True")
    return check_tensor(parts[0], "out[0]"), check_tensor(parts[1], "out[1]")


def _ref(fn, *args, **kwargs):
    """Run a reference and apply the kernels' rule: a non-finite result is an error, not an answer."""
    res = fn(*args, **kwargs)
    for t in res if isinstance(res, tuple) else (res,):
        if t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
            raise ValueError(
                "the result has non-finite values: an input (x or grad_out) contains NaN or inf, "
                "or the squared gradients overflow"
            )
    return res


def _check_no_grad_for_out(*tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "out= accumulates in place and is not differentiable; call it under torch.no_grad(), "
            "or omit out= to get a differentiable result"
        )


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------


def sq_grad_linear(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    sample_weight: torch.Tensor | None = None,
    with_bias: bool = False,
    out: _OUT = None,
    backend: str = "auto",
    algorithm: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared per-sample gradients of a Linear layer's weight (and bias).

    Args:
        x: ``[B, *, d_in]`` layer inputs (``*`` are sequence dims, flattened to T; 2-D means T=1).
        grad_out: ``[B, *, d_out]`` gradients of the per-sample losses w.r.t. the layer outputs.
        group: optional int ``[B]`` group id of each sample (e.g. its class), in ``[0, num_groups)``.
        num_groups: number of groups K; the result has a leading dimension K.
        sample_weight: optional float ``[B]`` weight ``w_b`` of each sample's squared gradient.
        with_bias: also return the bias Fisher.
        out: accumulate into this tensor (``(weight_out, bias_out)`` with ``with_bias``) in place
            and return it; it must be contiguous, of the result's shape and accumulator dtype.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
        algorithm: ``"auto"`` (by shape), ``"segmented"``, ``"hadamard"`` or ``"per_sample"``
            (a tuning knob; every algorithm gives the same result).

    Returns:
        ``F [K, d_out, d_in]`` with ``F[k] = sum_{b: group[b]=k} w_b * (grad_out[b]^T x[b])**2``, and
        with ``with_bias`` also ``F_bias [K, d_out]``; float64 for float64 inputs, else float32.

    Example:
        >>> x, g = torch.randn(8, 16, 32), torch.randn(8, 16, 64)
        >>> sq_grad_linear(x, g).shape
        torch.Size([1, 64, 32])
    """
    x3, g3 = _linear_inputs(x, grad_out)
    check_group_weight(group, num_groups, sample_weight, x3.shape[0])
    device = check_same_device([("x", x), ("group", group), ("sample_weight", sample_weight)])
    _check_algorithm(algorithm)
    be = resolve_backend(backend, device, "sq_grad_linear")
    acc = accum_dtype(x.dtype)
    d_in, d_out = x3.shape[-1], g3.shape[-1]
    w_out, b_out = _split_out(out, with_bias)

    if w_out is not None:
        check_accumulator(w_out, (num_groups, d_out, d_in), acc, device, "out")
        if b_out is not None:
            check_accumulator(b_out, (num_groups, d_out), acc, device, "bias_out")
        _check_no_grad_for_out(x, grad_out, sample_weight)
        if be == "reference":
            res = _ref(
                _reference.sq_grad_linear_reference,
                x3,
                g3,
                group=group,
                num_groups=num_groups,
                sample_weight=sample_weight,
                with_bias=with_bias,
            )
            if with_bias:
                w_out.add_(res[0])
                b_out.add_(res[1])
            else:
                w_out.add_(res)
        elif be == "triton":
            torch.ops.unlearn_ext.sq_grad_linear_triton_(
                x3, g3, group, num_groups, sample_weight, w_out, b_out, algorithm
            )
        else:
            torch.ops.unlearn_ext.sq_grad_linear_(x3, g3, group, num_groups, sample_weight, w_out, b_out, algorithm)
        return (w_out, b_out) if with_bias else w_out

    if be == "reference":
        return _ref(
            _reference.sq_grad_linear_reference,
            x3,
            g3,
            group=group,
            num_groups=num_groups,
            sample_weight=sample_weight,
            with_bias=with_bias,
        )
    op = torch.ops.unlearn_ext.sq_grad_linear_triton if be == "triton" else torch.ops.unlearn_ext.sq_grad_linear
    fw, fb = op(x3, g3, group, num_groups, sample_weight, with_bias, algorithm)
    return (fw, fb) if with_bias else fw


def _linear_fake(x, grad_out, group, num_groups, sample_weight, with_bias, algorithm="auto"):
    torch._check(x.dim() == grad_out.dim(), lambda: "x and grad_out must have the same rank")
    acc = accum_dtype(x.dtype)
    d_in, d_out = x.shape[-1], grad_out.shape[-1]
    fw = x.new_empty((num_groups, d_out, d_in), dtype=acc)
    fb = x.new_empty((num_groups, d_out if with_bias else 0), dtype=acc)
    return fw, fb


def _per_sample_chunks(batch: int, per_sample_elems: int, elem_bytes: int) -> int:
    return max(1, min(batch, _BACKWARD_CHUNK_BYTES // max(1, per_sample_elems * elem_bytes)))


def _group_index(group: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.long, device=device) if group is None else group.long()


def _linear_backward_impl(x3, g3, group, sample_weight, grad_f, grad_fb, needs):
    """Gradients of F = sum_b w_b (G_b^T X_b)**2 (and F_b = sum_b w_b (sum_t G_b)**2)."""
    acc = grad_f.dtype if grad_f is not None else accum_dtype(x3.dtype)
    B, T = x3.shape[0], x3.shape[1]
    gidx = _group_index(group, B, x3.device)
    w = torch.ones(B, dtype=acc, device=x3.device) if sample_weight is None else sample_weight.to(acc)
    gx = torch.zeros(x3.shape, dtype=acc, device=x3.device) if needs[0] else None
    gg = torch.zeros(g3.shape, dtype=acc, device=x3.device) if needs[1] else None
    gw = torch.zeros(B, dtype=acc, device=x3.device) if needs[4] else None
    if grad_f is not None and (needs[0] or needs[1] or needs[4]):
        chunk = _per_sample_chunks(B, g3.shape[-1] * x3.shape[-1], torch.finfo(acc).bits // 8)
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            xs, gs = x3[b0:b1].to(acc), g3[b0:b1].to(acc)
            p = torch.bmm(gs.transpose(1, 2), xs)  # [c, d_out, d_in] per-sample gradients
            gfs = grad_f.index_select(0, gidx[b0:b1])
            if gw is not None:
                gw[b0:b1] += (gfs * p * p).sum((1, 2))
            a = gfs * p * (2 * w[b0:b1]).view(-1, 1, 1)
            if gx is not None:
                gx[b0:b1] = torch.bmm(gs, a)
            if gg is not None:
                gg[b0:b1] = torch.bmm(xs, a.transpose(1, 2))
    if grad_fb is not None and grad_fb.numel() > 0 and (needs[1] or needs[4]):
        s = g3.to(acc).sum(1)  # [B, d_out]
        gfb = grad_fb.index_select(0, gidx)
        if gw is not None:
            gw += (gfb * s * s).sum(1)
        if gg is not None:
            gg += (2 * w.view(-1, 1) * gfb * s).unsqueeze(1).expand(-1, T, -1)
    return (
        gx.to(x3.dtype) if gx is not None else None,
        gg.to(g3.dtype) if gg is not None else None,
        gw.to(sample_weight.dtype) if gw is not None else None,
    )


def _linear_setup_context(ctx, inputs, output):
    x, grad_out, group, num_groups, sample_weight, with_bias, _algorithm = inputs
    ctx.save_for_backward(x, grad_out, group, sample_weight)


def _linear_backward(ctx, grad_f, grad_fb):
    x, grad_out, group, sample_weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    flat = x.dim() == 2  # the ops accept [B, d] (T = 1) as well as [B, T, d]
    x3, g3 = (x.unsqueeze(1), grad_out.unsqueeze(1)) if flat else (x, grad_out)
    gx, gg, gw = _linear_backward_impl(x3, g3, group, sample_weight, grad_f, grad_fb, needs)
    if flat:
        gx = gx.squeeze(1) if gx is not None else None
        gg = gg.squeeze(1) if gg is not None else None
    return gx, gg, None, None, gw, None, None


# --------------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------------


def _conv_output_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_inputs(x, grad_out, weight_shape, stride, padding, dilation, groups):
    check_tensor(x, "x")
    check_tensor(grad_out, "grad_out")
    check_float(x, "x")
    check_float(grad_out, "grad_out")
    if x.dtype != grad_out.dtype:
        raise ValueError(f"x ({x.dtype}) and grad_out ({grad_out.dtype}) must have the same dtype")
    check_same_device([("x", x), ("grad_out", grad_out)])
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C_in, H, W], got shape {list(x.shape)}")
    if grad_out.dim() != 4:
        raise ValueError(f"grad_out must be [B, C_out, H_out, W_out], got shape {list(grad_out.shape)}")
    ws = [int(v) for v in weight_shape]
    if len(ws) != 4 or min(ws) <= 0:
        raise ValueError(f"weight_shape must be 4 positive ints [C_out, C_in/groups, kh, kw], got {weight_shape}")
    stride, padding, dilation = (
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if min(stride) <= 0 or min(dilation) <= 0 or min(padding) < 0:
        raise ValueError(f"invalid stride {stride}, padding {padding} or dilation {dilation}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if x.shape[1] != ws[1] * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight_shape {ws} with groups={groups} expects {ws[1] * groups}"
        )
    if ws[0] % groups:
        raise ValueError(f"weight_shape[0] (C_out={ws[0]}) must be divisible by groups={groups}")
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out has batch size {grad_out.shape[0]} but x has {x.shape[0]}")
    if grad_out.shape[1] != ws[0]:
        raise ValueError(f"grad_out has {grad_out.shape[1]} channels but weight_shape has C_out={ws[0]}")
    h_out = _conv_output_size(x.shape[2], ws[2], stride[0], padding[0], dilation[0])
    w_out = _conv_output_size(x.shape[3], ws[3], stride[1], padding[1], dilation[1])
    if h_out <= 0 or w_out <= 0:
        raise ValueError(
            f"the (dilated) kernel {ws[2:]} is larger than the padded input {list(x.shape[2:])}: "
            "the convolution has no output"
        )
    if tuple(grad_out.shape[2:]) != (h_out, w_out):
        raise ValueError(
            f"grad_out must have spatial size [{h_out}, {w_out}] for this input, kernel, stride, padding "
            f"and dilation, got {list(grad_out.shape[2:])}"
        )
    return ws, list(stride), list(padding), list(dilation)


def sq_grad_conv2d(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weight_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    sample_weight: torch.Tensor | None = None,
    with_bias: bool = False,
    out: _OUT = None,
    backend: str = "auto",
    algorithm: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared per-sample gradients of a Conv2d weight ``[C_out, C_in/groups, kh, kw]``.

    Args:
        x: ``[B, C_in, H, W]`` layer inputs; grad_out: ``[B, C_out, H_out, W_out]`` output gradients.
        weight_shape, stride, padding, dilation, groups: the convolution's (numeric padding only).
        group, num_groups, sample_weight, with_bias, out, backend, algorithm: as :func:`sq_grad_linear`.

    Returns:
        ``F [K, C_out, C_in/groups, kh, kw]`` (and ``F_bias [K, C_out]``). Never an im2col buffer of
        the whole batch: on the CPU, layers with at least 32 output positions run one oneDNN
        weight-gradient convolution per sample; smaller ones (and the CUDA/Triton kernels) lower a few
        samples at a time to im2col columns and the Linear kernels.
    """
    ws, st, pd, dl = _conv_inputs(x, grad_out, weight_shape, stride, padding, dilation, groups)
    check_group_weight(group, num_groups, sample_weight, x.shape[0])
    device = check_same_device([("x", x), ("group", group), ("sample_weight", sample_weight)])
    _check_algorithm(algorithm)
    be = resolve_backend(backend, device, "sq_grad_conv2d")
    acc = accum_dtype(x.dtype)
    w_out, b_out = _split_out(out, with_bias)
    if w_out is not None:
        check_accumulator(w_out, (num_groups, *ws), acc, device, "out")
        if b_out is not None:
            check_accumulator(b_out, (num_groups, ws[0]), acc, device, "bias_out")
        _check_no_grad_for_out(x, grad_out, sample_weight)
        if be == "reference":
            res = _ref(_reference.sq_grad_conv2d_reference,
                x, grad_out, ws, st, pd, dl, groups, group=group, num_groups=num_groups,
                sample_weight=sample_weight, with_bias=with_bias,
            )  # fmt: skip
            if with_bias:
                w_out.add_(res[0])
                b_out.add_(res[1])
            else:
                w_out.add_(res)
        elif be == "triton":
            torch.ops.unlearn_ext.sq_grad_conv2d_triton_(
                x, grad_out, ws, st, pd, dl, groups, group, num_groups, sample_weight, w_out, b_out, algorithm
            )
        else:
            torch.ops.unlearn_ext.sq_grad_conv2d_(
                x, grad_out, ws, st, pd, dl, groups, group, num_groups, sample_weight, w_out, b_out, algorithm
            )
        return (w_out, b_out) if with_bias else w_out
    if be == "reference":
        return _ref(_reference.sq_grad_conv2d_reference,
            x, grad_out, ws, st, pd, dl, groups, group=group, num_groups=num_groups,
            sample_weight=sample_weight, with_bias=with_bias,
        )  # fmt: skip
    op = torch.ops.unlearn_ext.sq_grad_conv2d_triton if be == "triton" else torch.ops.unlearn_ext.sq_grad_conv2d
    fw, fb = op(x, grad_out, ws, st, pd, dl, groups, group, num_groups, sample_weight, with_bias, algorithm)
    return (fw, fb) if with_bias else fw


def _conv_fake(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups, sample_weight,
               with_bias, algorithm="auto"):  # fmt: skip
    acc = accum_dtype(x.dtype)
    fw = x.new_empty((num_groups, *weight_shape), dtype=acc)
    fb = x.new_empty((num_groups, weight_shape[0] if with_bias else 0), dtype=acc)
    return fw, fb


def _conv_setup_context(ctx, inputs, output):
    x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups, sample_weight, wb, _ = inputs
    ctx.conv = (list(weight_shape), list(stride), list(padding), list(dilation), groups)
    ctx.save_for_backward(x, grad_out, group, sample_weight)


def _conv_backward(ctx, grad_f, grad_fb):
    x, grad_out, group, sample_weight = ctx.saved_tensors
    ws, stride, padding, dilation, groups = ctx.conv
    needs = ctx.needs_input_grad
    acc = accum_dtype(x.dtype)
    B, L = x.shape[0], grad_out.shape[2] * grad_out.shape[3]
    kh, kw = ws[2], ws[3]
    c_out, d = ws[0], ws[1] * kh * kw
    co_g = c_out // groups
    gidx = _group_index(group, B, x.device)
    w = torch.ones(B, dtype=acc, device=x.device) if sample_weight is None else sample_weight.to(acc)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device) if needs[0] else None
    gg = torch.zeros(grad_out.shape, dtype=acc, device=x.device) if needs[1] else None
    gw = torch.zeros(B, dtype=acc, device=x.device) if needs[9] else None
    if grad_f is not None and (needs[0] or needs[1] or needs[9]):
        gf = grad_f.reshape(grad_f.shape[0], groups, co_g, d)
        chunk = _per_sample_chunks(B, c_out * d + groups * d * L, torch.finfo(acc).bits // 8)
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            cols = F.unfold(x[b0:b1].to(acc), (kh, kw), dilation, padding, stride)  # [c, C_in*kh*kw, L]
            cols = cols.view(b1 - b0, groups, d, L)
            gs = grad_out[b0:b1].to(acc).reshape(b1 - b0, groups, co_g, L)
            p = torch.einsum("cgol,cgdl->cgod", gs, cols)  # per-sample gradients per conv group
            gfs = gf.index_select(0, gidx[b0:b1])
            if gw is not None:
                gw[b0:b1] += (gfs * p * p).sum((1, 2, 3))
            a = gfs * p * (2 * w[b0:b1]).view(-1, 1, 1, 1)
            if gg is not None:
                gg[b0:b1] = torch.einsum("cgod,cgdl->cgol", a, cols).reshape(b1 - b0, c_out, *grad_out.shape[2:])
            if gx is not None:
                dcols = torch.einsum("cgod,cgol->cgdl", a, gs).reshape(b1 - b0, groups * d, L)
                gx[b0:b1] = F.fold(dcols, x.shape[2:], (kh, kw), dilation, padding, stride)
    if grad_fb is not None and grad_fb.numel() > 0 and (needs[1] or needs[9]):
        s = grad_out.to(acc).sum((2, 3))  # [B, C_out]
        gfb = grad_fb.index_select(0, gidx)
        if gw is not None:
            gw += (gfb * s * s).sum(1)
        if gg is not None:
            gg += (2 * w.view(-1, 1) * gfb * s).view(B, c_out, 1, 1)
    return (
        gx.to(x.dtype) if gx is not None else None,
        gg.to(grad_out.dtype) if gg is not None else None,
        None, None, None, None, None, None, None,
        gw.to(sample_weight.dtype) if gw is not None else None,
        None, None,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------


def _embedding_inputs(ids, grad_out, num_embeddings, padding_idx):
    check_tensor(ids, "ids")
    check_tensor(grad_out, "grad_out")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be an int64 or int32 tensor, got {ids.dtype}")
    check_float(grad_out, "grad_out")
    check_same_device([("ids", ids), ("grad_out", grad_out)])
    if ids.dim() < 1:
        raise ValueError("ids must be [B, *] with a batch dimension, got a scalar")
    if tuple(grad_out.shape[:-1]) != tuple(ids.shape) or grad_out.dim() != ids.dim() + 1:
        raise ValueError(f"grad_out must have shape [*ids.shape, d] = {[*ids.shape, 'd']}, got {list(grad_out.shape)}")
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings <= 0:
        raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
    if padding_idx is not None:
        if padding_idx < 0:
            padding_idx += num_embeddings
        if not 0 <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx must be in [-num_embeddings, num_embeddings), got {padding_idx}")
    if ids.numel() > 0 and ids.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(f"ids must be in [0, num_embeddings={num_embeddings}), got values in [{lo}, {hi}]")
    B, T = ids.shape[0], math.prod(ids.shape[1:])
    return ids.reshape(B, T), grad_out.reshape(B, T, grad_out.shape[-1]), padding_idx


def sq_grad_embedding(
    ids: torch.Tensor,
    grad_out: torch.Tensor,
    num_embeddings: int,
    *,
    padding_idx: int | None = None,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    sample_weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sum of squared per-sample gradients of an Embedding table ``[num_embeddings, d]``.

    Args:
        ids: int ``[B, *]`` token ids; grad_out: ``[B, *, d]`` gradients w.r.t. the looked-up rows.
        num_embeddings: rows V of the table. padding_idx: rows of this id get no gradient (as in
            ``nn.Embedding``). group, num_groups, sample_weight, out, backend: as :func:`sq_grad_linear`.

    Returns:
        ``F [K, V, d]``: for each sample, the gradient rows of an id repeated inside the sample are
        summed before squaring (that sum is the sample's gradient of that row).
    """
    ids2, g3, padding_idx = _embedding_inputs(ids, grad_out, num_embeddings, padding_idx)
    check_group_weight(group, num_groups, sample_weight, ids2.shape[0])
    device = check_same_device([("ids", ids), ("group", group), ("sample_weight", sample_weight)])
    be = resolve_backend(backend, device, "sq_grad_embedding")
    acc = accum_dtype(grad_out.dtype)
    shape = (num_groups, num_embeddings, g3.shape[-1])
    if out is not None:
        check_accumulator(out, shape, acc, device, "out")
        _check_no_grad_for_out(grad_out, sample_weight)
        if be == "reference":
            out.add_(
                _ref(
                    _reference.sq_grad_embedding_reference,
                    ids2,
                    g3,
                    num_embeddings,
                    padding_idx=padding_idx,
                    group=group,
                    num_groups=num_groups,
                    sample_weight=sample_weight,
                )  # fmt: skip
            )
        elif be == "triton":
            torch.ops.unlearn_ext.sq_grad_embedding_triton_(
                ids2, g3, num_embeddings, padding_idx, group, num_groups, sample_weight, out
            )
        else:
            torch.ops.unlearn_ext.sq_grad_embedding_(
                ids2, g3, num_embeddings, padding_idx, group, num_groups, sample_weight, out
            )
        return out
    if be == "reference":
        return _ref(_reference.sq_grad_embedding_reference,
            ids2, g3, num_embeddings, padding_idx=padding_idx, group=group, num_groups=num_groups,
            sample_weight=sample_weight,
        )  # fmt: skip
    op = torch.ops.unlearn_ext.sq_grad_embedding_triton if be == "triton" else torch.ops.unlearn_ext.sq_grad_embedding
    return op(ids2, g3, num_embeddings, padding_idx, group, num_groups, sample_weight)


def _embedding_fake(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight):
    return grad_out.new_empty((num_groups, num_embeddings, grad_out.shape[-1]), dtype=accum_dtype(grad_out.dtype))


def embedding_row_sums(ids2: torch.Tensor, g3: torch.Tensor, num_embeddings: int, padding_idx: int | None):
    """Per (sample, id) sums of gradient rows: returns (sums [U, d], inverse [B*T], sample [U], id [U]).

    ``inverse`` maps every token to its (sample, id) pair; padding tokens map to a pair whose id is
    ``padding_idx`` (callers drop it).
    """
    B, T = ids2.shape
    key = torch.arange(B, device=ids2.device).repeat_interleave(T) * num_embeddings + ids2.reshape(-1).long()
    uniq, inverse = torch.unique(key, return_inverse=True)
    sums = g3.new_zeros((uniq.numel(), g3.shape[-1])).index_add_(0, inverse, g3.reshape(-1, g3.shape[-1]))
    return sums, inverse, uniq // num_embeddings, uniq % num_embeddings


def _embedding_setup_context(ctx, inputs, output):
    ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight = inputs
    ctx.emb = (num_embeddings, padding_idx)
    ctx.save_for_backward(ids, grad_out, group, sample_weight)


def _embedding_backward(ctx, grad_f):
    ids, grad_out, group, sample_weight = ctx.saved_tensors
    num_embeddings, padding_idx = ctx.emb
    needs = ctx.needs_input_grad
    acc = grad_f.dtype
    B, T, d = grad_out.shape
    sums, inverse, sample, row = embedding_row_sums(ids, grad_out.to(acc), num_embeddings, padding_idx)
    gidx = _group_index(group, B, ids.device)
    w = torch.ones(B, dtype=acc, device=ids.device) if sample_weight is None else sample_weight.to(acc)
    gfr = grad_f[gidx[sample], row]  # [U, d]: upstream gradient at each (sample, id) pair's row
    if padding_idx is not None:
        keep = (row != padding_idx).to(acc).unsqueeze(1)
        gfr = gfr * keep
    gg = None
    if needs[1]:
        a = 2 * w[sample].unsqueeze(1) * gfr * sums  # [U, d]
        gg = a.index_select(0, inverse).view(B, T, d).to(grad_out.dtype)
    gw = None
    if needs[6]:
        per_pair = (gfr * sums * sums).sum(1)
        gw = torch.zeros(B, dtype=acc, device=ids.device).index_add_(0, sample, per_pair).to(sample_weight.dtype)
    return None, gg, None, None, None, None, gw


# --------------------------------------------------------------------------------------------
# Registration of fake kernels and autograd formulas
# --------------------------------------------------------------------------------------------


def _register_compiled_ops() -> None:
    """Fake kernels and autograd of the C++/CUDA ops (they exist only when _C loaded)."""
    lib = "unlearn_ext::"
    torch.library.register_fake(lib + "sq_grad_linear")(_linear_fake)
    torch.library.register_fake(lib + "sq_grad_linear_")(lambda *args: None)
    torch.library.register_autograd(lib + "sq_grad_linear", _linear_backward, setup_context=_linear_setup_context)
    torch.library.register_fake(lib + "sq_grad_conv2d")(_conv_fake)
    torch.library.register_fake(lib + "sq_grad_conv2d_")(lambda *args: None)
    torch.library.register_autograd(lib + "sq_grad_conv2d", _conv_backward, setup_context=_conv_setup_context)
    torch.library.register_fake(lib + "sq_grad_embedding")(_embedding_fake)
    torch.library.register_fake(lib + "sq_grad_embedding_")(lambda *args: None)
    torch.library.register_autograd(
        lib + "sq_grad_embedding", _embedding_backward, setup_context=_embedding_setup_context
    )


if _loader.extension_loaded():
    _register_compiled_ops()

if _sq_grad_triton is not None:
    _sq_grad_triton.register(
        linear=(_linear_fake, _linear_setup_context, _linear_backward),
        conv=(_conv_fake, _conv_setup_context, _conv_backward),
        embedding=(_embedding_fake, _embedding_setup_context, _embedding_backward),
    )
