"""Supervised training loop shared by model training and the methods that train (retrain, fine-tune, ...).

Mnemonic codes (METHODS.md 1.2): with probability ``t_mix`` each training sample's image is
*replaced* by its class's code (after normalisation, so the code goes in raw); the label is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext._progress import progress_bar

SCHEDULES = ("none", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """SGD training recipe. The defaults are the mnemonic-code paper's MNIST recipe (METHODS.md 1.2).

    Attributes:
        epochs: passes over the training batches.
        batch_size: samples per step (used when the data is given as tensors).
        lr: SGD learning rate; momentum, weight_decay: SGD's.
        t_mix: probability of replacing a sample by its class's mnemonic code (0 disables codes).
        schedule: ``"none"`` or ``"cosine"`` (cosine decay to 0 over all steps).
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    t_mix: float = 0.1
    schedule: str = "none"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or not 0.0 <= self.t_mix < 1.0:
            raise ValueError(f"need lr > 0 and 0 <= t_mix < 1, got lr={self.lr}, t_mix={self.t_mix}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def to_dict(self) -> dict:
        return asdict(self)


#: Default recipes per architecture: the paper's for the MLP; a shorter cosine one for the CNN.
DEFAULT_TRAIN_CONFIGS = {
    "mlp": TrainConfig(),
    "cnn": TrainConfig(epochs=15, lr=0.05, schedule="cosine"),
}


def mix_codes(
    x: torch.Tensor, y: torch.Tensor, codes: torch.Tensor, t_mix: float, generator: torch.Generator
) -> torch.Tensor:
    """Replace each sample of ``x`` by ``codes[y]`` with probability ``t_mix`` (out of place)."""
    if t_mix <= 0:
        return x
    mask = torch.rand(x.shape[0], generator=generator) < t_mix
    if not mask.any():
        return x
    mask = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, codes[y].to(x.dtype), x)


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay
    )


def fit(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "none",
    t_mix: float = 0.0,
    codes: torch.Tensor | None = None,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    description: str = "training",
) -> list[dict]:
    """Train ``model`` in place with SGD on cross-entropy (or ``loss_fn(logits, y)``).

    Args:
        batches: re-iterable ``(x, y)`` batches (iterated once per epoch).
        t_mix, codes: mnemonic-code replacement (needs ``codes`` ``[C, *input_shape]`` when ``t_mix > 0``).
        seed: seeds the code-replacement draws.

    Returns:
        one ``{"epoch", "loss", "accuracy"}`` dict per epoch (training-stream averages).
    """
    if t_mix > 0 and codes is None:
        raise ValueError("t_mix > 0 needs mnemonic codes (the model has none; attach_codes first)")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    loss_fn = loss_fn or F.cross_entropy
    opt = sgd(model, lr, momentum, weight_decay)
    steps_per_epoch = len(batches) if hasattr(batches, "__len__") else None
    scheduler = None
    if schedule == "cosine":
        total = epochs * (steps_per_epoch or 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    log = []
    model.train()
    with progress_bar(epochs, description, progress) as advance:
        for epoch in range(epochs):
            total_loss, correct, seen = 0.0, 0, 0
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                if codes is not None and t_mix > 0:
                    x = mix_codes(x, y, codes, t_mix, generator)
                logits = model(x)
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                total_loss += loss.item() * y.shape[0]
                correct += int((logits.argmax(1) == y).sum())
                seen += y.shape[0]
            if seen == 0:
                raise ValueError("the training batches are empty")
            if not math.isfinite(total_loss):
                raise FloatingPointError(f"training diverged: non-finite loss in epoch {epoch}")
            log.append({"epoch": epoch, "loss": total_loss / seen, "accuracy": correct / seen})
            advance(1, f"loss {total_loss / seen:.3f}")
    model.eval()
    return log


def train_classifier(
    arch: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    config: TrainConfig | None = None,
    with_codes: bool = True,
    seed: int = 0,
    progress: bool = False,
    description: str | None = None,
    **model_config,
) -> nn.Module:
    """Build an ``arch`` classifier (seeded init), record its head's initialisation (the
    ``initial_head`` buffer, for MUSO), attach mnemonic codes (seeded) when ``with_codes``, and train
    it on ``x`` ``[N, *input_shape]`` / ``y`` ``[N]``. Returns the model in eval mode."""
    from unlearn_ext.data.batches import TensorBatches
    from unlearn_ext.models.initial_head import attach_initial_head
    from unlearn_ext.models.mnemonic_codes import attach_codes, make_codes
    from unlearn_ext.models.vision import build_model

    config = config or DEFAULT_TRAIN_CONFIGS.get(arch, TrainConfig())
    input_shape = tuple(x.shape[1:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, input_shape, num_classes, **model_config)
    attach_initial_head(model)  # w0 of the head, for MUSO (models/initial_head.py)
    codes = None
    if with_codes:
        codes = make_codes(num_classes, input_shape, seed=seed + 1)
        attach_codes(model, codes)
    fit(
        model,
        TensorBatches(x, y, batch_size=config.batch_size, shuffle=True, seed=seed + 2),
        epochs=config.epochs,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        schedule=config.schedule,
        t_mix=config.t_mix if with_codes else 0.0,
        codes=codes,
        seed=seed + 3,
        progress=progress,
        description=description or f"training {arch}",
    )
    model.train_config = config.to_dict()  # recorded in checkpoints
    return model
