"""MUSO's exact linear case (METHODS.md 3.1) on random Fourier features of the bundled MNIST.

The central check: fine-tuning the original head on all data with MUSO's closed-form forget labels
lands on the head retrained from ``w0`` on the retain data, to float64 rounding (relative distance
at most 1e-6; measured ~1e-12), while random labels and Bad Teacher end far away. The retrained head
is trained independently (its own run of the solver on the retain rows only).
"""

from __future__ import annotations

import math

import pytest
import torch

from unlearn_ext.data import load_dataset
from unlearn_ext.methods.muso_linear import (
    bad_teacher_linear,
    fit_interpolating_head,
    interpolant,
    muso_linear,
    optimal_forget_labels,
    parameter_distance,
    predicted_classes,
    random_label_linear,
    relative_distance,
    signed_targets,
)
from unlearn_ext.models.random_features import RandomFourierFeatures

pytestmark = pytest.mark.usefixtures("one_thread")
EXACT = 1e-6


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", seed=0)


@pytest.fixture(scope="module")
def pair(mnist):
    """3-vs-7: 800 training digits, 2D = 5000 random features (sigma 20), +-1 targets."""
    keep = (mnist.y_train == 3) | (mnist.y_train == 7)
    rff = RandomFourierFeatures(784, 2500, 20.0, seed=0)
    phi = rff(mnist.x_train[keep])
    return phi, signed_targets(mnist.y_train[keep], positive=3), rff


def init_head(p: int, columns: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (p,) if columns is None else (p, columns)
    return torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(p)


# --------------------------------------------------------------------------------------------
# Random Fourier features
# --------------------------------------------------------------------------------------------


def test_random_features_shape_seed_and_kernel(mnist):
    x = mnist.x_train[:64]
    rff = RandomFourierFeatures(784, 4000, 20.0, seed=3)
    phi = rff(x)
    assert phi.shape == (64, 8000) and phi.dtype == torch.float64 and rff.out_features == 8000
    assert torch.equal(phi, RandomFourierFeatures(784, 4000, 20.0, seed=3)(x))
    assert not torch.equal(phi, RandomFourierFeatures(784, 4000, 20.0, seed=4)(x))
    assert torch.allclose(phi.square().sum(1), torch.ones(64, dtype=torch.float64))  # cos^2 + sin^2, / D
    flat = x.flatten(1).double()
    kernel = torch.exp(-torch.cdist(flat, flat).square() / (2 * 20.0**2))
    assert (phi @ phi.T - kernel).abs().max() < 0.06  # Monte Carlo error ~ 1/sqrt(D)
    assert list(rff.parameters()) == [] and "weight" in rff.state_dict()


def test_random_features_bad_input():
    with pytest.raises(ValueError, match="in_features"):
        RandomFourierFeatures(0)
    with pytest.raises(ValueError, match="num_features"):
        RandomFourierFeatures(4, 2.5)
    for sigma in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="sigma"):
            RandomFourierFeatures(4, 8, sigma)
    with pytest.raises(ValueError, match="floating-point"):
        RandomFourierFeatures(4, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="expected 4 input values"):
        RandomFourierFeatures(4, 8)(torch.zeros(2, 5))


# --------------------------------------------------------------------------------------------
# Training to interpolation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [None, 3])
@pytest.mark.parametrize("solver", ["cgls", "gd"])
def test_fit_reaches_the_interpolant_closest_to_w0(columns, solver):
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(40, 120, generator=g, dtype=torch.float64) / 11
    y = torch.randn(40, generator=g, dtype=torch.float64) if columns is None else torch.randn(40, columns, generator=g)
    y = y.double()
    w0 = init_head(120, columns, seed=2)
    w0_before = w0.clone()
    fit = fit_interpolating_head(phi, y, w0, solver=solver, tol=1e-12)
    assert fit.converged and fit.relative_residual <= 1e-12 and not fit.stopped_early
    assert fit.weight.shape == w0.shape and torch.equal(w0, w0_before)
    closed = interpolant(phi, y, w0)
    assert relative_distance(fit.weight, closed) < 1e-9
    # the interpolant closest to w0: w - w0 lies in the row space of phi
    pinv = torch.linalg.pinv(phi)
    assert relative_distance(closed, w0 + pinv @ (y - phi @ w0)) < 1e-10
    if solver == "cgls":
        assert fit.iterations <= 4 * 40


def test_fit_stops_early_and_at_max_iter(pair):
    phi, t, _ = pair
    w0 = init_head(phi.shape[1])
    seen = []

    def stop(w):
        seen.append(w.shape)
        return len(seen) == 3

    fit = fit_interpolating_head(phi, t, w0, stop=stop, check_every=5)
    assert fit.stopped_early and not fit.converged and fit.iterations == 15 and seen == [w0.shape] * 3
    capped = fit_interpolating_head(phi, t, w0, max_iter=4)
    assert capped.iterations == 4 and not capped.converged and capped.relative_residual > 1e-6


def test_fit_bad_input():
    phi, y, w0 = torch.randn(5, 8).double(), torch.randn(5).double(), torch.zeros(8).double()
    cases = [
        (dict(phi=torch.randn(5)), "feature matrix"),
        (dict(phi=torch.zeros(0, 8).double()), "no rows"),
        (dict(phi=torch.full((5, 8), math.nan).double()), "NaN"),
        (dict(targets=torch.randn(4).double()), "4 rows but the features have 5"),
        (dict(targets=torch.ones(5, dtype=torch.long)), "floating-point"),
        (dict(targets=torch.tensor([1.0, math.inf, 0, 0, 0]).double()), "NaN or inf"),
        (dict(w0=torch.zeros(7).double()), r"w0 must have shape \[8\]"),
        (dict(w0=torch.zeros(8, 2).double()), r"w0 must have shape \[8\]"),
        (dict(solver="adam"), "solver"),
        (dict(tol=-1.0), "tol"),
        (dict(max_iter=-1), "max_iter"),
        (dict(check_every=0), "check_every"),
    ]
    for override, message in cases:
        kwargs = dict(phi=phi, targets=y, w0=w0) | override
        with pytest.raises(ValueError, match=message):
            fit_interpolating_head(kwargs.pop("phi"), kwargs.pop("targets"), kwargs.pop("w0"), **kwargs)


# --------------------------------------------------------------------------------------------
# The closed-form relabelling
# --------------------------------------------------------------------------------------------


def test_optimal_labels_are_the_retrained_heads_outputs(pair):
    phi, t, _ = pair
    w0 = init_head(phi.shape[1])
    retain = torch.zeros(phi.shape[0], dtype=torch.bool)
    retain[::3] = True
    w_r = fit_interpolating_head(phi[retain], t[retain], w0).weight
    labels = optimal_forget_labels(phi[~retain], phi[retain], t[retain], w0)
    assert relative_distance(labels, phi[~retain] @ w_r) < 1e-9
    # the released code's ridge 1e-8 changes them only by ~eps / lambda_min
    ridged = optimal_forget_labels(phi[~retain], phi[retain], t[retain], w0, eps=1e-8)
    assert 0 < relative_distance(ridged, labels) < 1e-5


def test_singular_gram_needs_a_ridge(pair):
    phi, t, _ = pair
    w0 = init_head(phi.shape[1])
    dup = torch.cat([phi[:50], phi[:50]])  # each retain sample twice: rank 50 of 100
    y_dup = torch.cat([t[:50], t[:50]])
    with pytest.raises(ValueError, match="Gram matrix of the retain features is singular.*pass a ridge eps > 0"):
        optimal_forget_labels(phi[50:60], dup, y_dup, w0)
    ridged = optimal_forget_labels(phi[50:60], dup, y_dup, w0, eps=1e-8)
    unique = optimal_forget_labels(phi[50:60], phi[:50], t[:50], w0)
    assert relative_distance(ridged, unique) < 1e-5
    for eps in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="eps"):
            optimal_forget_labels(phi[50:60], phi[:50], t[:50], w0, eps=eps)


def test_optimal_labels_bad_input(pair):
    phi, t, _ = pair
    w0 = init_head(phi.shape[1])
    with pytest.raises(ValueError, match="same feature map"):
        optimal_forget_labels(phi[:5, :100], phi[5:20], t[5:20], w0)
    with pytest.raises(ValueError, match="y_retain has 14 rows"):
        optimal_forget_labels(phi[:5], phi[5:20], t[5:19], w0)
    with pytest.raises(ValueError, match="w0 must have shape"):
        optimal_forget_labels(phi[:5], phi[5:20], t[5:20], w0[:-1])


# --------------------------------------------------------------------------------------------
# MUSO is exact; the relabelling baselines are not
# --------------------------------------------------------------------------------------------


def test_muso_equals_retraining_binary_3_vs_7(pair, mnist):
    """The paper's setting: 300 retain samples, the other 500 of 3-vs-7 forgotten."""
    phi, t, rff = pair
    w0 = init_head(phi.shape[1])
    retain = torch.zeros(phi.shape[0], dtype=torch.bool)
    retain[torch.randperm(phi.shape[0], generator=torch.Generator().manual_seed(0))[:300]] = True
    forget = ~retain
    original = fit_interpolating_head(phi, t, w0)
    retrained = fit_interpolating_head(phi[retain], t[retain], w0)
    assert original.converged and retrained.converged
    muso = muso_linear(phi, t, forget, original.weight, w0)
    assert muso.fit.converged
    assert relative_distance(muso.weight, retrained.weight) <= EXACT
    assert parameter_distance(muso.weight, retrained.weight) < 1e-20
    torch.testing.assert_close(muso.labels[retain], t[retain])
    rand = random_label_linear(phi, t, forget, original.weight, seed=0)
    teacher = bad_teacher_linear(phi, t, forget, original.weight, init_head(phi.shape[1], seed=9))
    for other in (rand, teacher, original):
        weight = other.weight if hasattr(other, "weight") else other
        assert relative_distance(weight, retrained.weight) > 0.3
    # same function as the retrained head on unseen digits
    keep = (mnist.y_test == 3) | (mnist.y_test == 7)
    phi_test = rff(mnist.x_test[keep])
    assert torch.equal(
        predicted_classes(phi_test @ muso.weight, positive=3, negative=7),
        predicted_classes(phi_test @ retrained.weight, positive=3, negative=7),
    )


@pytest.mark.parametrize("solver", ["cgls", "gd"])
def test_muso_equals_retraining_one_vs_rest_class_forgetting(mnist, solver):
    """Ten classes, one-vs-rest targets, class 3 forgotten; plain gradient descent on fewer samples
    (it needs thousands of steps where conjugate gradients need a few hundred)."""
    n = 200 if solver == "cgls" else 60
    x, y = mnist.x_train[:n], mnist.y_train[:n]
    phi = RandomFourierFeatures(784, 600, 20.0, seed=5)(x)
    t = signed_targets(y, num_classes=10)
    w0 = init_head(phi.shape[1], 10, seed=1)
    forget = y == 3
    kw = dict(solver=solver, tol=1e-12)
    original = fit_interpolating_head(phi, t, w0, **kw)
    retrained = fit_interpolating_head(phi[~forget], t[~forget], w0, **kw)
    muso = muso_linear(phi, t, forget, original.weight, w0, **kw)
    assert relative_distance(muso.weight, retrained.weight) <= EXACT
    rand = random_label_linear(phi, t, forget, original.weight, seed=1, **kw)
    assert relative_distance(rand.weight, retrained.weight) > 0.1
    # random labels pick another class for every forget sample
    assert bool((rand.labels[forget].argmax(1) != 3).all()) and set(rand.labels[forget].unique().tolist()) == {-1, 1}


def test_baselines_with_early_stopping(pair):
    """As in the released code: fine-tuning stops once forget accuracy is within 0.03 of retrain's."""
    phi, t, _ = pair
    w0 = init_head(phi.shape[1])
    forget = torch.arange(phi.shape[0]) % 4 == 0
    original = fit_interpolating_head(phi, t, w0).weight
    retrained = fit_interpolating_head(phi[~forget], t[~forget], w0).weight
    target_acc = float((torch.sign(phi[forget] @ retrained) == t[forget]).double().mean())

    def close_enough(w):
        return abs(float((torch.sign(phi[forget] @ w) == t[forget]).double().mean()) - target_acc) <= 0.03

    for result in (
        random_label_linear(phi, t, forget, original, seed=2, stop=close_enough, check_every=1),
        bad_teacher_linear(phi, t, forget, original, init_head(phi.shape[1], seed=7), stop=close_enough, check_every=1),
    ):
        assert relative_distance(result.weight, retrained) > 0.1


def test_methods_bad_forget_masks(pair):
    phi, t, _ = pair
    w = init_head(phi.shape[1])
    n = phi.shape[0]
    cases = [
        (torch.zeros(n, dtype=torch.bool), "forget set is empty"),
        (torch.ones(n, dtype=torch.bool), "nothing would be retained"),
        (torch.zeros(n, dtype=torch.long), "bool tensor"),
        (torch.zeros(n - 1, dtype=torch.bool), "bool tensor"),
    ]
    for mask, message in cases:
        for call in (
            lambda m: muso_linear(phi, t, m, w, w),
            lambda m: random_label_linear(phi, t, m, w),
            lambda m: bad_teacher_linear(phi, t, m, w, w),
        ):
            with pytest.raises(ValueError, match=message):
                call(mask)
    mask = torch.arange(n) < 10
    with pytest.raises(ValueError, match="w_original must have shape"):
        muso_linear(phi, t, mask, w[:-1], w)
    with pytest.raises(ValueError, match="w_teacher must have shape"):
        bad_teacher_linear(phi, t, mask, w, w[:-1])


def test_targets_and_distances():
    y = torch.tensor([0, 3, 7, 3])
    torch.testing.assert_close(signed_targets(y, positive=3), torch.tensor([-1.0, 1, -1, 1], dtype=torch.float64))
    ovr = signed_targets(y, num_classes=8)
    assert ovr.shape == (4, 8) and torch.equal(ovr.argmax(1), y) and int((ovr == 1).sum()) == 4
    with pytest.raises(ValueError, match="exactly one"):
        signed_targets(y)
    with pytest.raises(ValueError, match="class ids must be in"):
        signed_targets(y, num_classes=5)
    with pytest.raises(ValueError, match="integer class ids"):
        signed_targets(y.double(), positive=3)
    assert torch.equal(predicted_classes(torch.tensor([0.5, -2.0]), positive=3, negative=7), torch.tensor([3, 7]))
    with pytest.raises(ValueError, match="positive= and negative="):
        predicted_classes(torch.tensor([0.5]))
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0])
    assert relative_distance(a, b) == pytest.approx(0.75) and parameter_distance(a, b) == pytest.approx(4.5)
    with pytest.raises(ValueError, match="shapes differ"):
        relative_distance(a, b[:1])
