"""Mean diagonal Fisher of the forget and retain sets in ONE pass of the fused per-sample op
(group 0 = forget, group 1 = retain), shared by the Fisher-based baselines."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from unlearn_ext.fisher import diagonal_fisher
from unlearn_ext.methods._base import Batches


def _tagged(forget: Batches, retain: Batches | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for group, batches in ((0, forget), (1, retain)):
        if batches is None:
            continue
        for x, y in batches:
            yield x, y, torch.full((y.shape[0],), group, dtype=torch.long)


def forget_retain_fisher(
    model: nn.Module,
    forget: Batches,
    retain: Batches | None,
    *,
    labels: str = "empirical",
    seed: int = 0,
    backend: str = "auto",
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]:
    """``(F_forget, F_retain, n_forget, n_retain)``: per-sample mean diagonal Fishers ``{name: [*shape]}``
    (``F_retain`` is zeros when ``retain`` is None). ``model`` must be in eval mode (BatchNorm)."""
    sums, counts = diagonal_fisher(
        model,
        _tagged(forget, retain),
        num_groups=2,
        labels=labels,
        seed=seed,
        backend=backend,
        return_counts=True,
        progress=progress,
    )
    n_f, n_r = int(counts[0]), int(counts[1])
    f_forget = {k: v[0] / max(n_f, 1) for k, v in sums.items()}
    f_retain = {k: v[1] / max(n_r, 1) for k, v in sums.items()}
    return f_forget, f_retain, n_f, n_r
