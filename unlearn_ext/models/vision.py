"""Small image classifiers: the mnemonic-code paper's MLP (784-1000 sigmoid-10) and a small CNN."""

from __future__ import annotations

import math

import torch
from torch import nn

ARCHITECTURES = ("mlp", "cnn")


class MLP(nn.Module):
    """``Flatten -> Linear(in, hidden) -> activation -> Linear(hidden, num_classes)``.

    The default is the mnemonic-code paper's MNIST model (784-1000 sigmoid-10).
    Input ``[B, *input_shape]``, output logits ``[B, num_classes]``.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 1000, activation: str = "sigmoid"
    ) -> None:
        super().__init__()
        acts = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        self.config = {
            "arch": "mlp",
            "input_shape": list(input_shape),
            "num_classes": num_classes,
            "hidden": hidden,
            "activation": activation,
        }
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            acts[activation](),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two ``Conv3x3 -> BatchNorm -> ReLU -> MaxPool2`` blocks, then ``Linear -> ReLU -> Linear``.

    Input ``[B, C, H, W]`` (H, W at least 4), output logits ``[B, num_classes]``. BatchNorm makes
    the eval-mode requirement of the Fisher-based methods real.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, *, channels: int = 16, hidden: int = 128
    ) -> None:
        super().__init__()
        if len(input_shape) != 3 or min(input_shape[1:]) < 4:
            raise ValueError(f"SmallCNN needs a (C, H, W) input shape with H, W >= 4, got {tuple(input_shape)}")
        c, h, w = input_shape
        self.config = {
            "arch": "cnn",
            "input_shape": list(input_shape),
            "num_classes": num_classes,
            "channels": channels,
            "hidden": hidden,
        }

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(c, channels), *block(channels, 2 * channels), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(2 * channels * (h // 4) * (w // 4), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int, **config) -> nn.Module:
    """Build an ``"mlp"`` or ``"cnn"`` classifier (extra keyword arguments go to its constructor)."""
    if arch == "mlp":
        return MLP(tuple(input_shape), num_classes, **config)
    if arch == "cnn":
        return SmallCNN(tuple(input_shape), num_classes, **config)
    raise ValueError(f"unknown model architecture {arch!r}; choose one of {ARCHITECTURES}")


def reset_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every submodule that has ``reset_parameters`` (in place), seeded; BatchNorm
    running statistics are reset too. Returns ``model``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model
