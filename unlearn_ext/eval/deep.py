"""Deep-forgetting metrics of one unlearned model in one call (OPC, METHODS.md 4.3).

:func:`deep_forgetting_metrics` runs the tests of :mod:`unlearn_ext.eval.recovery`,
:mod:`unlearn_ext.eval.representation` and (optionally) :mod:`unlearn_ext.eval.inversion` on the
standard unlearning splits and returns flat float metrics, the columns ``unlearn demo`` and
``benchmarks/bench_opc.py`` report. Like the rest of :mod:`unlearn_ext.eval` it never changes a model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from unlearn_ext.data.batches import TensorBatches
from unlearn_ext.eval.inversion import gradient_inversion
from unlearn_ext.eval.predictions import Batches
from unlearn_ext.eval.recovery import feature_mapping_attacks, finetune_recovery_attack, fit_feature_maps
from unlearn_ext.eval.representation import linear_cka, linear_probe_accuracy

DEEP_KEYS = (
    "fm_recovered_forget_acc",
    "fm_recovered_forget_class_test_acc",
    "fm_recovered_test_acc",
    "fm_fit_r2",
    "fm_linear_recovered_forget_acc",
    "fm_linear_recovered_forget_class_test_acc",
    "fm_linear_recovered_test_acc",
    "fm_linear_fit_r2",
    "ft_recovered_forget_acc",
    "cka_original_forget",
    "cka_retrain_forget",
    "probe_forget_class_test_acc",
    "inversion_psnr",
    "inversion_ssim",
)
"""Every key :func:`deep_forgetting_metrics` can return (which ones depends on the splits and options)."""


def take_samples(batches: Batches, n: int, *, batch_size: int = 64, seed: int = 0) -> TensorBatches:
    """The first ``n`` samples of ``batches`` (one pass) as re-iterable shuffling :class:`TensorBatches`.

    Gives every model of an experiment the *same* small subset (e.g. the fine-tuning attack's retain
    subset), whatever order the source shuffles into on later passes.

    Raises:
        ValueError: when ``n < 1`` or the batches hold no tensor samples.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    xs, ys, have = [], [], 0
    for inputs, targets in batches:
        if not isinstance(inputs, torch.Tensor):
            raise ValueError(f"take_samples needs tensor inputs, got {type(inputs).__name__}")
        xs.append(inputs[: n - have])
        ys.append(torch.as_tensor(targets)[: n - have])
        have += xs[-1].shape[0]
        if have >= n:
            break
    if have == 0:
        raise ValueError("batches is empty (no samples)")
    return TensorBatches(torch.cat(xs), torch.cat(ys), batch_size=batch_size, shuffle=True, seed=seed)


def deep_forgetting_metrics(
    model: nn.Module,
    original: nn.Module,
    splits: Mapping[str, Batches],
    *,
    retrained: nn.Module | None = None,
    finetune_batches: Batches | None = None,
    finetune_samples: int = 256,
    finetune_steps: int = 50,
    finetune_lr: float = 0.01,
    ridge: float = 1e-3,
    probe: bool = True,
    probe_samples: int = 2000,
    inversion_samples: int = 0,
    inversion_steps: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Deep-forgetting metrics of ``model`` (unlearned from ``original``) on the unlearning splits.

    Args:
        model: the unlearned classifier; its last layer must be an ``nn.Linear`` (the head ``g``).
        original: the model before unlearning (same input shape and classes).
        splits: as :func:`~unlearn_ext.eval.evaluate`: ``"forget"`` and ``"retain"`` are required;
            ``"forget_class_test"`` (class forgetting) adds the attacks on unseen images of the
            forgotten classes. Batches must be re-iterable.
        retrained: the model retrained without the forget set; adds ``"cka_retrain_forget"``.
        finetune_batches: the fine-tuning attack's retain subset; default the first
            ``finetune_samples`` samples of ``splits["retain"]`` (pass the same batches for every model
            compared, e.g. from :func:`take_samples`). ``finetune_steps <= 0`` skips the attack.
        finetune_lr: SGD learning rate of the fine-tuning attack.
        ridge: relative ridge of the feature map (:func:`~unlearn_ext.eval.fit_affine_map`).
        probe: fit the linear probe (scikit-learn logistic regression, a few seconds).
        probe_samples: training samples (forget first, then retain) the probe is fitted on.
        inversion_samples: forget samples to reconstruct by gradient inversion, one at a time
            (``0``: skip; each costs ``inversion_steps`` double-backward steps).
        seed: seed of the attacks (fine-tuning steps, probe, inversion initialisation).

    Returns:
        Floats (accuracies in [0, 1]):

        * ``"fm_recovered_forget_acc"``: forget-set accuracy of the training-free feature-mapping
          attack (affine map fitted on the retain set from ``model``'s penultimate features to
          ``original``'s, then ``original``'s head), ``"fm_fit_r2"`` its fit;
          ``"fm_recovered_forget_class_test_acc"`` / ``"fm_recovered_test_acc"`` the same on
          ``"forget_class_test"`` / ``"test"`` (all classes: does the attack give back a whole working
          classifier, or only a constant answer that happens to be the forgotten class?);
        * ``"fm_linear_recovered_forget_acc"`` (and ``..._forget_class_test_acc``, ``..._test_acc``,
          ``"fm_linear_fit_r2"``): the same attack with the *linear* map (no intercept), METHODS.md 4.3's
          form; features contracted to the origin map to the origin, where ``original``'s head answers
          with its bias, so a one-point contraction to 0 defeats it by construction;
        * ``"ft_recovered_forget_acc"``: forget-set accuracy after ``finetune_steps`` SGD steps on the
          retain subset (a copy of ``model`` is trained);
        * ``"cka_original_forget"`` / ``"cka_retrain_forget"``: linear CKA of the forget set's
          penultimate features to ``original``'s / ``retrained``'s (0.0 for features collapsed to one point);
        * ``"probe_forget_class_test_acc"``: accuracy on ``"forget_class_test"`` of a linear probe
          fitted on ``model``'s features of ``probe_samples`` training samples with their true labels
          (a one-point contraction of a class that stays apart from the rest is still perfectly probed);
        * ``"inversion_psnr"`` (dB) / ``"inversion_ssim"``: mean quality of the gradient-inversion
          reconstructions of the first ``inversion_samples`` forget samples (higher: more leaked).

    Raises:
        ValueError: on a missing ``"forget"`` or ``"retain"`` split, empty splits, or models without
            a final ``nn.Linear`` (as the attacks).
    """
    for name in ("forget", "retain"):
        if name not in splits:
            raise ValueError(f"deep_forgetting_metrics needs a {name!r} split (got {sorted(splits)})")
    forget, retain = splits["forget"], splits["retain"]
    out: dict[str, float] = {}

    feature_maps = fit_feature_maps(model, original, retain, ridge=ridge)  # one pass, both maps
    attack_sets = {"forget": forget}
    for name in ("forget_class_test", "test"):
        if name in splits:
            attack_sets[name] = splits[name]
    prefixes = {"affine": "fm", "linear": "fm_linear"}
    for name, batches in attack_sets.items():
        results = feature_mapping_attacks(model, original, feature_maps, batches)  # one pass, both maps
        for kind, prefix in prefixes.items():
            out[f"{prefix}_recovered_{name}_acc"] = float(results[kind]["recovered_acc"])
    for kind, prefix in prefixes.items():
        out[f"{prefix}_fit_r2"] = float(feature_maps[kind].r2)

    if finetune_steps > 0:
        subset = finetune_batches if finetune_batches is not None else take_samples(retain, finetune_samples, seed=seed)
        ft = finetune_recovery_attack(model, subset, forget, steps=finetune_steps, lr=finetune_lr, seed=seed)
        out["ft_recovered_forget_acc"] = float(ft["recovered_acc"])

    out["cka_original_forget"] = linear_cka(model, original, forget)
    if retrained is not None:
        out["cka_retrain_forget"] = linear_cka(model, retrained, forget)

    if probe and "forget_class_test" in splits:
        fit_set = _first_samples([forget, retain], probe_samples)
        out["probe_forget_class_test_acc"] = linear_probe_accuracy(
            model, fit_set, splits["forget_class_test"], max_iter=300, seed=seed
        )

    if inversion_samples > 0:
        out.update(_inversion(model, forget, inversion_samples, inversion_steps, seed))
    return out


def _first_samples(sources: list[Batches], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``n`` samples taken from ``sources`` in order (each source read once), as a batch list."""
    out, have = [], 0
    for source in sources:
        for inputs, targets in source:
            if have >= n:
                return out
            out.append((inputs[: n - have], torch.as_tensor(targets)[: n - have]))
            have += out[-1][1].shape[0]
    return out


def _inversion(model: nn.Module, forget: Batches, n: int, steps: int, seed: int) -> dict[str, float]:
    """Mean PSNR / SSIM of gradient-inversion reconstructions of the first ``n`` forget samples."""
    samples = _first_samples([forget], n)
    x = torch.cat([b[0] for b in samples])
    y = torch.cat([b[1] for b in samples])
    lo, hi = float(x.min()), float(x.max())
    images = x.dim() == 4
    psnrs, ssims = [], []
    for i in range(x.shape[0]):
        rec = gradient_inversion(
            model, x[i : i + 1], y[i : i + 1], steps=steps, tv_weight=1e-4 if images else 0.0,
            data_range=(lo, hi), seed=seed + i,
        )  # fmt: skip
        psnrs.append(float(rec["psnr"]))
        if rec["ssim"] is not None:
            ssims.append(float(rec["ssim"]))
    result = {"inversion_psnr": sum(psnrs) / len(psnrs)}
    if ssims:
        result["inversion_ssim"] = sum(ssims) / len(ssims)
    return result


__all__ = ["DEEP_KEYS", "deep_forgetting_metrics", "take_samples"]
