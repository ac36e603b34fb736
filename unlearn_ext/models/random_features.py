"""Random Fourier features (Rahimi & Recht, 2007): the fixed feature map of MUSO's linear theory
(METHODS.md 3.1), ``phi(x) = sqrt(1/D) [cos(x W), sin(x W)]`` with ``W [d, D] ~ N(0, 1/sigma^2)``."""

from __future__ import annotations

import math

import torch
from torch import nn


class RandomFourierFeatures(nn.Module):
    """A fixed random feature map ``[B, *input_shape] -> [B, 2 * num_features]``.

    ``phi(x) = sqrt(1 / D) * [cos(x W), sin(x W)]`` with ``x`` flattened to ``[B, d]`` and ``W``
    ``[d, D]`` drawn from ``N(0, 1 / sigma^2)`` by a generator seeded with ``seed``;
    ``phi(x)^T phi(x')`` approximates the Gaussian kernel ``exp(-||x - x'||^2 / (2 sigma^2))``.
    ``W`` is a buffer (saved in the state dict, never trained). Inputs are cast to ``dtype``.

    Args:
        in_features: ``d``, the number of input values per sample (e.g. 784 for MNIST).
        num_features: ``D`` (the output has ``2 D`` features). METHODS.md 3.1: 2500.
        sigma: kernel bandwidth, in input units. METHODS.md 3.1: 20.
        seed: seed of ``W``.
        dtype: dtype of ``W`` and of the features (float64 for exactness checks).
    """

    def __init__(
        self,
        in_features: int,
        num_features: int = 2500,
        sigma: float = 20.0,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_features", num_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(in_features, num_features, generator=generator, dtype=torch.float64) / sigma
        self.register_buffer("weight", weight.to(dtype))
        self.in_features, self.num_features, self.sigma, self.seed = in_features, num_features, float(sigma), seed

    @property
    def out_features(self) -> int:
        return 2 * self.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, *]`` with ``in_features`` values per sample -> features ``[B, 2 D]``."""
        flat = x.reshape(x.shape[0], -1) if x.dim() != 1 else x.reshape(1, -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"expected {self.in_features} input values per sample, got {flat.shape[1]} (input shape "
                f"{tuple(x.shape)})"
            )
        proj = flat.to(self.weight.dtype) @ self.weight
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=1) * math.sqrt(1.0 / self.num_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_features={self.num_features}, sigma={self.sigma}, seed={self.seed}"
