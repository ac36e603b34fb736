"""Random labels (RL / Amnesiac-style relabelling) and the training loop it shares with SalUn."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext._progress import progress_bar
from unlearn_ext.methods._base import (
    Batches,
    Unlearner,
    interleave,
    model_device,
    random_wrong_labels,
    register,
    unwrap_model,
)
from unlearn_ext.models.training import sgd


def train_with_random_labels(
    method: Unlearner,
    model: nn.Module,
    forget: Batches,
    retain: Batches,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    retain_weight: float = 1.0,
    grad_mask: dict[str, torch.Tensor] | None = None,
    description: str,
) -> None:
    """Each epoch: every forget batch (relabelled to random wrong classes, fresh each epoch) and every
    retain batch (weighted by ``retain_weight``), in one random order. ``grad_mask`` ``{name: 0/1}``
    restricts updates to the masked entries (SalUn)."""
    # With a mask, weight decay is applied by hand inside the mask so unmasked weights never move.
    opt = sgd(model, lr, momentum, weight_decay if grad_mask is None else 0.0)
    device = model_device(model)
    gen = torch.Generator().manual_seed(method.seed)
    params = dict(unwrap_model(model).named_parameters())  # the mask's names (no DDP prefix)
    model.train()
    with progress_bar(epochs, description, method.progress) as advance:
        for epoch in range(epochs):
            sums = {"forget": 0.0, "retain": 0.0}
            counts = {"forget": 0, "retain": 0}
            for source, (x, y) in interleave(("forget", forget), ("retain", retain), generator=gen):
                x, y = x.to(device), y.to(device)
                weight = 1.0
                if source == "forget":
                    y = random_wrong_labels(y, method.num_classes, gen)
                else:
                    weight = retain_weight
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                (weight * loss).backward()
                if grad_mask is not None:
                    for n, m in grad_mask.items():
                        if params[n].grad is not None:
                            params[n].grad.add_(params[n].detach(), alpha=weight_decay).mul_(m)
                opt.step()
                sums[source] += loss.item()
                counts[source] += 1
            entry = {"epoch": epoch, **{f"{k}_loss": sums[k] / max(counts[k], 1) for k in sums}}
            method.log.append(entry)
            advance(1, f"L_rand {entry['forget_loss']:.3f} L_r {entry['retain_loss']:.3f}")


@register
@dataclass(kw_only=True)
class RandomLabel(Unlearner):
    """Fine-tune on the retain set plus the forget set relabelled to random wrong classes.

    Hyperparameters: epochs, lr, momentum, weight_decay.
    """

    name = "random_label"

    epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        train_with_random_labels(
            self,
            model,
            forget,
            retain,
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            description="random_label",
        )
