"""Model predictions over batches, and per-sample quantities computed from logits.

Everything here is pure: :func:`predict` runs the model in eval mode under ``torch.no_grad()`` and
restores every submodule's ``training`` flag afterwards, so no parameter, buffer (BatchNorm running
statistics included) or mode of the model changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batches = Iterable[tuple[Any, Any]]
"""Any iterable of ``(inputs, targets)`` pairs: a ``DataLoader``, ``TensorBatches``, a list of tuples."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or first buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore each submodule's own ``training`` flag.

    Restoring per submodule (rather than ``model.train(was_training)``) keeps mixed modes intact, e.g.
    a model in train mode with a frozen BatchNorm kept in eval mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def _as_logits(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, or an object with ``.logits`` (Hugging Face style)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(f"the model must return a logits tensor [B, C], got {type(output).__name__}")


def _check_logits(logits: torch.Tensor, name: str = "logits", *, allow_empty: bool = False) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [N, C], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(logits.shape)}")
    if not allow_empty and logits.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_targets(targets: torch.Tensor, logits: torch.Tensor, name: str = "targets") -> None:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [N], got {type(targets).__name__}")
    if targets.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N] class indices, got shape {tuple(targets.shape)}")
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{name} and logits have mismatched shapes: {tuple(targets.shape)} vs {tuple(logits.shape)} "
            "(need targets [N] for logits [N, C])"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {targets.dtype}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= logits.shape[1]:
            raise ValueError(f"{name} must be class indices in [0, {logits.shape[1]}), got values in [{lo}, {hi}]")


def predict(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over every batch and concatenate the outputs.

    Inputs are moved to the model's device (its first parameter's). The model is evaluated in eval
    mode under ``torch.no_grad()``; its modes are restored afterwards and nothing in it changes.

    Args:
        model: maps inputs ``[B, ...]`` to logits ``[B, C]``.
        batches: iterable of ``(inputs, targets)`` with ``targets`` ``[B]`` class indices.

    Returns:
        ``(logits, targets)``: float32 logits ``[N, C]`` and int64 targets ``[N]``, both on the CPU.

    Raises:
        ValueError: when the batches hold no samples, or a batch's outputs or targets have the wrong shape.
    """
    device = model_device(model)
    all_logits: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    with eval_mode(model), torch.no_grad():
        for index, batch in enumerate(batches):
            try:
                inputs, targets = batch
            except (TypeError, ValueError) as exc:
                raise ValueError(f"batch {index} is not an (inputs, targets) pair") from exc
            targets = torch.as_tensor(targets)
            if isinstance(inputs, torch.Tensor):
                inputs = inputs.to(device)
            logits = _as_logits(model(inputs)).detach()
            if logits.dim() != 2:
                raise ValueError(f"the model must return 2-D logits [B, C], got shape {tuple(logits.shape)}")
            if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"batch {index}: targets and logits have mismatched shapes: {tuple(targets.shape)} vs "
                    f"{tuple(logits.shape)} (need targets [B] for logits [B, C])"
                )
            if all_logits and logits.shape[1] != all_logits[0].shape[1]:
                raise ValueError(
                    f"batch {index}: the model returned {logits.shape[1]} classes, earlier batches "
                    f"{all_logits[0].shape[1]}"
                )
            all_logits.append(logits.to(device="cpu", dtype=torch.float32))
            all_targets.append(targets.to(device="cpu", dtype=torch.int64))
    if not all_logits or sum(t.shape[0] for t in all_targets) == 0:
        raise ValueError("cannot evaluate: the batches are empty (no samples)")
    return torch.cat(all_logits), torch.cat(all_targets)


def accuracy_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]: the fraction of rows of ``logits`` ``[N, C]`` whose argmax is ``targets`` ``[N]``."""
    _check_logits(logits)
    _check_targets(targets, logits)
    return float((logits.argmax(dim=1) == targets.to(logits.device)).double().mean())


def accuracy(model: nn.Module, batches: Batches) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` over ``batches`` (see :func:`predict`)."""
    logits, targets = predict(model, batches)
    return accuracy_from_logits(logits, targets)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample in nats, no reduction: ``[N, C]`` logits, ``[N]`` targets -> ``[N]``."""
    _check_logits(logits, allow_empty=True)
    _check_targets(targets, logits)
    return F.cross_entropy(_upcast(logits), targets.to(device=logits.device, dtype=torch.int64), reduction="none")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of each row in nats: ``[N, C]`` -> ``[N]``, in ``[0, log C]``.

    Computed from ``log_softmax``, so large logits neither overflow nor give ``0 * log 0`` NaNs.
    """
    _check_logits(logits, allow_empty=True)
    log_p = torch.log_softmax(_upcast(logits), dim=1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * log_p, torch.zeros_like(p))
    return (-terms.sum(dim=1)).clamp_min(0.0)


def true_class_confidence(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the true class of each sample: ``[N, C]`` logits, ``[N]`` targets -> ``[N]`` in [0, 1]."""
    _check_logits(logits, allow_empty=True)
    _check_targets(targets, logits)
    probs = torch.softmax(_upcast(logits), dim=1)
    return probs.gather(1, targets.to(device=logits.device, dtype=torch.int64).unsqueeze(1)).squeeze(1)
