"""What the Triton launchers of the fused LM-head losses share (``_masked_kl_triton``,
``_ce_norm_triton``): chunk and tile sizes, the finiteness check, and a chunk's GEMMs (the logits,
and the gradients from ``dLoss/dz`` written over them), mirroring csrc/include/unlearn_ext/linear_head.h.
"""

from __future__ import annotations

import os

import torch
import triton

from unlearn_ext._triton import interpreter_enabled

_CHUNK_ELEMS = 8 << 20  # logits per chunk of rows (32 MiB in float32)


def rows_per_chunk(vocab: int, env_name: str) -> int:
    """Rows per chunk: about 32 MiB of float32 logits, or the value of ``env_name`` (tests use it)."""
    env = os.environ.get(env_name, "")
    if env:
        rows = int(env)
        if rows < 1:
            raise ValueError(f"{env_name} must be a positive integer, got {env!r}")
        return rows
    return max(1, _CHUNK_ELEMS // vocab)


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


def accumulate_grads(g, h, w, gh, gw, gb, first: bool) -> None:
    """From a chunk's ``g = dLoss/dz`` ``[m, V]``: ``gh = g @ w`` (the chunk's rows), and ``gw``
    (``[V, H]``), ``gb`` (``[V]`` or None) set by the first chunk, accumulated by the others."""
    torch.mm(g, w, out=gh)
    if first:
        torch.mm(g.T, h, out=gw)
        if gb is not None:
            torch.sum(g, 0, out=gb)
    else:
        gw.addmm_(g.T, h)
        if gb is not None:
            gb.add_(g.sum(0))
