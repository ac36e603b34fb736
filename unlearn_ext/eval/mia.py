"""Membership-inference attacks (MIA) on logits, as used by MUSO / SalUn style evaluations.

Protocol (METHODS.md 3.3): a logistic regression is fitted on a one-dimensional per-sample feature,
with *members* (retain-train samples) labelled 1 and *non-members* (test samples) labelled 0. The
training set is class-balanced by subsampling the larger group (seeded) to the size of the smaller.
The attack is then applied to the *target* samples (the forget set), and the result is the fraction
of targets predicted "member", in [0, 1]. After a good unlearning, the forget set should look like
non-members about as often as it does for a model retrained without it.

scikit-learn is needed here (imported on first use).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unlearn_ext.eval.predictions import _check_logits, _check_targets, entropy, per_sample_loss


def _sklearn(what: str) -> Any:
    try:
        import sklearn.linear_model
        import sklearn.metrics
    except ImportError as exc:  # pragma: no cover - scikit-learn is installed wherever tests run
        raise ImportError(f"{what} needs scikit-learn: pip install scikit-learn") from exc
    return sklearn


def _check_sets(member: torch.Tensor, nonmember: torch.Tensor, target: torch.Tensor) -> None:
    for logits, name in ((member, "member_logits"), (nonmember, "nonmember_logits"), (target, "target_logits")):
        _check_logits(logits, name)
    if member.shape[1] != nonmember.shape[1] or member.shape[1] != target.shape[1]:
        raise ValueError(
            "member, nonmember and target logits must have the same number of classes, got "
            f"{member.shape[1]}, {nonmember.shape[1]} and {target.shape[1]}"
        )


def _to_column(feature: torch.Tensor) -> np.ndarray:
    return feature.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1, 1)


def _balanced_attack(
    member_feature: torch.Tensor, nonmember_feature: torch.Tensor, target_feature: torch.Tensor, seed: int
) -> float:
    """Fit the class-balanced logistic-regression attack on 1-D features; fraction of targets called members."""
    sklearn = _sklearn("the membership-inference attack")
    xm, xn, xt = _to_column(member_feature), _to_column(nonmember_feature), _to_column(target_feature)
    for x, name in ((xm, "member"), (xn, "nonmember"), (xt, "target")):
        if not np.isfinite(x).all():
            raise ValueError(f"the {name} attack feature contains NaN or inf values")
    rng = np.random.default_rng(seed)
    n = min(len(xm), len(xn))
    if len(xm) > n:
        xm = xm[np.sort(rng.choice(len(xm), size=n, replace=False))]
    if len(xn) > n:
        xn = xn[np.sort(rng.choice(len(xn), size=n, replace=False))]
    x = np.concatenate([xm, xn])
    y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    attack = sklearn.linear_model.LogisticRegression(random_state=seed, max_iter=1000)
    attack.fit(x, y)
    return float(np.mean(attack.predict(xt) == 1))


def entropy_mia(
    member_logits: torch.Tensor, nonmember_logits: torch.Tensor, target_logits: torch.Tensor, *, seed: int = 0
) -> float:
    """Entropy-based membership inference (MUSO's MIA metric).

    Feature: the entropy of the softmax (nats, see :func:`~unlearn_ext.eval.entropy`). Members tend to
    be predicted confidently (low entropy), non-members less so.

    Args:
        member_logits: ``[N_m, C]`` logits of known members (the retain-train set), labelled 1.
        nonmember_logits: ``[N_n, C]`` logits of known non-members (the test set), labelled 0.
        target_logits: ``[N_t, C]`` logits of the samples attacked (the forget set).
        seed: seed of the class-balancing subsample (the larger of members / non-members is cut to
            the size of the smaller).

    Returns:
        The fraction of target samples predicted "member", in [0, 1].

    Raises:
        ValueError: on an empty set, logits that are not 2-D or hold NaN/inf, or differing class counts.
    """
    _check_sets(member_logits, nonmember_logits, target_logits)
    return _balanced_attack(entropy(member_logits), entropy(nonmember_logits), entropy(target_logits), seed)


def loss_mia(
    member_logits: torch.Tensor,
    member_targets: torch.Tensor,
    nonmember_logits: torch.Tensor,
    nonmember_targets: torch.Tensor,
    target_logits: torch.Tensor,
    target_targets: torch.Tensor,
    *,
    seed: int = 0,
) -> float:
    """Loss-based membership inference: the protocol of :func:`entropy_mia` on per-sample cross-entropy.

    Members tend to have a low loss on their true label. Arguments are ``[N, C]`` logits and ``[N]``
    class-index targets of members (label 1), non-members (label 0) and targets (attacked).

    Returns:
        The fraction of target samples predicted "member", in [0, 1].

    Raises:
        ValueError: on an empty set, bad logits (not 2-D, NaN/inf), differing class counts, or targets
            whose shape does not match their logits or that are out of class range.
    """
    _check_sets(member_logits, nonmember_logits, target_logits)
    for logits, targets, name in (
        (member_logits, member_targets, "member_targets"),
        (nonmember_logits, nonmember_targets, "nonmember_targets"),
        (target_logits, target_targets, "target_targets"),
    ):
        _check_targets(targets, logits, name)
    return _balanced_attack(
        per_sample_loss(member_logits, member_targets),
        per_sample_loss(nonmember_logits, nonmember_targets),
        per_sample_loss(target_logits, target_targets),
        seed,
    )


def mia_auc(member_scores: torch.Tensor | np.ndarray, nonmember_scores: torch.Tensor | np.ndarray) -> float:
    """ROC AUC of a threshold attack that calls *higher* scores "member", in [0, 1].

    0.5 means members and non-members are indistinguishable by this score. Pass a score that is larger
    for members, e.g. ``-entropy(logits)``, ``-per_sample_loss(...)`` or ``true_class_confidence(...)``.

    Args:
        member_scores: ``[N_m]`` scores of members (positives).
        nonmember_scores: ``[N_n]`` scores of non-members (negatives).
    """
    sklearn = _sklearn("mia_auc")
    member = torch.as_tensor(member_scores).detach().cpu().double().numpy()
    nonmember = torch.as_tensor(nonmember_scores).detach().cpu().double().numpy()
    if member.ndim != 1 or nonmember.ndim != 1:
        raise ValueError(
            f"mia_auc scores must be 1-D [N], got shapes {member.shape} (members) and {nonmember.shape} (non-members)"
        )
    if member.size == 0 or nonmember.size == 0:
        raise ValueError(
            f"mia_auc needs non-empty score sets, got {member.size} members and {nonmember.size} non-members"
        )
    if not (np.isfinite(member).all() and np.isfinite(nonmember).all()):
        raise ValueError("mia_auc scores contain NaN or inf values")
    y = np.concatenate([np.ones(member.size), np.zeros(nonmember.size)])
    return float(sklearn.metrics.roc_auc_score(y, np.concatenate([member, nonmember])))
