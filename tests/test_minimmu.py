"""MiniMMU's LLaVA-style model on a tiny random Llama (the CI configuration) with SmolLM2's real
tokenizer and the bundled MNIST digits."""

from __future__ import annotations

import pytest
import torch

from unlearn_ext import _loader
from unlearn_ext.siu import build_siu_data, concept_vocab_mask, encode_sample
from unlearn_ext.siu.minimmu import ConnectorConfig, MiniLlava, digit_qa, greedy_answer, train_connector
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


def _tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    lm = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
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


def test_connector_training_lowers_the_answer_loss_and_freezes_the_language_model(smollm2_tokenizer, mnist):
    tok = smollm2_tokenizer
    model = _tiny_model(tok)
    lm_before = {k: v.clone() for k, v in model.model.decoder.state_dict().items()}
    log = train_connector(
        model, tok, mnist.x_train, mnist.y_train, config=ConnectorConfig(num_images=48, epochs=2, batch_size=16)
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
