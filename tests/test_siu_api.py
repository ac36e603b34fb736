"""``unlearn_concept`` (SIU and the concept-setting baselines in one call), the MiniMMU experiment
driver and ``unlearn mmu``, on a tiny random MiniLlava with SmolLM2's real tokenizer and the
bundled MNIST digits (the real MiniMMU build takes ~10 minutes and is a benchmark, not a test)."""

from __future__ import annotations

import json

import pytest
import torch

from unlearn_ext import _loader
from unlearn_ext.siu import api as siu_api
from unlearn_ext.siu import benchmark as mmu
from unlearn_ext.siu.api import ConceptRequest, concept_training_data, unlearn_concept
from unlearn_ext.siu.metrics import answer_accuracy
from unlearn_ext.siu.minimmu import IMAGE_TOKEN, MiniLlava
from unlearn_ext.siu.train import FinetuneConfig

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not _loader.has_kernel("fused_linear_masked_kl", "cpu"), reason="C++ kernel absent"),
]


@pytest.fixture(scope="module")
def mnist():
    from unlearn_ext.data import load_dataset

    return load_dataset("mnist", seed=0)


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    torch.manual_seed(0)
    tok = smollm2_tokenizer
    lm = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        )
    )  # fmt: skip
    return MiniLlava(lm, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens=4, width=16).eval()


def _request(mnist, **change) -> ConceptRequest:
    seven = mnist.x_train[int((mnist.y_train == 7).nonzero()[0])]
    three = mnist.x_train[int((mnist.y_train == 3).nonzero()[0])]
    kw = dict(
        concept="seven", image=seven, kind="digit", fictitious_name="Zorblat",
        counterfactual_description="A round loop with a tail, like a q.", facts=["Seven is odd."],
        other_concepts={"Is three odd?": "Yes, three is odd."},
        identity_prompts=["Which digit is this?", "Which {kind} is in the picture?"],
        identity_answer="This is the digit {concept}.", refusal="I cannot tell.",
        retain_images=[(three, "Which digit is this?", "This is the digit three.")],
    )  # fmt: skip
    kw.update(change)
    return ConceptRequest(**kw)


def _enc(model):
    return {"image_token_id": model.image_token_id, "num_image_tokens": model.num_image_tokens}


@pytest.mark.parametrize("method", ["siu", "ga", "ga_kl", "po"])
def test_training_data_of_each_method(method, tiny, smollm2_tokenizer, mnist):
    tok = smollm2_tokenizer
    req = _request(mnist)
    samples, images = concept_training_data(method, req, tok, **_enc(tiny))
    assert len(samples) == len(images) > 0
    for s, img in zip(samples, images, strict=True):
        assert (s.image_positions.numel() == 4) == (img is not None)
    answers = [tok.decode(s.input_ids[s.labels != -100]) for s in samples]
    if method == "siu":
        # 2 identity + 2 recognition + 1 fact + 1 text retain + 1 image retain
        assert len(samples) == 7 and images[-1] is req.retain_images[0][0]
        assert sum("Zorblat" in a for a in answers) == 2
        # SIU's type-1 answers: the request's identity_answer with the fictitious name for the concept
        assert sum("This is the digit Zorblat." in a for a in answers) == 2
    elif method == "po":
        assert len(samples) == 2 and all("I cannot tell" in a for a in answers)
    else:
        assert len(samples) == 2 and all("seven" in a for a in answers)
        assert all(img is req.image for img in images)


@pytest.mark.parametrize(
    ("method", "change", "match"),
    [
        ("nope", {}, "unknown concept-unlearning method 'nope'"),
        ("siu", dict(image=torch.full((1, 28, 28), float("nan"))), "NaN or inf"),
        ("siu", dict(image=torch.zeros(28)), "one image's pixel_values"),
        ("siu", dict(identity_prompts=[]), "identity_prompts must not be empty"),
        ("siu", dict(facts=[]), "at least one textual fact"),
        ("siu", dict(retain_images=[(torch.zeros(1, 28, 28), "Which?", "A seven.")]), "names the concept"),
        ("ga", dict(identity_answer="This is a digit."), "must name the concept"),
        ("ga_kl", dict(identity_answer=["This is {concept}."] * 3), "3 answers for 2 identity prompts"),
        ("siu", dict(identity_answer="This is a digit."), "must contain {concept}"),
    ],
)
def test_bad_requests_raise_clear_errors(method, change, match, tiny, smollm2_tokenizer, mnist):
    with pytest.raises(ValueError, match=match):
        concept_training_data(method, _request(mnist, **change), smollm2_tokenizer, **_enc(tiny))


def test_unlearn_concept_trains_a_copy_and_masks_the_concept_for_siu(tiny, smollm2_tokenizer, mnist, monkeypatch):
    seen = {}
    real = siu_api.finetune_llm

    def spy(model, samples, **kw):
        seen.update(kw)
        return real(model, samples, **kw)

    monkeypatch.setattr(siu_api, "finetune_llm", spy)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    res = unlearn_concept(
        tiny, smollm2_tokenizer, _request(mnist), method="siu", **_enc(tiny),
        config=FinetuneConfig(objective="po", steps=2, batch_size=3, lr=1e-3),
    )  # fmt: skip
    assert seen["config"].objective == "siu"  # the method wins over the config's objective
    vocab_mask = seen["vocab_mask"]
    assert vocab_mask.shape == (len(smollm2_tokenizer),) and vocab_mask.dtype == torch.bool
    seven_ids = smollm2_tokenizer(" seven", add_special_tokens=False)["input_ids"]
    assert not vocab_mask[seven_ids].any() and vocab_mask.sum() >= len(vocab_mask) - 8
    assert len(res.log) == 2
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())  # the input is untouched
    assert any(not torch.equal(v, before[k]) for k, v in res.model.state_dict().items())
    res = unlearn_concept(tiny, smollm2_tokenizer, _request(mnist), method="ga", **_enc(tiny),
                          config=FinetuneConfig(steps=1))  # fmt: skip
    assert seen["vocab_mask"] is None and seen["config"].objective == "ga"


def test_answer_accuracy_matches_whole_words(monkeypatch):
    from unlearn_ext.siu import metrics

    answers = iter(["Seven is odd.", "It is 8.", "Someone said nine."])
    monkeypatch.setattr(metrics, "_answers", lambda *a: [next(answers) for _ in range(3)])
    acc, got = answer_accuracy(None, None, ["a", "b", "c"], [None] * 3, ["even", ("eight", "8"), "one"])
    assert acc == pytest.approx(1 / 3) and got[1] == "It is 8."  # "even" is not in "seven", "one" not in "someone"
    with pytest.raises(ValueError, match="no words"):
        answer_accuracy(None, None, ["a"], [None], [()])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(digits=(10,)), "digits must be"),
        (dict(digits=()), "digits must be"),
        (dict(methods=("siu", "scrub")), r"unknown MiniMMU method\(s\) \['scrub'\]"),
        (dict(held_out=0), "held_out"),
        (dict(seeds=()), "seeds must be"),
        (dict(seeds=(1, 1)), "seeds must be"),
    ],
)
def test_mmu_spec_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        mmu.MMUSpec(**change)


@pytest.fixture(scope="module")
def tiny_report(tiny, smollm2_tokenizer, mnist):
    """run_minimmu end to end on the tiny model (which names no digit: the forget image is the first
    training image of the digit)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(mmu, "_forget_image", lambda m, t, ds, d: int((ds.y_train == d).nonzero()[0]))
    # text specificity counts only the questions the original answers: the tiny model's answers are
    # mostly empty, so "*" stands for "any answer" in one question; the other cannot be answered
    from unlearn_ext.siu import metrics

    names = metrics._names
    mp.setattr(metrics, "_names", lambda answer, word: word == "*" or names(answer, word))
    mp.setattr(mmu, "TEXT_QUESTIONS", (("What is two plus two?", ("*",)), ("Name a colour.", ("zzqxj",))))
    spec = mmu.MMUSpec(digits=(7,), steps=1, batch_size=2, held_out=2, others=1, lr=1e-3, seeds=(0, 1))
    try:
        yield mmu.run_minimmu(spec, built=(tiny, smollm2_tokenizer, mnist, {"cached": True}), log=lambda s: None)
    finally:
        mp.undo()


def test_run_minimmu_reports_every_method_and_metric(tiny_report):
    rep = tiny_report
    methods = ["siu", "ga", "ga_kl", "po"]
    assert [r["method"] for r in rep["rows"]] == ["original", *(m for m in methods for _ in (0, 1))]
    assert [r.get("seed") for r in rep["rows"]] == [None, *[0, 1] * 4]
    assert set(rep["summary"]) == {"original", *methods}
    for m in methods:  # the summary and the per-digit entry: the mean (and spread) over the two seeds
        pair = [r for r in rep["rows"] if r["method"] == m]
        entry = rep["by_digit"][m]["7"]
        assert entry["runs"] == 2 and rep["summary"][m]["min_k"] == pytest.approx(
            (pair[0]["min_k"] + pair[1]["min_k"]) / 2
        )
        assert entry["min_k"] == pytest.approx(rep["summary"][m]["min_k"])
        assert entry["min_k_sd"] == pytest.approx(abs(pair[0]["min_k"] - pair[1]["min_k"]) / 2**0.5)
    assert rep["by_digit"]["original"]["7"]["runs"] == 1 and "efficacy_sd" not in rep["by_digit"]["original"]["7"]
    for r in rep["rows"]:
        for k in ("efficacy", "generality", "specificity", "diversity"):
            assert 0 <= r[k] <= 100, (r["method"], k)
        assert r["text_questions"] == 1 and 0 <= r["text_specificity"] <= 100
        assert r["fluency_ppl"] > 1 and r["min_k"] < 0
    orig = rep["rows"][0]
    assert orig["text_specificity"] == 100  # by construction
    assert orig["c_dis"] == pytest.approx(0.0, abs=1e-6)  # the original against itself
    for r in rep["rows"][1:]:
        assert r["specificity_drop"] == pytest.approx(orig["specificity"] - r["specificity"])
        assert r["text_drop"] == pytest.approx(orig["text_specificity"] - r["text_specificity"])
        assert r["seconds"] > 0 and "final_loss" in r


def test_merge_reports_of_runs_side_by_side(tiny_report):
    """Two processes, one seed each, merge into the report of one run with both seeds."""
    import copy

    def part(seed):
        rep = copy.deepcopy(tiny_report)
        rep["spec"]["seeds"] = [seed]
        rep["rows"] = [r for r in rep["rows"] if r.get("seed", seed) == seed]
        return rep

    merged = mmu.merge_reports([part(1), part(0)])
    assert merged["rows"] == tiny_report["rows"] and merged["spec"]["seeds"] == [0, 1]
    for m, entry in tiny_report["summary"].items():
        assert merged["summary"][m] == pytest.approx(entry)
    assert merged["by_digit"]["siu"]["7"] == pytest.approx(tiny_report["by_digit"]["siu"]["7"])
    with pytest.raises(ValueError, match="in two reports"):
        mmu.merge_reports([part(0), part(0)])
    other = part(1)
    other["spec"]["lr"] = 1.0
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        mmu.merge_reports([part(0), other])
    with pytest.raises(ValueError, match="at least one"):
        mmu.merge_reports([])
    old = part(0)
    del old["spec"]["seeds"]
    with pytest.raises(ValueError, match="no spec.seeds"):
        mmu.merge_reports([old])


def test_mmu_report_files_and_table(tiny_report, tmp_path, capsys):
    from unlearn_ext.report import print_mmu_table, write_mmu_report

    paths = write_mmu_report(tiny_report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "minimmu.png"]
    assert json.loads(paths[0].read_text())["summary"].keys() == tiny_report["summary"].keys()
    assert paths[1].read_bytes()[:4] == b"\x89PNG"
    print_mmu_table(tiny_report)
    out = capsys.readouterr().out
    assert "ga_kl" in out and "efficacy" in out
    assert "per digit: mean ± sd over seeds [0, 1]" in out and " ± " in out


def test_mmu_report_without_text_questions(tiny_report, tmp_path, capsys):
    """A model that answers none of the text questions has no text specificity: the table shows "-"
    and the plot leaves the bar out, instead of NaN in the JSON."""
    from unlearn_ext.report import print_mmu_table, write_mmu_report

    drop = ("text_specificity", "text_drop")
    rep = {
        **tiny_report,
        "summary": {m: {k: v for k, v in r.items() if k not in drop} for m, r in tiny_report["summary"].items()},
    }
    paths = write_mmu_report(rep, tmp_path / "out")
    assert "NaN" not in paths[0].read_text() and paths[1].read_bytes()[:4] == b"\x89PNG"
    print_mmu_table(rep)
    assert " - " in capsys.readouterr().out


def test_cli_mmu_runs_the_experiment_and_rejects_bad_input(tiny_report, tmp_path, monkeypatch, capsys):
    from unlearn_ext import cli

    calls = []

    def fake_run(spec, *, progress, log):
        calls.append(spec)
        return tiny_report

    monkeypatch.setattr(mmu, "run_minimmu", fake_run)
    rc = cli.main(["mmu", "--digits", "7", "--methods", "siu", "po", "--steps", "3", "--lr", "1e-4",
                   "--train", "decoder", "--beta", "2", "--seeds", "4", "2", "--out", str(tmp_path / "o"),
                   "--no-progress"])  # fmt: skip
    assert rc == 0 and (tmp_path / "o" / "report.json").is_file() and calls[0].seeds == (4, 2)
    assert calls[0].methods == ("siu", "po") and calls[0].steps == 3 and calls[0].lr == 1e-4
    assert calls[0].train == "decoder" and calls[0].beta == 2.0
    assert calls[0].others == 10 and calls[0].image_retain == 5 and calls[0].batch_size == 6  # unset: the defaults
    assert cli.main(["mmu", "--others", "4", "--image-retain", "0", "--batch-size", "2", "--lora-rank", "0",
                     "--out", str(tmp_path / "q"), "--no-progress"]) == 0  # fmt: skip
    assert calls[1] == mmu.MMUSpec(others=4, image_retain=0, batch_size=2, lora_rank=None)
    assert cli.main(["mmu", "--digits", "11", "--no-progress", "--out", str(tmp_path / "p")]) == 2
    assert "digits must be" in capsys.readouterr().err and not (tmp_path / "p").exists()
    with pytest.raises(SystemExit):
        cli.main(["mmu", "--methods", "scrub"])


def test_hf_llava_check_moves_each_methods_answers_the_right_way(smollm2_tokenizer, mnist):
    """The benchmark's Hugging Face path: a tiny random LlavaForConditionalGeneration, every method."""
    image = mnist.x_train[int((mnist.y_train == 7).nonzero()[0])]
    res = mmu.hf_llava_check(smollm2_tokenizer, image, steps=4)
    assert set(res) == {"siu", "ga", "ga_kl", "po"}
    for method, r in res.items():
        direction = -1 if method in ("siu", "po") else +1
        assert direction * (r["answer_ce_after"] - r["answer_ce_before"]) > 0, (method, r)
