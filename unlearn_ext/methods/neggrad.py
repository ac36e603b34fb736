"""NegGrad (gradient ascent on the forget set) and NegGrad+ (Kurmanji et al.: with a retain term)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext._progress import progress_bar
from unlearn_ext.methods._base import Batches, Unlearner, cycle, model_device, register
from unlearn_ext.models.training import sgd


@register
@dataclass(kw_only=True)
class NegGrad(Unlearner):
    """Gradient ascent on the forget set's cross-entropy: ``theta <- theta + lr * grad L_f``, clipped.

    Hyperparameters: epochs (passes over the forget set), lr, momentum, max_grad_norm (clipping of
    the ascent direction; ``0`` disables).
    """

    name = "neggrad"
    requires_retain = False

    epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    max_grad_norm: float = 1.0

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        opt = sgd(model, self.lr, self.momentum, 0.0)
        device = model_device(model)
        model.train()
        with progress_bar(self.epochs, "neggrad", self.progress) as advance:
            for epoch in range(self.epochs):
                total, n = 0.0, 0
                for x, y in forget:
                    x, y = x.to(device), y.to(device)
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    (-loss).backward()
                    if self.max_grad_norm > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                    opt.step()
                    total += loss.item() * y.shape[0]
                    n += y.shape[0]
                self.log.append({"epoch": epoch, "forget_loss": total / n})
                advance(1, f"L_f {total / n:.3f}")


@register
@dataclass(kw_only=True)
class NegGradPlus(Unlearner):
    """NegGrad+: minimise ``beta * L_r - (1 - beta) * L_f``, one forget batch per retain batch.

    Hyperparameters: epochs (passes over the retain set), lr, momentum, weight_decay, beta,
    max_grad_norm (``0`` disables clipping).
    """

    name = "neggrad_plus"

    epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    beta: float = 0.99
    max_grad_norm: float = 5.0

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"neggrad_plus: beta must be in [0, 1], got {self.beta}")
        opt = sgd(model, self.lr, self.momentum, self.weight_decay)
        device = model_device(model)
        forget_stream = cycle(forget)
        model.train()
        with progress_bar(self.epochs, "neggrad+", self.progress) as advance:
            for epoch in range(self.epochs):
                sums = torch.zeros(2)
                steps = 0
                for xr, yr in retain:
                    xf, yf = next(forget_stream)
                    lr_ = F.cross_entropy(model(xr.to(device)), yr.to(device))
                    lf = F.cross_entropy(model(xf.to(device)), yf.to(device))
                    opt.zero_grad(set_to_none=True)
                    (self.beta * lr_ - (1.0 - self.beta) * lf).backward()
                    if self.max_grad_norm > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                    opt.step()
                    sums += torch.tensor([lr_.item(), lf.item()])
                    steps += 1
                self.log.append(
                    {"epoch": epoch, "retain_loss": sums[0].item() / steps, "forget_loss": sums[1].item() / steps}
                )
                advance(1, f"L_r {sums[0].item() / steps:.3f} L_f {sums[1].item() / steps:.3f}")
