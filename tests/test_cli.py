"""The ``unlearn`` command end to end on scikit-learn's 8x8 digits, with a private model cache.

The CLI trains with the paper's MLP recipe (784-1000-10 sigmoid, 200 epochs; here 64-1000-10 on
1437 digits): ~3 s per model on one thread. The cold run of the module fixture trains the original
and the retrained model once; later tests reuse that cache (``--fresh`` and the random-sample split
train again, deliberately). Whole file: ~20 s measured.
"""

from __future__ import annotations

import json

import pytest

from unlearn_ext.cli import main
from unlearn_ext.methods import get_method

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("safetensors")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = ("forget_acc", "retain_acc", "test_acc", "forget_class_test_acc", "mia", "seconds")
DEEP_ROW_KEYS = (
    "fm_recovered_forget_acc",
    "fm_recovered_test_acc",
    "fm_linear_recovered_forget_acc",
    "ft_recovered_forget_acc",
    "cka_original_forget",
)
RUN_MNEMONIC = ["run", "--method", "mnemonic", "--dataset", "digits", "--forget-class", "3", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("unlearn-cache")


@pytest.fixture
def cache(cache_dir, monkeypatch):
    """Point the model cache at this module's private folder (never the user's ~/.cache)."""
    monkeypatch.setenv("UNLEARN_EXT_CACHE", str(cache_dir))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return cache_dir


@pytest.fixture(scope="module")
def first_run(cache_dir, tmp_path_factory):
    """A cold ``unlearn run`` (empty cache): trains and caches the original and retrained models."""
    out = tmp_path_factory.mktemp("first-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_EXT_CACHE", str(cache_dir))
        mp.delenv("XDG_CACHE_HOME", raising=False)
        assert not any(cache_dir.iterdir())
        rc = main([*RUN_MNEMONIC, "--out", str(out)])
    return rc, out


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_run_writes_the_report_and_plots(first_run, cache_dir):
    rc, out = first_run
    assert rc == 0
    report = _report(out)
    for key in ("dataset", "model", "forget", "seed", "versions", "methods"):
        assert key in report, key
    assert report["dataset"]["name"] == "digits" and report["dataset"]["train"] == 1437
    assert report["model"]["arch"] == "mlp" and report["model"]["hidden"] == 1000
    assert report["forget"]["kind"] == "class" and report["forget"]["classes"] == [3]
    assert report["seed"] == 0
    assert {"unlearn_ext", "torch", "python"} <= set(report["versions"])
    rows = report["methods"]
    assert list(rows) == ["original", "retrain", "mnemonic"]
    for name, row in rows.items():
        for key in ROW_KEYS:
            assert key in row, (name, key)
        for key in ("forget_acc", "retain_acc", "test_acc", "forget_class_test_acc", "mia"):
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert row["seconds"] > 0
    for name in ("retrain", "mnemonic"):
        assert rows[name]["speedup_vs_retrain"] > 0
    assert rows["retrain"]["speedup_vs_retrain"] == 1.0
    assert rows["original"]["cached"] is False and rows["retrain"]["cached"] is False
    # The paper's MLP knows class 3; mnemonic and retraining forget it and keep the rest.
    assert rows["original"]["forget_class_test_acc"] > 0.9
    assert rows["retrain"]["forget_class_test_acc"] < 0.05
    assert rows["mnemonic"]["forget_class_test_acc"] < 0.2
    assert rows["mnemonic"]["retain_class_test_acc"] > rows["original"]["retain_class_test_acc"] - 0.05
    assert rows["mnemonic"]["hparams"]["lambda1"] == get_method("mnemonic").lambda1  # the default
    for png in ("accuracy.png", "time.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE, png
    assert sorted(p.name.split("-")[0] for p in cache_dir.glob("*.safetensors")) == ["original", "retrain"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_every_report_row_has_speedup_vs_retrain(first_run):
    _, out = first_run
    rows = _report(out)["methods"]
    for name, row in rows.items():
        assert "speedup_vs_retrain" in row, name
    assert rows["original"]["speedup_vs_retrain"] is None  # training time, not an unlearning time
    assert rows["retrain"]["speedup_vs_retrain"] == 1.0
    speedup = rows["mnemonic"]["speedup_vs_retrain"]
    assert speedup == pytest.approx(rows["retrain"]["seconds"] / rows["mnemonic"]["seconds"], rel=1e-6)


def test_second_run_reuses_the_cache_and_fresh_retrains(first_run, cache, tmp_path):
    first = _report(first_run[1])["methods"]
    assert main([*RUN_MNEMONIC, "--out", str(tmp_path / "cached")]) == 0
    cached = _report(tmp_path / "cached")["methods"]
    assert cached["original"]["cached"] is True and cached["retrain"]["cached"] is True
    # The cache keeps the training time as measured when the model was trained.
    assert cached["original"]["seconds"] == first["original"]["seconds"]
    for name in ("original", "retrain", "mnemonic"):
        for key in ("forget_acc", "test_acc", "forget_class_test_acc"):
            assert cached[name][key] == first[name][key], (name, key)

    assert main([*RUN_MNEMONIC, "--fresh", "--out", str(tmp_path / "fresh")]) == 0
    fresh = _report(tmp_path / "fresh")["methods"]
    assert fresh["original"]["cached"] is False and fresh["retrain"]["cached"] is False
    # Seeded training reproduces the same models.
    for name in ("original", "retrain", "mnemonic"):
        for key in ("forget_acc", "test_acc", "forget_class_test_acc"):
            assert fresh[name][key] == first[name][key], (name, key)


def test_no_cache_neither_reads_nor_writes(first_run, cache, tmp_path, monkeypatch):
    import unlearn_ext.experiment as experiment

    before = sorted(p.name for p in cache.iterdir())

    def no_training(*args, **kwargs):
        raise AssertionError("trained a model")

    # With --no-cache the cached models must not be used, so it has to train: stop it right there.
    monkeypatch.setattr(experiment, "train_classifier", no_training)
    with pytest.raises(AssertionError, match="trained a model"):
        main([*RUN_MNEMONIC, "--no-cache", "--out", str(tmp_path / "x")])
    assert sorted(p.name for p in cache.iterdir()) == before


def test_demo_runs_the_chosen_methods(first_run, cache, tmp_path):
    out = tmp_path / "demo"
    rc = main(
        ["demo", "--dataset", "digits", "--forget-class", "3", "--methods", "mnemonic", "ssd"]
        + ["--no-progress", "--out", str(out)]
    )
    assert rc == 0
    rows = _report(out)["methods"]
    assert list(rows) == ["original", "retrain", "mnemonic", "ssd"]
    assert rows["original"]["cached"] is True  # same dataset, model, seed and split as the run above
    for name in ("mnemonic", "ssd"):
        assert "error" not in rows[name]
        assert rows[name]["forget_class_test_acc"] < rows["original"]["forget_class_test_acc"]
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    # deep-forgetting metrics on every row (the default), and their plot
    for name, row in rows.items():
        assert set(DEEP_ROW_KEYS) <= set(row), name
        assert all(0.0 <= row[k] <= 1.0 + 1e-9 for k in DEEP_ROW_KEYS), name
    assert "cka_retrain_forget" in rows["mnemonic"] and "cka_retrain_forget" not in rows["retrain"]
    assert rows["original"]["cka_original_forget"] == pytest.approx(1.0, abs=1e-6)
    assert rows["retrain"]["ft_recovered_forget_acc"] < 0.5  # it never saw class 3
    assert (out / "deep.png").read_bytes()[:8] == PNG_SIGNATURE


def test_no_deep_skips_the_deep_metrics(first_run, cache, tmp_path):
    out = tmp_path / "nodeep"
    assert main([*RUN_MNEMONIC, "--no-deep", "--out", str(out)]) == 0
    rows = _report(out)["methods"]
    for row in rows.values():
        assert not set(DEEP_ROW_KEYS) & set(row)
    assert not (out / "deep.png").exists()


def test_forget_fraction_run_of_finetune(first_run, cache, tmp_path):
    out = tmp_path / "fraction"
    rc = main(
        ["run", "--method", "finetune", "--dataset", "digits", "--forget-fraction", "0.1"]
        + ["--epochs", "2", "--no-progress", "--out", str(out)]
    )
    assert rc == 0
    report = _report(out)
    assert report["forget"]["kind"] == "random" and report["forget"]["fraction"] == 0.1
    assert report["forget"]["num_forget"] == round(0.1 * 1437)
    rows = report["methods"]
    assert list(rows) == ["original", "retrain", "finetune"]
    assert rows["original"]["cached"] is True  # the original does not depend on the forget set
    assert rows["finetune"]["hparams"]["epochs"] == 2
    for row in rows.values():
        assert "forget_class_test_acc" not in row
        assert 0.0 <= row["forget_acc"] <= 1.0
    # Random forgetting: the retrained model still generalises to the forgotten samples.
    assert rows["retrain"]["forget_acc"] > 0.8


# --------------------------------------------------------------------------------------------
# Errors: reported before any training (the cache stays as it was)
# --------------------------------------------------------------------------------------------


def _fails(argv, capsys, cache) -> tuple[int, str]:
    before = sorted(p.name for p in cache.iterdir())
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    assert sorted(p.name for p in cache.iterdir()) == before
    return rc, capsys.readouterr().err


def test_unknown_method_is_named(capsys, cache, tmp_path):
    rc, err = _fails(["run", "--method", "nosuch", "--dataset", "digits", "--forget-class", "3"], capsys, cache)
    assert rc != 0 and "nosuch" in err
    rc, err = _fails(["demo", "--dataset", "digits", "--methods", "mnemonic", "nosuch2"], capsys, cache)
    assert rc != 0 and "nosuch2" in err


def test_planned_method_is_not_implemented(capsys, cache, monkeypatch):
    import unlearn_ext.methods._base as base

    monkeypatch.setitem(base.PLANNED, "future_method", "a method of a later issue")
    rc, err = _fails(["run", "--method", "future_method", "--dataset", "digits", "--forget-class", "3"], capsys, cache)
    assert rc == 2 and "future_method" in err and "not implemented" in err


def test_forget_class_out_of_range(capsys, cache):
    rc, err = _fails(["run", "--method", "mnemonic", "--dataset", "digits", "--forget-class", "12"], capsys, cache)
    assert rc == 2 and "class 12" in err


def test_forget_fraction_out_of_range(capsys, cache):
    rc, err = _fails(["run", "--method", "finetune", "--dataset", "digits", "--forget-fraction", "1.5"], capsys, cache)
    assert rc == 2 and "fraction" in err and "1.5" in err


def test_hyperparameter_of_another_method(capsys, cache):
    rc, err = _fails(
        ["run", "--method", "ssd", "--dataset", "digits", "--forget-class", "3", "--max-steps", "3"], capsys, cache
    )
    assert rc != 0 and "--max-steps" in err and "ssd" in err


def test_run_needs_a_forget_spec(capsys, cache):
    with pytest.raises(SystemExit) as info:
        main(["run", "--method", "mnemonic", "--dataset", "digits"])
    assert info.value.code != 0
    assert "--forget-class" in capsys.readouterr().err


def test_forget_class_and_fraction_are_exclusive(capsys, cache):
    with pytest.raises(SystemExit) as info:
        main(["run", "--method", "finetune", "--forget-class", "3", "--forget-fraction", "0.1"])
    assert info.value.code != 0
    assert "not allowed with" in capsys.readouterr().err
