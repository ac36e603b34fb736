"""`unlearn apply` with concept requests: SIU (and GA) on a self-contained multimodal checkpoint.

The model is a tiny MiniLlava (SmolLM2's real tokenizer, a random 2-layer Llama, the digit vision
encoder) fine-tuned for a few seconds to answer "This is the digit seven." about images of sevens
and "There are seven days in a week." to a text question, so there is a concept to forget (its
hit rate is 1 before) and a fact that names the same word to keep. The images are real MNIST
digits written as PNG files beside the request.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
import torch
from _utils import run_cli

from unlearn_ext import _loader
from unlearn_ext.cli import main as cli_main
from unlearn_ext.production import RequestError, apply_requests, read_audit, sha256_file

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not _loader.has_kernel("fused_linear_masked_kl", "cpu"), reason="C++ kernel absent"),
]

QUESTIONS = ("Which digit is this?", "What number is shown in the image?")
TEXT_Q = "How many days are in a week?"


@pytest.fixture(scope="module")
def mnist():
    from unlearn_ext.data import load_dataset

    return load_dataset("mnist", seed=0)


@pytest.fixture(scope="module")
def deployed(smollm2_tokenizer, mnist, tmp_path_factory):
    """(checkpoint path, folder with seven.png, seven_b.png, seven_c.png, three.png, the model)."""
    from unlearn_ext.siu.checkpoint import save_image, save_multimodal_checkpoint
    from unlearn_ext.siu.data import SIUSample
    from unlearn_ext.siu.masks import encode_sample
    from unlearn_ext.siu.minimmu import IMAGE_TOKEN, MiniLlava
    from unlearn_ext.siu.train import FinetuneConfig, finetune_llm

    tok, ds = smollm2_tokenizer, mnist
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        )
    )  # fmt: skip
    model = MiniLlava(lm, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens=4, width=16)
    enc = {"image_token_id": model.image_token_id, "num_image_tokens": 4}
    sevens = (ds.y_train == 7).nonzero().flatten().tolist()
    samples, images = [], []
    for i in sevens[:6]:
        for q in QUESTIONS:
            samples.append(encode_sample(SIUSample(0, q, "This is the digit seven.", True, None), tok, **enc))
            images.append(ds.x_train[i])
    fact = SIUSample(0, TEXT_Q, "There are seven days in a week.", False, None)
    samples += [encode_sample(fact, tok, **enc)] * 2
    images += [None, None]
    cfg = FinetuneConfig(objective="po", steps=80, lr=1e-2, batch_size=8)
    model = finetune_llm(model.eval(), samples, images=images, vocab_mask=None, pad_id=tok.pad_token_id, config=cfg)
    model = model.model.eval()

    folder = tmp_path_factory.mktemp("concept")
    path = save_multimodal_checkpoint(
        model, tok, folder / "deployed.safetensors", image_shape=(1, 28, 28),
        image_preprocess={"mean": ds.mean, "std": ds.std},
        concept_defaults={"kind": "digit", "identity_prompts": list(QUESTIONS),
                          "identity_answer": "This is the digit {concept}."},
        metadata={"model": "tiny-minillava"},
    )  # fmt: skip
    record = {"config": {"input_shape": [1, 28, 28]}, "image_preprocess": {"mode": "L", "scale": 255.0,
              "mean": [ds.mean], "std": [ds.std]}}  # fmt: skip
    test7, test3 = (ds.y_test == 7).nonzero().flatten().tolist(), (ds.y_test == 3).nonzero().flatten().tolist()
    save_image(ds.x_train[sevens[0]], folder / "seven.png", record)
    save_image(ds.x_test[test7[0]], folder / "seven_b.png", record)
    save_image(ds.x_test[test7[1]], folder / "seven_c.png", record)
    save_image(ds.x_test[test3[0]], folder / "three.png", record)
    return path, folder, model


def concept_request(rid: str = "c1", **overrides) -> dict:
    base = {
        "request_id": rid,
        "forget": {
            "concept": "seven",
            "image": "seven.png",
            "fictitious_name": "Zorblat",
            "counterfactual_description": "A round loop with a small tail, like the letter q.",
            "facts": ["Seven is an odd number."],
            "other_concepts": {"Is three odd?": "Yes, three is odd."},
        },
        "checks": {
            "held_out_images": ["seven_b.png", "seven_c.png"],
            "retain": [{"question": TEXT_Q, "expect": ["seven", "7"]}],
        },
        "method": "siu",
        "hparams": {"steps": 48, "lr": 5e-3, "batch_size": 4},
        "gates": {"max_forget_hit_rate": 0.0},
    }
    base.update(overrides)
    return base


def write(folder: Path, name: str, obj) -> Path:
    path = folder / name
    path.write_text(json.dumps(obj))
    return path


def test_multimodal_checkpoint_round_trip(deployed, smollm2_tokenizer, mnist, tmp_path):
    from unlearn_ext.models import load_checkpoint
    from unlearn_ext.siu.checkpoint import load_image, load_multimodal_checkpoint
    from unlearn_ext.siu.minimmu import greedy_answer

    path, folder, model = deployed
    loaded, tok, record = load_multimodal_checkpoint(path)
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight  # re-tied, stored once
    assert record["aliases"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    text = f"{TEXT_Q} seven <empty_output> Zorblat"
    assert tok(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    assert tok.chat_template == smollm2_tokenizer.chat_template and len(tok) == len(smollm2_tokenizer)
    image = load_image(folder / "seven.png", record)
    first_seven = int((mnist.y_train == 7).nonzero()[0])
    assert image.shape == (1, 28, 28) and torch.allclose(image, mnist.x_train[first_seven], atol=1e-5)
    assert greedy_answer(loaded, tok, QUESTIONS[0], image) == "This is the digit seven."
    assert "seven" in greedy_answer(loaded, tok, TEXT_Q, None)
    with pytest.raises(ValueError, match="multimodal \\(MiniLlava\\) checkpoint, not a classifier"):
        load_checkpoint(path)
    data = path.read_bytes()
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-64] + bytes(b ^ 0x5A for b in data[-64:]))
    with pytest.raises(ValueError, match="checksum recorded"):
        load_multimodal_checkpoint(flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_multimodal_checkpoint(truncated)


def test_the_tokenizer_loads_when_the_temporary_folder_is_a_symbolic_link(deployed, tmp_path, monkeypatch):
    import tempfile

    from unlearn_ext.siu.checkpoint import load_multimodal_checkpoint

    (tmp_path / "real").mkdir()
    (tmp_path / "tmp").symlink_to(tmp_path / "real")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    _, tok, _ = load_multimodal_checkpoint(deployed[0])
    assert tok.convert_ids_to_tokens(tok("seven")["input_ids"])


def test_a_concept_request_is_forgotten_published_and_audited(deployed, tmp_path):
    from unlearn_ext.siu.checkpoint import load_image, load_multimodal_checkpoint
    from unlearn_ext.siu.minimmu import greedy_answer

    path, folder, _ = deployed
    input_sha = sha256_file(path)
    req = concept_request(gates={"max_forget_hit_rate": 0.0, "max_held_out_hit_rate": 0.5})
    req["checks"]["held_out_images"][1] = str(folder / "seven_c.png")  # absolute paths work too
    req_path = write(folder, "publish.json", req)
    out = tmp_path / "unlearned.safetensors"
    result = apply_requests(path, [req_path], out)
    assert result.status == "published", (result.gates, result.metrics_after, result.details)
    assert result.metrics_before["forget_hit_rate"] == 1.0 and result.metrics_before["held_out_hit_rate"] == 1.0
    assert result.metrics_after["forget_hit_rate"] == 0.0 and result.metrics_after["held_out_hit_rate"] <= 0.5
    assert sha256_file(path) == input_sha and sha256_file(out) == result.output_sha256
    answers = result.details["after"]["forget_image_answers"]
    assert set(answers) == set(QUESTIONS) and not any("seven" in a.lower() for a in answers.values())

    model, tok, record = load_multimodal_checkpoint(out)
    image = load_image(folder / "seven.png", record)
    assert "seven" not in greedy_answer(model, tok, QUESTIONS[0], image).lower()
    (entry,) = record["metadata"]["unlearn_history"]
    image_sha = hashlib.sha256((folder / "seven.png").read_bytes()).hexdigest()
    assert entry["forget"] == {"kind": "concept", "concept": "seven", "image_sha256": image_sha}
    assert entry["input_sha256"] == input_sha and record["metadata"]["model"] == "tiny-minillava"
    assert record["concept_defaults"]["identity_prompts"] == list(QUESTIONS)

    intent, published = read_audit(tmp_path / "unlearn-audit.jsonl")
    assert (intent["event"], published["event"]) == ("intent", "published")
    assert intent["forget"]["image_sha256"] == image_sha and intent["forget"]["num_held_out_images"] == 2
    assert len(intent["images_sha256"]) == 3 and intent["method"] == "siu"
    assert intent["finetune"]["objective"] == "siu" and intent["finetune"]["steps"] == 48
    assert intent["details_before"]["forget_image_answers"][QUESTIONS[0]] == "This is the digit seven."
    assert intent["gates"]["max_forget_hit_rate"]["pass"] and intent["output"]["sha256"] == result.output_sha256

    # The same request again: a no-op that reports the earlier run (through the CLI).
    assert cli_main(["apply", "--checkpoint", str(path), "--request", str(req_path), "--out", str(out),
                     "--no-progress"]) == 0  # fmt: skip
    assert read_audit(tmp_path / "unlearn-audit.jsonl")[-1]["event"] == "noop"
    # The published output cannot take the same request id again (its lineage has it).
    with pytest.raises(RequestError, match="already applied"):
        apply_requests(out, [req_path], tmp_path / "again.safetensors")


def test_the_same_request_id_over_changed_images_is_a_different_request(deployed, tmp_path):
    """A concept request is its JSON and the images it names: re-filed with the same id after
    seven.png changed, it is refused, not taken for the published one."""
    import shutil

    path, folder, _ = deployed
    for name in ("seven.png", "seven_b.png", "seven_c.png"):
        shutil.copy(folder / name, tmp_path / name)
    req_path = write(tmp_path, "c.json", concept_request())
    out = tmp_path / "unlearned.safetensors"
    assert apply_requests(path, [req_path], out).status == "published"
    assert apply_requests(path, [req_path], out).status == "noop"  # unchanged: the same request
    shutil.copy(folder / "three.png", tmp_path / "seven.png")
    with pytest.raises(RequestError, match="different content: file the change under a new request id"):
        apply_requests(path, [req_path], out)
    # An audit written before image digests counted holds the JSON digest alone: the same request.
    from unlearn_ext.production import load_requests

    shutil.copy(folder / "seven.png", tmp_path / "seven.png")
    (old,) = load_requests([req_path])
    log = tmp_path / "unlearn-audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for rec in records:
        if "request_sha256" in rec:
            rec["request_sha256"] = {"c1": old.digest}
    log.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    assert apply_requests(path, [req_path], out).status == "noop"


def test_a_failed_concept_gate_publishes_nothing(deployed, tmp_path, capsys):
    """Gradient ascent with a large step forgets the image but also the text fact that names the same
    word: the retain gate rejects it (exit 3) and nothing is written but the audit record."""
    path, folder, _ = deployed
    req = concept_request(
        "c-ga", method="ga", hparams={"steps": 12, "lr": 2e-2},
        gates={"max_forget_hit_rate": 0.0, "max_retain_drop": 0.0},
    )  # fmt: skip
    req_path = write(folder, "ga.json", req)
    out = tmp_path / "ga.safetensors"
    code = cli_main(["apply", "--checkpoint", str(path), "--request", str(req_path), "--out", str(out),
                     "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 3, captured
    assert "FAIL  max_retain_drop" in captured.out and "nothing was published" in captured.err
    assert "'Which digit is this?': 'This is the digit seven.' ->" in captured.out
    assert not out.exists()
    (rejected,) = read_audit(tmp_path / "unlearn-audit.jsonl")
    assert rejected["event"] == "rejected" and rejected["failed_gates"] == ["max_retain_drop"]
    assert rejected["metrics_before"]["retain_acc"] == 1.0 > rejected["metrics_after"]["retain_acc"]


def test_bad_concept_requests_are_refused_before_anything_is_written(deployed, tmp_path):
    path, folder, _ = deployed
    (folder / "garbage.png").write_bytes(b"not an image at all")
    concept = concept_request()["forget"]
    cases = [
        ({"forget": {"classes": [7]}, "method": "neggrad", "hparams": {}, "gates": {}, "checks": None},
         "multimodal checkpoint: it takes concept requests"),
        ({"forget": {**concept, "image": "missing.png"}}, "no image at"),
        ({"forget": {**concept, "image": "garbage.png"}}, "not a readable image"),
        ({"checks": {"held_out_images": ["seven_b.png", "nope.png"]}}, r"checks.held_out_images\[1\]: no image"),
        ({"hparams": {"steps": 0}}, "hparams.steps must be a positive integer"),
        ({"hparams": {"lr": -1.0}}, "hparams.lr must be positive"),
        ({"hparams": {"lora_targets": "q_proj"}}, "lora_targets must be a non-empty list"),
        ({"hparams": {"backend": "gpu"}}, "hparams.backend must be one of"),
        ({"hparams": {"epochs": 3}}, r"no hyperparameter\(s\) \['epochs'\]"),
        ({"hparams": {"objective": "ga"}}, r"no hyperparameter\(s\) \['objective'\]"),
        ({"method": "neggrad"}, "unknown concept-unlearning method 'neggrad'"),
        ({"gates": {"max_forget_acc": 0.1}}, r"unknown gate\(s\) \['max_forget_acc'\] for a concept request"),
        ({"checks": {"retain": []}, "gates": {"max_held_out_hit_rate": 0.1}}, "needs checks.held_out_images"),
        ({"checks": {}, "gates": {"max_retain_drop": 0.1}}, "needs checks.retain"),
        ({"checks": {"retain": [{"question": TEXT_Q}]}}, r"checks.retain\[0\] must be an object with question"),
        ({"model": {"hidden_size": 64}}, "expects model hidden_size=64"),
        ({"model": {"num_image_tokens": 4, "arch": "minillava", "vocab_size": 10}}, "vocab_size=10"),
        ({"dataset": {"name": "mnist"}}, "takes its images from forget and checks"),
        ({"forget": {**concept, "counterfactual_description": ""}}, "counterfactual_description must be a non-empty"),
        ({"forget": {**concept, "retain_images": [{"image": "three.png", "question": "Which digit is this?",
                                                   "answer": "Not a seven."}]}}, "names the concept"),
        ({"forget": {**concept, "facts": "Seven is odd."}}, "forget.facts must be a non-empty JSON list"),
        ({"forget": {"concept": "seven"}}, "needs forget.image"),
        ({"forget": {"classes": [7], "image": "seven.png"}}, r"misplaced key\(s\) \['image'\]"),
    ]  # fmt: skip
    out = tmp_path / "never.safetensors"
    for i, (change, pattern) in enumerate(cases):
        req = concept_request(f"bad{i}", **change)
        req = {k: v for k, v in req.items() if v is not None}
        with pytest.raises(RequestError, match=pattern):
            apply_requests(path, [write(folder, f"bad{i}.json", req)], out)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], change  # no output, lock or audit file


@pytest.mark.parametrize("crash_at", ["temp_written", "replaced"])
def test_sigkill_while_publishing_a_concept_request(deployed, tmp_path, crash_at):
    """Killed with the new multimodal checkpoint in a temporary file, or just after the rename: the
    input and the audit log are intact, the output is absent or complete, and a rerun publishes once."""
    from unlearn_ext.siu.checkpoint import load_multimodal_checkpoint

    path, folder, _ = deployed
    input_sha = sha256_file(path)
    req = write(folder, f"crash-{crash_at}.json", concept_request(f"crash-{crash_at}", hparams={"steps": 2}, gates={}))
    out = tmp_path / "out.safetensors"
    args = ["apply", "--checkpoint", str(path), "--request", str(req), "--out", str(out), "--no-progress"]
    proc = run_cli(args, crash_at, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sha256_file(path) == input_sha
    records = read_audit(tmp_path / "unlearn-audit.jsonl")
    assert [r["event"] for r in records] == ["intent"]
    if crash_at == "replaced":
        assert sha256_file(out) == records[0]["output"]["sha256"]
        load_multimodal_checkpoint(out)
    else:
        assert not out.exists() and len(list(tmp_path.glob(".out.safetensors.*.tmp"))) == 1
    proc = run_cli(args, None, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = read_audit(tmp_path / "unlearn-audit.jsonl")
    published = [r for r in records if r["event"] == "published"]
    assert len(published) == 1 and sha256_file(out) == published[0]["output"]["sha256"]
    assert bool(published[0].get("recovered")) == (crash_at == "replaced")
    assert not list(tmp_path.glob(".*.tmp")) and sha256_file(path) == input_sha


def test_export_minimmu_writes_a_deployable_checkpoint_and_images(deployed, smollm2_tokenizer, mnist, tmp_path):
    from unlearn_ext.siu.checkpoint import export_minimmu, load_image, load_multimodal_checkpoint
    from unlearn_ext.siu.minimmu import IMAGE_QA

    _, _, model = deployed
    out = export_minimmu(
        tmp_path / "mmu.safetensors", images=tmp_path / "imgs", per_digit=2,
        built=(model, smollm2_tokenizer, mnist, {"cached": True}),
    )  # fmt: skip
    assert len(out["images"]) == 20 and out["bytes"] == (tmp_path / "mmu.safetensors").stat().st_size
    loaded, _, record = load_multimodal_checkpoint(tmp_path / "mmu.safetensors")
    assert record["concept_defaults"]["identity_prompts"] == [q for q, _ in IMAGE_QA]
    assert record["metadata"]["dataset"] == {"name": "mnist", "seed": 0}
    second_three = (mnist.y_test == 3).nonzero().flatten()[1]
    assert torch.allclose(load_image(tmp_path / "imgs" / "digit3_1.png", record), mnist.x_test[second_three], atol=1e-5)
    assert cli_main(["export-minimmu", "--out", str(tmp_path / "x.safetensors"), "--per-digit", "0"]) == 2
    assert not (tmp_path / "x.safetensors").exists()
