"""Triton kernels of the squared per-sample gradient ops, wrapped as ``torch.library`` custom ops.

Kernels:
  * ``_sq_grad_segmented_kernel``: a segmented-K GEMM. Each program owns one output tile of one
    group (so no atomics): it loops over that group's samples, reduces each sample's T rows into
    a register accumulator with ``tl.dot``, squares it, weights it and adds it to the tile.
  * ``_sq_grad_pairs_kernel``: the Hadamard expansion for short sequences,
    ``(G^T X)**2 = sum_{t<=s} c_ts (g_t * g_s)^T (x_t * x_s)``, as one GEMM whose K dimension runs
    over (sample, t, s) triples generated on the fly; T = 1 is the single GEMM ``(G*G)^T (X*X)``.
  * ``_sq_grad_embedding_kernel``: one program per (sample, id) run and column block: sums the
    run's gradient rows, squares, weights and atomically adds them into the table's row.
Conv2d is lowered in the launcher to im2col of a few samples at a time plus the linear kernels.

Under ``TRITON_INTERPRET=1`` (CI on CPU) bf16/fp16 tiles are upcast to fp32 before arithmetic,
because the interpreter's bf16 arithmetic is broken; on GPUs bf16/fp16 go to the tensor cores
with fp32 accumulation, and fp32/fp64 use exact (IEEE) dot products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from unlearn_ext._triton import interpreter_enabled
from unlearn_ext.ops._common import accum_dtype, check_accumulator, check_group_weight

# Bytes of im2col columns the conv launcher materialises at once.
_CONV_CHUNK_BYTES = 16 << 20

# Groups per launch: they are the grid's third axis, which CUDA caps at 65535 (the C++ launcher
# slices the same way, csrc/cuda/sq_grad.cu).
MAX_GROUPS_PER_LAUNCH = 65535


def _group_slices(num_groups: int):
    """``(k0, k)`` slices of at most MAX_GROUPS_PER_LAUNCH groups covering ``range(num_groups)``."""
    step = MAX_GROUPS_PER_LAUNCH
    return [(k0, min(step, num_groups - k0)) for k0 in range(0, num_groups, step)]


@triton.jit
def _add_tile(out_ptr, sfo, offs_o, offs_i, mask_o, mask_i, tile):
    """out[offs_o, offs_i] += tile (masked); the program owns this tile, so no atomics."""
    ptrs = out_ptr + offs_o[:, None].to(tl.int64) * sfo + offs_i[None, :]  # int64: d_out * d_in may pass 2^31
    mask = mask_o[:, None] & mask_i[None, :]
    prev = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, prev + tile, mask=mask)


@triton.jit
def _sq_grad_segmented_kernel(
    x_ptr, g_ptr, out_ptr, order_ptr, weight_ptr, seg_ptr,
    T, d_in, d_out,
    sxb, sxt, sxi, sgb, sgt, sgo, sfk, sfo,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    k = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < d_out
    mask_i = offs_i < d_in
    start = tl.load(seg_ptr + k)
    end = tl.load(seg_ptr + k + 1)
    f = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
    for j in range(start, end):
        b = tl.load(order_ptr + j).to(tl.int64)
        w = tl.load(weight_ptr + j)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + offs_t
            mask_t = tt < T
            g = tl.load(
                g_ptr + b * sgb + tt[None, :] * sgt + offs_o[:, None] * sgo,
                mask=mask_o[:, None] & mask_t[None, :],
                other=0.0,
            )
            x = tl.load(
                x_ptr + b * sxb + tt[:, None] * sxt + offs_i[None, :] * sxi,
                mask=mask_t[:, None] & mask_i[None, :],
                other=0.0,
            )
            if UPCAST:
                g = g.to(tl.float32)
                x = x.to(tl.float32)
            acc += tl.dot(g, x, input_precision=PRECISION, out_dtype=ACC)
        f += w * acc * acc
    _add_tile(out_ptr + k.to(tl.int64) * sfk, sfo, offs_o, offs_i, mask_o, mask_i, f)


@triton.jit
def _sq_grad_pairs_kernel(
    x_ptr, g_ptr, out_ptr, xa_ptr, xb_ptr, ga_ptr, gb_ptr, coef_ptr, seg_ptr,
    d_in, d_out, sxi, sgo, sfk, sfo,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    k = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, BLOCK_K)
    mask_o = offs_o < d_out
    mask_i = offs_i < d_in
    start = tl.load(seg_ptr + k)
    end = tl.load(seg_ptr + k + 1)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
    for p0 in range(start, end, BLOCK_K):
        pp = p0 + offs_k
        mask_p = pp < end
        xa = tl.load(xa_ptr + pp, mask=mask_p, other=0)
        xb = tl.load(xb_ptr + pp, mask=mask_p, other=0)
        ga = tl.load(ga_ptr + pp, mask=mask_p, other=0)
        gb = tl.load(gb_ptr + pp, mask=mask_p, other=0)
        c = tl.load(coef_ptr + pp, mask=mask_p, other=0.0)
        mg = mask_o[:, None] & mask_p[None, :]
        mx = mask_p[:, None] & mask_i[None, :]
        g1 = tl.load(g_ptr + ga[None, :] + offs_o[:, None] * sgo, mask=mg, other=0.0).to(ACC)
        g2 = tl.load(g_ptr + gb[None, :] + offs_o[:, None] * sgo, mask=mg, other=0.0).to(ACC)
        x1 = tl.load(x_ptr + xa[:, None] + offs_i[None, :] * sxi, mask=mx, other=0.0).to(ACC)
        x2 = tl.load(x_ptr + xb[:, None] + offs_i[None, :] * sxi, mask=mx, other=0.0).to(ACC)
        a = g1 * g2 * c[None, :].to(ACC)
        bx = x1 * x2
        acc += tl.dot(a, bx, input_precision=PRECISION, out_dtype=ACC)
    _add_tile(out_ptr + k.to(tl.int64) * sfk, sfo, offs_o, offs_i, mask_o, mask_i, acc)


@triton.jit
def _sq_grad_embedding_kernel(
    g_ptr, out_ptr, tok_off_ptr, run_start_ptr, run_row_ptr, run_weight_ptr,
    d, sgd, sfk_row,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    m0 = tl.load(run_start_ptr + r)
    m1 = tl.load(run_start_ptr + r + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for m in range(m0, m1):
        off = tl.load(tok_off_ptr + m)
        acc += tl.load(g_ptr + off + offs_d * sgd, mask=mask_d, other=0.0).to(ACC)
    row = tl.load(run_row_ptr + r)  # flat row index k * V + id of the output
    w = tl.load(run_weight_ptr + r)
    tl.atomic_add(out_ptr + row * sfk_row + offs_d, w * acc * acc, mask=mask_d)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    # bf16/fp16 use the tensor cores (the precision knob only affects fp32); fp32/fp64 stay exact.
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreter_enabled() and dtype in (torch.bfloat16, torch.float16)


def _blocks(d_out: int, d_in: int) -> tuple[int, int]:
    if interpreter_enabled():  # the interpreter runs programs one by one: few, large tiles
        return 64, 64
    return 64, 64


def _sample_plan(batch, group, num_groups, sample_weight, device, acc):
    """Samples sorted by group (stable), zero weights dropped; returns (order, weight, seg_start)."""
    if group is None:
        order = torch.arange(batch, device=device)
        gid = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        gid = group.long()
        order = torch.sort(gid, stable=True).indices
    w = (
        torch.ones(batch, dtype=acc, device=device)
        if sample_weight is None
        else sample_weight.to(device=device, dtype=acc)
    )
    if sample_weight is not None:
        order = order[w[order] != 0]
    counts = torch.bincount(gid[order], minlength=num_groups)[:num_groups]
    seg = torch.zeros(num_groups + 1, dtype=torch.long, device=device)
    seg[1:] = counts.cumsum(0)
    return order.contiguous(), w[order].contiguous(), seg


def _launch_segmented(x3, g3, order, weight, seg, out3):
    T, d_in, d_out = x3.shape[1], x3.shape[2], g3.shape[2]
    K = out3.shape[0]
    bo, bi = _blocks(d_out, d_in)
    bt = 16
    for k0, k in _group_slices(K):  # the kernel reads seg[k], seg[k + 1] and writes out[k] of its slice
        grid = (triton.cdiv(d_out, bo), triton.cdiv(d_in, bi), k)
        _sq_grad_segmented_kernel[grid](
            x3, g3, out3[k0:], order, weight, seg[k0:],
            T, d_in, d_out,
            x3.stride(0), x3.stride(1), x3.stride(2), g3.stride(0), g3.stride(1), g3.stride(2),
            out3.stride(0), out3.stride(1),
            BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt,
            UPCAST=_upcast(x3.dtype), ACC=_tl_acc(out3.dtype), PRECISION=_precision(x3.dtype),
        )  # fmt: skip


def _launch_pairs(x3, g3, order, weight, seg, out3):
    """Hadamard expansion: (sample, t <= s) triples, generated here as row offsets, sorted by group."""
    B, T, d_in = x3.shape
    d_out = g3.shape[2]
    K = out3.shape[0]
    dev = x3.device
    tt, ss = torch.triu_indices(T, T, device=dev)  # t <= s
    coef_ts = torch.where(tt == ss, 1.0, 2.0).to(out3.dtype)
    b = order.unsqueeze(1)  # [S, 1]
    xa = (b * x3.stride(0) + tt * x3.stride(1)).reshape(-1)
    xb = (b * x3.stride(0) + ss * x3.stride(1)).reshape(-1)
    ga = (b * g3.stride(0) + tt * g3.stride(1)).reshape(-1)
    gb = (b * g3.stride(0) + ss * g3.stride(1)).reshape(-1)
    coef = (weight.unsqueeze(1) * coef_ts).reshape(-1).contiguous()
    pair_seg = seg * tt.numel()
    bo, bi = _blocks(d_out, d_in)
    for k0, k in _group_slices(K):
        grid = (triton.cdiv(d_out, bo), triton.cdiv(d_in, bi), k)
        _sq_grad_pairs_kernel[grid](
            x3, g3, out3[k0:], xa, xb, ga, gb, coef, pair_seg[k0:],
            d_in, d_out, x3.stride(2), g3.stride(2), out3.stride(0), out3.stride(1),
            BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=32,
            UPCAST=_upcast(x3.dtype), ACC=_tl_acc(out3.dtype), PRECISION=_precision(x3.dtype),
        )  # fmt: skip


def _resolve(algorithm: str, T: int) -> str:
    if algorithm == "auto":
        return "hadamard" if T <= 2 else "segmented"
    if algorithm == "per_sample":
        raise ValueError("algorithm='per_sample' is not a Triton kernel; use 'segmented' or 'hadamard'")
    return algorithm


def _accumulate_linear(x3, g3, order, weight, seg, out3, algorithm):
    if order.numel() == 0 or x3.shape[1] == 0 or x3.shape[2] == 0 or g3.shape[2] == 0:
        return
    if _resolve(algorithm, x3.shape[1]) == "hadamard":
        _launch_pairs(x3, g3, order, weight, seg, out3)
    else:
        _launch_segmented(x3, g3, order, weight, seg, out3)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        raise ValueError(
            f"{name} has non-finite values after accumulation: an input (x, grad_out or a previous `out`) "
            "contains NaN or inf, or the squared gradients overflow; an `out` passed in now holds those values"
        )


def _bias_accumulate(g3, order, weight, seg, bias_out):
    if order.numel() == 0:
        return
    s = g3.index_select(0, order).to(bias_out.dtype).sum(1)
    gid = torch.repeat_interleave(torch.arange(bias_out.shape[0], device=seg.device), seg.diff())
    bias_out.index_add_(0, gid, s.square() * weight.unsqueeze(1))


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("unlearn_ext::sq_grad_linear_triton_", mutates_args=("out", "bias_out"))
def sq_grad_linear_triton_(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    group: torch.Tensor | None,
    num_groups: int,
    sample_weight: torch.Tensor | None,
    out: torch.Tensor,
    bias_out: torch.Tensor | None,
    algorithm: str = "auto",
) -> None:
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    g3 = grad_out if grad_out.dim() == 3 else grad_out.unsqueeze(1)
    # The public function validates too; the op checks what a direct call could get wrong.
    if x3.dim() != 3 or g3.shape[:2] != x3.shape[:2]:
        raise ValueError(
            f"x and grad_out must be [B, T, d] with matching B and T, got {list(x.shape)}, {list(grad_out.shape)}"
        )
    acc = accum_dtype(x.dtype)
    check_accumulator(out, (num_groups, g3.shape[-1], x3.shape[-1]), acc, x.device, "out")
    if bias_out is not None:
        check_accumulator(bias_out, (num_groups, g3.shape[-1]), acc, x.device, "bias_out")
    check_group_weight(group, num_groups, sample_weight, x3.shape[0])
    order, weight, seg = _sample_plan(x3.shape[0], group, num_groups, sample_weight, x.device, out.dtype)
    _accumulate_linear(x3, g3, order, weight, seg, out, algorithm)
    _check_finite(out, "out")
    if bias_out is not None:
        _bias_accumulate(g3, order, weight, seg, bias_out)
        _check_finite(bias_out, "bias_out")


@torch.library.custom_op("unlearn_ext::sq_grad_linear_triton", mutates_args=())
def sq_grad_linear_triton(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    group: torch.Tensor | None,
    num_groups: int,
    sample_weight: torch.Tensor | None,
    with_bias: bool,
    algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accum_dtype(x.dtype)
    fw = torch.zeros((num_groups, grad_out.shape[-1], x.shape[-1]), dtype=acc, device=x.device)
    fb = torch.zeros((num_groups, grad_out.shape[-1] if with_bias else 0), dtype=acc, device=x.device)
    sq_grad_linear_triton_(x, grad_out, group, num_groups, sample_weight, fw, fb if with_bias else None, algorithm)
    return fw, fb


def _conv_accumulate(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups,
                     sample_weight, out, bias_out, algorithm):  # fmt: skip
    c_out, c_in_g, kh, kw = weight_shape
    B = x.shape[0]
    acc = accum_dtype(x.dtype)
    check_accumulator(out, (num_groups, *weight_shape), acc, x.device, "out")
    if bias_out is not None:
        check_accumulator(bias_out, (num_groups, c_out), acc, x.device, "bias_out")
    check_group_weight(group, num_groups, sample_weight, B)
    if grad_out.shape[2] <= 0 or grad_out.shape[3] <= 0 or x.shape[1] != c_in_g * groups:
        raise ValueError(f"inconsistent conv2d shapes: x {list(x.shape)}, grad_out {list(grad_out.shape)}")
    L = grad_out.shape[2] * grad_out.shape[3]
    D = c_in_g * kh * kw
    co_g = c_out // groups
    order, weight, seg = _sample_plan(B, group, num_groups, sample_weight, x.device, out.dtype)
    out3 = out.view(num_groups, c_out, D)
    g_flat = grad_out.reshape(B, c_out, L)
    S = order.numel()
    chunk = max(1, _CONV_CHUNK_BYTES // max(1, groups * D * L * x.element_size()))
    for j0 in range(0, S, chunk):
        j1 = min(S, j0 + chunk)
        idx = order[j0:j1]
        cols = F.unfold(x.index_select(0, idx), (kh, kw), dilation, padding, stride)  # [c, C_in*kh*kw, L]
        gs = g_flat.index_select(0, idx)
        sub_seg = (seg - j0).clamp(0, j1 - j0)
        local = torch.arange(j1 - j0, device=x.device)
        for gi in range(groups):
            x3 = cols[:, gi * D : (gi + 1) * D, :].transpose(1, 2)
            g3 = gs[:, gi * co_g : (gi + 1) * co_g, :].transpose(1, 2)
            _accumulate_linear(x3, g3, local, weight[j0:j1], sub_seg, out3[:, gi * co_g : (gi + 1) * co_g], algorithm)
    _check_finite(out, "out")
    if bias_out is not None:
        _bias_accumulate(g_flat.transpose(1, 2), order, weight, seg, bias_out)
        _check_finite(bias_out, "bias_out")


@torch.library.custom_op("unlearn_ext::sq_grad_conv2d_triton_", mutates_args=("out", "bias_out"))
def sq_grad_conv2d_triton_(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    group: torch.Tensor | None,
    num_groups: int,
    sample_weight: torch.Tensor | None,
    out: torch.Tensor,
    bias_out: torch.Tensor | None,
    algorithm: str = "auto",
) -> None:
    _conv_accumulate(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups,
                     sample_weight, out, bias_out, algorithm)  # fmt: skip


@torch.library.custom_op("unlearn_ext::sq_grad_conv2d_triton", mutates_args=())
def sq_grad_conv2d_triton(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    group: torch.Tensor | None,
    num_groups: int,
    sample_weight: torch.Tensor | None,
    with_bias: bool,
    algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accum_dtype(x.dtype)
    fw = torch.zeros((num_groups, *weight_shape), dtype=acc, device=x.device)
    fb = torch.zeros((num_groups, weight_shape[0] if with_bias else 0), dtype=acc, device=x.device)
    _conv_accumulate(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups,
                     sample_weight, fw, fb if with_bias else None, algorithm)  # fmt: skip
    return fw, fb


def _embedding_accumulate(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight, out):
    B, T = ids.shape
    d = grad_out.shape[-1]
    check_accumulator(out, (num_groups, num_embeddings, d), accum_dtype(grad_out.dtype), ids.device, "out")
    check_group_weight(group, num_groups, sample_weight, B)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
        raise ValueError(f"ids must be in [0, num_embeddings={num_embeddings})")
    order, weight, seg = _sample_plan(B, group, num_groups, sample_weight, ids.device, out.dtype)
    S = order.numel()
    if S == 0 or T == 0 or d == 0:
        return
    gid = torch.repeat_interleave(torch.arange(num_groups, device=ids.device), seg.diff())  # group per position
    pos = torch.arange(S, device=ids.device).repeat_interleave(T)
    tok_b = order.repeat_interleave(T)
    tok_t = torch.arange(T, device=ids.device).repeat(S)
    tok_id = ids.index_select(0, order).reshape(-1).long()
    if padding_idx is not None:
        keep = tok_id != padding_idx
        pos, tok_b, tok_t, tok_id = pos[keep], tok_b[keep], tok_t[keep], tok_id[keep]
    if pos.numel() == 0:
        return
    key = pos * num_embeddings + tok_id
    key, perm = torch.sort(key, stable=True)
    tok_off = (tok_b[perm] * grad_out.stride(0) + tok_t[perm] * grad_out.stride(1)).contiguous()
    new_run = torch.ones_like(key, dtype=torch.bool)
    new_run[1:] = key[1:] != key[:-1]
    starts = torch.nonzero(new_run).flatten()
    run_start = torch.cat([starts, torch.tensor([key.numel()], device=ids.device)]).contiguous()
    run_pos = key[starts] // num_embeddings
    run_row = (gid[run_pos] * num_embeddings + key[starts] % num_embeddings).contiguous()
    run_weight = weight[run_pos].contiguous()
    block_d = 64
    grid = (starts.numel(), triton.cdiv(d, block_d))
    _sq_grad_embedding_kernel[grid](
        grad_out, out, tok_off, run_start, run_row, run_weight,
        d, grad_out.stride(2), out.stride(1),
        BLOCK_D=block_d, ACC=_tl_acc(out.dtype),
    )  # fmt: skip


@torch.library.custom_op("unlearn_ext::sq_grad_embedding_triton_", mutates_args=("out",))
def sq_grad_embedding_triton_(
    ids: torch.Tensor,
    grad_out: torch.Tensor,
    num_embeddings: int,
    padding_idx: int | None,
    group: torch.Tensor | None,
    num_groups: int,
    sample_weight: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    _embedding_accumulate(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight, out)
    _check_finite(out, "out")


@torch.library.custom_op("unlearn_ext::sq_grad_embedding_triton", mutates_args=())
def sq_grad_embedding_triton(
    ids: torch.Tensor,
    grad_out: torch.Tensor,
    num_embeddings: int,
    padding_idx: int | None,
    group: torch.Tensor | None,
    num_groups: int,
    sample_weight: torch.Tensor | None,
) -> torch.Tensor:
    acc = accum_dtype(grad_out.dtype)
    out = torch.zeros((num_groups, num_embeddings, grad_out.shape[-1]), dtype=acc, device=grad_out.device)
    sq_grad_embedding_triton_(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight, out)
    return out


def register(
    *,
    linear: tuple[Callable, Callable, Callable],
    conv: tuple[Callable, Callable, Callable],
    embedding: tuple[Callable, Callable, Callable],
) -> None:
    """Attach fake kernels and autograd formulas (shared with the C++ ops) to the Triton ops."""
    for functional, inplace, (fake, setup, backward) in (
        (sq_grad_linear_triton, sq_grad_linear_triton_, linear),
        (sq_grad_conv2d_triton, sq_grad_conv2d_triton_, conv),
        (sq_grad_embedding_triton, sq_grad_embedding_triton_, embedding),
    ):
        functional.register_fake(fake)
        functional.register_autograd(backward, setup_context=setup)
        inplace.register_fake(lambda *args, **kwargs: None)
