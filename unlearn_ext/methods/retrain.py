"""Retrain from scratch on the retain set: the gold standard every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from unlearn_ext.methods._base import Batches, Unlearner, register
from unlearn_ext.models.mnemonic_codes import get_codes
from unlearn_ext.models.training import TrainConfig, fit
from unlearn_ext.models.vision import reset_parameters


@register
@dataclass(kw_only=True)
class Retrain(Unlearner):
    """Re-initialise every layer (seeded) and train on the retain set only.

    Every recipe field left ``None`` comes from the recipe the model was trained with
    (``model.train_config``, recorded by ``train_classifier`` and checkpoints), else from
    :class:`~unlearn_ext.models.TrainConfig`'s defaults (the mnemonic paper's MNIST recipe). A model
    trained with mnemonic codes is retrained with them too (the retained classes' codes only appear).

    Hyperparameters: epochs, lr, momentum, weight_decay, schedule (``"none"``/``"cosine"``),
    t_mix (code replacement probability; 0 to train without codes).
    """

    name = "retrain"

    epochs: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    t_mix: float | None = None

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        recipe = dict(getattr(model, "train_config", None) or TrainConfig().to_dict())
        for key in ("epochs", "lr", "momentum", "weight_decay", "schedule", "t_mix"):
            if getattr(self, key) is not None:
                recipe[key] = getattr(self, key)
        codes = get_codes(model)
        t_mix = recipe["t_mix"] if codes is not None else 0.0
        reset_parameters(model, self.seed)
        self.log.extend(
            fit(
                model,
                retain,
                epochs=recipe["epochs"],
                lr=recipe["lr"],
                momentum=recipe["momentum"],
                weight_decay=recipe["weight_decay"],
                schedule=recipe["schedule"],
                t_mix=t_mix,
                codes=codes,
                seed=self.seed,
                progress=self.progress,
                description="retrain",
            )
        )
