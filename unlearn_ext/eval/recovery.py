"""Performance-recovery attacks on an unlearned model (OPC's "shallow forgetting" tests, METHODS.md 4.3).

* :func:`feature_mapping_attack`: training-free. A map from the unlearned model's penultimate
  features to the original model's is solved in closed form (ridge least squares) on a fitting set
  (the retain data), then forget samples are classified by the *original* head on the mapped
  unlearned features. A high recovered accuracy means the forget information is still in the features.
  The map is affine by default (``x W + b``, the stronger attack) or linear (``intercept=False``:
  ``x W``, METHODS.md 4.3's form, under which features contracted to the origin map to the origin).
* :func:`finetune_recovery_attack`: a copy of the unlearned model is fine-tuned for a few SGD steps on
  a small retain subset; forget accuracy that comes back was hidden, not removed.

Both are pure: the models given are never changed (the fine-tuning runs on a deep copy).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext.eval.predictions import (
    Batches,
    _check_targets,
    accuracy,
    accuracy_from_logits,
    model_device,
    predict,
)
from unlearn_ext.eval.representation import _check_features, stream_features
from unlearn_ext.models.heads import final_linear

# --------------------------------------------------------------------------------------------
# Closed-form affine / linear ridge map
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureMap:
    """A map ``x -> x @ weight + bias`` fitted by :func:`fit_affine_map` / :func:`fit_feature_map`.

    Attributes:
        weight: float64 ``[d_in, d_out]``.
        bias: float64 ``[d_out]`` (all zeros when ``intercept`` is false).
        intercept: whether ``bias`` was fitted (affine map) or fixed at 0 (linear map).
        r2: coefficient of determination on the fitting set, pooled over output dimensions:
            ``1 - sum of squared residuals / sum of squared deviations from the column means``
            (``nan`` when the targets are constant on the fitting set; a linear map can score below 0).
        ridge: the relative ridge it was fitted with; rho: the absolute penalty that gave.
        n: number of fitting samples.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    intercept: bool
    r2: float
    ridge: float
    rho: float
    n: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` ``[N, d_in]`` to float64 ``[N, d_out]`` (on ``weight``'s device)."""
        _check_features(x, "x")
        if x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"x must be [N, {self.weight.shape[0]}] for this map, got {tuple(x.shape)}")
        return x.to(device=self.weight.device, dtype=torch.float64) @ self.weight + self.bias


class _AffineRidge:
    """One streaming pass of sufficient statistics for an affine ridge fit of ``y`` on ``x``.

    With ``Z = [x - s_x, 1]`` (the first chunk's column means ``s`` are subtracted to limit
    cancellation; the fit is affine, so the shift changes nothing else) it accumulates in float64 the
    ``(d_x + 1) x (d_x + 1)`` Gram ``Z^T Z``, the ``(d_x + 1) x d_y`` cross matrix ``Z^T (y - s_y)``
    and ``||y - s_y||_F^2``.
    """

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.y_sq = 0.0
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return 0 if self.gram is None else round(float(self.gram[-1, -1]))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        _check_features(x, "x")
        _check_features(y, "y")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        if x.shape[0] == 0:
            return
        x = x.detach().to(dtype=torch.float64)
        y = y.detach().to(device=x.device, dtype=torch.float64)
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
            d_x, d_y = x.shape[1], y.shape[1]
            self.gram = torch.zeros(d_x + 1, d_x + 1, dtype=torch.float64, device=x.device)
            self.cross = torch.zeros(d_x + 1, d_y, dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.shift_x.shape[0] or y.shape[1] != self.shift_y.shape[0]:
            raise ValueError(
                f"feature widths changed between chunks: got x [*, {x.shape[1]}] and y [*, {y.shape[1]}] "
                f"after x [*, {self.shift_x.shape[0]}] and y [*, {self.shift_y.shape[0]}]"
            )
        z = torch.cat([x - self.shift_x, torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)
        y = y - self.shift_y
        self.gram += z.T @ z
        self.cross += z.T @ y
        self.y_sq += float(y.square().sum())

    def solve(self, ridge: float, *, intercept: bool = True) -> FeatureMap:
        """The ridge solution from the statistics: affine (``intercept``) or linear through the origin."""
        n = self.n
        if n == 0:
            raise ValueError("no samples to fit the map on")
        d = self.gram.shape[0] - 1
        mu_x = self.gram[:d, d] / n
        centred_trace = float(torch.trace(self.gram[:d, :d]) - n * mu_x.square().sum())
        # rho = ridge * (average per-dimension sum of squared deviations); fall back to `ridge` itself when
        # the features are constant (their block is then 0 and any positive rho gives weight 0).
        rho = ridge * centred_trace / d if centred_trace > 0 else float(ridge)
        if intercept:
            gram, cross, y_sq = self.gram, self.cross, self.y_sq
        else:
            gram, cross, y_sq = self._unshifted()
        system = gram.clone()
        system.diagonal()[:d] += rho  # the intercept (last row/column, affine only) is not penalised
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) != 0:
            raise ValueError(
                "the fitting features are rank-deficient (e.g. constant or duplicated dimensions, or fewer "
                f"samples than dimensions: n={n}, d={d}); use ridge > 0"
            )
        solution = torch.cholesky_solve(cross, factor)  # [(d + 1), d_y] affine, [d, d_y] linear
        if intercept:
            weight = solution[:d]
            bias = solution[d] + self.shift_y - self.shift_x @ weight
        else:
            weight, bias = solution, torch.zeros_like(self.shift_y)
        # residual and total sums of squares from the same statistics (no second pass)
        rss = float((solution * (gram @ solution)).sum() - 2 * (solution * cross).sum()) + y_sq
        mu_y = self.cross[d] / n
        tss = self.y_sq - n * float(mu_y.square().sum())
        r2 = 1.0 - max(rss, 0.0) / tss if tss > 0 else math.nan
        return FeatureMap(weight=weight, bias=bias, intercept=intercept, r2=r2, ridge=float(ridge), rho=rho, n=n)

    def _unshifted(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``X^T X`` ``[d, d]``, ``X^T Y`` ``[d, d_y]`` and ``||Y||_F^2`` of the raw (unshifted) data.

        With ``X = X_s + 1 s_x^T`` and ``Y = Y_s + 1 s_y^T``: ``X^T X = X_s^T X_s + g s_x^T + s_x g^T +
        n s_x s_x^T`` and ``X^T Y = X_s^T Y_s + g s_y^T + s_x c^T + n s_x s_y^T``, where ``g = X_s^T 1`` and
        ``c = Y_s^T 1`` are the ones-column entries already accumulated.
        """
        d, n = self.gram.shape[0] - 1, self.n
        s_x, s_y = self.shift_x, self.shift_y
        g, c = self.gram[:d, d], self.cross[d]
        xtx = self.gram[:d, :d] + torch.outer(g, s_x) + torch.outer(s_x, g) + n * torch.outer(s_x, s_x)
        xty = self.cross[:d] + torch.outer(g, s_y) + torch.outer(s_x, c) + n * torch.outer(s_x, s_y)
        y_sq = self.y_sq + 2 * float(s_y @ c) + n * float(s_y @ s_y)
        return xtx, xty, y_sq


def _check_ridge(ridge: float) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")


def fit_affine_map(
    x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-3, chunk_size: int = 4096, intercept: bool = True
) -> FeatureMap:
    """Closed-form ridge regression of ``y`` ``[N, d_y]`` on ``x`` ``[N, d_x]``, streamed in row chunks.

    Minimises ``||x W + 1 b^T - y||_F^2 + rho ||W||_F^2`` (the intercept ``b`` is not penalised), by one
    Cholesky solve of the ``(d_x + 1)``-square system of the Gram of ``[x, 1]`` (float64). With
    ``intercept=False`` it fits the linear map ``x W`` (``b = 0``, a ``d_x``-square system), the form of
    METHODS.md 4.3: ``x = 0`` then maps to ``0``.

    ``ridge`` is unit-free: ``rho = ridge * tr(x_c^T x_c) / d_x`` with ``x_c`` the column-centred ``x``,
    i.e. ``ridge`` is the penalty as a fraction of the average per-dimension variance of ``x`` (times
    ``N``), the same ``rho`` with or without the intercept. ``ridge=0`` is ordinary least squares and
    needs full-rank (centred, for the affine map) ``x``. When ``x`` is constant (collapsed), ``rho =
    ridge`` and the fitted affine ``W`` is 0: the map predicts ``y``'s mean.

    Raises:
        ValueError: on non-finite or non-2-D inputs, mismatched row counts, ``N = 0``, ``ridge < 0``, or
            rank-deficient ``x`` with ``ridge = 0``.
    """
    _check_ridge(ridge)
    _check_intercept(intercept)
    _check_features(x, "x")
    _check_features(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    acc = _AffineRidge()
    for start in range(0, x.shape[0], chunk_size):
        acc.update(x[start : start + chunk_size], y[start : start + chunk_size])
    if acc.n == 0:
        raise ValueError("x and y are empty (no samples)")
    return acc.solve(ridge, intercept=intercept)


def _check_intercept(intercept: bool) -> None:
    if not isinstance(intercept, bool):
        raise ValueError(f"intercept must be True or False, got {intercept!r}")


def fit_feature_maps(
    unlearned: nn.Module, original: nn.Module, fit_batches: Batches, *, ridge: float = 1e-3
) -> dict[str, FeatureMap]:
    """Both maps from ``unlearned``'s penultimate features to ``original``'s, from one pass over ``fit_batches``.

    Returns ``{"affine": ..., "linear": ...}``: :func:`fit_affine_map` with and without the intercept on
    the same statistics (both models run once on each batch; accumulated on ``unlearned``'s device).

    Raises:
        ValueError: on empty batches, a model without a final ``nn.Linear``, or as :func:`fit_affine_map`.
    """
    _check_ridge(ridge)
    acc = _feature_statistics(unlearned, original, fit_batches)
    return {"affine": acc.solve(ridge, intercept=True), "linear": acc.solve(ridge, intercept=False)}


def _feature_statistics(unlearned: nn.Module, original: nn.Module, fit_batches: Batches) -> _AffineRidge:
    """The ridge statistics of ``original``'s penultimate features on ``unlearned``'s, one pass."""
    acc = _AffineRidge()
    for [(f_u, _), (f_o, _)], _ in stream_features([unlearned, original], fit_batches, "fit_batches"):
        acc.update(f_u, f_o)
    if acc.n == 0:
        raise ValueError("fit_batches is empty (no samples)")
    return acc


def fit_feature_map(
    unlearned: nn.Module, original: nn.Module, fit_batches: Batches, *, ridge: float = 1e-3, intercept: bool = True
) -> FeatureMap:
    """The map from ``unlearned``'s penultimate features to ``original``'s, fitted on ``fit_batches``.

    Affine by default, linear with ``intercept=False`` (see :func:`fit_affine_map` for both and for
    ``ridge``); one streaming pass as :func:`fit_feature_maps`.

    Raises:
        ValueError: on empty batches, a model without a final ``nn.Linear``, or as :func:`fit_affine_map`.
    """
    _check_ridge(ridge)
    _check_intercept(intercept)
    return _feature_statistics(unlearned, original, fit_batches).solve(ridge, intercept=intercept)


# --------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------


def feature_mapping_attack(
    unlearned: nn.Module,
    original: nn.Module,
    fit_batches: Batches,
    attack_batches: Batches,
    *,
    ridge: float = 1e-3,
    intercept: bool = True,
    feature_map: FeatureMap | None = None,
) -> dict[str, float | int]:
    """Training-free feature-mapping (FM) recovery attack (METHODS.md 4.3, 6.4).

    1. On ``fit_batches`` (typically the retain set), fit the map ``W`` from ``F_u = f_u(X_fit)`` to
       ``F_o = f_o(X_fit)`` in closed form (:func:`fit_feature_map`): affine ``F_u W + b`` by default,
       linear ``F_u W`` (METHODS.md 4.3's form) with ``intercept=False``.
    2. Classify ``attack_batches`` (typically the forget set) with the *original* head ``g_o`` (the
       original's final ``nn.Linear``) on the mapped features: ``g_o(f_u(x) W + b)``.

    The affine map is the stronger attack: its intercept can send features contracted to one point
    (OPC) into any region of the original's feature space, while the linear map sends the origin to
    the origin, where the original head answers with its bias alone.

    Args:
        unlearned, original: classifiers whose last layer is an ``nn.Linear``; neither is changed.
        fit_batches, attack_batches: ``(inputs, targets)`` batches, targets ``[B]`` class indices.
        ridge: relative ridge penalty (a fraction of the average per-dimension variance of the
            unlearned features on the fitting set; see :func:`fit_affine_map`).
        intercept: fit the affine map (True) or the linear one (False).
        feature_map: a map already fitted by :func:`fit_feature_map` on ``fit_batches`` (attacking
            several sets with one fit); ``fit_batches``, ``ridge`` and ``intercept`` are then not used.

    Returns:
        ``{"recovered_acc", "unlearned_acc", "original_acc"}``: top-1 accuracies on the attack set in
        [0, 1] of the attack, the unlearned model and the original model; ``"fit_r2"``: the map's
        :attr:`FeatureMap.r2` on the fitting set; ``"n_fit"``, ``"n_attack"``: sample counts.

    Raises:
        ValueError: on empty batches, bad targets, a model without a final ``nn.Linear``, ``ridge < 0``, or a
            non-bool ``intercept``.
    """
    if feature_map is None:
        feature_map = fit_feature_map(unlearned, original, fit_batches, ridge=ridge, intercept=intercept)
    return feature_mapping_attacks(unlearned, original, {"map": feature_map}, attack_batches)["map"]


def feature_mapping_attacks(
    unlearned: nn.Module, original: nn.Module, feature_maps: Mapping[str, FeatureMap], attack_batches: Batches
) -> dict[str, dict[str, float | int]]:
    """:func:`feature_mapping_attack` with several fitted maps, in one pass over ``attack_batches``.

    Both models run once per batch; each map in ``feature_maps`` (e.g. :func:`fit_feature_maps`'s affine
    and linear maps) is applied to the same unlearned features. Returns ``{name: result}`` with
    :func:`feature_mapping_attack`'s result keys.

    Raises:
        ValueError: on empty batches or maps, bad targets, or a model without a final ``nn.Linear``.
    """
    if not feature_maps:
        raise ValueError("feature_maps is empty")
    head = final_linear(original)
    weight = head.weight.detach().to(torch.float64)
    bias = None if head.bias is None else head.bias.detach().to(torch.float64)
    recovered_correct = dict.fromkeys(feature_maps, 0)
    correct = {"unlearned_acc": 0, "original_acc": 0}
    n_attack = 0
    for [(f_u, logits_u), (_, logits_o)], targets in stream_features(
        [unlearned, original], attack_batches, "attack_batches"
    ):
        _check_targets(targets, logits_o, "attack_batches targets")
        for name, feature_map in feature_maps.items():
            recovered = F.linear(feature_map(f_u).to(weight.device), weight, bias)
            recovered_correct[name] += int((recovered.argmax(1).cpu() == targets).sum())
        for key, logits in (("unlearned_acc", logits_u), ("original_acc", logits_o)):
            correct[key] += int((logits.argmax(1).cpu() == targets).sum())
        n_attack += targets.shape[0]
    if n_attack == 0:
        raise ValueError("attack_batches is empty (no samples)")
    results: dict[str, dict[str, float | int]] = {}
    for name, feature_map in feature_maps.items():
        result: dict[str, float | int] = {"recovered_acc": recovered_correct[name] / n_attack}
        result.update({key: value / n_attack for key, value in correct.items()})
        result.update(fit_r2=feature_map.r2, n_fit=feature_map.n, n_attack=n_attack)
        results[name] = result
    return results


def finetune_recovery_attack(
    unlearned: nn.Module,
    retain_subset_batches: Batches,
    attack_batches: Batches,
    *,
    steps: int = 50,
    lr: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
) -> dict[str, float | int]:
    """Fine-tuning recovery attack: does forget accuracy come back after a little retain-only training?

    A deep copy of ``unlearned`` is trained in train mode for ``steps`` SGD steps (``lr``, ``momentum``,
    no weight decay) on cross-entropy over ``retain_subset_batches``, cycling through them as often as
    needed; ``seed`` seeds torch's RNG for the steps (dropout). ``unlearned`` itself is never changed.
    The attack set is typically the forget set; the fine-tuning data should be a *small* retain subset
    (a few hundred samples) so that relearning from scratch is not what is measured.

    Args:
        unlearned: the model attacked (any classifier ``[B, ...] -> [B, C]``).
        retain_subset_batches: re-iterable ``(inputs, targets)`` batches to fine-tune on.
        attack_batches: re-iterable ``(inputs, targets)`` batches, scored before and after.
        steps: number of SGD steps (batches), at least 1.

    Returns:
        ``{"recovered_acc", "unlearned_acc"}``: top-1 accuracy on the attack set after and before the
        fine-tuning, in [0, 1]; ``"steps"``; ``"finetune_loss"``: the cross-entropy of the last step
        (nats); ``"n_attack"``.

    Raises:
        ValueError: on bad ``steps``/``lr``/``momentum``, empty batches, or a model with no trainable
            parameter.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr!r}, momentum={momentum!r}")
    logits, targets = predict(unlearned, attack_batches)
    unlearned_acc, n_attack = accuracy_from_logits(logits, targets), int(targets.shape[0])
    attacker = copy.deepcopy(unlearned)
    params = [p for p in attacker.parameters() if p.requires_grad]
    if not params:
        raise ValueError("unlearned has no trainable parameter (requires_grad) to fine-tune")
    device = model_device(attacker)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    attacker.train()
    last_loss = math.nan
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        step = 0
        while step < steps:
            seen = 0
            for inputs, targets in itertools.islice(retain_subset_batches, steps - step):
                if len(targets) == 0:
                    continue
                logits = attacker(inputs.to(device))
                loss = F.cross_entropy(logits, torch.as_tensor(targets).to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last_loss = loss.item()
                step += 1
                seen += 1
            if seen == 0:
                raise ValueError(
                    "retain_subset_batches is empty (no samples), or a one-shot iterator that ran out; "
                    "pass a re-iterable (a DataLoader, TensorBatches, a list)"
                )
    if not math.isfinite(last_loss):
        raise FloatingPointError("fine-tuning diverged: non-finite loss; lower lr")
    recovered_acc = accuracy(attacker, attack_batches)
    return {
        "recovered_acc": recovered_acc,
        "unlearned_acc": unlearned_acc,
        "steps": steps,
        "finetune_loss": last_loss,
        "n_attack": n_attack,
    }
