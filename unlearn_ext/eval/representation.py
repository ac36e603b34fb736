"""Representation metrics of deep forgetting (METHODS.md 4.3, 6.4): linear CKA and linear probing.

Both work on the *penultimate features* ``f(x)`` of a classifier, the input of its final ``nn.Linear``
(:func:`~unlearn_ext.models.heads.features_and_logits`). Like the rest of :mod:`unlearn_ext.eval`
they are pure: models run in eval mode under ``torch.no_grad()`` and their modes are restored.

Linear CKA (Kornblith et al., 2019) of two feature matrices ``A`` ``[N, d_a]`` and ``B`` ``[N, d_b]``
of the same ``N`` inputs, with ``A_c``, ``B_c`` their column-centred versions::

    CKA(A, B) = ||B_c^T A_c||_F^2 / (||A_c^T A_c||_F * ||B_c^T B_c||_F)        in [0, 1]

It is invariant to orthogonal transforms and isotropic scaling of either side (not to general
invertible linear maps). For OPC, a low CKA between the unlearned and the original model's forget-set
features indicates deep forgetting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from unlearn_ext.eval.predictions import Batches, eval_mode, model_device
from unlearn_ext.models.heads import features_and_logits, final_linear

COLLAPSE_RTOL = 1e-12
"""A feature set counts as collapsed to one point when its total variance is at most this fraction
of its mean squared norm (``tr(A_c^T A_c) <= COLLAPSE_RTOL * tr(A^T A)``): a spread of about a
millionth of the features' magnitude, i.e. float32 rounding noise. See :class:`CKAAccumulator`."""


# --------------------------------------------------------------------------------------------
# Streaming over batches (shared with recovery.py)
# --------------------------------------------------------------------------------------------


def _unpack(batch: Any, index: int, name: str) -> tuple[Any, torch.Tensor]:
    try:
        inputs, targets = batch
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: batch {index} is not an (inputs, targets) pair") from exc
    targets = torch.as_tensor(targets)
    if targets.dim() != 1:
        raise ValueError(f"{name}: batch {index} targets must be 1-D [B], got shape {tuple(targets.shape)}")
    return inputs, targets


def stream_features(
    models: Sequence[nn.Module], batches: Batches, name: str = "batches"
) -> Iterator[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]]:
    """Yield, for each non-empty batch, ``([(features, logits) per model], targets)``.

    Each model sees the same inputs (moved to its own device) in eval mode under ``torch.no_grad()``.
    Modes and grad mode are switched per batch and restored before each ``yield``, so the caller's code
    between batches runs with the models and autograd as they were. ``features`` are ``[B, d]`` (the
    input of the model's final ``nn.Linear``), ``logits`` ``[B, C]``, ``targets`` ``[B]`` int64 on the CPU.

    Raises:
        ValueError: on a batch that is not an ``(inputs, targets)`` pair, targets that are not ``[B]``,
            or a model without a final ``nn.Linear``.
    """
    for model in models:
        final_linear(model)  # fail before any work on a model that cannot be split
    devices = [model_device(model) for model in models]
    for index, batch in enumerate(batches):
        inputs, targets = _unpack(batch, index, name)
        if targets.shape[0] == 0:
            continue
        outputs = []
        with contextlib.ExitStack() as stack, torch.no_grad():
            for model in models:
                stack.enter_context(eval_mode(model))
            for model, device in zip(models, devices, strict=True):
                x = inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs
                feats, logits = features_and_logits(model, x)
                if feats.shape[0] != targets.shape[0]:
                    raise ValueError(
                        f"{name}: batch {index} has {targets.shape[0]} targets but {type(model).__name__} "
                        f"returned {feats.shape[0]} rows"
                    )
                outputs.append((feats.detach(), logits.detach()))
        yield outputs, targets.to(dtype=torch.int64, device="cpu")


def penultimate_features(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate features of ``model`` over ``batches``, concatenated.

    Returns:
        ``(features, targets)``: float32 ``[N, d]`` (the input of the final ``nn.Linear``) and int64
        ``[N]``, both on the CPU.

    Raises:
        ValueError: when the batches hold no samples, or as :func:`stream_features`.
    """
    return _collect(model, batches, "batches")


def _collect(model: nn.Module, batches: Batches, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    feats, targets = [], []
    for [(f, _)], y in stream_features([model], batches, name):
        feats.append(f.to(device="cpu", dtype=torch.float32))
        targets.append(y)
    if not feats:
        raise ValueError(f"{name} is empty (no samples)")
    return torch.cat(feats), torch.cat(targets)


# --------------------------------------------------------------------------------------------
# Linear CKA
# --------------------------------------------------------------------------------------------


def _check_features(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [N, d], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, d], got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold real numbers, got {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


class CKAAccumulator:
    """Linear CKA in one streaming pass over row chunks of two feature matrices.

    :meth:`update` takes matching row chunks ``a`` ``[n, d_a]`` and ``b`` ``[n, d_b]`` and accumulates,
    in float64 on ``a``'s device: the count ``N``, the column sums, the Grams ``A^T A``, ``B^T B`` and the
    cross product ``B^T A``. :meth:`compute` corrects them for the mean (``G_c = G - N mu mu^T``) and
    returns ``||B_c^T A_c||_F^2 / (||A_c^T A_c||_F ||B_c^T B_c||_F)``.

    To limit cancellation in ``G - N mu mu^T`` when the features' mean is large against their spread,
    every row is first shifted by the first chunk's column mean (a shift leaves centred Grams unchanged).

    Degenerate case: when either side has collapsed to a single point (zero variance, up to
    :data:`COLLAPSE_RTOL`), the CKA is ``0/0``; :meth:`compute` returns ``0.0``: a point carries no
    structure shared with the other representation. This is the trivial "CKA ~ 0" of a one-point
    contraction that METHODS.md 4.3 warns about.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift_a: torch.Tensor | None = None
        self._shift_b: torch.Tensor | None = None
        self._sum_a = self._sum_b = self._gram_a = self._gram_b = self._cross = None
        self._sq_a = self._sq_b = 0.0  # sums of squared raw features (collapse test scale)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> CKAAccumulator:
        """Add matching rows ``a`` ``[n, d_a]`` and ``b`` ``[n, d_b]`` (the same ``n`` inputs); returns self."""
        _check_features(a, "a")
        _check_features(b, "b")
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"a and b must have the same number of rows (the same inputs), got {a.shape[0]} and {b.shape[0]}"
            )
        if a.shape[0] == 0:
            return self
        a = a.detach().to(dtype=torch.float64)
        b = b.detach().to(device=a.device, dtype=torch.float64)
        if self._shift_a is None:
            self._shift_a, self._shift_b = a.mean(0), b.mean(0)
            da, db = a.shape[1], b.shape[1]
            zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=a.device)
            self._sum_a, self._sum_b = zeros(da), zeros(db)
            self._gram_a, self._gram_b, self._cross = zeros(da, da), zeros(db, db), zeros(db, da)
        elif a.shape[1] != self._shift_a.shape[0] or b.shape[1] != self._shift_b.shape[0]:
            raise ValueError(
                f"feature widths changed between chunks: got a [*, {a.shape[1]}] and b [*, {b.shape[1]}] "
                f"after a [*, {self._shift_a.shape[0]}] and b [*, {self._shift_b.shape[0]}]"
            )
        self._sq_a += float(a.square().sum())
        self._sq_b += float(b.square().sum())
        a, b = a - self._shift_a, b - self._shift_b
        self.n += a.shape[0]
        self._sum_a += a.sum(0)
        self._sum_b += b.sum(0)
        self._gram_a += a.T @ a
        self._gram_b += b.T @ b
        self._cross += b.T @ a
        return self

    def compute(self) -> float:
        """Linear CKA of everything added so far, in [0, 1] (0.0 when either side has collapsed).

        Raises:
            ValueError: with fewer than 2 rows added (centring needs at least two).
        """
        if self.n < 2:
            raise ValueError(f"linear CKA needs at least 2 samples, got {self.n}")
        mu_a, mu_b = self._sum_a / self.n, self._sum_b / self.n
        gram_a = self._gram_a - self.n * torch.outer(mu_a, mu_a)
        gram_b = self._gram_b - self.n * torch.outer(mu_b, mu_b)
        cross = self._cross - self.n * torch.outer(mu_b, mu_a)
        if _collapsed(gram_a, self._sq_a) or _collapsed(gram_b, self._sq_b):
            return 0.0
        value = float(cross.square().sum() / (torch.linalg.matrix_norm(gram_a) * torch.linalg.matrix_norm(gram_b)))
        return min(max(value, 0.0), 1.0)  # rounding can step a hair outside [0, 1]


def _collapsed(centred_gram: torch.Tensor, sum_sq: float) -> bool:
    return float(torch.trace(centred_gram)) <= COLLAPSE_RTOL * sum_sq


def linear_cka_from_features(a: torch.Tensor, b: torch.Tensor, *, chunk_size: int = 4096) -> float:
    """Linear CKA of ``a`` ``[N, d_a]`` and ``b`` ``[N, d_b]`` (row ``i`` of both from the same input).

    Streams over ``chunk_size`` rows at a time through :class:`CKAAccumulator` (float64).

    Returns:
        The CKA in [0, 1]; 0.0 when either side has collapsed to a single point.

    Raises:
        ValueError: when ``a`` or ``b`` is not a finite 2-D tensor, their row counts differ, or ``N < 2``.
    """
    _check_features(a, "a")
    _check_features(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must have the same number of rows (the same inputs), got {a.shape[0]} and {b.shape[0]}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    acc = CKAAccumulator()
    for start in range(0, a.shape[0], chunk_size):
        acc.update(a[start : start + chunk_size], b[start : start + chunk_size])
    return acc.compute()


def linear_cka(model_a: nn.Module, model_b: nn.Module, batches: Batches) -> float:
    """Linear CKA between two models' penultimate features on the same inputs, in one pass.

    For OPC (METHODS.md 4.3): ``linear_cka(unlearned, original, forget_batches)``; low means deep
    forgetting, but a one-point contraction gives 0.0 trivially (see :class:`CKAAccumulator`).

    Args:
        model_a, model_b: classifiers whose last layer is an ``nn.Linear`` (feature widths may differ).
        batches: ``(inputs, targets)`` batches (targets are ignored); each is run through both models.

    Returns:
        The CKA in [0, 1].

    Raises:
        ValueError: when the batches hold fewer than 2 samples, or a model has no final ``nn.Linear``.
    """
    acc = CKAAccumulator()
    for [(fa, _), (fb, _)], _ in stream_features([model_a, model_b], batches, "batches"):
        acc.update(fa, fb)
    if acc.n == 0:
        raise ValueError("batches is empty (no samples)")
    return acc.compute()


# --------------------------------------------------------------------------------------------
# Linear probing
# --------------------------------------------------------------------------------------------


def linear_probe_accuracy(
    model: nn.Module,
    train_batches: Batches,
    test_batches: Batches,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> float:
    """Accuracy of a linear classifier probing ``model``'s frozen penultimate features.

    A scikit-learn pipeline ``StandardScaler -> LogisticRegression(C, lbfgs, random_state=seed)`` is
    fitted on the features and labels of ``train_batches`` and scored on ``test_batches``. Which data
    goes where is the caller's choice; typical for unlearning: fit on the unlearned model's features of
    the whole training set (retain + forget) and score on the forget-class test samples (does the
    representation still separate the forgotten classes?), or fit and score on two halves of the forget
    set (random-sample forgetting).

    Args:
        model: a classifier whose last layer is an ``nn.Linear``; not changed.
        train_batches, test_batches: ``(inputs, targets)`` batches, targets ``[B]`` class indices.
        C: inverse L2 regularisation strength of the logistic regression.
        max_iter: lbfgs iteration limit.
        seed: the logistic regression's ``random_state``.

    Returns:
        Top-1 accuracy of the probe on ``test_batches``, in [0, 1].

    Raises:
        ValueError: on empty batches, or when ``train_batches`` holds fewer than two classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not C > 0:
        raise ValueError(f"C must be positive, got {C!r}")
    x_train, y_train = _collect(model, train_batches, "train_batches")
    x_test, y_test = _collect(model, test_batches, "test_batches")
    if torch.unique(y_train).numel() < 2:
        raise ValueError(
            f"train_batches must hold at least two classes to fit a probe, got only class {int(y_train[0])}"
        )
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    probe.fit(x_train.double().numpy(), y_train.numpy())
    return float(np.mean(probe.predict(x_test.double().numpy()) == y_test.numpy()))
