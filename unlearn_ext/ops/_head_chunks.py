"""What the Triton launchers of the fused LM-head losses share (``_masked_kl_triton``,
``_ce_norm_triton``): chunk and tile sizes, the finiteness check, and a chunk's GEMMs (the logits,
and the gradients from ``dLoss/dz`` written over them), mirroring csrc/include/unlearn_ext/linear_head.h.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton

from unlearn_ext._triton import interpreter_enabled

_CHUNK_BYTES = 32 << 20  # logits per chunk of rows, per model

# Chunks over which a bfloat16/float16 weight gradient is summed in its own dtype; past this, in
# float32 (csrc/include/unlearn_ext/linear_head.h kMaxLowPrecisionChunks says why).
MAX_LOW_PRECISION_CHUNKS = 2

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class GradMask(NamedTuple):
    """Which gradients of a head's loss are computed (the ops' ``bool[3]`` grad_mask / output_mask).
    A frozen head needs no ``[V, H]`` weight gradient, the largest buffer of the ops."""

    hidden: bool
    weight: bool
    bias: bool

    @classmethod
    def of(cls, mask: Sequence[bool], has_bias: bool) -> GradMask:
        """From an op's ``bool[3]`` argument (a bias gradient only with a bias)."""
        return cls(bool(mask[0]), bool(mask[1]), bool(mask[2]) and has_bias)

    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


def zero_grads(want: GradMask, n: int, hidden_dim: int, vocab: int, dtype: torch.dtype, device):
    """``(grad_hidden, grad_weight, grad_bias)`` of a loss with no active row: zeros where wanted."""
    return (
        torch.zeros(n, hidden_dim, dtype=dtype, device=device) if want.hidden else None,
        torch.zeros(vocab, hidden_dim, dtype=dtype, device=device) if want.weight else None,
        torch.zeros(vocab, dtype=dtype, device=device) if want.bias else None,
    )


def grads_or_empty(like: torch.Tensor, *grads: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Each gradient, or a distinct empty tensor where it was not computed (op outputs must not alias)."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def rows_per_chunk(vocab: int, env_name: str, elem_size: int = 4) -> int:
    """Rows per chunk: about 32 MiB of logits in the input dtype (``elem_size`` bytes each), or the
    value of ``env_name`` (tests use it)."""
    forced = _rows_from_env(env_name)
    return forced or max(1, _CHUNK_BYTES // (vocab * elem_size))


# On a GPU a chunk has at least this many rows: each head GEMM reads the whole weight and does about
# rows flops per byte (bfloat16), memory-bound below a few hundred rows (linear_head.h says more;
# reasoned, not measured).
MIN_GPU_CHUNK_ROWS = 512


def rows_for_grad(
    rows: int, n: int, hidden_dim: int, dtype: torch.dtype, weight_grad: bool, env_name: str, *, gpu: bool = False
) -> int:
    """``rows`` raised to a quarter of the ``[V, hidden_dim]`` weight's size in logits when a
    bfloat16/float16 weight gradient is computed (fewer passes over the float32 sums; up to
    ``hidden_dim / 2`` tokens need none), and to MIN_GPU_CHUNK_ROWS on a GPU; a row count set in
    ``env_name`` is kept. At most ``n``."""
    if not _rows_from_env(env_name):
        if weight_grad and dtype in _LOW_PRECISION:
            rows = max(rows, hidden_dim // 4)
        if gpu:
            rows = max(rows, MIN_GPU_CHUNK_ROWS)
    return max(1, min(rows, n))


def _rows_from_env(env_name: str) -> int:
    env = os.environ.get(env_name, "")
    if not env:
        return 0
    rows = int(env)
    if rows < 1:
        raise ValueError(f"{env_name} must be a positive integer, got {env!r}")
    return rows


def block_v(vocab: int) -> int:
    """Vocabulary tile: small under the interpreter so that tests cross tile boundaries."""
    cap = 64 if interpreter_enabled() else 4096
    return min(cap, triton.next_power_of_2(vocab))


def check_finite(tensors: dict[str, torch.Tensor | None]) -> None:
    for name, t in tensors.items():
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")


def logits_into(z: torch.Tensor, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``z = h @ w.T + bias`` in place (``z`` ``[m, V]``, ``h`` ``[m, H]``, ``w`` ``[V, H]``)."""
    if bias is not None:
        torch.addmm(bias, h, w.T, out=z)
    else:
        torch.mm(h, w.T, out=z)


class Float16Overflow:
    """float16 logits overflow past 65504 even from finite inputs, and the row kernels would then
    return a wrong loss (a KL of 0 with NaN gradients): each chunk's logits add their min and max
    (NaN propagates) to a float32 scalar, which a finite chunk cannot overflow; ``check`` syncs once.
    Mirrors csrc/include/unlearn_ext/linear_head.h."""

    def __init__(self, like: torch.Tensor):
        self.acc = torch.zeros((), dtype=torch.float32, device=like.device) if like.dtype == torch.float16 else None

    def add(self, z: torch.Tensor) -> None:
        if self.acc is not None and z.numel():
            lo, hi = torch.aminmax(z)
            self.acc += lo.float() + hi.float()

    def check(self) -> None:
        if self.acc is not None and not bool(torch.isfinite(self.acc)):
            raise ValueError(
                "the float16 logits overflowed (|hidden @ weight.T + bias| > 65504) although the inputs are "
                "finite: use bfloat16 or float32"
            )


class HeadGradSums:
    """The ``[V, H]`` weight gradient (when ``weight``) and ``[V]`` bias gradient (when ``bias``) of a
    head summed over ``chunks`` chunks of tokens: in place in the head's dtype (float32/float64, or
    bfloat16/float16 over at most MAX_LOW_PRECISION_CHUNKS chunks), else in float32 and rounded once
    by ``result()``. A bfloat16/float16 bias gradient is always summed in float32."""

    def __init__(self, vocab: int, hidden_dim: int, weight: bool, bias: bool, dtype: torch.dtype, device, chunks: int):
        low = dtype in _LOW_PRECISION
        self.dtype = dtype
        wdt = torch.float32 if low and chunks > MAX_LOW_PRECISION_CHUNKS else dtype
        self.gw = torch.empty(vocab, hidden_dim, dtype=wdt, device=device) if weight else None
        self.gb = torch.empty(vocab, dtype=torch.float32 if low else dtype, device=device) if bias else None
        self._tmp = None
        self._started = False

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        """Adds a chunk: ``g = dLoss/dz`` ``[m, V]`` and its hidden states ``h`` ``[m, H]``."""
        first = not self._started
        self._started = True
        if self.gw is not None and self.gw.dtype == g.dtype:
            if first:
                torch.mm(g.T, h, out=self.gw)
            else:
                self.gw.addmm_(g.T, h)
        elif self.gw is not None:
            self._add_in_float32(g, h, first)
        if self.gb is not None:
            if first:
                torch.sum(g, 0, dtype=self.gb.dtype, out=self.gb)
            else:
                self.gb.add_(g.sum(0, dtype=self.gb.dtype))

    def _add_in_float32(self, g: torch.Tensor, h: torch.Tensor, first: bool) -> None:
        if g.device.type != "cuda":  # no float32-output GEMM for low-precision CPU tensors: upcast
            if first:
                torch.mm(g.T.float(), h.float(), out=self.gw)
            else:
                self.gw.addmm_(g.T.float(), h.float())
            return
        vocab, hidden_dim = self.gw.shape
        slab = max(1, min(vocab, _CHUNK_BYTES // (hidden_dim * 4)))  # the float32 temporary's rows
        if not first and self._tmp is None:
            self._tmp = torch.empty(slab, hidden_dim, dtype=torch.float32, device=g.device)
        for v0 in range(0, vocab, slab):
            s = min(slab, vocab - v0)
            dst, gs = self.gw[v0 : v0 + s], g[:, v0 : v0 + s].T
            if first:
                torch.mm(gs, h, out_dtype=torch.float32, out=dst)
            else:
                t = self._tmp[:s]
                torch.mm(gs, h, out_dtype=torch.float32, out=t)
                dst.add_(t)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(grad_weight, grad_bias)`` in the head's dtype (zeros when nothing was added; None where
        not wanted)."""
        out = []
        for t in (self.gw, self.gb):
            if t is not None and not self._started:
                t.zero_()
            out.append(t.to(self.dtype) if t is not None else None)
        return out[0], out[1]


def accumulate_grads(g, h, w, gh, sums: HeadGradSums | None) -> None:
    """From a chunk's ``g = dLoss/dz`` ``[m, V]``: ``gh = g @ w`` (the chunk's rows; skipped when
    ``gh`` is None) and the chunk added to ``sums`` (when given)."""
    if gh is not None:
        torch.mm(g, w, out=gh)
    if sums is not None:
        sums.add(g, h)
