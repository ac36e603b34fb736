"""Unlearning methods on a real (tiny) task: forget digit 3 of scikit-learn's 8x8 digits.

One MLP (64-256-10, sigmoid, mnemonic codes) is trained once per module in ~1 s and treated as
read-only; every test that changes a model works on a copy (and the protocol tests check that the
methods themselves never touch their input).

Why 256 hidden units and not fewer: the mnemonic method's default step caps are tuned for the
paper's 784-1000-10 MLP. Measured on 5 data/model seeds x 2 forgotten classes with 64 hidden units,
the one-shot step was too small to flip the codes in 4 of 10 cases with lambda1 = 1e-3 (the paper's)
and 2 of 10 with 2e-3 (forget-class test accuracy stayed at 0.95-1.0); with 256 units it forgot in
all 10 (max 0.49 with 1e-3, 0.23 with 2e-3, median 0).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unlearn_ext
from unlearn_ext.data import TensorBatches, make_forget_split
from unlearn_ext.eval import accuracy
from unlearn_ext.methods import (
    PLANNED,
    UnlearnResult,
    available_methods,
    class_fisher_from_codes,
    get_method,
    method_class,
    mnemonic_delta,
)
from unlearn_ext.methods.salun import saliency_mask
from unlearn_ext.models import CODES_BUFFER, TrainConfig, build_model, get_codes, train_classifier

pytest.importorskip("sklearn")

FORGET_CLASS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split(digits):
    return make_forget_split(digits, classes=FORGET_CLASS)


@pytest.fixture(scope="module")
def digits_mlp(digits):
    """The trained original model. READ-ONLY: never pass it with inplace=True; copy it instead."""
    return train_classifier(
        "mlp", digits.x_train, digits.y_train, num_classes=10, config=TrainConfig(epochs=30, lr=0.05), hidden=256
    )


@pytest.fixture(scope="module")
def original_accuracy(digits_mlp, split):
    t = split.tensors()
    return {k: accuracy(digits_mlp, [t[k]]) for k in ("forget_class_test", "retain_class_test")}


@pytest.fixture
def batches(split):
    """Fresh batches per test: their shuffling generators advance with every pass, so sharing them
    would make a test's result depend on which tests ran before it."""
    return split.batches(batch_size=64)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _hparams(name: str) -> dict:
    # retrain's default recipe is the model's own (here 30 epochs); set it explicitly to stay fast.
    return {"epochs": 30, "lr": 0.05} if name == "retrain" else {}


# --------------------------------------------------------------------------------------------
# Every method: forgets class 3, keeps the others, never touches its input
# --------------------------------------------------------------------------------------------

# (max forget-class TEST accuracy after unlearning, max drop of retained-class test accuracy).
# The original model scores 0.97 / 0.97. Measured on this model (seed 0, class 3) and, for
# robustness, on 5 seeds x classes {3, 8} with the same recipe: worst cases in brackets.
EFFECTIVE = {
    "retrain": (0.10, 0.05),  # 0.00 everywhere [0.00]; retained within 1 point
    "mnemonic": (0.30, 0.03),  # 0.00 here [0.23 with lambda1 = 2e-3]; one-shot, retained within 1 point
    "fisher_forgetting": (0.10, 0.03),  # 0.00 [0.00]: the forgotten head row is zeroed
    "ssd": (0.25, 0.03),  # 0.00 here [0.89 on one of 10 seed/class pairs: nothing selected enough]
    "random_label": (0.10, 0.05),  # 0.00 [0.00]; retained drops up to 3 points
    "salun": (0.10, 0.05),  # 0.00 [0.00]; retained drops up to 3.4 points
    "bad_teacher": (0.30, 0.05),  # 0.05 here [0.14]
    "opc": (0.20, 0.05),  # 0.08 here; retained drops 3.7 points (logit contraction; on="features": 0.00 / 0.6)
}
# Known to forget only partially with their default hyperparameters on this task (measured
# forget-class test accuracy here: finetune 0.35, neggrad 0.81, neggrad_plus 0.81, scrub 0.95;
# over 10 seed/class pairs up to 0.35 / 0.81 / 0.81 / 0.95). Only checked to run, change the
# model and not make the forget class *better* than the original did.
# muso (the full-retain-Gram projector): 0.95 here; with 1291 retain samples and 257 feature
# dimensions the projector is within 3% of the identity, so the relabelling keeps the true class for
# 92-94% of the forget samples (see unlearn_ext.methods.muso, "projector_effect" in its log).
WEAK = {"finetune", "neggrad", "neggrad_plus", "scrub", "muso"}


@pytest.mark.parametrize("name", available_methods())
def test_method_forgets_the_class_and_leaves_its_input_untouched(name, digits_mlp, split, batches, original_accuracy):
    before = _state(digits_mlp)
    out = get_method(name, **_hparams(name)).unlearn(digits_mlp, batches["forget"], batches["retain"])

    assert out is not digits_mlp
    assert _same_state(digits_mlp, before), f"{name} modified its input model"
    assert not digits_mlp.training and not out.training
    assert not _same_state(out, before), f"{name} returned the model unchanged"
    assert torch.equal(get_codes(out), get_codes(digits_mlp))  # the codes travel with the copy

    t = split.tensors()
    forget_acc = accuracy(out, [t["forget_class_test"]])
    retain_acc = accuracy(out, [t["retain_class_test"]])
    if name in EFFECTIVE:
        max_forget, max_drop = EFFECTIVE[name]
        assert forget_acc <= max_forget, f"{name}: forget-class test accuracy {forget_acc:.3f} > {max_forget}"
    else:  # WEAK, or a method added since these thresholds were measured
        max_drop = 0.05
        assert forget_acc <= original_accuracy["forget_class_test"] + 1e-9, (name, forget_acc)
    drop = original_accuracy["retain_class_test"] - retain_acc
    assert drop <= max_drop, f"{name}: retained-class test accuracy fell by {drop:.3f} (> {max_drop})"


@pytest.mark.parametrize("name", available_methods())
def test_inplace_modifies_and_returns_the_given_model(name, digits_mlp, batches):
    model = copy.deepcopy(digits_mlp)
    before = _state(model)
    out = get_method(name, inplace=True, **_hparams(name)).unlearn(model, batches["forget"], batches["retain"])
    assert out is model
    assert not _same_state(model, before)
    assert not model.training


def test_unlearn_function_returns_a_result(digits_mlp, batches):
    res = unlearn_ext.unlearn(digits_mlp, "ssd", forget=batches["forget"], retain=batches["retain"], alpha=4.0)
    assert isinstance(res, UnlearnResult)
    assert res.method == "ssd" and res.model is not digits_mlp
    assert res.seconds > 0
    assert isinstance(res.log, list) and res.log and isinstance(res.log[0], dict)
    assert isinstance(res.hparams, dict) and res.hparams["alpha"] == 4.0 and "seed" in res.hparams
    assert "inplace" not in res.hparams and "progress" not in res.hparams


# --------------------------------------------------------------------------------------------
# Mnemonic
# --------------------------------------------------------------------------------------------


def _per_class_fisher_autograd(model: torch.nn.Module, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """METHODS.md 1.3 literally: for each class k, one batch-1 backward of CE(model(c_k), k), squared."""
    params = dict(model.named_parameters())
    out = {n: torch.zeros(codes.shape[0], *p.shape) for n, p in params.items()}
    for k in range(codes.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(codes[k : k + 1]), torch.tensor([k])).backward()
        for n, p in params.items():
            out[n][k] = p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_class_fisher_from_codes_matches_a_per_class_autograd_loop(arch, digits_mlp):
    if arch == "mlp":
        model = copy.deepcopy(digits_mlp)
    else:
        torch.manual_seed(0)
        model = build_model("cnn", (1, 8, 8), 10, channels=4, hidden=16)
        model.train()
        with torch.no_grad():
            model(torch.randn(32, 1, 8, 8))  # non-trivial BatchNorm statistics: eval mode must use them
    model.eval()
    codes = get_codes(digits_mlp)
    fused = class_fisher_from_codes(model, codes)
    expected = _per_class_fisher_autograd(model, codes)
    assert fused.keys() == expected.keys()
    for n in expected:
        assert fused[n].shape == (10, *dict(model.named_parameters())[n].shape)
        scale = expected[n].abs().max().item()
        torch.testing.assert_close(fused[n], expected[n], rtol=1e-4, atol=1e-6 * scale, msg=n)


def test_mnemonic_delta_hand_made_cases():
    f_f = torch.tensor([4.0, 0.0, 1.0, 2.0, 0.0])
    f_r = torch.tensor([2.0, 0.0, 0.0, 8.0, 3.0])
    # log ratios: ln 2, nan (0/0 -> ratio 1), +inf (-> largest finite ratio, 2), ln 0.25, -inf (ratio 0)
    expected_ratio = torch.tensor([2.0, 1.0, 2.0, 0.25, 0.0])

    delta, scale = mnemonic_delta(f_f, f_r, lambda1=1e-3, lambda2=10.0)  # lambda1 binds: 10 / 2 > 1e-3
    assert scale == pytest.approx(1e-3)
    torch.testing.assert_close(delta, 1e-3 * expected_ratio)

    delta, scale = mnemonic_delta(f_f, f_r, lambda1=1.0, lambda2=0.5)  # lambda2 / max r = 0.25 binds
    assert scale == pytest.approx(0.25)
    torch.testing.assert_close(delta, 0.25 * expected_ratio)
    assert delta.max().item() == pytest.approx(0.5)  # the largest entry is exactly lambda2


def test_mnemonic_delta_overflow_and_all_infinite():
    # exp(log 1e30 - log 1e-30) overflows float32: treated like +inf, i.e. the largest finite ratio.
    delta, scale = mnemonic_delta(
        torch.tensor([1e30, 3.0, 1.0]), torch.tensor([1e-30, 1.0, 1.0]), lambda1=1.0, lambda2=6.0
    )
    assert scale == pytest.approx(1.0)  # lambda2 / max r = 6 / 3 = 2 > lambda1 = 1
    torch.testing.assert_close(delta, torch.tensor([3.0, 3.0, 1.0]), rtol=1e-5, atol=0)
    # Every ratio infinite: no finite value to borrow; ratio 1 everywhere.
    delta, scale = mnemonic_delta(torch.ones(3), torch.zeros(3), lambda1=0.1, lambda2=10.0)
    torch.testing.assert_close(delta, torch.full((3,), 0.1))
    assert torch.isfinite(delta).all()


def test_mnemonic_delta_non_negative_and_capped():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        f_f = torch.rand(50, generator=g) ** 8  # wide dynamic range, some tiny
        f_r = torch.rand(50, generator=g) ** 8
        f_f[::7] = 0.0
        f_r[::5] = 0.0
        for lam1, lam2 in ((1e-3, 10.0), (1.0, 1e-2)):
            delta, scale = mnemonic_delta(f_f, f_r, lam1, lam2)
            assert torch.isfinite(delta).all() and (delta >= 0).all()
            assert scale <= lam1 + 1e-12
            assert delta.max().item() <= lam2 * (1 + 1e-5)


@pytest.mark.parametrize("lambdas", [(1e-3, 10.0), (1e-3, 1e-2)], ids=["paper-mnist", "lambda2-binds"])
def test_mnemonic_matches_the_spec_step_by_step(lambdas, digits_mlp, batches):
    """Recompute METHODS.md 1.3-1.4 independently (autograd Fisher, float64 ratio) and compare."""
    lam1, lam2 = lambdas
    method = get_method("mnemonic", lambda1=lam1, lambda2=lam2)
    out = method.unlearn(digits_mlp, batches["forget"], batches["retain"])
    (entry,) = method.log

    model = copy.deepcopy(digits_mlp).eval()
    codes = get_codes(model)
    per_class = _per_class_fisher_autograd(model, codes)
    forget = torch.zeros(10, dtype=torch.bool)
    forget[FORGET_CLASS] = True
    deltas = {}
    for n, fk in per_class.items():
        f_f = 1e-16 + fk[forget].mean(0).double()
        f_r = 1e-16 + fk[~forget].mean(0).double()
        r = f_f / f_r
        scale = min(lam1, lam2 / r.max().item())
        assert entry["scales"][n] == pytest.approx(scale, rel=1e-3), n  # per-tensor scale
        deltas[n] = (scale * r).float()

    params = dict(model.named_parameters())
    original = {n: p.detach().clone() for n, p in params.items()}
    labels = torch.arange(10)
    scores = {}
    with torch.no_grad():
        for sign in (1, -1):
            for n, d in deltas.items():
                params[n].copy_(original[n] + sign * d)
            correct = model(codes).argmax(1) == labels
            scores[sign] = (1 - correct[forget].float().mean().item()) + correct[~forget].float().mean().item()
    assert entry["score_plus"] == pytest.approx(scores[1]) and entry["score_minus"] == pytest.approx(scores[-1])
    assert entry["sign"] == (1 if entry["score_plus"] >= entry["score_minus"] else -1)
    assert entry["classes"] == [FORGET_CLASS]
    sign = entry["sign"]
    for n, p in out.named_parameters():
        torch.testing.assert_close(p.detach(), original[n] + sign * deltas[n], rtol=1e-4, atol=1e-6, msg=n)


def test_mnemonic_forgets_the_codes_of_the_forgotten_class(digits_mlp, batches):
    codes = get_codes(digits_mlp)
    with torch.no_grad():
        assert torch.equal(digits_mlp(codes).argmax(1), torch.arange(10))  # the original knows every code
    method = get_method("mnemonic")
    out = method.unlearn(digits_mlp, batches["forget"], batches["retain"])
    with torch.no_grad():
        pred = out(codes).argmax(1)
    assert pred[FORGET_CLASS] != FORGET_CLASS
    keep = [k for k in range(10) if k != FORGET_CLASS]
    assert torch.equal(pred[keep], torch.tensor(keep))
    assert max(method.log[0]["score_plus"], method.log[0]["score_minus"]) == pytest.approx(2.0)


def test_mnemonic_uses_only_labels_no_retain_and_explicit_codes(digits_mlp, batches):
    a = get_method("mnemonic").unlearn(digits_mlp, batches["forget"])  # retain is optional
    b = get_method("mnemonic", classes=(FORGET_CLASS,)).unlearn(digits_mlp, batches["forget"], batches["retain"])
    assert _same_state(a, _state(b))
    # Codes passed explicitly to a model that lost its buffer give the same result.
    bare = copy.deepcopy(digits_mlp)
    codes = get_codes(bare).clone()
    del bare._buffers[CODES_BUFFER]
    assert get_codes(bare) is None
    c = get_method("mnemonic", codes=codes).unlearn(bare, batches["forget"])
    for (n, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_mnemonic_without_codes_raises(batches):
    model = build_model("mlp", (1, 8, 8), 10, hidden=16)
    with pytest.raises(ValueError, match="codes"):
        get_method("mnemonic").unlearn(model, batches["forget"], batches["retain"])


def test_mnemonic_forgetting_every_class_raises(digits_mlp, digits):
    everything = TensorBatches(digits.x_train, digits.y_train, batch_size=256)
    with pytest.raises(ValueError, match="every class"):
        get_method("mnemonic").unlearn(digits_mlp, everything)
    with pytest.raises(ValueError, match="every class"):
        get_method("mnemonic", classes=tuple(range(10))).unlearn(digits_mlp, everything)
    with pytest.raises(ValueError, match="outside"):
        get_method("mnemonic", classes=(10,)).unlearn(digits_mlp, everything)
    # a random-sample forget set covers every class: the error says what to do instead
    random_split = make_forget_split(digits, fraction=0.1, seed=0)
    sample_set = random_split.batches()["forget"]
    with pytest.raises(ValueError, match="random-sample forget set does: pass classes=, or use a sample-level"):
        get_method("mnemonic").unlearn(digits_mlp, sample_set)


# --------------------------------------------------------------------------------------------
# SSD, Fisher forgetting, SalUn
# --------------------------------------------------------------------------------------------


def test_ssd_with_huge_alpha_changes_nothing(digits_mlp, batches):
    method = get_method("ssd", alpha=1e9)
    out = method.unlearn(digits_mlp, batches["forget"], batches["retain"])
    assert method.log[0]["dampened"] == 0
    assert _same_state(out, _state(digits_mlp))


def test_ssd_only_shrinks_parameters(digits_mlp, batches):
    method = get_method("ssd")
    out = method.unlearn(digits_mlp, batches["forget"], batches["retain"])
    entry = method.log[0]
    assert entry["n_forget"] == batches["forget"].num_samples and entry["n_retain"] == batches["retain"].num_samples
    changed = 0
    for (n, new), old in zip(out.named_parameters(), digits_mlp.parameters(), strict=True):
        assert (new.abs() <= old.abs()).all(), n
        assert (torch.sign(new) * torch.sign(old) >= 0).all(), n  # dampened, never flipped
        changed += int((new != old).sum())
    assert 0 < changed <= entry["dampened"] < entry["total"]


def test_fisher_forgetting_is_seeded_and_zeroes_the_forgotten_head_row(digits_mlp, split):
    def run(seed):
        # Fresh batches each time: the sampled Fisher labels follow the retain set's (shuffled) order.
        b = split.batches(batch_size=64)
        method = get_method("fisher_forgetting", seed=seed)
        return method.unlearn(digits_mlp, b["forget"], b["retain"]), method.log

    a, log = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert _same_state(a, _state(b))
    assert not torch.equal(a.net[1].weight, c.net[1].weight)
    assert log[0]["zeroed_classes"] == [FORGET_CLASS]
    head = a.net[3]
    assert torch.equal(head.weight[FORGET_CLASS], torch.zeros_like(head.weight[FORGET_CLASS]))
    assert head.bias[FORGET_CLASS] == 0
    keep = [k for k in range(10) if k != FORGET_CLASS]
    assert (head.weight[keep] != 0).any(1).all()


def test_salun_updates_only_salient_weights(digits_mlp, split):
    # Non-shuffled forget batches: the mask inside salun and ours sum the same gradients in the
    # same order, so they are bit-identical.
    t = split.tensors()
    forget = list(TensorBatches(*t["forget"], batch_size=64))
    retain = TensorBatches(*t["retain"], batch_size=64, shuffle=True, seed=1)
    mask = saliency_mask(copy.deepcopy(digits_mlp), forget, 0.5)
    method = get_method("salun")
    out = method.unlearn(digits_mlp, forget, retain)
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    assert method.log[0] == {"masked_weights": kept, "total_weights": total}
    assert abs(kept - 0.5 * total) <= 0.01 * total
    moved = 0
    for (n, new), old in zip(out.named_parameters(), digits_mlp.parameters(), strict=True):
        outside = mask[n] == 0
        assert torch.equal(new[outside], old[outside]), f"{n}: a weight outside the saliency mask moved"
        moved += int((new[~outside] != old[~outside]).sum())
    assert moved > 0.5 * kept


# --------------------------------------------------------------------------------------------
# Registry and hyperparameters
# --------------------------------------------------------------------------------------------


def test_registry_contents():
    names = available_methods()
    assert len(names) == len(set(names))
    for required in ("retrain", "finetune", "neggrad", "neggrad_plus", "random_label", "salun", "scrub"):
        assert required in names
    for required in ("bad_teacher", "fisher_forgetting", "ssd", "mnemonic"):
        assert required in names
    for name in names:
        assert method_class(name).name == name


def test_get_method_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown unlearning method 'nope'") as info:
        get_method("nope")
    for name in available_methods():
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["siu", "ga", "ga_kl", "po"])
def test_concept_setting_methods_point_to_unlearn_concept(name):
    with pytest.raises(ValueError, match=rf"'{name}' forgets a visual concept.*unlearn_concept.*unlearn mmu"):
        get_method(name)


def test_get_method_planned_names_are_not_implemented(monkeypatch):
    assert {"opc", "muso"} <= set(available_methods()) and not {"opc", "muso"} & set(PLANNED)
    import unlearn_ext.methods._base as base

    monkeypatch.setitem(base.PLANNED, "future_method", "a method of a later issue")
    with pytest.raises(NotImplementedError, match="future_method.*not implemented yet: a method of a later issue"):
        get_method("future_method")


def test_get_method_unknown_hyperparameter_is_named():
    with pytest.raises(ValueError, match="max_steps"):
        get_method("ssd", max_steps=3)
    with pytest.raises(ValueError, match="lr"):
        get_method("mnemonic", lr=0.1)
    m = get_method("scrub", max_steps=2, seed=4)
    assert m.max_steps == 2 and m.seed == 4


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_empty_forget_set_raises(digits_mlp, batches):
    empty = TensorBatches(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    for forget in ([], empty):
        for name in ("ssd", "mnemonic", "neggrad"):
            with pytest.raises(ValueError, match="empty"):
                get_method(name).unlearn(digits_mlp, forget, batches["retain"])
    with pytest.raises(ValueError, match="retain set is empty"):
        get_method("finetune").unlearn(digits_mlp, batches["forget"], empty)


@pytest.mark.parametrize("name", ["retrain", "finetune", "ssd", "scrub", "salun", "fisher_forgetting"])
def test_missing_retain_set_raises_for_methods_that_need_it(name, digits_mlp, batches):
    assert method_class(name).requires_retain
    with pytest.raises(ValueError, match="retain"):
        get_method(name).unlearn(digits_mlp, batches["forget"])


def _bad_batch(kind: str):
    x = torch.randn(8, 1, 8, 8)
    y = torch.full((8,), FORGET_CLASS)
    if kind == "target-too-large":
        y[2] = 10
    elif kind == "target-negative":
        y[0] = -1
    elif kind == "float-targets":
        y = y.float()
    elif kind == "2d-targets":
        y = y[:, None]
    elif kind == "nan-inputs":
        x[1, 0, 2, 2] = float("nan")
    elif kind == "inf-inputs":
        x[3, 0, 0, 0] = float("inf")
    elif kind == "length-mismatch":
        y = y[:5]
    return x, y


@pytest.mark.parametrize(
    "kind, match",
    [
        ("target-too-large", "outside the model's classes"),
        ("target-negative", "outside the model's classes"),
        ("float-targets", "integer"),
        ("2d-targets", "1-D"),
        ("nan-inputs", "NaN"),
        ("inf-inputs", "NaN or inf"),
        ("length-mismatch", "same batch size"),
    ],
)
@pytest.mark.parametrize("where", ["forget", "retain"])
def test_bad_batches_raise_value_error(kind, match, where, digits_mlp, batches):
    good = list(batches[where])
    bad = good[:1] + [_bad_batch(kind)] + good[1:]
    sets = {"forget": batches["forget"], "retain": batches["retain"], where: bad}
    with pytest.raises(ValueError, match=match) as info:
        get_method("ssd").unlearn(digits_mlp, sets["forget"], sets["retain"])
    assert where in str(info.value)


@pytest.mark.parametrize("where", ["forget", "retain"])
def test_inputs_of_the_wrong_shape_raise_value_error_naming_the_shape(where, digits_mlp, batches):
    # 5x5 images into the MLP built for 8x8 digits.
    wrong = TensorBatches(torch.randn(40, 1, 5, 5), torch.full((40,), FORGET_CLASS), batch_size=16)
    sets = {"forget": batches["forget"], "retain": batches["retain"], where: wrong}
    with pytest.raises(ValueError, match=r"shape \(1, 5, 5\)") as info:
        get_method("ssd").unlearn(digits_mlp, sets["forget"], sets["retain"])
    assert where in str(info.value)


def test_a_later_batch_of_the_wrong_shape_raises_value_error(digits_mlp, batches):
    forget = list(batches["forget"])
    forget.insert(1, (torch.randn(8, 1, 5, 5), torch.full((8,), FORGET_CLASS)))
    with pytest.raises(ValueError, match="shape"):
        get_method("ssd").unlearn(digits_mlp, forget, batches["retain"])


def test_batch_that_is_not_a_pair_raises(digits_mlp, batches):
    x, y = next(iter(batches["forget"]))
    with pytest.raises(ValueError, match="pair"):
        get_method("neggrad").unlearn(digits_mlp, [(x, y, y)])
    with pytest.raises(TypeError, match="forget"):
        get_method("neggrad").unlearn(digits_mlp, 42)


def test_one_shot_generator_is_materialised(digits_mlp, split):
    t = split.tensors()
    forget = list(TensorBatches(*t["forget"], batch_size=64))
    # neggrad makes 3 passes over the forget set: a generator would be exhausted after one.
    from_list = get_method("neggrad").unlearn(digits_mlp, forget)
    from_generator = get_method("neggrad").unlearn(digits_mlp, (b for b in forget))
    assert _same_state(from_generator, _state(from_list))
    assert not _same_state(from_list, _state(digits_mlp))
