"""Pure-PyTorch references of every op: the ground truth of tests and benchmarks.

They favour obviousness over speed: per-sample gradients come from ``torch.func`` (``vmap`` of
``grad``), exactly as a user would compute them, then get squared, weighted and summed per group.
They materialise ``[B, *param_shape]`` per-sample gradients, so use them on small inputs (or with
``chunk_size``). They are differentiable through ordinary autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

__all__ = [
    "fused_linear_ce_norm_reference",
    "fused_linear_masked_kl_reference",
    "sq_grad_conv2d_reference",
    "sq_grad_embedding_reference",
    "sq_grad_linear_reference",
]


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_sum(
    per_sample: torch.Tensor,
    group: torch.Tensor | None,
    num_groups: int,
    sample_weight: torch.Tensor | None,
) -> torch.Tensor:
    """sum_b w_b * per_sample[b]**2 into [num_groups, *per_sample.shape[1:]]."""
    sq = per_sample.square()
    if sample_weight is not None:
        sq = sq * sample_weight.to(sq.dtype).view(-1, *([1] * (sq.dim() - 1)))
    out = sq.new_zeros((num_groups, *sq.shape[1:]))
    idx = torch.zeros(sq.shape[0], dtype=torch.long, device=sq.device) if group is None else group.long()
    return out.index_add(0, idx, sq)


def sq_grad_linear_reference(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    sample_weight: torch.Tensor | None = None,
    with_bias: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample gradients of a Linear layer, via ``torch.func`` per-sample gradients.

    Args:
        x: ``[B, *, d_in]`` layer inputs. grad_out: ``[B, *, d_out]`` gradients of the per-sample
            losses with respect to the layer outputs.
        group, num_groups, sample_weight, with_bias: as :func:`unlearn_ext.sq_grad_linear`.
        chunk_size: forwarded to ``vmap`` to bound memory.

    Returns:
        ``F [num_groups, d_out, d_in]`` (and ``F_bias [num_groups, d_out]``) in the accumulator dtype.
    """
    acc = _accum_dtype(x.dtype)
    B, d_in, d_out = x.shape[0], x.shape[-1], grad_out.shape[-1]
    T = math.prod(x.shape[1:-1])
    if B == 0 or T == 0 or d_in == 0 or d_out == 0:  # no per-sample gradient has a nonzero entry
        fw = x.new_zeros((num_groups, d_out, d_in), dtype=acc)
        return (fw, x.new_zeros((num_groups, d_out), dtype=acc)) if with_bias else fw
    x3 = x.reshape(B, T, d_in).to(acc)
    g3 = grad_out.reshape(B, T, d_out).to(acc)
    weight = torch.zeros(d_out, d_in, dtype=acc, device=x.device)
    bias = torch.zeros(d_out, dtype=acc, device=x.device)

    def pairing(w: torch.Tensor, b: torch.Tensor, xb: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
        # <grad_out_b, x_b W^T + b>: its gradient in (W, b) is sample b's gradient of the loss.
        return (gb * F.linear(xb, w, b)).sum()

    per_w, per_b = vmap(grad(pairing, argnums=(0, 1)), in_dims=(None, None, 0, 0), chunk_size=chunk_size)(
        weight, bias, x3, g3
    )
    fw = _group_sum(per_w, group, num_groups, sample_weight)
    if not with_bias:
        return fw
    return fw, _group_sum(per_b, group, num_groups, sample_weight)


def sq_grad_conv2d_reference(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weight_shape: tuple[int, int, int, int] | list[int] | torch.Size,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    sample_weight: torch.Tensor | None = None,
    with_bias: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample gradients of a Conv2d weight ``[C_out, C_in/groups, kh, kw]``."""
    acc = _accum_dtype(x.dtype)
    weight = torch.zeros(tuple(weight_shape), dtype=acc, device=x.device)
    bias = torch.zeros(weight.shape[0], dtype=acc, device=x.device)
    if x.shape[0] == 0 or grad_out.numel() == 0:
        fw = x.new_zeros((num_groups, *weight.shape), dtype=acc)
        return (fw, x.new_zeros((num_groups, weight.shape[0]), dtype=acc)) if with_bias else fw

    def pairing(w: torch.Tensor, b: torch.Tensor, xb: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(xb.unsqueeze(0), w, b, stride, padding, dilation, groups)
        return (gb.unsqueeze(0) * y).sum()

    per_w, per_b = vmap(grad(pairing, argnums=(0, 1)), in_dims=(None, None, 0, 0), chunk_size=chunk_size)(
        weight, bias, x.to(acc), grad_out.to(acc)
    )
    fw = _group_sum(per_w, group, num_groups, sample_weight)
    if not with_bias:
        return fw
    return fw, _group_sum(per_b, group, num_groups, sample_weight)


def sq_grad_embedding_reference(
    ids: torch.Tensor,
    grad_out: torch.Tensor,
    num_embeddings: int,
    *,
    padding_idx: int | None = None,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    sample_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Squared per-sample gradients of an Embedding table ``[num_embeddings, d]``."""
    acc = _accum_dtype(grad_out.dtype)
    B, d = ids.shape[0], grad_out.shape[-1]
    T = math.prod(ids.shape[1:])
    if B == 0 or T == 0 or d == 0:
        return grad_out.new_zeros((num_groups, num_embeddings, d), dtype=acc)
    ids2 = ids.reshape(B, T)
    g3 = grad_out.reshape(B, T, d).to(acc)
    table = torch.zeros(num_embeddings, g3.shape[-1], dtype=acc, device=grad_out.device)

    def pairing(e: torch.Tensor, idb: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
        return (gb * F.embedding(idb, e, padding_idx=padding_idx)).sum()

    per = vmap(grad(pairing), in_dims=(None, 0, 0), chunk_size=chunk_size)(table, ids2, g3)
    if padding_idx is not None:  # F.embedding already gives the padding row no gradient
        per = per.clone()
        per[:, padding_idx] = 0
    return _group_sum(per, group, num_groups, sample_weight)


def fused_linear_masked_kl_reference(
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
) -> torch.Tensor:
    """Masked ``KL(p_ref || q)`` (+ CE) from full ``[N, V]`` logits, exactly as DESIGN.md 4.2 states it.

    The reference logits are computed without gradient. Rows outside ``token_mask`` contribute 0;
    a mean over no rows is 0.
    """
    acc = _accum_dtype(hidden.dtype)
    z = F.linear(hidden, weight, bias).to(acc)
    with torch.no_grad():
        r = F.linear(ref_hidden, ref_weight, ref_bias).to(acc)
    n = z.shape[0]
    kl = z.new_zeros(n)
    tm = torch.ones(n, dtype=acc, device=z.device) if token_mask is None else token_mask.to(acc)
    if kl_weight != 0:
        s, t = z / temperature, r / temperature
        if renormalize and vocab_mask is not None:
            if bool(vocab_mask.any()):
                logq, logp = F.log_softmax(s[:, vocab_mask], 1), F.log_softmax(t[:, vocab_mask], 1)
                kl = (logp.exp() * (logp - logq)).sum(1)
            else:
                kl = (s * 0).sum(1)
        else:
            logq, logp = F.log_softmax(s, 1), F.log_softmax(t, 1)
            term = logp.exp() * (logp - logq)
            kl = (term if vocab_mask is None else term * vocab_mask.to(acc)).sum(1)
        kl = kl * tm
    ce = z.new_zeros(n)
    valid = torch.zeros(n, dtype=acc, device=z.device)
    if target is not None:
        valid = (target != ignore_index).to(acc)
        if ce_weight != 0:
            ce = F.cross_entropy(z, target.long(), ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return kl_weight * kl + ce_weight * ce
    if reduction == "sum":
        return kl_weight * kl.sum() + ce_weight * ce.sum()
    return kl_weight * kl.sum() / tm.sum().clamp_min(1) + ce_weight * ce.sum() / valid.sum().clamp_min(1)


def fused_linear_ce_norm_reference(
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
) -> torch.Tensor:
    """CE on retained rows plus ``norm_weight * ||z||^2`` (or ``||z||``) on forgotten rows, from full
    ``[N, V]`` logits, exactly as DESIGN.md 4.3 states it.

    Rows whose target is ``ignore_index`` contribute nothing; "mean" divides each term by its own row
    count (an empty term is 0). The unsquared norm's gradient at ``z = 0`` is 0 (torch's subgradient).
    """
    acc = _accum_dtype(hidden.dtype)
    z = F.linear(hidden, weight, bias).to(acc)
    n = z.shape[0]
    valid = target != ignore_index
    forget = torch.zeros(n, dtype=torch.bool, device=z.device) if forget_mask is None else forget_mask
    f_rows, c_rows = (valid & forget).to(acc), (valid & ~forget).to(acc)
    safe_target = torch.where(c_rows.bool(), target.long(), 0)
    ce = F.cross_entropy(z, safe_target, reduction="none") * c_rows
    sq = z.square().sum(1)
    norm = sq if squared else torch.linalg.vector_norm(z, dim=1)
    pen = norm * f_rows
    if reduction == "none":
        return ce + norm_weight * pen
    if reduction == "sum":
        return ce.sum() + norm_weight * pen.sum()
    return ce.sum() / c_rows.sum().clamp_min(1) + norm_weight * pen.sum() / f_rows.sum().clamp_min(1)
