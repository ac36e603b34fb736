"""Fine-tune on the retain set (FT): relies on catastrophic forgetting of the forget set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from unlearn_ext.methods._base import Batches, Unlearner, register
from unlearn_ext.models.training import fit


@register
@dataclass(kw_only=True)
class Finetune(Unlearner):
    """A few epochs of SGD on the retain set's cross-entropy, from the original weights.

    Hyperparameters: epochs, lr, momentum, weight_decay.
    """

    name = "finetune"

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        self.log.extend(
            fit(
                model,
                retain,
                epochs=self.epochs,
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                seed=self.seed,
                progress=self.progress,
                description="finetune",
            )
        )
