"""SalUn (Fan et al., ICLR 2024): random-label unlearning restricted to salient weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext.distributed import current_data_parallel
from unlearn_ext.methods._base import Batches, Unlearner, model_copy, model_device, register, unwrap_model
from unlearn_ext.methods.random_label import train_with_random_labels


def saliency_mask(model: nn.Module, forget: Batches, keep_fraction: float) -> dict[str, torch.Tensor]:
    """``{name: 0/1 mask}`` of the ``keep_fraction`` entries with the largest ``|grad L_f(theta)|``
    over all parameters (one global threshold); ``L_f`` is the forget set's mean cross-entropy.
    Under :func:`unlearn_ext.distributed.unlearn_distributed` the gradient sums and the count are
    summed over the ranks' data shards (the same mask on every rank); under FSDP2 the gradients are
    taken on a gathered copy and each rank gets its parameter shard's slice of the mask (a DTensor)."""
    live = unwrap_model(model)  # plain autograd.grad: no DDP gradient hooks
    sharded = _is_fsdp(live)
    # FSDP2 keeps only shards: take the gradients on a gathered full copy (a collective, on every rank).
    model = model_copy(model) if sharded else live
    device = model_device(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    total = 0
    model.eval()
    for x, y in forget:
        loss = F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True):
            if g is not None:
                grads[n] += g
        total += y.shape[0]
    parallel = current_data_parallel()
    if parallel is not None:
        count = torch.tensor([float(total)], dtype=torch.float64, device=device)
        parallel.all_reduce([*grads.values(), count])
        total = int(count.item())
    flat = torch.cat([g.abs().flatten() for g in grads.values()]) / total
    k = max(1, int(round(keep_fraction * flat.numel())))
    threshold = torch.topk(flat, k, sorted=False).values.min()
    masks = {n: (g.abs() / total >= threshold).to(g.dtype) for n, g in grads.items()}
    if sharded:  # the same full mask on every rank -> each rank's slice, shaped like its parameter shard
        from torch.distributed.tensor import distribute_tensor

        shards = dict(live.named_parameters())
        masks = {
            n: distribute_tensor(m, shards[n].device_mesh, shards[n].placements, src_data_rank=None)
            for n, m in masks.items()
        }
    return masks


def _is_fsdp(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


@register
@dataclass(kw_only=True)
class SalUn(Unlearner):
    """Saliency mask ``m = 1[|grad L_f(theta_o)| >= gamma]`` keeping ``keep_fraction`` of the weights,
    then random-label CE on the forget set plus ``alpha * L_r``, updating only the masked weights.

    Hyperparameters: keep_fraction (0.5 in the paper), epochs, lr, momentum, weight_decay, alpha.
    """

    name = "salun"

    keep_fraction: float = 0.5
    epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    alpha: float = 1.0

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"salun: keep_fraction must be in (0, 1], got {self.keep_fraction}")
        mask = saliency_mask(model, forget, self.keep_fraction)
        kept = sum(int(m.sum()) for m in mask.values())
        self.log.append({"masked_weights": kept, "total_weights": sum(m.numel() for m in mask.values())})
        train_with_random_labels(
            self,
            model,
            forget,
            retain,
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            retain_weight=self.alpha,
            grad_mask=mask,
            description="salun",
        )
