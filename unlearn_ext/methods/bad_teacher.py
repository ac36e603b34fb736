"""Bad Teacher (Chundawat et al., AAAI 2023): distil from a competent teacher on retained data and
from an incompetent (randomly initialised) teacher on the forget set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unlearn_ext._progress import progress_bar
from unlearn_ext.methods._base import Batches, Unlearner, interleave, model_copy, model_device, register
from unlearn_ext.methods.scrub import distill_kl
from unlearn_ext.models.training import sgd
from unlearn_ext.models.vision import reset_parameters


@register
@dataclass(kw_only=True)
class BadTeacher(Unlearner):
    """Student starts at the original weights. Each epoch sees every forget batch (target: the
    randomly initialised teacher) and a seeded ``retain_fraction`` of the retain batches (target:
    the original model), in one random order, minimising ``KL(p_teacher || p_student)``.

    Hyperparameters: epochs, retain_fraction (0.3 in the paper), temperature, lr, momentum, weight_decay.
    """

    name = "bad_teacher"

    epochs: int = 1
    retain_fraction: float = 0.3
    temperature: float = 1.0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        if not 0.0 < self.retain_fraction <= 1.0:
            raise ValueError(f"bad_teacher: retain_fraction must be in (0, 1], got {self.retain_fraction}")
        competent = model_copy(model).eval().requires_grad_(False)
        incompetent = reset_parameters(model_copy(model), self.seed + 1).eval().requires_grad_(False)
        opt = sgd(model, self.lr, self.momentum, self.weight_decay)
        device = model_device(model)
        gen = torch.Generator().manual_seed(self.seed)
        model.train()
        with progress_bar(self.epochs, "bad_teacher", self.progress) as advance:
            for epoch in range(self.epochs):
                subset = [b for b in retain if torch.rand((), generator=gen).item() < self.retain_fraction]
                total, steps = 0.0, 0
                for source, (x, _) in interleave(("forget", forget), ("retain", subset), generator=gen):
                    x = x.to(device)
                    with torch.no_grad():
                        target = (incompetent if source == "forget" else competent)(x)
                    loss = distill_kl(model(x), target, self.temperature)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, steps = total + loss.item(), steps + 1
                self.log.append({"epoch": epoch, "kl": total / steps, "retain_batches": len(subset)})
                advance(1, f"KL {total / steps:.3f}")
