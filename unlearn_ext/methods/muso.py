"""MUSO for deep networks (METHODS.md 3.2): alternate an optimal relabelling of the forget set,
computed on the last layer as a linear model over the current features, with one epoch of training.

Per epoch ``e`` (``eps_e`` on a cosine ramp from ``eps0`` to ``eps_final``):

1. Stream *all* retain samples through the current network (eval mode) and accumulate the Gram
   ``G = Z^T Z`` of their features with a 1 appended (``[d + 1, d + 1]``, float64). The projector onto
   the retain features' row space is ``Pi = Z^T (Z Z^T + eps I)^-1 Z = I - eps (G + eps I)^-1``
   (one Cholesky of ``G + eps I``: no subsampling and no ``N x N`` inverse, unlike the released code,
   whose current version also mis-scales it by ``1 / eps``; METHODS.md 3.2).
2. ``R = Pi (w_p - w0) + w0 + w_p``, with ``w_p`` the original head and ``w0`` its initialisation
   (``[d + 1, C]``).
3. One epoch over the retain and forget batches in a random order; each forget batch is relabelled
   with ``argmax(z~_net(x_f) R - m_orig(x_f))`` (no gradient; ``m_orig(x_f)`` are the original model's
   logits, cached once): the linear-case label ``z~_net (w0 + Pi (w_p - w0))`` plus the feature-drift
   correction ``(z~_net - z~_orig) w_p``. Cross-entropy on every batch, one optimiser step each.

``targets="labels"`` (not the paper's deep form): the same closed form (METHODS.md 3.1) with the retain
set's *true* labels in place of the original model's retain logits ``Z_r w_p``. The pass of step 1 also
accumulates ``C = Z^T Y`` (``Y``: one-vs-rest +-1 targets, ``[d + 1, classes]``), the head is the
ridge least-squares fit from ``w0``, ``w_r = (G + eps I)^-1 (C + eps w0)``
(= ``w0 + Z^T (Z Z^T + eps I)^-1 (Y - Z w0)``, 3.1's formula), and each forget batch is relabelled
with ``argmax(z~_net(x_f) w_r)``: the prediction of the last layer retrained on the retain set over the
current features. The two forms agree when the original head interpolates its labels
(``Z_r w_p = Y``, the over-parameterised linear case); they differ once there are more retain samples
than feature dimensions, where ``Pi`` is the identity and the paper's relabelling is the original
model's own prediction (see the README's MUSO section).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext._progress import progress_bar
from unlearn_ext.distributed import current_data_parallel
from unlearn_ext.methods._base import (
    Batches,
    Unlearner,
    full_tensor,
    interleave,
    model_copy,
    model_device,
    register,
    steps_per_epoch,
    unwrap_model,
)
from unlearn_ext.models.heads import features_and_logits, final_linear
from unlearn_ext.models.initial_head import get_initial_head, head_matrix

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")
PROJECTORS = ("exact", "released")
TARGETS = ("original", "labels")


def epsilon_ramp(epoch: int, epochs: int, eps0: float, eps_final: float) -> float:
    """``eps0 + (eps_final - eps0) (1 - cos(pi e / (E - 1))) / 2`` (``eps0`` for a single epoch)."""
    if epochs <= 1:
        return eps0
    return eps0 + (eps_final - eps0) * (1.0 - math.cos(math.pi * epoch / (epochs - 1))) / 2.0


def retain_gram(model: nn.Module, retain: Batches) -> tuple[torch.Tensor, int]:
    """``(Z^T Z, N)``: the float64 ``[d + 1, d + 1]`` Gram of the model's penultimate features with a 1
    appended, over every retain sample (one streaming pass, eval mode, no gradient), and the count.

    Under :func:`unlearn_ext.distributed.unlearn_distributed` each rank streams its shard and the Gram
    and count are summed over the ranks (one bucketed all-reduce), so every rank gets the whole set's."""
    gram, _, n = retain_statistics(model, retain)
    return gram, n


def retain_statistics(
    model: nn.Module, retain: Batches, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(G, C, N)`` in one streaming pass over the retain set (eval mode, no gradient, float64):
    ``G = Z^T Z`` ``[d + 1, d + 1]`` of the penultimate features with a 1 appended, ``C = Z^T Y``
    ``[d + 1, num_classes]`` with ``Y`` the one-vs-rest targets of the labels (+1 in the sample's class
    column, -1 elsewhere; ``None`` when ``num_classes`` is None) and the count ``N``. Summed over the
    ranks under :func:`unlearn_ext.distributed.unlearn_distributed` (one bucketed all-reduce).

    Raises:
        ValueError: an empty retain set, or a label outside ``[0, num_classes)``.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    gram, cross, n = None, None, 0
    try:
        with torch.no_grad():
            for x, y in retain:
                if x.shape[0] == 0:
                    continue
                feats, _ = features_and_logits(model, x.to(device))
                z = torch.cat([feats.double(), feats.new_ones(feats.shape[0], 1, dtype=torch.float64)], dim=1)
                g = z.T @ z
                gram = g if gram is None else gram + g
                if num_classes is not None:
                    c = z.T @ _signed_one_vs_rest(y.to(device), num_classes)
                    cross = c if cross is None else cross + c
                n += z.shape[0]
    finally:
        model.train(was_training)
    parallel = current_data_parallel()
    if parallel is not None:
        d = final_linear(model).in_features
        if gram is None:  # an empty shard still takes part in the sum
            gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=device)
        if num_classes is not None and cross is None:
            cross = torch.zeros(d + 1, num_classes, dtype=torch.float64, device=device)
        count = torch.tensor([n], dtype=torch.float64, device=gram.device)
        parallel.all_reduce([gram, count] if cross is None else [gram, cross, count])
        n = int(count.item())
    if gram is None or n == 0:
        raise ValueError("muso: the retain set is empty")
    return gram, cross, n


def _signed_one_vs_rest(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, num_classes]`` float64: +1 in each sample's class column, -1 elsewhere."""
    y = y.long().reshape(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"muso: retain labels must be class ids in [0, {num_classes}) to match the head, "
            f"got [{int(y.min())}, {int(y.max())}]"
        )
    out = torch.full((y.shape[0], num_classes), -1.0, dtype=torch.float64, device=y.device)
    out[torch.arange(y.shape[0], device=y.device), y] = 1.0
    return out


def retain_projector(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """``I - eps (G + eps I)^-1`` (= ``Z^T (Z Z^T + eps I)^-1 Z``) by a Cholesky factorisation.

    Raises:
        ValueError: ``eps`` not positive and finite, a non-square or non-finite ``gram``, or ``G + eps I``
            not positive definite (``eps = 0`` with rank-deficient features).
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"muso: eps must be a positive finite ridge, got {eps!r}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or not bool(torch.isfinite(gram).all()):
        raise ValueError(f"muso: the Gram matrix must be a finite square matrix, got shape {tuple(gram.shape)}")
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + eps * eye)
    if int(info) != 0:
        raise ValueError(f"muso: G + eps I is not positive definite at eps={eps!r}: raise eps0")
    return eye - eps * torch.cholesky_solve(eye, chol)


def released_projector(
    model: nn.Module, retain: Batches, eps: float, subset_ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """The released code's operator (its Feb 2025 HEAD, METHODS.md 3.2), for comparison only:
    ``(1 / eps) Z_s^T (I + Z_s Z_s^T)^-1 Z_s`` over a random ``subset_ratio`` of the retain rows
    (each kept with that probability), an ``N_s x N_s`` solve; not a projector (scaled by ``1 / eps``).
    Returns ``(operator [d + 1, d + 1], N_s)``."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for x, _ in retain:
                if x.shape[0] == 0:
                    continue
                keep = torch.rand(x.shape[0], generator=generator) < subset_ratio
                if not bool(keep.any()):
                    continue
                feats, _ = features_and_logits(model, x[keep].to(device))
                rows.append(torch.cat([feats.double(), torch.ones_like(feats[:, :1], dtype=torch.float64)], 1))
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("muso: the retain subsample is empty: raise subset_ratio")
    z = torch.cat(rows)
    inner = torch.eye(z.shape[0], dtype=z.dtype, device=z.device) + z @ z.T
    return z.T @ torch.linalg.solve(inner, z) / eps, z.shape[0]


def relabel_matrix(gram: torch.Tensor, w_p: torch.Tensor, w0: torch.Tensor, eps: float) -> torch.Tensor:
    """``R = Pi (w_p - w0) + w0 + w_p`` (``[d + 1, C]``) with ``Pi = retain_projector(gram, eps)``;
    ``w_p``, ``w0``: the original head and its initialisation as ``[d + 1, C]`` (weight rows, then bias)."""
    projector = retain_projector(gram, eps)
    return projector @ (w_p - w0) + w0 + w_p


def retrained_head(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, eps: float) -> torch.Tensor:
    """The last layer retrained on the retain set from ``w0``: ``(G + eps I)^-1 (C + eps w0)`` ``[d + 1, C]``,
    the ridge least-squares fit ``argmin ||Z w - Y||^2 + eps ||w - w0||^2`` (= ``w0 + Z^T (Z Z^T + eps I)^-1
    (Y - Z w0)``, METHODS.md 3.1's closed form), by one Cholesky of ``G + eps I``.

    Raises:
        ValueError: as :func:`retain_projector`; ``cross`` or ``w0`` not ``[d + 1, C]`` or not finite.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"muso: eps must be a positive finite ridge, got {eps!r}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or not bool(torch.isfinite(gram).all()):
        raise ValueError(f"muso: the Gram matrix must be a finite square matrix, got shape {tuple(gram.shape)}")
    if cross.shape != w0.shape or cross.shape[0] != gram.shape[0] or not bool(torch.isfinite(cross).all()):
        raise ValueError(
            f"muso: Z^T Y {tuple(cross.shape)} and w0 {tuple(w0.shape)} must both be finite [d + 1, C] with "
            f"d + 1 = {gram.shape[0]}"
        )
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + eps * eye)
    if int(info) != 0:
        raise ValueError(f"muso: G + eps I is not positive definite at eps={eps!r}: raise eps0")
    return torch.cholesky_solve(cross + eps * w0.to(cross.dtype), chol)


def forget_scores(features: torch.Tensor, relabel: torch.Tensor, original_logits: torch.Tensor | None) -> torch.Tensor:
    """MUSO's relabelling scores ``z~(x_f) R - m_orig(x_f)`` ``[B, C]`` (float64) from the current
    features ``[B, d]`` (``z~(x_f) R`` when ``original_logits`` is None: ``targets="labels"``, where
    ``R`` is the retrained head); the hard labels are their argmax."""
    z = torch.cat([features.double(), torch.ones_like(features[:, :1], dtype=torch.float64)], dim=1)
    scores = z @ relabel
    return scores if original_logits is None else scores - original_logits.double()


@register
@dataclass(kw_only=True)
class MUSO(Unlearner):
    """MUSO (Yang et al.): alternating optimal relabelling of the forget set and fine-tuning.

    Needs the head's initialisation ``w0``: the model's ``initial_head`` buffer (recorded by
    :func:`unlearn_ext.models.train_classifier` and kept in checkpoints) or the ``w0`` argument
    (``[C, d + 1]``: weight, bias as the last column). The model's last layer must be an ``nn.Linear``.

    Hyperparameters: epochs, lr, optimizer ("adamw", "adam", "sgd"), schedule ("cosine", "constant"),
    weight_decay, eps0 and eps_final (the ridge's cosine ramp; METHODS.md 3.2: 1e-6 to 1e-2), w0,
    projector: ``"exact"`` (the streamed-Gram projector over all retain rows) or ``"released"`` (the
    released code's ``1 / eps``-scaled operator on a random ``subset_ratio`` of the retain rows, to
    reproduce its behaviour; :func:`released_projector`); targets: ``"original"`` (the paper's deep form:
    the original model's retain logits stand in for the labels, with the drift correction) or
    ``"labels"`` (the retain set's true labels: relabel with the last layer retrained on the retain set
    over the current features, :func:`retrained_head`; the module docstring says when the two differ).
    Defaults are the released code's full-class setting (5 epochs, AdamW, lr 2.8e-4, cosine); its
    random-subset setting is ``epochs=2, optimizer="adam", lr=3e-5, schedule="constant"``.

    ``log`` per epoch: ``eps``; ``retain_samples_in_gram``; ``projector_effect`` =
    ``||(I - Pi)(w_p - w0)|| / ||w_p - w0||`` (0 when the retain features span the whole feature space,
    as they do once there are more retain samples than feature dimensions: the relabelling is then the
    original model's own prediction plus the drift correction; None with ``targets="labels"``); ``loss``;
    ``forget_relabel_keeps_true`` (fraction of forget samples relabelled with their true class).
    """

    name = "muso"

    epochs: int = 5
    lr: float = 2.8e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    weight_decay: float = 0.0
    eps0: float = 1e-6
    eps_final: float = 1e-2
    projector: str = "exact"
    subset_ratio: float = 0.2
    targets: str = "original"
    w0: torch.Tensor | None = None

    def _check(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"muso: epochs must be a positive int, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"muso: lr must be positive, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"muso: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"muso: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"muso: projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"muso: targets must be one of {TARGETS}, got {self.targets!r}")
        if self.targets == "labels" and self.projector != "exact":
            raise ValueError("muso: targets='labels' uses the streamed Gram (projector='exact'), not the released one")
        if not (isinstance(self.subset_ratio, (int, float)) and 0 < self.subset_ratio <= 1):
            raise ValueError(f"muso: subset_ratio must be in (0, 1], got {self.subset_ratio!r}")
        if self.projector == "released" and current_data_parallel() is not None:
            raise NotImplementedError("muso: projector='released' (a comparison knob) runs on one process only")
        for name in ("eps0", "eps_final"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"muso: {name} must be a positive finite number, got {v!r}")

    def _initial_head(self, model: nn.Module, head: nn.Linear) -> torch.Tensor:
        w0 = self.w0 if self.w0 is not None else get_initial_head(unwrap_model(model))
        if w0 is None:
            raise ValueError(
                "muso needs the head's initialisation w0: train the model with unlearn_ext.models.train_classifier "
                "(it records the 'initial_head' buffer) or pass w0=[C, d + 1] (initial weight, bias as last column)"
            )
        expected = (head.out_features, head.in_features + 1)
        if not isinstance(w0, torch.Tensor) or tuple(w0.shape) != expected:
            got = tuple(w0.shape) if isinstance(w0, torch.Tensor) else type(w0).__name__
            raise ValueError(
                f"muso: w0 must have shape {list(expected)} (classes x (feature dimension + 1)) to match the "
                f"model's final nn.Linear({head.in_features}, {head.out_features}), got {got}"
            )
        if not bool(torch.isfinite(w0).all()):
            raise ValueError("muso: w0 contains NaN or inf")
        return w0.detach().double().to(head.weight.device)

    def _optimizer(self, model: nn.Module, steps: int):
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if self.schedule == "cosine" else None
        return opt, sched

    def _forget_labels(
        self, model: nn.Module, index: int, x: torch.Tensor, relabel: torch.Tensor, original_logits: torch.Tensor | None
    ) -> torch.Tensor:
        """The hard labels ``[B]`` of forget batch ``index`` (inputs ``x`` on the model's device), called in
        eval mode under ``no_grad``: ``argmax(z~_net(x) R - m_orig(x))`` (:func:`forget_scores`).
        ``benchmarks/muso_oracle.py`` overrides it to train MUSO's schedule on the retrained model's labels."""
        feats, _ = features_and_logits(model, x)
        return forget_scores(feats, relabel, original_logits).argmax(1)

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        self._check()
        head = final_linear(model)
        w0 = self._initial_head(model, head).T  # [d + 1, C]
        w_p = full_tensor(head_matrix(head)).double().T  # [d + 1, C]
        device = model_device(model)
        forget_batches = [(x, y) for x, y in forget if y.shape[0]]
        original_logits = [None] * len(forget_batches)
        if self.targets == "original":
            original = model_copy(model).eval()
            with torch.no_grad():  # the original model's forget logits = z~_orig(x_f) w_p, cached once
                original_logits = [original(x.to(device)).double() for x, _ in forget_batches]
            del original

        retain_steps = steps_per_epoch(retain)
        if retain_steps is None:  # a re-iterable without len(): count its batches once
            retain_steps = sum(1 for _ in retain)
        n_steps = self.epochs * (len(forget_batches) + retain_steps)
        opt, sched = self._optimizer(model, n_steps)
        generator = torch.Generator().manual_seed(self.seed)
        with progress_bar(self.epochs, "muso", self.progress) as advance:
            for epoch in range(self.epochs):
                eps = epsilon_ramp(epoch, self.epochs, self.eps0, self.eps_final)
                if self.targets == "labels":
                    gram, cross, n_retain = retain_statistics(model, retain, head.out_features)
                    relabel = retrained_head(gram, cross, w0, eps)
                elif self.projector == "exact":
                    gram, n_retain = retain_gram(model, retain)
                    relabel = relabel_matrix(gram, w_p, w0, eps)
                else:
                    operator, n_retain = released_projector(model, retain, eps, self.subset_ratio, generator)
                    relabel = operator @ (w_p - w0) + w0 + w_p
                indexed = list(enumerate(forget_batches))
                stats = {"loss": 0.0, "steps": 0, "kept_true": 0, "n_forget": 0}
                model.train()
                for source, batch in interleave(("retain", retain), ("forget", indexed), generator=generator):
                    if source == "forget":
                        index, (x, y_true) = batch
                        x = x.to(device)
                        model.eval()
                        with torch.no_grad():
                            y = self._forget_labels(model, index, x, relabel, original_logits[index])
                        model.train()
                        stats["kept_true"] += int((y.cpu() == y_true.cpu()).sum())
                        stats["n_forget"] += int(y.shape[0])
                    else:
                        x, y = batch
                        if y.shape[0] == 0:
                            continue
                        x, y = x.to(device), y.to(device)
                    loss = F.cross_entropy(model(x), y.long())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    stats["loss"] += float(loss.detach())
                    stats["steps"] += 1
                entry = {
                    "epoch": epoch,
                    "eps": eps,
                    "retain_samples_in_gram": n_retain,
                    "projector_effect": None
                    if self.targets == "labels"
                    else float(torch.linalg.matrix_norm(relabel - 2 * w_p))
                    / max(float(torch.linalg.matrix_norm(w_p - w0)), 1e-300),
                    "loss": stats["loss"] / max(stats["steps"], 1),
                    "forget_relabel_keeps_true": stats["kept_true"] / max(stats["n_forget"], 1),
                }
                self.log.append(entry)
                advance(1, f"eps {eps:.2g} relabel=true {entry['forget_relabel_keeps_true']:.2f}")
