"""SIU and its baselines (GA, GA+KL, PO) through the Hugging Face LLaVA integration path: a tiny,
random-initialised LlavaForConditionalGeneration with SmolLM2's real tokenizer, on the four-target
data of one MNIST-sized image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _utils import UnlearnExtOpCalls

from unlearn_ext import _loader
from unlearn_ext.siu import build_siu_data, concept_vocab_mask, encode_sample
from unlearn_ext.siu.train import FinetuneConfig, collate, finetune_llm

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not _loader.has_kernel("fused_linear_masked_kl", "cpu"), reason="C++ kernel absent"),
]
PATCH, SIDE = 7, 28
N_IMG = (SIDE // PATCH) ** 2


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer):
    tok = smollm2_tokenizer
    image_id = len(tok)  # one id past the tokenizer's vocabulary: the image placeholder
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=SIDE,
            patch_size=PATCH, num_channels=1,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=image_id + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        ),
        image_token_index=image_id, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    data = build_siu_data(
        "seven", fictitious_name="Zorblat", counterfactual_description="A round loop with a tail, like a q.",
        facts=["Seven is an odd number."], other_concepts={"Is three odd?": "Yes, three is odd."}, kind="digit",
    )  # fmt: skip
    enc = [encode_sample(s, tok, image_token_id=image_id, num_image_tokens=N_IMG) for s in data]
    image = torch.randn(1, SIDE, SIDE)
    images = [image if s.has_image else None for s in data]
    vocab_mask = concept_vocab_mask(tok, "seven", image_id + 1)
    return model, enc, images, vocab_mask, tok.eos_token_id, data


def _ce(model, samples, images, pad_id):
    """Mean answer CE of ``model`` on ``samples`` (the plain way: full logits)."""
    batch = collate(samples, pad_id)
    imgs = [i for i in images if i is not None]
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=torch.stack(imgs) if imgs else None,
        ).logits  # fmt: skip
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_siu_teaches_the_fictitious_name_and_leaves_the_input_untouched(setup):
    model, enc, images, vocab_mask, pad, data = setup
    before = _state(model)
    kind1 = [i for i, s in enumerate(data) if s.kind == 1]
    ce_before = _ce(model, [enc[i] for i in kind1], [images[i] for i in kind1], pad)
    res = finetune_llm(
        model, enc, images=images, vocab_mask=vocab_mask, pad_id=pad,
        config=FinetuneConfig(objective="siu", steps=12, batch_size=4, lr=1e-2),
    )  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the input model changed"
    assert len(res.log) == 12 and all(torch.isfinite(torch.tensor(e["loss"])) for e in res.log)
    ce_after = _ce(res.model, [enc[i] for i in kind1], [images[i] for i in kind1], pad)
    assert ce_after < ce_before - 2.0, (ce_before, ce_after)  # from ln(V) ~ 10.8 for the random model
    assert not res.model.training


@pytest.mark.parametrize(("objective", "direction"), [("ga", +1), ("ga_kl", +1), ("po", -1)])
def test_baselines_move_the_answer_likelihood_the_right_way(setup, objective, direction):
    model, enc, images, vocab_mask, pad, data = setup
    kind1 = [i for i, s in enumerate(data) if s.kind == 1]
    sub, sub_images = [enc[i] for i in kind1], [images[i] for i in kind1]
    ce_before = _ce(model, sub, sub_images, pad)
    res = finetune_llm(
        model, sub, images=sub_images, vocab_mask=None, pad_id=pad,
        config=FinetuneConfig(objective=objective, steps=4, batch_size=3, lr=5e-3),
    )  # fmt: skip
    ce_after = _ce(res.model, sub, sub_images, pad)
    assert direction * (ce_after - ce_before) > 0, (objective, ce_before, ce_after)


def test_only_the_named_parameters_train(setup):
    model, enc, images, vocab_mask, pad, _ = setup
    res = finetune_llm(
        model, enc, images=images, vocab_mask=vocab_mask, pad_id=pad,
        config=FinetuneConfig(steps=2, train="multi_modal_projector"),
    )  # fmt: skip
    changed = {k for k, v in res.model.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


def test_bad_input(setup):
    model, enc, images, vocab_mask, pad, _ = setup
    with pytest.raises(ValueError, match="objective"):
        finetune_llm(model, enc, images=images, vocab_mask=vocab_mask, pad_id=pad, config=FinetuneConfig(objective="x"))
    with pytest.raises(ValueError, match="images has"):
        finetune_llm(model, enc, images=images[:-1], vocab_mask=vocab_mask, pad_id=pad)
    with pytest.raises(ValueError, match="empty"):
        finetune_llm(model, [], images=[], vocab_mask=vocab_mask, pad_id=pad)
    swapped = [None if i is not None else torch.zeros(1, SIDE, SIDE) for i in images]
    with pytest.raises(ValueError, match="image tokens"):
        finetune_llm(model, enc, images=swapped, vocab_mask=vocab_mask, pad_id=pad)
    with pytest.raises(ValueError, match="no parameter name"):
        finetune_llm(model, enc, images=images, vocab_mask=vocab_mask, pad_id=pad, config=FinetuneConfig(train="nope"))


def test_lora_trains_adapters_and_returns_a_merged_model_of_the_same_architecture(setup):
    pytest.importorskip("peft")
    model, enc, images, vocab_mask, pad, data = setup
    res = finetune_llm(
        model, enc, images=images, vocab_mask=vocab_mask, pad_id=pad,
        config=FinetuneConfig(steps=3, lr=1e-2, lora_rank=4, lora_targets=("q_proj", "v_proj")),
    )  # fmt: skip
    assert type(res.model) is type(model) and set(res.model.state_dict()) == set(model.state_dict())
    changed = {k for k, v in res.model.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    # LoRA on q/v only: exactly those weights moved (merged adapters), the rest is the original.
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    with pytest.raises(ValueError, match="names a Linear"):
        finetune_llm(model, enc, images=images, vocab_mask=vocab_mask, pad_id=pad,
                     config=FinetuneConfig(steps=1, lora_rank=2, lora_targets=("nope",)))  # fmt: skip


@pytest.mark.parametrize(
    ("config", "head_trains"),
    [(dict(lora_rank=2, lora_targets=("q_proj",)), False), (dict(train="multi_modal_projector"), False),
     (dict(), True)],
    ids=["lora", "projector-only", "full"],
)  # fmt: skip
def test_a_frozen_lm_head_gets_no_weight_gradient_from_the_fused_loss(setup, config, head_trains):
    """SIU with LoRA (or with only the projector trained) leaves the LM head frozen: the fused
    masked-KL op is asked for the hidden states' gradient only, never for the [V, H] weight's."""
    if "lora_rank" in config:
        pytest.importorskip("peft")
    model, enc, images, vocab_mask, pad, _ = setup
    with UnlearnExtOpCalls() as calls:
        finetune_llm(model, enc, images=images, vocab_mask=vocab_mask, pad_id=pad,
                     config=FinetuneConfig(steps=1, **config))  # fmt: skip
    masks = [args[-1] for name, args in calls if name.startswith("fused_linear_masked_kl")]
    assert masks and all(m == [True, head_trains, False] for m in masks), masks


def test_lora_run_is_fixed_by_its_seed_not_by_the_global_rng(setup):
    """LoRA's random initialisation comes from FinetuneConfig.seed: the same seed gives the same
    model whatever the global RNG state, another seed another one, and the caller's RNG is untouched."""
    pytest.importorskip("peft")
    model, enc, images, vocab_mask, pad, _ = setup

    def run(seed):
        cfg = FinetuneConfig(steps=2, lr=1e-2, lora_rank=4, lora_targets=("q_proj",), seed=seed)
        res = finetune_llm(model, enc, images=images, vocab_mask=vocab_mask, pad_id=pad, config=cfg)
        return {k: v for k, v in res.model.state_dict().items() if k.endswith("q_proj.weight")}

    torch.manual_seed(1)
    first = run(3)
    after = torch.rand(1)  # the global stream continues as if finetune_llm had drawn nothing
    torch.manual_seed(1)
    run(3)
    assert torch.equal(torch.rand(1), after)
    torch.manual_seed(12345)  # another global state: the same model
    again = run(3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = run(4)
    assert any(not torch.equal(first[k], other[k]) for k in first)
