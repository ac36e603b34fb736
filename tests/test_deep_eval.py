"""Tests of the deep-forgetting evaluation (OPC, METHODS.md 4.3): recovery attacks, CKA, linear probes,
gradient inversion. Closed forms are checked against independent formulas; the attacks on small models
trained on the bundled real MNIST-5k."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from unlearn_ext.data import TensorBatches, load_dataset, make_forget_split
from unlearn_ext.eval import (
    DEEP_KEYS,
    CKAAccumulator,
    accuracy,
    deep_forgetting_metrics,
    evaluate,
    feature_mapping_attack,
    feature_mapping_attacks,
    finetune_recovery_attack,
    fit_affine_map,
    fit_feature_map,
    fit_feature_maps,
    gradient_inversion,
    linear_cka,
    linear_cka_from_features,
    linear_probe_accuracy,
    penultimate_features,
    psnr,
    ssim,
    take_samples,
    total_variation,
)
from unlearn_ext.models import TrainConfig, train_classifier

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread", "one_blas_thread")

HIDDEN = 64

# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS/OpenMP thread for scikit-learn too: on a busy 2-core runner, oversubscribed BLAS
    threads made a 4000-sample logistic regression ~10x slower."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def split(mnist):
    """Forget class 3 of MNIST-5k (400 training samples)."""
    return make_forget_split(mnist, classes=3)


@pytest.fixture(scope="module")
def mlp(mnist):
    """784-64 ReLU-10 MLP, 3 epochs on all of MNIST-5k's training split (~92% test accuracy)."""
    config = TrainConfig(epochs=3, lr=0.05, t_mix=0.0)
    model = train_classifier(
        "mlp",
        mnist.x_train,
        mnist.y_train,
        num_classes=10,
        config=config,
        with_codes=False,
        hidden=HIDDEN,
        activation="relu",
    )
    model.zero_grad(set_to_none=True)  # training leaves the last step's .grad behind
    return model


@pytest.fixture(scope="module")
def cnn(mnist):
    """A small SmallCNN (4/8 channels, BatchNorm), 1 epoch (~90% test accuracy)."""
    config = TrainConfig(epochs=1, lr=0.05, t_mix=0.0, schedule="cosine")
    model = train_classifier(
        "cnn", mnist.x_train, mnist.y_train, num_classes=10, config=config, with_codes=False, channels=4, hidden=32
    )
    model.zero_grad(set_to_none=True)
    return model


def batches(split, name: str, batch_size: int = 256, limit: int | None = None) -> TensorBatches:
    x, y = split.tensors()[name]
    return TensorBatches(x[:limit], y[:limit], batch_size=batch_size)


class Remixed(nn.Module):
    """``original``'s feature extractor, then an invertible affine layer, then a fresh random head.

    Its penultimate features are ``f_o(x) M^T + c``: all of the original's information, but the
    outputs are those of a random head (a caricature of shallow, head-only unlearning).
    """

    def __init__(self, original: nn.Module, mix: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        self.body = copy.deepcopy(original.net[:3])
        self.mix = nn.Linear(mix.shape[1], mix.shape[0])
        torch.manual_seed(seed)
        self.head = nn.Linear(mix.shape[0], 10)
        with torch.no_grad():
            self.mix.weight.copy_(mix)
            self.mix.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.body(x)))


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A Haar-random ``d x d`` orthogonal matrix, float64."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


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


class Probe(nn.Module):
    """A linear model whose penultimate features are its inputs."""

    def __init__(self, d: int, c: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# Closed-form affine map
# --------------------------------------------------------------------------------------------


def affine_data(n: int = 200, d_x: int = 7, d_y: int = 4, offset: float = 50.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, d_x, dtype=torch.float64)
    x = x + offset  # a large mean: the streaming statistics must not lose the spread to cancellation
    a = torch.randn(d_x, d_y, generator=g, dtype=torch.float64)
    y = x @ a + torch.randn(d_y, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, d_y, generator=g)
    return x, y


@pytest.mark.parametrize("chunk_size", [1, 13, 4096])
def test_fit_affine_map_is_least_squares(chunk_size):
    x, y = affine_data()
    fitted = fit_affine_map(x, y, ridge=0.0, chunk_size=chunk_size)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    expected = torch.linalg.lstsq(design, y, driver="gelsd").solution
    torch.testing.assert_close(fitted.weight, expected[:-1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(fitted.bias, expected[-1], rtol=1e-8, atol=1e-7)
    residual = design @ expected - y
    r2 = 1 - residual.square().sum() / (y - y.mean(0)).square().sum()
    assert fitted.r2 == pytest.approx(float(r2), abs=1e-9)
    assert fitted.n == 200 and fitted.rho == 0.0
    torch.testing.assert_close(fitted(x), design @ expected, rtol=1e-8, atol=1e-7)


def test_fit_affine_map_ridge_matches_augmented_lstsq():
    x, y = affine_data(n=60, d_x=9, d_y=3, offset=-20.0, seed=1)
    ridge = 0.3
    fitted = fit_affine_map(x, y, ridge=ridge, chunk_size=16)
    xn, yn = x.numpy(), y.numpy()
    xc, yc = xn - xn.mean(0), yn - yn.mean(0)
    rho = ridge * np.sum(xc**2) / xn.shape[1]  # the documented meaning of `ridge`
    # ridge with an unpenalised intercept == least squares on centred data stacked over sqrt(rho) I
    stacked_x = np.vstack([xc, np.sqrt(rho) * np.eye(xn.shape[1])])
    stacked_y = np.vstack([yc, np.zeros((xn.shape[1], yn.shape[1]))])
    w = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]
    b = yn.mean(0) - xn.mean(0) @ w
    assert fitted.rho == pytest.approx(rho, rel=1e-10)
    np.testing.assert_allclose(fitted.weight.numpy(), w, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fitted.bias.numpy(), b, rtol=1e-9, atol=1e-8)
    # ridge is unit-free: rescaling x rescales W inversely and leaves the predictions unchanged
    scaled = fit_affine_map(x * 1000.0, y, ridge=ridge)
    torch.testing.assert_close(scaled(x * 1000.0), fitted(x), rtol=1e-8, atol=1e-8)
    assert scaled.r2 == pytest.approx(fitted.r2, abs=1e-10)
    assert 0 < fitted.r2 < fit_affine_map(x, y, ridge=0.0).r2 < 1


@pytest.mark.parametrize("chunk_size", [1, 13, 4096])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_fit_linear_map_is_ridge_least_squares_through_the_origin(chunk_size, ridge):
    # the large offset makes the linear fit differ a lot from the affine one, and tests that the
    # unshifted statistics are recovered from the shifted ones without loss
    x, y = affine_data(n=80, d_x=6, d_y=3, offset=30.0, seed=2)
    fitted = fit_affine_map(x, y, ridge=ridge, chunk_size=chunk_size, intercept=False)
    xn, yn = x.numpy(), y.numpy()
    rho = ridge * np.sum((xn - xn.mean(0)) ** 2) / xn.shape[1]  # the same rho as the affine fit
    stacked_x = np.vstack([xn, np.sqrt(rho) * np.eye(xn.shape[1])])
    stacked_y = np.vstack([yn, np.zeros((xn.shape[1], yn.shape[1]))])
    w = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]
    assert fitted.intercept is False and fitted.rho == pytest.approx(rho, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(fitted.weight.numpy(), w, rtol=1e-7, atol=1e-8)
    assert torch.equal(fitted.bias, torch.zeros(3, dtype=torch.float64))
    residual = xn @ w - yn
    r2 = 1 - np.sum(residual**2) / np.sum((yn - yn.mean(0)) ** 2)
    assert fitted.r2 == pytest.approx(float(r2), abs=1e-8)
    torch.testing.assert_close(fitted(x), torch.from_numpy(xn @ w), rtol=1e-8, atol=1e-7)
    torch.testing.assert_close(fitted(torch.zeros(2, 6, dtype=torch.float64)), torch.zeros(2, 3, dtype=torch.float64))
    affine = fit_affine_map(x, y, ridge=ridge, chunk_size=chunk_size)
    assert affine.intercept is True
    if ridge == 0.0:
        assert affine.r2 > fitted.r2  # unpenalised, the intercept can only help the fit
    with pytest.raises(ValueError, match="intercept must be True or False"):
        fit_affine_map(x, y, intercept=1)


def test_linear_map_cannot_move_the_origin_but_the_affine_map_can():
    """Features collapsed to 0 on the attack set: the linear map leaves them at 0 whatever the fit,
    the affine map sends them to its intercept (the point the attack on OPC exploits)."""
    x, y = affine_data(n=100, d_x=5, d_y=4, offset=3.0, seed=4)
    y = y + 5.0  # a target intercept the affine fit must find
    linear = fit_affine_map(x, y, intercept=False)
    affine = fit_affine_map(x, y)
    origin = torch.zeros(7, 5, dtype=torch.float64)
    assert torch.equal(linear(origin), torch.zeros(7, 4, dtype=torch.float64))
    torch.testing.assert_close(affine(origin), affine.bias.expand(7, 4))
    assert float(affine.bias.min()) > 3.0


def test_fit_affine_map_collapsed_input_predicts_the_mean():
    _, y = affine_data(n=50)
    x = torch.full((50, 6), 2.5, dtype=torch.float64)
    fitted = fit_affine_map(x, y)
    assert torch.equal(fitted.weight, torch.zeros(6, 4, dtype=torch.float64))
    torch.testing.assert_close(fitted.bias, y.mean(0), rtol=1e-12, atol=1e-12)
    assert fitted.r2 == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(fit_affine_map(y, x).r2)  # constant targets: R^2 is undefined


def test_fit_affine_map_bad_input():
    x, y = affine_data(n=20)
    for ridge in (-1e-3, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="ridge"):
            fit_affine_map(x, y, ridge=ridge)
    with pytest.raises(ValueError, match="same number of rows"):
        fit_affine_map(x, y[:-1])
    with pytest.raises(ValueError, match="2-D"):
        fit_affine_map(x[:, 0], y)
    with pytest.raises(ValueError, match="empty"):
        fit_affine_map(x[:0], y[:0])
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_affine_map(torch.where(x > 50, float("nan"), x), y)
    with pytest.raises(ValueError, match="rank-deficient"):
        fit_affine_map(torch.cat([x, x[:, :1]], dim=1), y, ridge=0.0)  # a duplicated column
    with pytest.raises(ValueError, match="chunk_size"):
        fit_affine_map(x, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"x must be \[N, 7\]"):
        fit_affine_map(x, y)(x[:, :3])


# --------------------------------------------------------------------------------------------
# Feature-mapping attack
# --------------------------------------------------------------------------------------------


def test_fm_attack_on_the_original_itself(mlp, split):
    for unlearned in (mlp, copy.deepcopy(mlp)):
        result = feature_mapping_attack(unlearned, mlp, batches(split, "retain"), batches(split, "forget"), ridge=1e-9)
        assert result["original_acc"] > 0.8
        assert result["recovered_acc"] == result["unlearned_acc"] == result["original_acc"]
        assert result["fit_r2"] == pytest.approx(1.0, abs=1e-6)
        assert result["n_fit"] == split.retain_idx.numel() and result["n_attack"] == split.forget_idx.numel() == 400
    # the default ridge shrinks the map a little but changes nothing that matters
    result = feature_mapping_attack(mlp, mlp, batches(split, "retain"), batches(split, "forget"))
    assert 0.9999 < result["fit_r2"] < 1.0
    assert result["recovered_acc"] == pytest.approx(result["original_acc"], abs=0.01)


@pytest.mark.parametrize("orthogonal", [True, False])
def test_fm_attack_recovers_head_only_unlearning(mlp, split, orthogonal):
    mix = random_orthogonal(HIDDEN, 1).float() if orthogonal else torch.randn(HIDDEN, HIDDEN) + 3 * torch.eye(HIDDEN)
    unlearned = Remixed(mlp, mix)
    fit, forget = batches(split, "retain"), batches(split, "forget")
    result = feature_mapping_attack(unlearned, mlp, fit, forget, ridge=1e-8)
    assert result["unlearned_acc"] < 0.5  # the random head "forgot"
    assert result["fit_r2"] == pytest.approx(1.0, abs=1e-5)  # exact up to float32 features
    assert result["recovered_acc"] == pytest.approx(result["original_acc"], abs=1 / 400)
    # CKA sees through an orthogonal remix (plus a shift) but not through a general invertible one
    cka = linear_cka(unlearned, mlp, forget)
    if orthogonal:
        assert cka == pytest.approx(1.0, abs=1e-6)
    else:
        assert cka < 0.99


def test_fm_attack_on_collapsed_features(mlp, split):
    collapsed = copy.deepcopy(mlp)
    with torch.no_grad():
        collapsed.net[1].weight.zero_()
        collapsed.net[1].bias.fill_(-1.0)  # ReLU(-1) = 0: every penultimate feature is 0
    fit, forget = batches(split, "retain"), batches(split, "forget", batch_size=64)
    result = feature_mapping_attack(collapsed, mlp, fit, forget)
    # the map can only predict the original's mean retain feature: one constant class for everyone
    mean_feature = penultimate_features(mlp, fit)[0].double().mean(0)
    head = mlp.net[3]
    constant_class = int((head.weight.double() @ mean_feature + head.bias.double()).argmax())
    y_forget = split.tensors()["forget"][1]
    assert result["recovered_acc"] == pytest.approx(float((y_forget == constant_class).double().mean()))
    assert result["fit_r2"] == pytest.approx(0.0, abs=1e-9)
    assert result["recovered_acc"] == 0.0  # the forget class (3) is not the retain mean's class
    assert linear_cka(collapsed, mlp, forget) == 0.0
    # the linear map sends the collapsed point (0) to 0: the original head answers with its bias alone
    linear = feature_mapping_attack(collapsed, mlp, fit, forget, intercept=False)
    bias_class = int(head.bias.argmax())
    assert linear["recovered_acc"] == pytest.approx(float((y_forget == bias_class).double().mean()))
    assert linear["recovered_acc"] == 0.0 and bias_class != 3


def test_fm_attacks_with_several_maps_equal_the_single_attacks(mlp, split):
    unlearned = Remixed(mlp, torch.randn(HIDDEN, HIDDEN) + 2 * torch.eye(HIDDEN))
    fit, forget = batches(split, "retain", limit=1000), batches(split, "forget", batch_size=50)
    maps = fit_feature_maps(unlearned, mlp, fit)
    both = feature_mapping_attacks(unlearned, mlp, maps, forget)
    assert set(both) == {"affine", "linear"}
    for kind, intercept in (("affine", True), ("linear", False)):
        assert both[kind] == feature_mapping_attack(unlearned, mlp, fit, forget, intercept=intercept)
    with pytest.raises(ValueError, match="feature_maps is empty"):
        feature_mapping_attacks(unlearned, mlp, {}, forget)


def test_fit_feature_map_equals_fit_on_features(mlp, split):
    unlearned = Remixed(mlp, torch.randn(HIDDEN, HIDDEN) + 2 * torch.eye(HIDDEN))
    fit = batches(split, "retain", batch_size=100, limit=1000)
    streamed = fit_feature_map(unlearned, mlp, fit, ridge=1e-3)
    f_u, _ = penultimate_features(unlearned, fit)
    f_o, _ = penultimate_features(mlp, fit)
    direct = fit_affine_map(f_u, f_o, ridge=1e-3)
    torch.testing.assert_close(streamed.weight, direct.weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(streamed.bias, direct.bias, rtol=1e-9, atol=1e-9)
    assert streamed.r2 == pytest.approx(direct.r2, abs=1e-12) and streamed.n == 1000
    both = fit_feature_maps(unlearned, mlp, fit, ridge=1e-3)
    direct_linear = fit_affine_map(f_u, f_o, ridge=1e-3, intercept=False)
    torch.testing.assert_close(both["affine"].weight, direct.weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(both["linear"].weight, direct_linear.weight, rtol=1e-7, atol=1e-8)
    assert both["linear"].r2 == pytest.approx(direct_linear.r2, abs=1e-9)
    single = fit_feature_map(unlearned, mlp, fit, ridge=1e-3, intercept=False)
    assert torch.equal(single.weight, both["linear"].weight) and not single.intercept


# --------------------------------------------------------------------------------------------
# Fine-tuning attack
# --------------------------------------------------------------------------------------------


def test_finetune_attack_recovers_a_reset_head(mlp, mnist):
    random_split = make_forget_split(mnist, fraction=0.1, seed=0)
    shallow = copy.deepcopy(mlp)
    with torch.no_grad():
        shallow.net[3].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    xr, yr = random_split.tensors()["retain"]
    retain_subset = TensorBatches(xr[:256], yr[:256], batch_size=64, shuffle=True, seed=1)
    forget = batches(random_split, "forget")
    before = snapshot(shallow)
    result = finetune_recovery_attack(shallow, retain_subset, forget, steps=40, lr=0.05)
    assert_unchanged(shallow, before)
    assert result["unlearned_acc"] == accuracy(shallow, forget) < 0.5
    assert result["recovered_acc"] > 0.8
    assert result["steps"] == 40 and result["n_attack"] == 400 and math.isfinite(result["finetune_loss"])
    # seeded: the same call gives the same numbers
    retain_subset = TensorBatches(xr[:256], yr[:256], batch_size=64, shuffle=True, seed=1)
    assert finetune_recovery_attack(shallow, retain_subset, forget, steps=40, lr=0.05) == result


def test_finetune_attack_bad_input(mlp, split):
    forget = batches(split, "forget")
    retain = batches(split, "retain", limit=64)
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            finetune_recovery_attack(mlp, retain, forget, steps=steps)
    with pytest.raises(ValueError, match="lr"):
        finetune_recovery_attack(mlp, retain, forget, lr=0.0)
    with pytest.raises(ValueError, match="empty"):
        finetune_recovery_attack(mlp, [], forget, steps=1)
    one_shot = iter([(retain.x, retain.y)])  # enough for one step, not for three
    with pytest.raises(ValueError, match="re-iterable"):
        finetune_recovery_attack(mlp, one_shot, forget, steps=3)
    frozen = copy.deepcopy(mlp).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        finetune_recovery_attack(frozen, retain, forget, steps=1)


# --------------------------------------------------------------------------------------------
# Linear CKA
# --------------------------------------------------------------------------------------------


def cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """METHODS.md 6.4's formula, non-streaming: centre the columns, ||Y^T X||_F^2 / (||X^T X|| ||Y^T Y||)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def cka_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """The kernel form (Kornblith et al. eq. 4): HSIC of the centred linear kernels, normalised."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.sum(k * l_) / (np.linalg.norm(k) * np.linalg.norm(l_))


def related(n: int = 80, d_a: int = 12, d_b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d_a, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d_a, dtype=torch.float64)
    b = a[:, :d_b] @ torch.randn(d_b, d_b, generator=g, dtype=torch.float64) + torch.randn(n, d_b, generator=g)
    return a, b


def test_cka_matches_direct_formulas():
    for seed in range(3):
        a, b = related(seed=seed)
        value = linear_cka_from_features(a, b, chunk_size=7)
        assert 0.05 < value < 0.95
        assert value == pytest.approx(cka_numpy(a.numpy(), b.numpy()), rel=1e-10)
        assert value == pytest.approx(cka_hsic(a.numpy(), b.numpy()), rel=1e-10)
        # symmetric, float32 input is fine
        assert linear_cka_from_features(b, a) == pytest.approx(value, rel=1e-10)
        assert linear_cka_from_features(a.float(), b.float()) == pytest.approx(value, rel=1e-5)


def test_cka_invariances():
    a, b = related(seed=4)
    value = linear_cka_from_features(a, b)
    q = random_orthogonal(a.shape[1], 2)
    assert linear_cka_from_features(a @ q * 3.7 + 5.0, b) == pytest.approx(value, rel=1e-10)
    assert linear_cka_from_features(a, -0.01 * b - 2.0) == pytest.approx(value, rel=1e-10)
    assert linear_cka_from_features(a, a) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka_from_features(a, a @ q) == pytest.approx(1.0, rel=1e-12)
    # not invariant to a general invertible map (the test would not notice a wrong normalisation)
    stretch = torch.diag(torch.linspace(1, 10, a.shape[1], dtype=torch.float64))
    assert linear_cka_from_features(a, a @ stretch) < 0.99


def test_cka_streaming_and_offsets():
    a, b = related(n=101, seed=5)
    whole = linear_cka_from_features(a, b, chunk_size=1000)
    for chunk_size in (1, 2, 33, 100):
        assert linear_cka_from_features(a, b, chunk_size=chunk_size) == pytest.approx(whole, rel=1e-11)
    acc = CKAAccumulator()
    for lo, hi in ((0, 1), (1, 1), (1, 40), (40, 101)):  # uneven chunks, an empty one
        acc.update(a[lo:hi], b[lo:hi])
    assert acc.n == 101 and acc.compute() == pytest.approx(whole, rel=1e-11)
    # a mean 1e6 times the spread: the first-chunk shift keeps the centring exact enough
    assert linear_cka_from_features(a + 1e6, b - 3e5, chunk_size=10) == pytest.approx(whole, rel=1e-7)


def test_cka_collapsed_is_zero():
    a, _ = related()
    point = torch.full_like(a[:, :3], 0.7)
    assert linear_cka_from_features(a, point) == 0.0
    assert linear_cka_from_features(point, a) == 0.0
    assert linear_cka_from_features(point, point) == 0.0
    assert linear_cka_from_features(torch.zeros(10, 4), torch.zeros(10, 2)) == 0.0
    # collapsed up to float32 rounding of a large value: still a point
    noisy_point = (1000.0 + 1e-5 * torch.randn(50, 4)).float()
    assert linear_cka_from_features(noisy_point, a[:50]) == 0.0
    # a tiny but genuine spread is not a collapse (CKA is scale-invariant)
    assert linear_cka_from_features(a * 1e-20, a) == pytest.approx(1.0, rel=1e-10)


def test_cka_bad_input():
    a, b = related()
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka_from_features(a, b[:-1])
    with pytest.raises(ValueError, match="same number of rows"):
        CKAAccumulator().update(a, b[:-1])
    with pytest.raises(ValueError, match="at least 2 samples"):
        linear_cka_from_features(a[:1], b[:1])
    with pytest.raises(ValueError, match="at least 2 samples"):
        linear_cka_from_features(a[:0], b[:0])
    with pytest.raises(ValueError, match="2-D"):
        linear_cka_from_features(a[:, 0], b)
    with pytest.raises(ValueError, match="NaN or inf"):
        linear_cka_from_features(a, torch.where(b > 1, float("inf"), b))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cka_from_features(a, b, chunk_size=0)
    with pytest.raises(ValueError, match="widths changed"):
        CKAAccumulator().update(a[:5], b[:5]).update(a[5:, :3], b[5:])


def test_linear_cka_of_models(mlp, cnn, split):
    forget = batches(split, "forget", batch_size=96)
    assert linear_cka(mlp, mlp, forget) == pytest.approx(1.0, abs=1e-9)
    value = linear_cka(mlp, cnn, forget)  # different widths (64 vs 32)
    f_mlp, _ = penultimate_features(mlp, forget)
    f_cnn, _ = penultimate_features(cnn, forget)
    assert f_mlp.shape == (400, HIDDEN) and f_cnn.shape == (400, 32)
    assert value == pytest.approx(cka_numpy(f_mlp.double().numpy(), f_cnn.double().numpy()), rel=1e-6)
    assert 0.1 < value < 0.99
    with pytest.raises(ValueError, match="empty"):
        linear_cka(mlp, cnn, [])


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


def test_linear_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 5
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 6.0 * y[:, None].float() * torch.tensor([1.0, -1, 0, 0, 0])
    model = Probe(d)
    train, test = TensorBatches(x[:200], y[:200], batch_size=64), TensorBatches(x[200:], y[200:], batch_size=64)
    assert linear_probe_accuracy(model, train, test) == 1.0
    noise_y = torch.randint(0, 2, (n,), generator=g)  # labels independent of the features
    chance = linear_probe_accuracy(model, TensorBatches(x[:200], noise_y[:200]), TensorBatches(x[200:], noise_y[200:]))
    assert 0.35 < chance < 0.65


def test_linear_probe_on_mnist_features(mlp, split, mnist):
    train = batches(split, "retain", batch_size=512, limit=1500)
    test = TensorBatches(mnist.x_test, mnist.y_test, batch_size=512)
    before = snapshot(mlp)
    value = linear_probe_accuracy(mlp, train, test)
    assert_unchanged(mlp, before)
    # the forget class never appears in the probe's training data: it cannot be predicted
    y_test = mnist.y_test
    assert 0.75 < value < float((y_test != 3).double().mean())


def test_linear_probe_bad_input():
    model = Probe(3)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    good = TensorBatches(x, y)
    with pytest.raises(ValueError, match="two classes"):
        linear_probe_accuracy(model, TensorBatches(x, torch.zeros(20, dtype=torch.long)), good)
    with pytest.raises(ValueError, match="train_batches is empty"):
        linear_probe_accuracy(model, [], good)
    with pytest.raises(ValueError, match="test_batches is empty"):
        linear_probe_accuracy(model, good, [])
    with pytest.raises(ValueError, match="C must be positive"):
        linear_probe_accuracy(model, good, good, C=0.0)
    with pytest.raises(ValueError, match="1-D"):
        linear_probe_accuracy(model, [(x, y[:, None])], good)


# --------------------------------------------------------------------------------------------
# PSNR, SSIM
# --------------------------------------------------------------------------------------------


def test_psnr_known_values():
    a = torch.rand(3, 1, 12, 12)
    signs = torch.where(torch.rand(3, 1, 12, 12) > 0.5, 1.0, -1.0)
    delta = torch.tensor([0.1, 0.01, 0.5]).view(3, 1, 1, 1)
    value = psnr(a, a + delta * signs, data_range=2.0)  # MSE = delta^2 exactly (up to float32 rounding)
    assert value.shape == (3,) and value.dtype == torch.float64
    expected = 20 * torch.log10(2.0 / delta.flatten().double())
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-4)
    assert torch.isinf(psnr(a, a.clone(), data_range=1.0)).all()
    assert psnr(a.flatten(1), (a + 0.1).flatten(1), data_range=1.0) == pytest.approx(20.0, abs=1e-4)


def test_ssim_identical_and_constant_images():
    a = torch.randn(2, 3, 16, 20)
    torch.testing.assert_close(ssim(a, a.clone(), data_range=4.0), torch.ones(2, dtype=torch.float64))
    # constant images u and v: no variance, SSIM is the luminance term alone
    u, v, length = 0.2, 0.7, 1.0
    c1 = (0.01 * length) ** 2
    value = ssim(torch.full((1, 1, 11, 11), u), torch.full((1, 1, 11, 11), v), data_range=length)
    assert float(value) == pytest.approx((2 * u * v + c1) / (u**2 + v**2 + c1), rel=1e-6)
    # [B, H, W] is one channel
    torch.testing.assert_close(ssim(a[:, 0], a[:, 0] + 0.1, 4.0), ssim(a[:, :1], a[:, :1] + 0.1, 4.0))


def ssim_scipy(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
    """Per-image SSIM the way skimage computes it with gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False: scipy's Gaussian filter (truncate 3.5 -> 11 taps), crop the
    5-pixel border, average over the map and the channels."""
    from scipy.ndimage import gaussian_filter

    def blur(x):
        return gaussian_filter(x, sigma=1.5, truncate=3.5, mode="reflect")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for img_a, img_b in zip(a, b, strict=True):
        per_channel = []
        for x, y in zip(img_a, img_b, strict=True):
            mx, my = blur(x), blur(y)
            vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            per_channel.append(s[5:-5, 5:-5].mean())
        out.append(np.mean(per_channel))
    return np.array(out)


def test_ssim_matches_scipy_reference():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 28, 31, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    b[1] = 1 - a[1]  # anti-correlated: negative SSIM
    ours = ssim(a, b, data_range=1.0).numpy()
    np.testing.assert_allclose(ours, ssim_scipy(a.numpy(), b.numpy(), 1.0), rtol=0, atol=1e-10)
    assert ours[1] < 0 < ours[0]


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    ours = ssim(a, b, data_range=1.0)
    for i in range(2):
        ref = metrics.structural_similarity(
            a[i, 0].numpy(), b[i, 0].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
        assert float(ours[i]) == pytest.approx(ref, abs=1e-3)


def test_psnr_ssim_bad_input():
    a = torch.rand(2, 1, 12, 12)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1], 1.0)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[..., :11], 1.0)
    for bad_range in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="data_range"):
            psnr(a, a, bad_range)
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(a[..., :10], a[..., :10], 1.0)
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(a.flatten(1), a.flatten(1), 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        psnr(a[:0], a[:0], 1.0)
    with pytest.raises(ValueError, match="finite"):
        psnr(a, torch.full_like(a, float("nan")), 1.0)


def test_total_variation_hand_computed():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]]])  # |dx|: 1, 2, 0, 0 -> 0.75; |dy|: 0, 1, 3 -> 4/3
    assert float(total_variation(x)) == pytest.approx(0.75 + 4 / 3)
    with pytest.raises(ValueError, match="images"):
        total_variation(torch.zeros(2, 5))


# --------------------------------------------------------------------------------------------
# Gradient inversion
# --------------------------------------------------------------------------------------------


def test_gradient_inversion_reconstructs_through_an_mlp(mlp, mnist):
    x, y = mnist.x_test[:1], mnist.y_test[:1]
    before = snapshot(mlp)
    result = gradient_inversion(mlp, x, y, steps=150, seed=0)
    assert_unchanged(mlp, before)
    assert result["psnr"] > result["init_psnr"] + 10.0  # about 7.6 dB -> 25 dB measured
    assert result["ssim"] > 0.6 and result["grad_cos"] > 0.9
    rec = result["reconstruction"]
    assert rec.shape == x.shape and rec.dtype == torch.float32 and not rec.requires_grad
    assert float(rec.min()) >= float(x.min()) and float(rec.max()) <= float(x.max())  # boxed
    length = float(x.max() - x.min())
    assert result["psnr"] == pytest.approx(float(psnr(rec, x, length)), abs=1e-4)
    # seeded
    again = gradient_inversion(mlp, x, y, steps=150, seed=0)
    assert torch.equal(again["reconstruction"], rec)
    assert gradient_inversion(mlp, x, y, steps=3, seed=1)["init_psnr"] != result["init_psnr"]


def test_gradient_inversion_cnn_keeps_batchnorm_untouched(cnn, mnist):
    model = copy.deepcopy(cnn).train()  # train mode: a forward pass here would update running stats
    before = snapshot(model)
    x, y = mnist.x_test[:2], mnist.y_test[:2]
    result = gradient_inversion(model, x, y, steps=60, tv_weight=1e-2)
    assert_unchanged(model, before)
    assert model.training and all(m.training for m in model.modules())
    assert result["psnr"] > result["init_psnr"] and result["grad_cos"] > 0.5
    assert result["reconstruction"].shape == x.shape


def test_gradient_inversion_flat_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.rand(1, 20), torch.tensor([2])
    result = gradient_inversion(model, x, y, steps=100, tv_weight=0.0, data_range=(0.0, 1.0))
    assert result["ssim"] is None and result["psnr"] > result["init_psnr"]
    with pytest.raises(ValueError, match="tv_weight > 0 needs image"):
        gradient_inversion(model, x, y, steps=1, tv_weight=1e-4)


def test_gradient_inversion_bad_input(mlp, mnist):
    x, y = mnist.x_test[:2], mnist.y_test[:2]
    with pytest.raises(ValueError, match="y_true must be"):
        gradient_inversion(mlp, x, y[:1], steps=1)
    with pytest.raises(ValueError, match="integer class indices"):
        gradient_inversion(mlp, x, y.float(), steps=1)
    with pytest.raises(ValueError, match="class indices in"):
        gradient_inversion(mlp, x, y + 10, steps=1)
    with pytest.raises(ValueError, match="non-empty batch"):
        gradient_inversion(mlp, x[:0], y[:0], steps=1)
    with pytest.raises(ValueError, match="steps"):
        gradient_inversion(mlp, x, y, steps=0)
    with pytest.raises(ValueError, match="lr"):
        gradient_inversion(mlp, x, y, lr=-0.1)
    with pytest.raises(ValueError, match="tv_weight"):
        gradient_inversion(mlp, x, y, tv_weight=-1.0)
    with pytest.raises(ValueError, match="data_range"):
        gradient_inversion(mlp, x, y, data_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="no parameter that requires"):
        gradient_inversion(copy.deepcopy(mlp).requires_grad_(False), x, y, steps=1)


# --------------------------------------------------------------------------------------------
# Purity and bad input shared by the model-level functions
# --------------------------------------------------------------------------------------------


def test_every_function_leaves_models_unchanged(cnn, mlp, split):
    model = copy.deepcopy(cnn).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    model.features[1].eval()  # mixed modes must survive too
    original = copy.deepcopy(mlp)
    fit, forget = batches(split, "retain", batch_size=128, limit=512), batches(split, "forget", batch_size=128)
    before, before_original = snapshot(model), snapshot(original)
    grad_mode = torch.is_grad_enabled()
    feature_mapping_attack(model, original, fit, forget)
    fit_feature_map(original, model, fit)
    linear_cka(model, original, forget)
    linear_probe_accuracy(model, fit, forget)
    penultimate_features(model, forget)
    finetune_recovery_attack(model, fit, forget, steps=2)
    assert_unchanged(model, before)
    assert_unchanged(original, before_original)
    assert not model.features[1].training and model.training
    assert torch.is_grad_enabled() == grad_mode


def test_models_without_a_final_linear_raise(mlp, split):
    conv_only = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    forget = batches(split, "forget")
    for call in (
        lambda: feature_mapping_attack(conv_only, mlp, forget, forget),
        lambda: feature_mapping_attack(mlp, conv_only, forget, forget),
        lambda: linear_cka(conv_only, mlp, forget),
        lambda: linear_probe_accuracy(conv_only, forget, forget),
        lambda: penultimate_features(conv_only, forget),
    ):
        with pytest.raises(ValueError, match="no nn.Linear"):
            call()


def test_empty_and_malformed_batches_raise(mlp, split):
    forget = batches(split, "forget")
    empty = TensorBatches(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    for nothing in ([], empty):
        with pytest.raises(ValueError, match="fit_batches is empty"):
            feature_mapping_attack(mlp, mlp, nothing, forget)
        with pytest.raises(ValueError, match="attack_batches is empty"):
            feature_mapping_attack(mlp, mlp, forget, nothing)
        with pytest.raises(ValueError, match="batches is empty"):
            penultimate_features(mlp, nothing)
    x, y = split.tensors()["forget"]
    with pytest.raises(ValueError, match="not an \\(inputs, targets\\) pair"):
        linear_cka(mlp, mlp, [x])
    with pytest.raises(ValueError, match="1-D"):
        feature_mapping_attack(mlp, mlp, [(x, y[:, None])], forget)
    with pytest.raises(ValueError, match="has 10 targets but"):
        linear_cka(mlp, mlp, [(x[:20], y[:10])])
    with pytest.raises(ValueError, match="class indices in"):
        feature_mapping_attack(mlp, mlp, forget, [(x, y + 10)])


# --------------------------------------------------------------------------------------------
# deep_forgetting_metrics / evaluate(deep=True): the one-call summary
# --------------------------------------------------------------------------------------------


def deep_splits(split, limit: int = 600) -> dict[str, TensorBatches]:
    names = ("forget", "retain", "test", "forget_class_test")
    return {name: batches(split, name, batch_size=128, limit=limit) for name in names}


def test_deep_metrics_equal_the_single_attacks(mlp, split):
    unlearned = Remixed(mlp, torch.randn(HIDDEN, HIDDEN) + 3 * torch.eye(HIDDEN))
    retrained = copy.deepcopy(mlp)
    with torch.no_grad():
        retrained.net[1].weight.add_(0.05 * torch.randn_like(retrained.net[1].weight))
    splits = deep_splits(split)
    subset = take_samples(splits["retain"], 128, seed=3)
    out = deep_forgetting_metrics(
        unlearned, mlp, splits, retrained=retrained, finetune_batches=subset, finetune_steps=4, seed=3
    )
    assert set(out) == set(DEEP_KEYS) - {"inversion_psnr", "inversion_ssim"}
    for name in ("forget", "forget_class_test", "test"):
        fm = feature_mapping_attack(unlearned, mlp, splits["retain"], splits[name])
        assert out[f"fm_recovered_{name}_acc"] == fm["recovered_acc"]
        assert out["fm_fit_r2"] == fm["fit_r2"]
        lin = feature_mapping_attack(unlearned, mlp, splits["retain"], splits[name], intercept=False)
        assert out[f"fm_linear_recovered_{name}_acc"] == lin["recovered_acc"]
        assert out["fm_linear_fit_r2"] == lin["fit_r2"]
    ft = finetune_recovery_attack(unlearned, subset, splits["forget"], steps=4, seed=3)
    assert out["ft_recovered_forget_acc"] == ft["recovered_acc"]
    assert out["cka_original_forget"] == linear_cka(unlearned, mlp, splits["forget"])
    assert out["cka_retrain_forget"] == linear_cka(unlearned, retrained, splits["forget"])
    assert out["cka_retrain_forget"] != out["cka_original_forget"]
    fit_set = list(splits["forget"]) + list(splits["retain"])  # forget first, then retain, 2000 samples
    expected_probe = linear_probe_accuracy(
        unlearned, [(x, y) for x, y in _head(fit_set, 2000)], splits["forget_class_test"], max_iter=300, seed=3
    )
    assert out["probe_forget_class_test_acc"] == expected_probe
    # head-only "unlearning": every attack brings the forget class back
    assert out["fm_recovered_forget_acc"] > 0.8 and out["probe_forget_class_test_acc"] > 0.8


def _head(batch_list, n):
    have = 0
    for x, y in batch_list:
        if have >= n:
            return
        yield x[: n - have], y[: n - have]
        have += min(len(y), n - have)


def test_deep_metrics_of_the_original_itself(mlp, split):
    splits = deep_splits(split)
    out = deep_forgetting_metrics(mlp, mlp, splits, finetune_steps=0, probe=False)
    assert set(out) == {"fm_recovered_forget_acc", "fm_recovered_forget_class_test_acc", "fm_recovered_test_acc",
                        "fm_fit_r2", "fm_linear_recovered_forget_acc", "fm_linear_recovered_forget_class_test_acc",
                        "fm_linear_recovered_test_acc", "fm_linear_fit_r2", "cka_original_forget"}  # fmt: skip
    assert out["fm_recovered_forget_acc"] == pytest.approx(accuracy(mlp, splits["forget"]), abs=1 / 400)
    assert out["fm_recovered_test_acc"] == pytest.approx(accuracy(mlp, splits["test"]), abs=2 / 600)
    assert out["cka_original_forget"] == pytest.approx(1.0, abs=1e-9)


def test_deep_metrics_collapsed_forget_features_are_recovered_as_a_constant(mlp, split):
    """A model whose features are 0 for every input: the attack answers one class for everyone, so
    forget 'recovery' equals that class's share, and the whole-test-set accuracy exposes it."""
    collapsed = copy.deepcopy(mlp)
    with torch.no_grad():
        collapsed.net[1].weight.zero_()
        collapsed.net[1].bias.fill_(-1.0)
    splits = deep_splits(split)
    out = deep_forgetting_metrics(collapsed, mlp, splits, finetune_steps=0, probe=False)
    assert out["cka_original_forget"] == 0.0
    assert out["fm_recovered_test_acc"] < 0.2  # one class of ten (stratified test split)


def test_deep_metrics_inversion_and_purity(mlp, split):
    splits = deep_splits(split, limit=256)
    model = copy.deepcopy(mlp)
    before, before_original = snapshot(model), snapshot(mlp)
    out = deep_forgetting_metrics(model, mlp, splits, finetune_steps=2, inversion_samples=2, inversion_steps=3)
    assert math.isfinite(out["inversion_psnr"]) and -1.0 <= out["inversion_ssim"] <= 1.0
    x, y = split.tensors()["forget"]
    expected = [gradient_inversion(mlp, x[i : i + 1], y[i : i + 1], steps=3, data_range=(float(x[:256].min()),
                float(x[:256].max())), seed=i)["psnr"] for i in range(2)]  # fmt: skip
    assert out["inversion_psnr"] == pytest.approx(float(sum(expected)) / 2, rel=1e-5)
    assert_unchanged(model, before)
    assert_unchanged(mlp, before_original)


def test_deep_metrics_without_optional_splits_and_bad_input(mlp, split):
    splits = deep_splits(split)
    only = {"forget": splits["forget"], "retain": splits["retain"]}
    out = deep_forgetting_metrics(mlp, mlp, only, finetune_steps=1)
    assert set(out) == {"fm_recovered_forget_acc", "fm_fit_r2", "fm_linear_recovered_forget_acc", "fm_linear_fit_r2",
                        "ft_recovered_forget_acc", "cka_original_forget"}  # fmt: skip
    for missing in ("forget", "retain"):
        with pytest.raises(ValueError, match=f"needs a '{missing}' split"):
            deep_forgetting_metrics(mlp, mlp, {k: v for k, v in only.items() if k != missing})
    with pytest.raises(ValueError, match="fit_batches is empty"):
        deep_forgetting_metrics(mlp, mlp, {"forget": splits["forget"], "retain": []})


def test_take_samples(split):
    x, y = split.tensors()["retain"]
    source = TensorBatches(x, y, batch_size=100, shuffle=True, seed=5)
    subset = take_samples(source, 150, batch_size=64, seed=1)
    assert subset.num_samples == 150 and len(subset) == 3
    # the first 150 samples of the source's first pass (its seeded permutation), in a new order per pass
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(5))[:150]
    expected = sorted(zip(y[order].tolist(), x[order].flatten(1).sum(1).tolist(), strict=True))
    for _ in range(2):
        xs, ys = zip(*subset, strict=True)
        got = sorted(zip(torch.cat(ys).tolist(), torch.cat(xs).flatten(1).sum(1).tolist(), strict=True))
        assert got == expected
    pass_one, pass_two = (torch.cat([b[1] for b in subset]) for _ in range(2))
    assert not torch.equal(pass_one, pass_two)  # reshuffled (150 labels: a repeat is vanishingly unlikely)
    assert take_samples(source, 10**6).num_samples == x.shape[0]  # fewer samples than asked: all of them
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            take_samples(source, bad)
    with pytest.raises(ValueError, match="empty"):
        take_samples([], 5)


def test_evaluate_deep(mlp, split):
    splits = deep_splits(split)
    retrained = copy.deepcopy(mlp)
    plain = evaluate(mlp, splits, original=mlp)
    assert not set(plain) & set(DEEP_KEYS)
    deep = evaluate(mlp, splits, original=mlp, retrained=retrained, deep=True, deep_options={"finetune_steps": 1})
    assert {"fm_recovered_forget_acc", "ft_recovered_forget_acc", "cka_retrain_forget"} <= set(deep)
    assert {k: deep[k] for k in plain} == plain
    # a metrics dict as `retrained`: CKA to the retrained model only when the model comes in deep_options
    metrics = evaluate(retrained, splits)
    no_model = evaluate(mlp, splits, original=mlp, retrained=metrics, deep=True, deep_options={"finetune_steps": 0})
    assert "cka_retrain_forget" not in no_model
    with_model = evaluate(
        mlp, splits, original=mlp, retrained=metrics, deep=True,
        deep_options={"finetune_steps": 0, "retrained": retrained},
    )  # fmt: skip
    assert with_model["cka_retrain_forget"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="needs the original model"):
        evaluate(mlp, splits, deep=True)
    with pytest.raises(ValueError, match="needs the original model"):
        evaluate(mlp, {"forget": splits["forget"]}, original=mlp, deep=True)
    with pytest.raises(ValueError, match="deep_options given without deep"):
        evaluate(mlp, splits, original=mlp, deep_options={"probe": False})
