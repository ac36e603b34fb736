"""MUSO in its exact setting (METHODS.md 3.1): a linear head over fixed (random) features.

A least-squares head ``f(x) = phi(x)^T w`` trained by gradient descent from ``w0`` on an interpolable
problem (more features than samples) converges to the interpolant closest to ``w0``:
``w = w0 + Phi^+ (y - Phi w0)``. So fine-tuning the original head on *all* the data, with the forget
samples relabelled by the retrained head's predictions ``y~_f = Phi_f w_r``, lands exactly on the
retrained head ``w_r``; and ``w_r`` is known in closed form from the retain set and ``w0``:

    y~_f = Phi_f w0 + Phi_f Phi_r^T (Phi_r Phi_r^T + eps I)^-1 (y_r - Phi_r w0)

This module holds that relabelling (:func:`optimal_forget_labels`), the trainer
(:func:`fit_interpolating_head`: conjugate-gradient least squares or plain gradient descent, both
iterating in ``w0 + row(Phi)``), MUSO and the two relabelling baselines of the paper's linear
experiment (random labels, Bad Teacher), and the distances they are compared by. Shapes: ``phi``
``[N, p]`` features; targets ``[N]`` (binary, +-1) or ``[N, C]`` (one-vs-rest +-1 columns); heads
``[p]`` or ``[p, C]`` to match. Use float64 for exactness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SOLVERS = ("cgls", "gd")


@dataclass(frozen=True)
class HeadFit:
    """Result of :func:`fit_interpolating_head`.

    Attributes:
        weight: the trained head, ``[p]`` or ``[p, C]`` like ``w0``.
        iterations: iterations run.
        relative_residual: ``||Phi w - y||_F / ||y||_F`` at the end.
        converged: the residual reached ``tol`` (False when stopped by ``max_iter`` or ``stop``).
        stopped_early: ``stop`` returned True.
    """

    weight: torch.Tensor
    iterations: int
    relative_residual: float
    converged: bool
    stopped_early: bool = False


@dataclass(frozen=True)
class LinearUnlearning:
    """Result of a linear-head unlearning method: the new head, the labels it was fine-tuned on
    (``[N]`` or ``[N, C]``, forget rows relabelled) and the fine-tuning's :class:`HeadFit`."""

    weight: torch.Tensor
    labels: torch.Tensor
    fit: HeadFit


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_matrix(phi: torch.Tensor, name: str = "phi") -> None:
    if not isinstance(phi, torch.Tensor) or phi.dim() != 2 or not phi.is_floating_point():
        got = tuple(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__
        raise ValueError(f"{name} must be a floating-point [N, p] feature matrix, got {got}")
    if phi.shape[0] == 0:
        raise ValueError(f"{name} has no rows (no samples)")
    if not bool(torch.isfinite(phi).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_targets(targets: torch.Tensor, n: int, name: str = "targets") -> None:
    if not isinstance(targets, torch.Tensor) or targets.dim() not in (1, 2) or not targets.is_floating_point():
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{name} must be floating-point [N] or [N, C] regression targets, got {got}")
    if targets.shape[0] != n:
        raise ValueError(f"{name} has {targets.shape[0]} rows but the features have {n}")
    if not bool(torch.isfinite(targets).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_head(w: torch.Tensor, p: int, targets: torch.Tensor, name: str) -> None:
    expected = (p,) if targets.dim() == 1 else (p, targets.shape[1])
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != expected:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} must have shape {list(expected)} (features x target columns), got {got}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_forget_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"forget_mask must be a bool tensor [{n}] (True: forget the sample), got {got}")
    n_forget = int(mask.sum())
    if n_forget == 0:
        raise ValueError("forget_mask selects no sample: the forget set is empty")
    if n_forget == n:
        raise ValueError("forget_mask selects every sample: nothing would be retained")
    return mask


# --------------------------------------------------------------------------------------------
# Training and the closed form
# --------------------------------------------------------------------------------------------


def fit_interpolating_head(
    phi: torch.Tensor,
    targets: torch.Tensor,
    w0: torch.Tensor,
    *,
    solver: str = "cgls",
    tol: float = 1e-13,
    max_iter: int | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
    check_every: int = 10,
) -> HeadFit:
    """Train ``w`` from ``w0`` on the squared loss ``||Phi w - y||^2`` to interpolation.

    Both solvers keep ``w - w0`` in the row space of ``Phi``, so on an interpolable problem they
    converge to ``w0 + Phi^+ (y - Phi w0)``, the interpolant closest to ``w0`` (what SGD from ``w0``
    reaches too):

    * ``"cgls"``: conjugate-gradient least squares (gradient directions made conjugate); converges
      in at most ``N`` steps in exact arithmetic; each target column runs its own recursion.
    * ``"gd"``: full-batch gradient descent with step ``1 / ||Phi||_2^2`` (slow on ill-conditioned
      features; for checks).

    Args:
        phi: ``[N, p]`` features; targets: ``[N]`` or ``[N, C]``; w0: ``[p]`` or ``[p, C]``.
        tol: stop when ``||Phi w - y||_F <= tol * ||y||_F``.
        max_iter: iteration limit (default ``10 N`` for cgls, ``100000`` for gd).
        stop: early stopping: called with the current head after every ``check_every`` iterations
            (never before the first); True stops.

    Returns:
        A :class:`HeadFit`; ``w0`` is not modified.

    Raises:
        ValueError: on bad shapes, dtypes, NaN/inf, an unknown solver or bad ``tol``/``max_iter``.
    """
    _check_matrix(phi)
    _check_targets(targets, phi.shape[0])
    _check_head(w0, phi.shape[1], targets, "w0")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if max_iter is None:
        max_iter = 10 * phi.shape[0] if solver == "cgls" else 100_000
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}")

    dtype = torch.promote_types(phi.dtype, targets.dtype)
    phi = phi.to(dtype)
    vector = targets.dim() == 1
    y = targets.to(dtype).reshape(targets.shape[0], -1)
    w = w0.to(dtype).reshape(phi.shape[1], -1).clone()
    y_norm = float(torch.linalg.vector_norm(y))
    threshold = tol * y_norm

    def done(residual: torch.Tensor) -> bool:
        return float(torch.linalg.vector_norm(residual)) <= threshold

    r = y - phi @ w
    it, stopped = 0, False
    if solver == "cgls":
        s = phi.T @ r
        p = s.clone()
        gamma = s.square().sum(0)
        while it < max_iter and not done(r):
            if stop is not None and it > 0 and it % check_every == 0 and stop(_shaped(w, vector)):
                stopped = True
                break
            q = phi @ p
            qq = q.square().sum(0)
            alpha = torch.where(qq > 0, gamma / torch.where(qq > 0, qq, 1), 0)
            w += alpha * p
            r -= alpha * q
            s = phi.T @ r
            gamma_new = s.square().sum(0)
            beta = torch.where(gamma > 0, gamma_new / torch.where(gamma > 0, gamma, 1), 0)
            p = s + beta * p
            gamma = gamma_new
            it += 1
            if float(gamma.max()) == 0.0:
                break
    else:
        lr = 1.0 / float(torch.linalg.matrix_norm(phi, ord=2)) ** 2
        while it < max_iter and not done(r):
            if stop is not None and it > 0 and it % check_every == 0 and stop(_shaped(w, vector)):
                stopped = True
                break
            w += lr * (phi.T @ r)
            r = y - phi @ w
            it += 1
    residual = float(torch.linalg.vector_norm(y - phi @ w)) / max(y_norm, torch.finfo(dtype).tiny)
    return HeadFit(_shaped(w, vector), it, residual, residual <= tol or y_norm == 0.0, stopped)


def _shaped(w: torch.Tensor, vector: bool) -> torch.Tensor:
    return w[:, 0].clone() if vector else w.clone()


def interpolant(phi: torch.Tensor, targets: torch.Tensor, w0: torch.Tensor, *, eps: float = 0.0) -> torch.Tensor:
    """The closed form ``w0 + Phi^T (Phi Phi^T + eps I)^-1 (y - Phi w0)`` (the limit of
    :func:`fit_interpolating_head` when ``eps = 0``), by a Cholesky factorisation of the ``N x N`` Gram.

    Raises:
        ValueError: on bad input, or a singular Gram matrix with ``eps = 0`` (rank-deficient features).
    """
    _check_matrix(phi)
    _check_targets(targets, phi.shape[0])
    _check_head(w0, phi.shape[1], targets, "w0")
    coef = _gram_solve(phi, targets - phi @ w0, eps)
    return w0 + phi.T @ coef


def _gram_solve(phi: torch.Tensor, rhs: torch.Tensor, eps: float) -> torch.Tensor:
    """``(Phi Phi^T + eps I)^-1 rhs`` by Cholesky; a clear error when the Gram is not positive definite."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps (ridge) must be a finite number >= 0, got {eps!r}")
    gram = phi @ phi.T
    if eps:
        gram = gram + eps * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise ValueError(
            f"the {gram.shape[0]} x {gram.shape[0]} Gram matrix of the retain features is singular"
            f"{' even with eps=' + repr(eps) if eps else ''} (rank-deficient features: more retain samples "
            "than independent features, or duplicated samples): the retrained head is not unique; pass a "
            "ridge eps > 0"
        )
    rhs2 = rhs.reshape(rhs.shape[0], -1)
    return torch.cholesky_solve(rhs2, chol).reshape(rhs.shape)


def optimal_forget_labels(
    phi_forget: torch.Tensor,
    phi_retain: torch.Tensor,
    y_retain: torch.Tensor,
    w0: torch.Tensor,
    *,
    eps: float = 0.0,
) -> torch.Tensor:
    """MUSO's relabelling: the retrained head's outputs on the forget samples, in closed form.

    ``y~_f = Phi_f w0 + Phi_f Phi_r^T (Phi_r Phi_r^T + eps I)^-1 (y_r - Phi_r w0)`` (METHODS.md 3.1;
    the released code uses ``eps = 1e-8``; 0 is exact and raises on a singular Gram).

    Args:
        phi_forget: ``[N_f, p]``; phi_retain: ``[N_r, p]``; y_retain: ``[N_r]`` or ``[N_r, C]``;
        w0: ``[p]`` or ``[p, C]``, the head's initialisation.

    Returns:
        ``[N_f]`` or ``[N_f, C]`` regression targets for the forget samples.
    """
    _check_matrix(phi_forget, "phi_forget")
    _check_matrix(phi_retain, "phi_retain")
    if phi_forget.shape[1] != phi_retain.shape[1]:
        raise ValueError(
            f"phi_forget has {phi_forget.shape[1]} features but phi_retain has {phi_retain.shape[1]}: "
            "both must come from the same feature map"
        )
    _check_targets(y_retain, phi_retain.shape[0], "y_retain")
    _check_head(w0, phi_retain.shape[1], y_retain, "w0")
    coef = _gram_solve(phi_retain, y_retain - phi_retain @ w0, eps)
    return phi_forget @ w0 + (phi_forget @ phi_retain.T) @ coef


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def _result(phi: torch.Tensor, labels: torch.Tensor, w_original: torch.Tensor, kw: dict) -> LinearUnlearning:
    fit = fit_interpolating_head(phi, labels, w_original, **kw)
    return LinearUnlearning(fit.weight, labels, fit)


def _prepare(phi, targets, forget_mask, w_original) -> torch.Tensor:
    _check_matrix(phi)
    _check_targets(targets, phi.shape[0])
    _check_head(w_original, phi.shape[1], targets, "w_original")
    return _check_forget_mask(forget_mask, phi.shape[0])


def muso_linear(
    phi: torch.Tensor,
    targets: torch.Tensor,
    forget_mask: torch.Tensor,
    w_original: torch.Tensor,
    w0: torch.Tensor,
    *,
    eps: float = 0.0,
    **fit_kwargs,
) -> LinearUnlearning:
    """MUSO on a linear head: relabel the forget rows with :func:`optimal_forget_labels`, keep the
    retain labels, fine-tune ``w_original`` on all rows to interpolation (:func:`fit_interpolating_head`,
    ``fit_kwargs`` passed on). The result equals the head retrained from ``w0`` on the retain rows.

    Args:
        phi: ``[N, p]`` features of the whole training set; targets: ``[N]`` / ``[N, C]``;
        forget_mask: bool ``[N]``, True for the samples to forget;
        w_original: the trained head (``[p]`` / ``[p, C]``); w0: its initialisation.

    Raises:
        ValueError: on bad shapes, an empty or whole-data forget set, or a singular retain Gram with ``eps = 0``.
    """
    mask = _prepare(phi, targets, forget_mask, w_original)
    _check_head(w0, phi.shape[1], targets, "w0")
    labels = targets.clone().to(torch.promote_types(phi.dtype, targets.dtype))
    labels[mask] = optimal_forget_labels(phi[mask], phi[~mask], targets[~mask], w0, eps=eps).to(labels.dtype)
    return _result(phi, labels, w_original, fit_kwargs)


def random_label_linear(
    phi: torch.Tensor,
    targets: torch.Tensor,
    forget_mask: torch.Tensor,
    w_original: torch.Tensor,
    *,
    seed: int = 0,
    **fit_kwargs,
) -> LinearUnlearning:
    """Random labels (Amnesiac) on a linear head: binary +-1 targets get a uniform +-1 label; one-vs-rest
    ``[N, C]`` targets get a uniformly random *other* class (encoded +1 / -1); then fine-tune on all rows."""
    mask = _prepare(phi, targets, forget_mask, w_original)
    g = torch.Generator().manual_seed(seed)
    labels = targets.clone().to(torch.promote_types(phi.dtype, targets.dtype))
    n_f = int(mask.sum())
    if targets.dim() == 1:
        labels[mask] = (torch.randint(0, 2, (n_f,), generator=g) * 2 - 1).to(labels.dtype)
    else:
        c = targets.shape[1]
        if c < 2:
            raise ValueError("random labels need at least two target columns (classes)")
        true = targets[mask].argmax(1).cpu()
        other = (true + torch.randint(1, c, (n_f,), generator=g)) % c
        new = -torch.ones(n_f, c, dtype=labels.dtype)
        new[torch.arange(n_f), other] = 1
        labels[mask] = new.to(labels.device)
    return _result(phi, labels, w_original, fit_kwargs)


def bad_teacher_linear(
    phi: torch.Tensor,
    targets: torch.Tensor,
    forget_mask: torch.Tensor,
    w_original: torch.Tensor,
    w_teacher: torch.Tensor,
    **fit_kwargs,
) -> LinearUnlearning:
    """Bad Teacher on a linear head: forget rows relabelled with an incompetent (e.g. randomly
    initialised) teacher's outputs ``Phi_f w_teacher``; then fine-tune on all rows."""
    mask = _prepare(phi, targets, forget_mask, w_original)
    _check_head(w_teacher, phi.shape[1], targets, "w_teacher")
    labels = targets.clone().to(torch.promote_types(phi.dtype, targets.dtype))
    labels[mask] = (phi[mask] @ w_teacher).to(labels.dtype)
    return _result(phi, labels, w_original, fit_kwargs)


# --------------------------------------------------------------------------------------------
# Targets and distances
# --------------------------------------------------------------------------------------------


def signed_targets(y: torch.Tensor, *, positive: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Regression targets from class ids ``y`` ``[N]``: binary ``+1`` for ``positive`` and ``-1`` otherwise
    (``[N]``, float64), or one-vs-rest ``[N, num_classes]`` (+1 in the sample's class column, -1 elsewhere)."""
    if (positive is None) == (num_classes is None):
        raise ValueError("give exactly one of positive= (binary targets) or num_classes= (one-vs-rest)")
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must be integer class ids [N], got {tuple(y.shape)} {y.dtype}")
    if positive is not None:
        return torch.where(y == positive, 1.0, -1.0).to(torch.float64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    out = -torch.ones(y.shape[0], num_classes, dtype=torch.float64)
    out[torch.arange(y.shape[0]), y.long()] = 1.0
    return out


def predicted_classes(
    scores: torch.Tensor, *, positive: int | None = None, negative: int | None = None
) -> torch.Tensor:
    """Class ids from head outputs: argmax of ``[N, C]`` scores, or ``positive``/``negative`` by the
    sign of binary ``[N]`` scores."""
    if scores.dim() == 2:
        return scores.argmax(1)
    if positive is None or negative is None:
        raise ValueError("binary [N] scores need positive= and negative= class ids")
    return torch.where(scores > 0, positive, negative)


def relative_distance(w: torch.Tensor, reference: torch.Tensor) -> float:
    """``||w - reference||_F / ||reference||_F``."""
    if w.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(w.shape)} vs {tuple(reference.shape)}")
    ref = float(torch.linalg.vector_norm(reference.double()))
    return float(torch.linalg.vector_norm((w - reference).double())) / max(ref, 1e-300)


def parameter_distance(w: torch.Tensor, reference: torch.Tensor) -> float:
    """The paper's ``Delta = ||w - reference||^2 / p`` (``p`` features, METHODS.md 3.1), summed over columns."""
    if w.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(w.shape)} vs {tuple(reference.shape)}")
    return float(torch.linalg.vector_norm((w - reference).double()) ** 2) / w.shape[0]
