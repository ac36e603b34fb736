"""One-shot unlearning with mnemonic codes (METHODS.md 1.3-1.4).

The per-class diagonal Fisher comes from the codes alone (one code per class, eval mode, empirical
labels), computed in ONE batched pass of the fused per-sample op with one group per class. Then,
per parameter tensor, ``delta = min(lambda1, lambda2 / max(r)) * r`` with ``r = F_f / F_r`` computed
in log space; ``theta + delta`` and ``theta - delta`` are scored on the codes and the better one kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unlearn_ext.fisher import diagonal_fisher
from unlearn_ext.methods._base import Batches, Unlearner, labels_of, register
from unlearn_ext.models.mnemonic_codes import get_codes


def class_fisher_from_codes(model: nn.Module, codes: torch.Tensor, *, backend: str = "auto") -> dict[str, torch.Tensor]:
    """Per-class empirical Fisher from mnemonic codes: ``{name: [C, *param.shape]}``, row ``k`` is the
    squared gradient of ``CE(model(codes[k]), k)``. One forward/backward for all classes (the
    ``group`` argument of the fused op); the model must be in eval mode (BatchNorm)."""
    num_classes = codes.shape[0]
    labels = torch.arange(num_classes, device=codes.device)
    return diagonal_fisher(model, [(codes, labels)], groups="targets", num_groups=num_classes, backend=backend)


def mnemonic_delta(
    fisher_forget: torch.Tensor, fisher_retain: torch.Tensor, lambda1: float, lambda2: float
) -> tuple[torch.Tensor, float]:
    """METHODS.md 1.4 for one tensor: ``(delta, scale)`` with ``delta = scale * F_f / F_r`` (>= 0).

    The ratio is ``exp(log F_f - log F_r)``; NaN log-ratios become 0 (ratio 1); +inf ratios become the
    largest finite ratio of the tensor; ``scale = min(lambda1, lambda2 / max ratio)`` (per tensor).
    """
    log_ratio = torch.log(fisher_forget) - torch.log(fisher_retain)
    log_ratio = torch.nan_to_num(log_ratio, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    ratio = torch.exp(log_ratio)
    finite = torch.isfinite(ratio)
    if not finite.all():
        largest = ratio[finite].max() if finite.any() else torch.tensor(1.0, dtype=ratio.dtype)
        ratio = torch.where(finite, ratio, largest)
    peak = float(ratio.max())
    scale = lambda1 if peak <= 0 else min(lambda1, lambda2 / peak)
    return scale * ratio, scale


@register
@dataclass(kw_only=True)
class Mnemonic(Unlearner):
    """One-shot class unlearning with mnemonic codes (Yamashita et al., ACML 2024).

    Needs a model trained with codes (``t_mix``): they are read from its ``mnemonic_codes`` buffer or
    given as ``codes``. No training data is used, only the forget set's labels (which classes).

    Hyperparameters:
        lambda1: cap on the per-entry step scale. Default 2e-3, twice the paper's MNIST value: on the
            bundled 4000-image MNIST the paper's 1e-3 left 8.1% forget-class test accuracy (mean of 9
            runs, class 7 up to 50%); 2e-3 gave 0.8% (benchmarks/bench_methods.py).
        lambda2: cap on the largest entry of each tensor's step (paper, MNIST: 10).
        eps: floor added to both Fishers (1e-16 as in the reference code).
        classes: forget these classes (default: every class in the forget set's labels).
        codes: ``[C, *input_shape]`` codes (default: the model's own).
        backend: Fisher op backend (``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"``, ``"reference"``).
    """

    name = "mnemonic"
    requires_retain = False

    lambda1: float = 2e-3
    lambda2: float = 10.0
    eps: float = 1e-16
    classes: tuple[int, ...] | None = None
    codes: torch.Tensor | None = None
    backend: str = "auto"

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        codes = self.codes if self.codes is not None else get_codes(model)
        if codes is None:
            raise ValueError(
                "mnemonic needs the model's mnemonic codes: train it with codes (t_mix > 0, "
                "unlearn_ext.models.train_classifier) or pass codes=[C, *input_shape]"
            )
        device = next(model.parameters()).device
        codes = codes.to(device)
        num_classes = codes.shape[0]
        classes = sorted(set(self.classes)) if self.classes is not None else sorted(set(labels_of(forget).tolist()))
        if not classes:
            raise ValueError("mnemonic: no class to forget")
        if any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"mnemonic: classes {classes} outside the codes' classes 0..{num_classes - 1}")
        if len(classes) == num_classes:
            raise ValueError(
                f"mnemonic: forgetting every class leaves no retained class to compare against (mnemonic "
                f"unlearns whole classes; this forget set's labels cover all {num_classes}, as a random-sample "
                "forget set does: pass classes=, or use a sample-level method such as opc or scrub)"
            )
        forget_mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
        forget_mask[classes] = True

        model.eval()
        per_class = class_fisher_from_codes(model, codes, backend=self.backend)
        deltas, scales = {}, {}
        for name, fk in per_class.items():
            f_forget = self.eps + fk[forget_mask].mean(0)
            f_retain = self.eps + fk[~forget_mask].mean(0)
            deltas[name], scales[name] = mnemonic_delta(f_forget, f_retain, self.lambda1, self.lambda2)

        params = dict(model.named_parameters())
        labels = torch.arange(num_classes, device=device)
        original = {n: params[n].detach().clone() for n in deltas}
        scores = {}
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for n, d in deltas.items():
                    params[n].copy_(original[n] + sign * d.to(params[n].dtype))
                correct = model(codes).argmax(1) == labels
                acc_f = correct[forget_mask].float().mean().item()
                acc_r = correct[~forget_mask].float().mean().item()
                scores[sign] = (1.0 - acc_f) + acc_r
            best = 1.0 if scores[1.0] >= scores[-1.0] else -1.0
            for n, d in deltas.items():
                params[n].copy_(original[n] + best * d.to(params[n].dtype))
        self.log.append(
            {
                "classes": classes,
                "sign": int(best),
                "score_plus": scores[1.0],
                "score_minus": scores[-1.0],
                "scales": scales,
            }
        )
