"""Fisher forgetting (Golatkar et al., CVPR 2020), in the form common code uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unlearn_ext.methods._base import Batches, Unlearner, register, whole_forgotten_classes
from unlearn_ext.methods._fisher_sets import forget_retain_fisher


@register
@dataclass(kw_only=True)
class FisherForgetting(Unlearner):
    """Add Gaussian noise shaped by the retain set's inverse Fisher:
    ``theta <- theta + sqrt(alpha * min(1 / (n_r * F_r + eps), var_max)) * n``, ``n ~ N(0, I)``,
    with ``F_r`` the per-sample mean diagonal Fisher of the retain set (one fused pass). For class
    forgetting (classes absent from the retain set), the output layer's rows of those classes are
    set to zero (as common implementations do), so only the retained classes compete.

    Hyperparameters: alpha (noise scale), var_max (clamp of the per-entry variance before alpha),
    eps, labels (``"sampled"``: the Monte-Carlo true Fisher, as in the paper; or ``"empirical"``),
    zero_forgotten_rows, backend.
    """

    name = "fisher_forgetting"

    alpha: float = 1e-6
    var_max: float = 1e3
    eps: float = 1e-8
    labels: str = "sampled"
    zero_forgotten_rows: bool = True
    backend: str = "auto"

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        model.eval()
        _, f_r, _, n_r = forget_retain_fisher(
            model, [], retain, labels=self.labels, seed=self.seed, backend=self.backend, progress=self.progress
        )
        gen = torch.Generator().manual_seed(self.seed)
        classes = whole_forgotten_classes(forget, retain) if self.zero_forgotten_rows else []
        head = _output_layer(model, self.num_classes) if classes else None
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in f_r:
                    continue
                var = self.alpha * torch.clamp(1.0 / (n_r * f_r[name] + self.eps), max=self.var_max)
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
                p.add_((var.sqrt() * noise).to(p.dtype))
            if head is not None:
                head.weight[classes] = 0.0
                if head.bias is not None:
                    head.bias[classes] = 0.0
        self.log.append({"n_retain": n_r, "zeroed_classes": classes})


def _output_layer(model: nn.Module, num_classes: int) -> nn.Linear | None:
    """The last ``nn.Linear`` with ``num_classes`` outputs (the classifier head), if any."""
    head = None
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            head = m
    return head
