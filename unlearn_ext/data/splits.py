"""Forget/retain splits of a :class:`Dataset`: whole classes, several classes, or a random fraction."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from unlearn_ext.data.batches import TensorBatches
from unlearn_ext.data.datasets import Dataset


@dataclass(frozen=True)
class ForgetSplit:
    """Which training samples to forget, and the evaluation splits that go with it.

    Attributes:
        dataset: the dataset the indices refer to.
        forget_idx, retain_idx: int64 indices into ``dataset.x_train`` (disjoint, together all of it).
        classes: the forgotten classes (class forgetting), else ``None``.
        fraction: the forgotten fraction (random-sample forgetting), else ``None``.
        seed: seed of the random-sample choice.

    With neither ``classes`` nor ``fraction`` the forget set is a list of sample ids
    (:func:`forget_split_from_ids`, a deletion request); its kind is ``"samples"``.
    """

    dataset: Dataset
    forget_idx: torch.Tensor
    retain_idx: torch.Tensor
    classes: tuple[int, ...] | None
    fraction: float | None
    seed: int

    @property
    def kind(self) -> str:
        if self.classes is not None:
            return "class"
        return "random" if self.fraction is not None else "samples"

    def tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The evaluation splits as ``(x, y)``: ``forget``, ``retain``, ``test`` and, for class
        forgetting, ``forget_class_test`` / ``retain_class_test`` (test samples of the forgotten /
        the kept classes)."""
        ds = self.dataset
        out = {
            "forget": (ds.x_train[self.forget_idx], ds.y_train[self.forget_idx]),
            "retain": (ds.x_train[self.retain_idx], ds.y_train[self.retain_idx]),
            "test": (ds.x_test, ds.y_test),
        }
        if self.classes is not None:
            in_forget = torch.isin(ds.y_test, torch.tensor(self.classes, dtype=ds.y_test.dtype))
            out["forget_class_test"] = (ds.x_test[in_forget], ds.y_test[in_forget])
            out["retain_class_test"] = (ds.x_test[~in_forget], ds.y_test[~in_forget])
        return out

    def batches(self, *, batch_size: int = 128, seed: int = 0) -> dict[str, TensorBatches]:
        """Every split of :meth:`tensors` as re-iterable batches; ``forget`` and ``retain`` shuffle."""
        return {
            name: TensorBatches(x, y, batch_size=batch_size, shuffle=name in ("forget", "retain"), seed=seed + i)
            for i, (name, (x, y)) in enumerate(self.tensors().items())
        }

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "classes": list(self.classes) if self.classes is not None else None,
            "fraction": self.fraction,
            "num_forget": int(self.forget_idx.numel()),
            "num_retain": int(self.retain_idx.numel()),
            "seed": self.seed,
        }


def make_forget_split(
    dataset: Dataset,
    *,
    classes: int | Sequence[int] | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> ForgetSplit:
    """Split ``dataset``'s training set into a forget set and a retain set.

    Give exactly one of:
        classes: one class id or several: every training sample of those classes is forgotten.
        fraction: forget a uniformly random ``fraction`` of the training samples (seeded by ``seed``).

    Raises:
        ValueError: both or neither given; a class that does not exist; forgetting every class or
            every sample (nothing would be retained); an empty forget set.
    """
    if (classes is None) == (fraction is None):
        raise ValueError("give exactly one of classes= (class forgetting) or fraction= (random-sample forgetting)")
    y = dataset.y_train
    n = int(y.numel())
    if classes is not None:
        if _as_class_id(classes) is not None:
            cls = (classes,)
        elif isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable) or _is_0d(classes):
            raise ValueError(f"classes must be a class id or a sequence of class ids, got {classes!r}")
        else:
            cls = tuple(classes)
        if not cls:
            raise ValueError("classes is empty: the forget set would be empty")
        ids = []
        for c in cls:
            i = _as_class_id(c)
            if i is None or not 0 <= i < dataset.num_classes:
                raise ValueError(
                    f"class {c!r} does not exist in {dataset.name!r}; its classes are 0..{dataset.num_classes - 1}"
                )
            ids.append(i)
        cls = tuple(sorted(set(ids)))
        if len(cls) == dataset.num_classes:
            raise ValueError(
                f"forgetting all {dataset.num_classes} classes would forget the whole training set; nothing is retained"
            )
        mask = torch.isin(y, torch.tensor(cls, dtype=y.dtype))
        forget = mask.nonzero().flatten()
        retain = (~mask).nonzero().flatten()
        if forget.numel() == 0:
            raise ValueError(f"classes {list(cls)} have no training samples: the forget set is empty")
        return ForgetSplit(dataset, forget, retain, cls, None, seed)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    k = int(round(fraction * n))
    if k == 0:
        raise ValueError(f"fraction {fraction} of {n} training samples rounds to an empty forget set")
    if k == n:
        raise ValueError(f"fraction {fraction} of {n} training samples forgets all of them; nothing is retained")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return ForgetSplit(dataset, perm[:k].sort().values, perm[k:].sort().values, None, float(fraction), seed)


def _as_class_id(value: object) -> int | None:
    """``value`` as a Python int if it is an integer scalar (int, NumPy integer, 0-d integer tensor), else None.

    Booleans are not class ids.
    """
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_0d(value: object) -> bool:
    return getattr(value, "ndim", None) == 0


def forget_split_from_ids(dataset: Dataset, sample_ids: Iterable[int], *, seed: int = 0) -> ForgetSplit:
    """Forget the training samples ``sample_ids`` (indices into ``dataset.x_train``; duplicates merged).

    Raises:
        ValueError: an id that is not an integer or is outside ``[0, len(x_train))`` (the first few are
            named), an empty list, or every training sample (nothing would be retained).
    """
    if isinstance(sample_ids, (str, bytes)) or not isinstance(sample_ids, Iterable):
        raise ValueError(f"sample_ids must be a sequence of integer sample ids, got {sample_ids!r}")
    n = int(dataset.y_train.numel())
    ids, bad = [], []
    for v in sample_ids:
        i = _as_class_id(v)
        if i is None or not 0 <= i < n:
            bad.append(v)
        else:
            ids.append(i)
    if bad:
        raise ValueError(
            f"sample ids {bad[:5]!r}{' ...' if len(bad) > 5 else ''} ({len(bad)} bad) are not training samples of "
            f"{dataset.name!r}: ids must be integers in [0, {n})"
        )
    if not ids:
        raise ValueError("sample_ids is empty: the forget set would be empty")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.tensor(ids, dtype=torch.long)] = True
    if bool(mask.all()):
        raise ValueError(f"sample_ids cover all {n} training samples of {dataset.name!r}; nothing is retained")
    return ForgetSplit(dataset, mask.nonzero().flatten(), (~mask).nonzero().flatten(), None, None, seed)
