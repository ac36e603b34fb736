"""One-call evaluation of an unlearned model: accuracies per split, membership inference, gaps to retrain."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from unlearn_ext.eval.deep import deep_forgetting_metrics
from unlearn_ext.eval.mia import entropy_mia, loss_mia
from unlearn_ext.eval.predictions import Batches, accuracy_from_logits, predict

SPLIT_NAMES = ("forget", "retain", "test", "forget_class_test", "retain_class_test")
"""Split names :func:`evaluate` recognises; each gives an ``"<name>_acc"`` entry."""

GAP_KEYS = ("test_acc", "forget_acc", "mia")
"""The metrics MUSO's Avg Gap averages (METHODS.md 3.3)."""


def average_gap(metrics: Mapping[str, Any], retrained: Mapping[str, Any], keys: Iterable[str] = GAP_KEYS) -> float:
    """MUSO's Avg Gap: the mean of ``|metrics[k] - retrained[k]|`` over the ``keys`` present in both.

    Values are fractions in [0, 1] (so is the result); lower means closer to the retrained model.
    Keys missing from either dict (or set to ``None``) are skipped.

    Raises:
        ValueError: when none of ``keys`` is present in both dicts, or a value is not a finite number.
    """
    keys = tuple(keys)
    gaps = []
    for key in keys:
        a, b = metrics.get(key), retrained.get(key)
        if a is None or b is None:
            continue
        try:
            a, b = float(a), float(b)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"average_gap: {key!r} must be a number in both dicts, got {a!r} and {b!r}") from exc
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"average_gap: {key!r} is not finite ({a!r} vs {b!r})")
        gaps.append(abs(a - b))
    if not gaps:
        raise ValueError(
            f"average_gap: none of the keys {list(keys)} is present in both dicts "
            f"(metrics has {sorted(metrics)}, retrained has {sorted(retrained)})"
        )
    return sum(gaps) / len(gaps)


def evaluate(
    model: nn.Module,
    splits: Mapping[str, Batches],
    *,
    original: nn.Module | None = None,
    retrained: nn.Module | Mapping[str, Any] | None = None,
    mia: bool = True,
    deep: bool = False,
    deep_options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Evaluate an (unlearned) model on the unlearning splits.

    The model is not changed: it runs in eval mode under ``torch.no_grad()`` and its modes are restored.
    Each split's logits are computed once and reused for its accuracy and the attacks.

    Args:
        model: maps inputs ``[B, ...]`` to logits ``[B, C]``.
        splits: split name -> batches of ``(inputs, targets)``. Recognised names: ``"forget"``
            (required), ``"retain"``, ``"test"``, ``"forget_class_test"`` and ``"retain_class_test"``
            (test samples of the forgotten / kept classes, for class forgetting). Batches must be
            re-iterable (a ``DataLoader``, ``TensorBatches``, a list) when ``retrained`` is a model.
        original: the model before unlearning; adds ``"agreement_with_original_forget"``.
        retrained: the model retrained without the forget set, or its own ``evaluate()`` output; adds
            ``"avg_gap"`` (a model is evaluated first on the same splits, with the same ``mia`` and ``seed``).
        mia: run the membership-inference attacks (needs ``"retain"`` and ``"test"``; scikit-learn).
        deep: add the deep-forgetting metrics of :func:`~unlearn_ext.eval.deep_forgetting_metrics`
            (recovery attacks, CKA, linear probe; needs ``original`` and ``"retain"``; CKA to the
            retrained model when ``retrained`` is a model, or ``deep_options["retrained"]``);
            ``deep_options`` are passed on to it.
        seed: seed of the attacks' class-balancing subsample.

    Returns:
        A dict of floats in [0, 1]:

        * ``"<split>_acc"``: top-1 accuracy for each split given;
        * ``"mia"``: :func:`~unlearn_ext.eval.entropy_mia` with members = retain, non-members = test,
          target = forget (fraction of the forget set predicted "member");
        * ``"mia_loss"``: :func:`~unlearn_ext.eval.loss_mia` with the same roles;
        * ``"agreement_with_original_forget"``: fraction of forget samples whose argmax equals the
          original model's argmax;
        * ``"avg_gap"``: :func:`average_gap` of this result to the retrained model's;
        * with ``deep``, the keys of :data:`~unlearn_ext.eval.DEEP_KEYS` that apply.

    Raises:
        ValueError: on an unknown split name, a missing ``"forget"`` split, or empty / malformed batches;
            ``deep`` without ``original`` or a ``"retain"`` split.
    """
    if not isinstance(splits, Mapping):
        raise ValueError(f"splits must be a dict of split name -> batches, got {type(splits).__name__}")
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; recognised names are {list(SPLIT_NAMES)}")
    if "forget" not in splits:
        raise ValueError(f"splits must contain 'forget' (got {sorted(splits)})")
    if deep and (original is None or "retain" not in splits):
        raise ValueError("deep=True needs the original model (original=) and a 'retain' split")
    if deep_options is not None and not deep:
        raise ValueError("deep_options given without deep=True")

    batches = dict(splits)
    if original is not None:
        # Both models must see the forget samples in the same order (a shuffling loader would not
        # repeat it), so iterate the forget split once and keep its batches.
        batches["forget"] = list(batches["forget"])

    predictions = {name: predict(model, batches[name]) for name in SPLIT_NAMES if name in batches}
    result: dict[str, float] = {f"{name}_acc": accuracy_from_logits(*pred) for name, pred in predictions.items()}

    if mia and "retain" in predictions and "test" in predictions:
        (retain_logits, retain_targets), (test_logits, test_targets) = predictions["retain"], predictions["test"]
        forget_logits, forget_targets = predictions["forget"]
        result["mia"] = entropy_mia(retain_logits, test_logits, forget_logits, seed=seed)
        result["mia_loss"] = loss_mia(
            retain_logits, retain_targets, test_logits, test_targets, forget_logits, forget_targets, seed=seed
        )

    if original is not None:
        forget_logits = predictions["forget"][0]
        original_logits, _ = predict(original, batches["forget"])
        if original_logits.shape[0] != forget_logits.shape[0]:
            raise ValueError(
                f"the original model gave {original_logits.shape[0]} forget predictions, the model "
                f"{forget_logits.shape[0]}"
            )
        same = original_logits.argmax(dim=1) == forget_logits.argmax(dim=1)
        result["agreement_with_original_forget"] = float(same.to(torch.float64).mean())

    if retrained is not None:
        if isinstance(retrained, nn.Module):
            reference = evaluate(retrained, batches, mia=mia, seed=seed)
        elif isinstance(retrained, Mapping):
            reference = retrained
        else:
            raise ValueError(
                f"retrained must be an nn.Module or a dict of its evaluate() metrics, got {type(retrained).__name__}"
            )
        result["avg_gap"] = average_gap(result, reference)

    if deep:
        options = {"retrained": retrained if isinstance(retrained, nn.Module) else None, "seed": seed}
        options.update(deep_options or {})
        result.update(deep_forgetting_metrics(model, original, batches, **options))
    return result
