"""MUSO for deep networks (METHODS.md 3.2): the streamed-Gram projector, the relabelling, and the method.

The relabelling is checked against MUSO's exact linear closed form (unlearn_ext.methods.muso_linear)
on a network whose features are fixed random Fourier features with more dimensions than retain
samples: there the deep algorithm's first relabelling must be the linear theory's retrained-head
prediction.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from unlearn_ext.data import TensorBatches, make_forget_split
from unlearn_ext.eval import penultimate_features
from unlearn_ext.methods import get_method
from unlearn_ext.methods.muso import (
    epsilon_ramp,
    forget_scores,
    relabel_matrix,
    retain_gram,
    retain_projector,
    retain_statistics,
    retrained_head,
)
from unlearn_ext.methods.muso_linear import fit_interpolating_head, optimal_forget_labels, signed_targets
from unlearn_ext.models import (
    INITIAL_HEAD_BUFFER,
    RandomFourierFeatures,
    TrainConfig,
    attach_initial_head,
    get_initial_head,
    head_matrix,
    load_checkpoint,
    save_checkpoint,
    train_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split(digits):
    return make_forget_split(digits, classes=3, seed=0)


@pytest.fixture(scope="module")
def mlp(digits):
    return train_classifier(
        "mlp", digits.x_train, digits.y_train, num_classes=10, config=TrainConfig(epochs=5), with_codes=False
    )


def test_projector_from_the_gram_equals_the_textbook_form():
    """I - eps (Z^T Z + eps I)^-1 == Z^T (Z Z^T + eps I)^-1 Z, for N < d + 1 and N > d + 1."""
    g = torch.Generator().manual_seed(0)
    for n, d in ((30, 50), (200, 50)):
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        for eps in (1e-6, 1e-2, 3.0):
            textbook = z.T @ torch.linalg.solve(z @ z.T + eps * torch.eye(n, dtype=torch.float64), z)
            torch.testing.assert_close(retain_projector(z.T @ z, eps), textbook, rtol=1e-7, atol=1e-8)
    with pytest.raises(ValueError, match="eps must be a positive"):
        retain_projector(torch.eye(3, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="finite square"):
        retain_projector(torch.ones(2, 3, dtype=torch.float64), 1e-3)
    with pytest.raises(ValueError, match="not positive definite"):
        retain_projector(-torch.eye(3, dtype=torch.float64), 1e-3)


def test_epsilon_ramp():
    assert epsilon_ramp(0, 5, 1e-6, 1e-2) == 1e-6
    assert epsilon_ramp(4, 5, 1e-6, 1e-2) == pytest.approx(1e-2)
    assert epsilon_ramp(2, 5, 1e-6, 1e-2) == pytest.approx((1e-6 + 1e-2) / 2)
    assert epsilon_ramp(0, 1, 1e-6, 1e-2) == 1e-6
    values = [epsilon_ramp(e, 7, 1e-6, 1e-2) for e in range(7)]
    assert values == sorted(values)


def test_retain_gram_streams_every_sample(mlp, split):
    retain = split.batches(batch_size=100)["retain"]
    gram, n = retain_gram(mlp, retain)
    x, _ = split.tensors()["retain"]
    feats, _ = penultimate_features(mlp, [(x, torch.zeros(len(x), dtype=torch.long))])
    z = torch.cat([feats.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    assert n == len(x)
    torch.testing.assert_close(gram, z.T @ z, rtol=1e-9, atol=1e-9)  # summation order only
    with pytest.raises(ValueError, match="retain set is empty"):
        retain_gram(mlp, [])


class FixedFeatureNet(nn.Module):
    """Random Fourier features (fixed) followed by a trainable linear head: MUSO's linear setting."""

    def __init__(self, rff: RandomFourierFeatures, classes: int) -> None:
        super().__init__()
        self.rff = rff
        self.head = nn.Linear(rff.out_features, classes, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.rff(x))


def test_first_relabel_is_the_linear_closed_form(digits):
    """Fixed features, p = 2 * 400 + 1 > N_r: the deep relabelling equals the retrained linear head's outputs."""
    x, y = digits.x_train[:300], digits.y_train[:300]
    net = FixedFeatureNet(RandomFourierFeatures(64, 400, 6.0, seed=1), 10)
    w0 = head_matrix(net.head).double().T.clone()  # [d + 1, C]
    # "train" the head: interpolate one-vs-rest targets from w0 (features with the bias column appended)
    phi = torch.cat([net.rff(x), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    targets = torch.where(torch.nn.functional.one_hot(y, 10) > 0, 1.0, -1.0).double()
    w_p = fit_interpolating_head(phi, targets, w0).weight
    forget = y == 3
    eps = 1e-7  # the same ridge on both sides: Z^T (Z Z^T + eps I)^-1 Z == I - eps (Z^T Z + eps I)^-1
    gram = phi[~forget].T @ phi[~forget]
    original_logits = phi[forget] @ w_p
    scores = forget_scores(net.rff(x[forget]), relabel_matrix(gram, w_p, w0, eps), original_logits)
    # the linear theory: labels = retrained head's outputs, with the original's retain outputs as y_r
    expected = optimal_forget_labels(phi[forget], phi[~forget], phi[~forget] @ w_p, w0, eps=eps)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)  # p x p vs N x N solves at cond ~1e7
    assert torch.equal(scores.argmax(1), expected.argmax(1))
    assert bool((scores.argmax(1) != 3).float().mean() > 0.5)  # the retrained head mostly says "not 3"


def test_initial_head_is_recorded_and_kept_in_checkpoints(digits, tmp_path):
    model = train_classifier(
        "mlp", digits.x_train[:200], digits.y_train[:200], num_classes=10, config=TrainConfig(epochs=2)
    )
    w0 = get_initial_head(model)
    layer = model.net[-1]
    assert w0.shape == (10, layer.in_features + 1)
    assert not torch.allclose(w0[:, :-1], layer.weight.detach())  # trained away from its initialisation
    torch.manual_seed(0)
    from unlearn_ext.models import build_model

    fresh = build_model("mlp", tuple(digits.x_train.shape[1:]), 10)
    torch.testing.assert_close(w0, head_matrix(fresh.net[-1]))  # the seeded initialisation
    save_checkpoint(model, tmp_path / "m.safetensors")
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    torch.testing.assert_close(get_initial_head(loaded), w0)
    assert INITIAL_HEAD_BUFFER in loaded.state_dict()
    with pytest.raises(ValueError, match=r"shape \[10, "):
        attach_initial_head(copy.deepcopy(model), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        attach_initial_head(copy.deepcopy(model), torch.full_like(w0, math.nan))


def test_muso_runs_and_leaves_the_input_untouched(mlp, split):
    b = split.batches(batch_size=128)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    method = get_method("muso", epochs=2, lr=1e-3)
    out = method.unlearn(mlp, b["forget"], b["retain"])
    assert all(torch.equal(v, mlp.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, out.state_dict()[k]) for k, v in before.items())
    assert [e["epoch"] for e in method.log] == [0, 1]
    assert method.log[0]["eps"] == 1e-6 and method.log[1]["eps"] == pytest.approx(1e-2)
    assert method.log[0]["retain_samples_in_gram"] == split.retain_idx.numel()
    for entry in method.log:
        assert 0.0 <= entry["forget_relabel_keeps_true"] <= 1.0 and math.isfinite(entry["loss"])
        assert entry["projector_effect"] >= 0.0


def test_forget_labels_hook_sets_the_labels_trained_on(mlp, split):
    """A subclass overriding ``_forget_labels`` (benchmarks/muso_oracle.py) trains on those labels: here
    every forget sample gets the next class, so none keeps its true class and the model learns them."""
    from unlearn_ext.methods.muso import MUSO

    class NextClass(MUSO):
        def _forget_labels(self, model, index, x, relabel, original_logits):
            assert not model.training and not torch.is_grad_enabled() and original_logits.shape == (x.shape[0], 10)
            return (original_logits.argmax(1) + 1) % 10  # the original prediction, shifted by one

    b = split.batches(batch_size=128)
    method = NextClass(epochs=5, lr=1e-2, progress=False)
    out = method.unlearn(mlp, b["forget"], b["retain"])
    assert all(e["forget_relabel_keeps_true"] < 0.05 for e in method.log)
    with torch.no_grad():
        pred = torch.cat([out(x).argmax(1) for x, _ in b["forget"]])
        shifted = torch.cat([(mlp(x).argmax(1) + 1) % 10 for x, _ in b["forget"]])
    assert float((pred == shifted).float().mean()) > 0.5  # the forget set learned the labels it was given


def test_muso_bad_input(mlp, split):
    b = split.batches(batch_size=128)
    bare = copy.deepcopy(mlp)
    del bare._buffers[INITIAL_HEAD_BUFFER]
    with pytest.raises(ValueError, match="needs the head's initialisation w0"):
        get_method("muso").unlearn(bare, b["forget"], b["retain"])
    with pytest.raises(ValueError, match=r"w0 must have shape \[10, 1001\].*Linear\(1000, 10\)"):
        get_method("muso", w0=torch.zeros(10, 513)).unlearn(mlp, b["forget"], b["retain"])
    with pytest.raises(ValueError, match="NaN or inf"):
        get_method("muso", w0=torch.full((10, 1001), math.inf)).unlearn(mlp, b["forget"], b["retain"])
    with pytest.raises(ValueError, match="needs the retain set"):
        get_method("muso").unlearn(mlp, b["forget"])
    for hp, message in (
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"eps0": 0.0}, "eps0"),
        ({"eps_final": math.nan}, "eps_final"),
    ):
        with pytest.raises(ValueError, match=message):
            get_method("muso", **hp).unlearn(mlp, b["forget"], b["retain"])
    with pytest.raises(ValueError, match="the forget set is empty"):
        get_method("muso").unlearn(
            mlp, TensorBatches(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), b["retain"]
        )


def test_released_operator_is_the_scaled_woodbury_form(mlp, split):
    """projector='released' computes (1/eps) Z^T (I + Z Z^T)^-1 Z = (1/eps) (I - (I + G)^-1) on its
    subsample (all rows at subset_ratio=1), and the method runs with it."""
    from unlearn_ext.methods.muso import released_projector

    retain = split.batches(batch_size=64)["retain"]
    gram, n = retain_gram(mlp, retain)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    for eps in (1e-2, 0.5):
        op, n_s = released_projector(mlp, retain, eps, 1.0, torch.Generator().manual_seed(0))
        assert n_s == n
        torch.testing.assert_close(op, (eye - torch.linalg.inv(eye + gram)) / eps, rtol=1e-6, atol=1e-6)
    _, n_half = released_projector(mlp, retain, 1e-2, 0.2, torch.Generator().manual_seed(0))
    assert 0.1 * n < n_half < 0.3 * n
    b = split.batches(batch_size=64)
    m = get_method("muso", epochs=1, projector="released").unlearn(mlp, b["forget"], b["retain"])
    assert all(torch.isfinite(p).all() for p in m.parameters())
    with pytest.raises(ValueError, match="projector must be one of"):
        get_method("muso", projector="woodbury").unlearn(mlp, b["forget"], b["retain"])
    with pytest.raises(ValueError, match="subset_ratio must be in"):
        get_method("muso", projector="released", subset_ratio=0.0).unlearn(mlp, b["forget"], b["retain"])


def test_retrained_head_is_the_ridge_fit_from_w0_in_both_regimes():
    """(G + eps I)^-1 (Z^T Y + eps w0) == w0 + Z^T (Z Z^T + eps I)^-1 (Y - Z w0) (METHODS.md 3.1), with
    fewer and with more samples than feature dimensions; and with Y = Z w_p it reproduces the paper's
    relabelling without the drift term when the projector is exact."""
    g = torch.Generator().manual_seed(3)
    for n, d in ((30, 50), (400, 50)):
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = signed_targets(torch.randint(0, 4, (n,), generator=g), num_classes=4)
        w0 = torch.randn(d, 4, generator=g, dtype=torch.float64)
        for eps in (1e-6, 1e-2, 5.0):
            textbook = w0 + z.T @ torch.linalg.solve(z @ z.T + eps * torch.eye(n, dtype=torch.float64), y - z @ w0)
            torch.testing.assert_close(retrained_head(z.T @ z, z.T @ y, w0, eps), textbook, rtol=1e-6, atol=1e-7)
        w_p = torch.randn(d, 4, generator=g, dtype=torch.float64)
        paper = relabel_matrix(z.T @ z, w_p, w0, 1e-3) - w_p  # w0 + Pi (w_p - w0)
        torch.testing.assert_close(retrained_head(z.T @ z, z.T @ (z @ w_p), w0, 1e-3), paper, rtol=1e-6, atol=1e-7)
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="eps must be a positive"):
        retrained_head(eye, torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match=r"must both be finite \[d \+ 1, C\]"):
        retrained_head(eye, torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64), 1e-3)
    with pytest.raises(ValueError, match="not positive definite"):
        retrained_head(-eye, torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), 1e-3)


def test_retain_statistics_stream_the_gram_and_the_label_moments(mlp, split):
    retain = split.batches(batch_size=100)["retain"]
    gram, cross, n = retain_statistics(mlp, retain, 10)
    x, y = split.tensors()["retain"]
    feats, _ = penultimate_features(mlp, [(x, torch.zeros(len(x), dtype=torch.long))])
    z = torch.cat([feats.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    assert n == len(x)
    torch.testing.assert_close(gram, z.T @ z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cross, z.T @ signed_targets(y, num_classes=10), rtol=1e-9, atol=1e-9)
    assert retain_statistics(mlp, retain)[1] is None
    with pytest.raises(ValueError, match=r"retain labels must be class ids in \[0, 4\)"):
        retain_statistics(mlp, retain, 4)


def test_label_targets_relabel_with_the_retrained_linear_head(digits):
    """Fixed features (the linear setting): targets='labels' relabels the forget set with the outputs of
    the head retrained on the retain labels from w0, i.e. MUSO's linear closed form with the true y_r."""
    x, y = digits.x_train[:300], digits.y_train[:300]
    net = FixedFeatureNet(RandomFourierFeatures(64, 400, 6.0, seed=1), 10)
    w0 = head_matrix(net.head).double().T.clone()
    phi = torch.cat([net.rff(x), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    forget = y == 3
    retain = TensorBatches(x[~forget], y[~forget], batch_size=64)
    gram, cross, n = retain_statistics(net, retain, 10)
    head = retrained_head(gram, cross, w0, 1e-7)
    scores = forget_scores(net.rff(x[forget]), head, None)
    expected = optimal_forget_labels(
        phi[forget], phi[~forget], signed_targets(y[~forget], num_classes=10), w0, eps=1e-7
    )
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert not bool((scores.argmax(1) == 3).any())  # no retain sample is a 3: the retrained head never says 3


def test_label_targets_forget_a_class_where_the_papers_relabelling_keeps_it(mlp, split):
    """More retain samples (1291) than feature dimensions (1001): the paper's relabelling is the original's
    own prediction (keeps the true class for most forget samples), the label form relabels (almost) all of them."""
    b = split.batches(batch_size=128)
    paper = get_method("muso", epochs=2, lr=1e-3)
    paper.unlearn(mlp, b["forget"], b["retain"])
    labels = get_method("muso", epochs=2, lr=1e-3, targets="labels")
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    out = labels.unlearn(mlp, b["forget"], b["retain"])
    assert all(torch.equal(v, mlp.state_dict()[k]) for k, v in before.items())
    assert paper.log[0]["forget_relabel_keeps_true"] > 0.5
    assert labels.log[0]["forget_relabel_keeps_true"] <= 0.02
    assert labels.log[0]["projector_effect"] is None and labels.log[0]["retain_samples_in_gram"] == len(
        split.retain_idx
    )
    xf, yf = split.tensors()["forget"]
    with torch.no_grad():
        assert float((out(xf).argmax(1) == yf).float().mean()) <= 0.05
    with pytest.raises(ValueError, match="targets must be one of"):
        get_method("muso", targets="logits").unlearn(mlp, b["forget"], b["retain"])
    with pytest.raises(ValueError, match="targets='labels' uses the streamed Gram"):
        get_method("muso", targets="labels", projector="released").unlearn(mlp, b["forget"], b["retain"])
