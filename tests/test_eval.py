"""Tests of unlearn_ext.eval on hand-made cases with known answers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unlearn_ext.data import TensorBatches
from unlearn_ext.eval import (
    accuracy,
    accuracy_from_logits,
    average_gap,
    entropy,
    entropy_mia,
    evaluate,
    loss_mia,
    mia_auc,
    per_sample_loss,
    predict,
    true_class_confidence,
)

pytest.importorskip("sklearn")

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def identity_linear() -> nn.Linear:
    """A 2 -> 2 linear model whose logits are its inputs: it predicts the argmax coordinate."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    return model


# Predictions of identity_linear: [0, 1, 0, 1]; targets [0, 1, 1, 1] -> 3 of 4 correct.
X4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
Y4 = torch.tensor([0, 1, 1, 1])


def logits_with_entropy(h: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits ``[a, 0, ..., 0]`` whose softmax entropy equals ``h`` (nats), one row per entry of ``h``.

    Entropy falls monotonically from log C (a = 0) to 0 (a -> inf), so ``a`` is found by bisection.
    """
    h = h.double()
    assert bool((h > 0).all()) and bool((h < math.log(num_classes)).all())
    lo, hi = torch.zeros_like(h), torch.full_like(h, 60.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        logits = torch.zeros(h.shape[0], num_classes, dtype=torch.float64)
        logits[:, 0] = mid
        too_high = entropy(logits) > h  # entropy still too high -> need a larger logit
        lo, hi = torch.where(too_high, mid, lo), torch.where(too_high, hi, mid)
    out = torch.zeros(h.shape[0], num_classes, dtype=torch.float64)
    out[:, 0] = (lo + hi) / 2
    return out


def quantiles(mean: float, std: float, n: int) -> torch.Tensor:
    """``n`` evenly spaced quantiles of N(mean, std^2): a deterministic "sample"."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return mean + std * math.sqrt(2.0) * torch.erfinv(2 * u - 1)


def confident(labels: torch.Tensor, num_classes: int, margin: float) -> torch.Tensor:
    """Logits with ``margin`` on ``labels`` and 0 elsewhere."""
    logits = torch.zeros(labels.shape[0], num_classes)
    logits[torch.arange(labels.shape[0]), labels] = margin
    return logits


class SmallNet(nn.Module):
    def __init__(self, d: int = 6, c: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def make_splits(d: int = 6, c: int = 3, batch_size: int = 16) -> dict[str, TensorBatches]:
    g = torch.Generator().manual_seed(1)
    sizes = {"forget": 40, "retain": 120, "test": 60, "forget_class_test": 20, "retain_class_test": 30}
    return {
        name: TensorBatches(
            torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g), batch_size=batch_size
        )
        for name, n in sizes.items()
    }


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool], list[bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], list[bool], list[bool]]) -> None:
    state, modes, requires_grad = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------
# predictions.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batches",
    [
        TensorBatches(X4, Y4, batch_size=3),
        DataLoader(TensorDataset(X4, Y4), batch_size=1),
        [(X4[:2], Y4[:2]), (X4[2:], Y4[2:])],
    ],
    ids=["TensorBatches", "DataLoader", "list"],
)
def test_accuracy_hand_computed(batches):
    model = identity_linear()
    assert accuracy(model, batches) == 0.75
    logits, targets = predict(model, batches)
    assert logits.dtype == torch.float32 and targets.dtype == torch.int64
    assert logits.shape == (4, 2) and targets.shape == (4,)
    assert logits.device.type == "cpu" and targets.device.type == "cpu"
    torch.testing.assert_close(logits, X4)
    assert torch.equal(targets, Y4)
    assert accuracy_from_logits(logits, targets) == 0.75


def test_predict_float64_model_gives_float32_logits():
    model = identity_linear().double()
    logits, targets = predict(model, [(X4.double(), Y4.int())])
    assert logits.dtype == torch.float32 and targets.dtype == torch.int64
    assert accuracy_from_logits(logits, targets) == 0.75


@pytest.mark.parametrize("num_classes", [2, 10, 1000])
@pytest.mark.parametrize("level", [0.0, -7.5, 1000.0])
def test_entropy_uniform_is_log_c(num_classes, level):
    logits = torch.full((3, num_classes), level)
    torch.testing.assert_close(entropy(logits), torch.full((3,), math.log(num_classes)), rtol=1e-5, atol=1e-5)


def test_entropy_known_values_and_stability():
    # p = [1/2, 1/4, 1/4] -> H = 1.5 ln 2
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    torch.testing.assert_close(entropy(logits), torch.tensor([1.5 * math.log(2)]))
    # a one-hot-ish row: ~0, finite, never negative, even with huge logits
    big = torch.tensor([[100.0, 0.0, 0.0], [1e4, -1e4, 0.0], [3e38, 0.0, 0.0]])
    h = entropy(big)
    assert torch.isfinite(h).all() and (h >= 0).all()
    assert h.max() < 1e-30
    # large margin, two classes: q = 1 / (1 + e^a), H = -(1 - q) log(1 - q) - q log q ~ (a + 1) e^-a
    a = 20.0
    q = 1.0 / (1.0 + math.exp(a))
    expected = -(1.0 - q) * math.log1p(-q) - q * math.log(q)
    got = entropy(torch.tensor([[a, 0.0]], dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_per_sample_loss_and_confidence_hand_computed():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    logits = torch.log(p) + 3.0  # a shift changes nothing
    targets = torch.tensor([0, 2])
    torch.testing.assert_close(per_sample_loss(logits, targets), torch.tensor([math.log(2), -math.log(0.3)]))
    torch.testing.assert_close(true_class_confidence(logits, targets), torch.tensor([0.5, 0.3]))
    assert per_sample_loss(logits, targets).shape == (2,)


# --------------------------------------------------------------------------------------------
# mia.py
# --------------------------------------------------------------------------------------------

C_MIA = 100  # log C ~ 4.6: room for two well-separated entropy bands


def test_entropy_mia_separable():
    members = logits_with_entropy(quantiles(0.05, 0.01, 200), C_MIA)  # confident
    nonmembers = logits_with_entropy(quantiles(3.5, 0.2, 200), C_MIA)  # unsure
    like_members = logits_with_entropy(quantiles(0.06, 0.01, 30), C_MIA)
    like_nonmembers = logits_with_entropy(quantiles(3.4, 0.2, 30), C_MIA)
    assert entropy_mia(members, nonmembers, like_members) == 1.0
    assert entropy_mia(members, nonmembers, like_nonmembers) == 0.0
    mixed = torch.cat([like_members[:10], like_nonmembers])  # 10 of 40 look like members
    assert entropy_mia(members, nonmembers, mixed) == pytest.approx(0.25)


def test_entropy_mia_class_balanced():
    # Overlapping bands, 1000 members vs 50 non-members: the balanced boundary is the midpoint (2.0).
    # Fitted on the raw 20:1 data, the prior would push it to ~2.27 and call the targets (2.2) members.
    members = logits_with_entropy(quantiles(1.5, 0.3, 1000), C_MIA)
    nonmembers = logits_with_entropy(quantiles(2.5, 0.3, 50), C_MIA)
    targets_above = logits_with_entropy(torch.full((20,), 2.2), C_MIA)
    targets_below = logits_with_entropy(torch.full((20,), 1.8), C_MIA)
    assert entropy_mia(members, nonmembers, targets_above) == 0.0
    assert entropy_mia(members, nonmembers, targets_below) == 1.0
    # the other way round (50 members vs 1000 non-members) is balanced too
    assert entropy_mia(members[::20], logits_with_entropy(quantiles(2.5, 0.3, 1000), C_MIA), targets_above) == 0.0

    # Sanity check of the test itself: an unbalanced fit does call the 2.2 targets members.
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([entropy(members), entropy(nonmembers)]).numpy().reshape(-1, 1)
    y = np.r_[np.ones(1000), np.zeros(50)]
    unbalanced = LogisticRegression(max_iter=1000).fit(x, y)
    assert unbalanced.predict(entropy(targets_above).numpy().reshape(-1, 1)).mean() == 1.0


def test_entropy_mia_seeded_determinism():
    g = torch.Generator().manual_seed(0)
    members = torch.randn(300, 10, generator=g) * 3
    nonmembers = torch.randn(40, 10, generator=g)
    targets = torch.randn(100, 10, generator=g) * 2
    results = {seed: entropy_mia(members, nonmembers, targets, seed=seed) for seed in range(6)}
    for seed, value in results.items():
        assert 0.0 <= value <= 1.0
        assert entropy_mia(members, nonmembers, targets, seed=seed) == value
    assert len(set(results.values())) > 1  # the seed does pick the subsample


def test_entropy_mia_constant_feature_does_not_crash():
    same = torch.zeros(20, 5)  # every entropy is log 5: the attack cannot separate anything
    value = entropy_mia(same, same.clone(), same[:7].clone())
    assert 0.0 <= value <= 1.0


def test_loss_mia_separates_where_entropy_cannot():
    # Members: confident and right. Non-members: just as confident but wrong. Entropies are equal,
    # losses are ~0 vs ~10.
    c = 10
    g = torch.Generator().manual_seed(3)
    ym, yn = torch.randint(0, c, (200,), generator=g), torch.randint(0, c, (80,), generator=g)
    member_logits = confident(ym, c, 10.0)
    nonmember_logits = confident((yn + 1) % c, c, 10.0)
    yt = torch.randint(0, c, (30,), generator=g)
    right, wrong = confident(yt, c, 10.0), confident((yt + 3) % c, c, 10.0)
    assert loss_mia(member_logits, ym, nonmember_logits, yn, right, yt) == 1.0
    assert loss_mia(member_logits, ym, nonmember_logits, yn, wrong, yt) == 0.0
    half = torch.cat([right[:15], wrong[15:]])
    assert loss_mia(member_logits, ym, nonmember_logits, yn, half, yt) == pytest.approx(0.5)
    # the entropy feature is constant here: no crash, and the same call for every target
    assert entropy_mia(member_logits, nonmember_logits, right) == entropy_mia(member_logits, nonmember_logits, wrong)
    # seeded determinism
    noisy = right + torch.randn(right.shape, generator=g) * 5
    a = loss_mia(member_logits, ym, nonmember_logits, yn, noisy, yt, seed=7)
    assert a == loss_mia(member_logits, ym, nonmember_logits, yn, noisy, yt, seed=7)


def test_mia_auc():
    assert mia_auc(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert mia_auc(np.array([0.0, 1.0]), np.array([3.0, 4.0, 5.0])) == 0.0
    assert mia_auc(torch.ones(4), torch.ones(6)) == 0.5
    # 3 of the 4 (member, non-member) pairs are ordered right
    assert mia_auc(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])) == 0.75


# --------------------------------------------------------------------------------------------
# summary.py
# --------------------------------------------------------------------------------------------


def test_average_gap_hand_computed():
    metrics = {"test_acc": 0.9, "forget_acc": 0.1, "mia": 0.5, "retain_acc": 1.0}
    retrained = {"test_acc": 0.8, "forget_acc": 0.0, "mia": 0.2, "retain_acc": 0.0}
    assert average_gap(metrics, retrained) == pytest.approx((0.1 + 0.1 + 0.3) / 3)
    assert average_gap(metrics, retrained) == pytest.approx(0.16667, abs=1e-5)
    # keys missing from one side are skipped
    assert average_gap({"test_acc": 0.9, "forget_acc": 0.4}, {"test_acc": 0.7, "mia": 0.1}) == pytest.approx(0.2)
    assert average_gap(metrics, retrained, keys=("retain_acc",)) == 1.0
    with pytest.raises(ValueError, match="none of the keys"):
        average_gap({"test_acc": 0.9}, {"forget_acc": 0.1})
    with pytest.raises(ValueError, match="not finite"):
        average_gap({"mia": float("nan")}, {"mia": 0.1})


def test_evaluate_does_not_change_the_model():
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.train()
    original, retrained = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        retrained.fc2.weight.mul_(-1)
    before = snapshot(model), snapshot(original), snapshot(retrained)
    splits = make_splits()
    evaluate(model, splits, original=original, retrained=retrained)
    for m, b in zip((model, original, retrained), before, strict=True):
        assert_unchanged(m, b)
    assert model.training and model.bn.training and model.drop.training

    # mixed modes survive: a model in train mode with a frozen (eval-mode) BatchNorm
    model.bn.eval()
    before = snapshot(model)
    accuracy(model, splits["forget"])
    assert_unchanged(model, before)
    assert model.training and not model.bn.training

    # and an eval-mode model stays in eval mode
    model.eval()
    before = snapshot(model)
    evaluate(model, splits)
    assert_unchanged(model, before)
    assert not any(m.training for m in model.modules())


def test_evaluate_uses_eval_mode():
    # In train mode, dropout and batch statistics would make two runs differ; eval mode is deterministic.
    model = SmallNet().train()
    splits = make_splits()
    assert evaluate(model, splits, mia=False) == evaluate(model, splits, mia=False)
    logits, _ = predict(model, splits["test"])
    with torch.no_grad():
        expected = model.eval()(splits["test"].x)
    torch.testing.assert_close(logits, expected)


def test_evaluate_keys():
    model = SmallNet()
    splits = make_splits()
    accs = {"forget_acc", "retain_acc", "test_acc", "forget_class_test_acc", "retain_class_test_acc"}
    result = evaluate(model, splits)
    assert set(result) == accs | {"mia", "mia_loss"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result.values())
    for name, batches in splits.items():
        assert result[f"{name}_acc"] == accuracy(model, batches)
    logits = {name: predict(model, b)[0] for name, b in splits.items()}
    assert result["mia"] == entropy_mia(logits["retain"], logits["test"], logits["forget"])

    assert set(evaluate(model, splits, mia=False)) == accs
    assert set(evaluate(model, {"forget": splits["forget"], "test": splits["test"]})) == {"forget_acc", "test_acc"}
    result = evaluate(model, splits, original=model, retrained={"test_acc": 0.5, "forget_acc": 0.5, "mia": 0.5})
    assert set(result) == accs | {"mia", "mia_loss", "agreement_with_original_forget", "avg_gap"}
    assert result["avg_gap"] == pytest.approx(average_gap(result, {"test_acc": 0.5, "forget_acc": 0.5, "mia": 0.5}))


def test_evaluate_retrained_model_or_dict_same_gap():
    torch.manual_seed(0)
    model, retrained = SmallNet(), SmallNet()
    splits = make_splits()
    reference = evaluate(retrained, splits, seed=3)
    by_dict = evaluate(model, splits, retrained=reference, seed=3)
    by_model = evaluate(model, splits, retrained=retrained, seed=3)
    assert by_dict["avg_gap"] == by_model["avg_gap"]
    expected = np.mean([abs(by_dict[k] - reference[k]) for k in ("test_acc", "forget_acc", "mia")])
    assert by_dict["avg_gap"] == pytest.approx(expected)
    assert evaluate(model, splits, retrained=model)["avg_gap"] == 0.0


def test_agreement_with_original():
    model = identity_linear()
    forget = TensorBatches(X4, Y4, batch_size=3)
    result = evaluate(model, {"forget": forget}, original=model)
    assert result == {"forget_acc": 0.75, "agreement_with_original_forget": 1.0}

    # an original that predicts class 0 everywhere agrees on samples 0 and 2 only
    always0 = nn.Linear(2, 2)
    with torch.no_grad():
        always0.weight.zero_()
        always0.bias.copy_(torch.tensor([1.0, 0.0]))
    assert evaluate(model, {"forget": forget}, original=always0)["agreement_with_original_forget"] == 0.5

    # a shuffling forget loader is read once, so both models see the same order
    x = torch.randn(64, 2)
    y = torch.randint(0, 2, (64,))
    other = identity_linear()
    with torch.no_grad():
        other.weight.add_(torch.tensor([[0.0, 0.7], [0.0, 0.0]]))
    plain = evaluate(model, {"forget": TensorBatches(x, y, batch_size=8)}, original=other)
    shuffled = evaluate(model, {"forget": TensorBatches(x, y, batch_size=8, shuffle=True)}, original=other)
    assert 0.0 < plain["agreement_with_original_forget"] < 1.0
    assert shuffled["agreement_with_original_forget"] == plain["agreement_with_original_forget"]
    assert (
        evaluate(model, {"forget": TensorBatches(x, y, shuffle=True)}, original=model)["agreement_with_original_forget"]
        == 1.0
    )


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_empty_batches_raise():
    model = identity_linear()
    for empty in ([], TensorBatches(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))):
        with pytest.raises(ValueError, match="batches are empty"):
            predict(model, empty)
        with pytest.raises(ValueError, match="batches are empty"):
            accuracy(model, empty)
        with pytest.raises(ValueError, match="batches are empty"):
            evaluate(model, {"forget": empty})
    with pytest.raises(ValueError, match="empty"):
        entropy_mia(torch.zeros(0, 3), torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty"):
        entropy_mia(torch.randn(5, 3), torch.randn(5, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="empty"):
        mia_auc(torch.zeros(0), torch.ones(3))


def test_nan_and_inf_logits_raise():
    good = torch.randn(8, 3)
    y = torch.zeros(8, dtype=torch.long)
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = good.clone()
        bad[2, 1] = bad_value
        with pytest.raises(ValueError, match="NaN or inf"):
            entropy_mia(bad, good, good)
        with pytest.raises(ValueError, match="NaN or inf"):
            entropy_mia(good, good, bad)
        with pytest.raises(ValueError, match="NaN or inf"):
            loss_mia(good, y, bad, y, good, y)
        with pytest.raises(ValueError, match="NaN or inf"):
            accuracy_from_logits(bad, y)
        with pytest.raises(ValueError, match="NaN or inf"):
            entropy(bad)

    class NaNModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 3), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        evaluate(NaNModel(), {"forget": [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))]})


def test_shape_mismatches_raise():
    logits = torch.randn(6, 4)
    with pytest.raises(ValueError, match="mismatched shapes"):
        accuracy_from_logits(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="mismatched shapes"):
        per_sample_loss(logits, torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        entropy(torch.randn(6))
    with pytest.raises(ValueError, match="2-D"):
        entropy_mia(torch.randn(6), torch.randn(6, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="number of classes"):
        entropy_mia(torch.randn(6, 4), torch.randn(6, 5), torch.randn(6, 4))
    with pytest.raises(ValueError, match="number of classes"):
        entropy_mia(torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 3))
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="mismatched shapes"):
        loss_mia(logits, y, logits, y, logits, y[:3])
    with pytest.raises(ValueError, match="class indices in"):
        loss_mia(logits, y + 4, logits, y, logits, y)
    with pytest.raises(ValueError, match="1-D"):
        mia_auc(torch.ones(2, 2), torch.ones(3))
    # a batch whose targets do not match the model's outputs
    with pytest.raises(ValueError, match="mismatched shapes"):
        predict(identity_linear(), [(X4, Y4[:3])])
    with pytest.raises(ValueError, match="2-D logits"):
        predict(nn.Flatten(0), [(X4, Y4)])


def test_evaluate_bad_splits_raise():
    model = identity_linear()
    forget = TensorBatches(X4, Y4)
    with pytest.raises(ValueError, match="unknown split name"):
        evaluate(model, {"forget": forget, "tset": forget})
    with pytest.raises(ValueError, match="must contain 'forget'"):
        evaluate(model, {"retain": forget, "test": forget})
    with pytest.raises(ValueError, match="retrained must be"):
        evaluate(model, {"forget": forget}, retrained=0.5)
