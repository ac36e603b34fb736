"""A light, re-iterable batch source over in-memory tensors (what methods and training consume)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TensorBatches:
    """Re-iterable ``(inputs, targets)`` batches over in-memory tensors.

    Much cheaper than a ``DataLoader`` over a ``TensorDataset`` for small data (one index per batch,
    no per-sample collation). Each iteration reshuffles when ``shuffle`` is set, with a generator
    seeded by ``seed``, so a run is reproducible.

    Args:
        x: ``[N, ...]`` inputs.
        y: ``[N]`` targets.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: reshuffle every iteration.
        seed: seed of the shuffling generator.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 128, shuffle: bool = False, seed: int = 0
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator)
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]
        else:
            for i in range(0, n, self.batch_size):
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
