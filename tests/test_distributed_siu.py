"""SIU and its baselines data-parallel (``FinetuneConfig(distributed="ddp" | "fsdp")``): 2 CPU processes,
gloo on 127.0.0.1, compared with one process.

The model is a tiny random MiniLlava in float64 (a convolutional vision encoder and a projector in
front of a 2-layer Hugging Face Llama decoder, vocabulary 61) on synthetic encoded samples, some
with an image and some text-only, so that within a step one rank's shard can have no image (its
vision tower and projector are then not reached on that rank) and some global batches have no
image at all (those parameters get no gradient, and Adam must skip them as in one process). Batch
sizes are odd (shards of 2 and 1 samples, different token counts) and one run has ``batch_size=1``
(rank 1 has no sample at all): the loss is normalised by the global batch's token counts, so every
case must match the single-process weights to float64 rounding.

A second test runs the Hugging Face path end to end: ``unlearn_concept`` (SmolLM2's real
tokenizer, a tiny random ``LlavaForConditionalGeneration`` with a CLIP vision tower and a tied LM
head, float64) with ``FinetuneConfig(distributed=...)`` under DDP (also with LoRA) and FSDP2.

Each test starts 2 processes once and runs several cases in them: every case trains distributed,
rank 0 also trains the same case in one process (before the next collective), and the test
process compares the saved weights and loss logs.
"""

from __future__ import annotations

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
transformers = pytest.importorskip("transformers")

from _spawn import run_ranks  # noqa: E402

from unlearn_ext import _loader  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _loader.has_kernel("fused_linear_masked_kl", "cpu"), reason="the C++ fused_linear_masked_kl kernel is absent"
)

WORLD = 2
VOCAB, IMAGE_ID, N_IMG = 61, 60, 4
ATOL, RTOL = 1e-9, 1e-7

# --------------------------------------------------------------------------------------------
# Spawning (module-level functions: they pickle into the spawned processes)
# --------------------------------------------------------------------------------------------


def _run(fn, tmp_path) -> list[dict]:
    return run_ranks(fn, WORLD, tmp_path)


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------


def _model():
    from unlearn_ext.siu.minimmu import MiniLlava

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        )
    )  # fmt: skip
    return MiniLlava(lm, image_token_id=IMAGE_ID, num_image_tokens=N_IMG, width=8).double().eval()


def _samples():
    """7 encoded samples (3 with an image), answer lengths 3-7, a target phrase in some."""
    from unlearn_ext.siu.masks import EncodedSample

    g = torch.Generator().manual_seed(11)
    samples, images = [], []
    for i, (has_image, n_prompt, n_answer) in enumerate(
        [(True, 3, 4), (False, 4, 6), (True, 2, 3), (False, 5, 7), (False, 3, 5), (True, 4, 5), (False, 2, 4)]
    ):
        prompt = torch.randint(0, IMAGE_ID, (n_prompt,), generator=g)
        answer = torch.randint(0, IMAGE_ID, (n_answer,), generator=g)
        parts = [prompt[:1], torch.full((N_IMG,), IMAGE_ID), prompt[1:]] if has_image else [prompt]
        ids = torch.cat([*parts, answer])
        n, a = ids.numel(), answer.numel()
        labels = torch.full((n,), -100, dtype=torch.long)
        labels[n - a :] = answer
        phrase = torch.zeros(n, dtype=torch.bool)
        if i % 2 == 0:  # a target phrase: two answer tokens kept out of the KL
            phrase[n - a + 1 : n - a + 3] = True
        token_mask = (labels != -100) & ~phrase
        pos = torch.nonzero(ids == IMAGE_ID).flatten()
        samples.append(EncodedSample(ids, labels, token_mask, phrase, pos))
        images.append(torch.randn(1, 28, 28, generator=g, dtype=torch.float64) if has_image else None)
    vocab_mask = torch.ones(VOCAB, dtype=torch.bool)
    vocab_mask[[5, 17, 33]] = False  # the "concept's" token ids
    return samples, images, vocab_mask


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The global batches finetune_llm draws (its order rule)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


#: name -> FinetuneConfig fields (without ``distributed``), compared with one process.
CASES = {
    "siu": {"objective": "siu", "steps": 5, "batch_size": 3, "lr": 1e-2, "seed": 1},
    "siu_batch1": {"objective": "siu", "steps": 2, "batch_size": 1, "lr": 1e-2, "seed": 2},
    "siu_renorm_projector": {
        "objective": "siu",
        "steps": 4,
        "batch_size": 3,
        "lr": 1e-2,
        "seed": 5,
        "renormalize": True,
        "temperature": 2.0,
        "train": "projector",
    },  # fmt: skip
    "ga": {"objective": "ga", "steps": 3, "batch_size": 3, "lr": 5e-3, "seed": 3},
    "ga_kl": {"objective": "ga_kl", "steps": 3, "batch_size": 4, "lr": 5e-3, "seed": 4},
    "po": {"objective": "po", "steps": 3, "batch_size": 3, "lr": 5e-3, "seed": 5},
    "siu_lora": {
        "objective": "siu",
        "steps": 4,
        "batch_size": 3,
        "lr": 1e-2,
        "seed": 5,
        "lora_rank": 2,
        "lora_targets": ("q_proj", "v_proj"),
        "train": "projector",
    },  # fmt: skip
}
FSDP_CASES = ("siu", "siu_batch1", "ga", "siu_lora")


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, strategy: str, names) -> dict:
    from unlearn_ext.siu.train import FinetuneConfig, finetune_llm

    model = _model()
    before = _state(model)
    samples, images, vocab_mask = _samples()
    out: dict = {}
    for name in names:
        cfg = FinetuneConfig(**CASES[name])
        torch.manual_seed(7)  # LoRA's initialisation (rank 0's is broadcast; the reference run draws the same)
        res = finetune_llm(
            model, samples, images=images, vocab_mask=vocab_mask, pad_id=0,
            config=FinetuneConfig(**CASES[name], distributed=strategy),
        )  # fmt: skip
        case = {"dist": _state(res.model), "log": res.log, "type": type(res.model).__name__}
        case["requires_grad"] = all(p.requires_grad for p in res.model.parameters())
        case["training"] = res.model.training
        if rank == 0:
            torch.manual_seed(7)
            ref = finetune_llm(model, samples, images=images, vocab_mask=vocab_mask, pad_id=0, config=cfg)
            case["ref"], case["ref_log"] = _state(ref.model), ref.log
        out[name] = case
    out["untouched"] = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    try:
        finetune_llm(model, samples, images=images, vocab_mask=vocab_mask, pad_id=0,
                     config=FinetuneConfig(distributed="zero"))  # fmt: skip
    except ValueError as e:
        out["bad"] = str(e)
    from unlearn_ext.distributed import unlearn_distributed

    try:
        unlearn_distributed(model, "siu", forget=[], strategy=strategy)
    except ValueError as e:
        out["classifier_api"] = str(e)
    return out


def _ddp_worker(rank: int, world: int) -> dict:
    return _worker(rank, world, "ddp", list(CASES))


def _fsdp_worker(rank: int, world: int) -> dict:
    return _worker(rank, world, "fsdp", FSDP_CASES)


def _check(runs: list[dict], names) -> None:
    original = _model().state_dict()
    for r in runs:
        assert r["untouched"], "the input model changed"
        assert "distributed must be one of" in r["bad"]
        assert "FinetuneConfig(distributed='ddp')" in r["classifier_api"]
    for name in names:
        a, b = runs[0][name], runs[1][name]
        for case in (a, b):
            assert case["type"] == "MiniLlava" and case["requires_grad"] and not case["training"], name
            assert set(case["dist"]) == set(original), f"{name}: not the input's architecture (LoRA merged?)"
        for k in a["dist"]:  # the same weights on both ranks
            assert torch.equal(a["dist"][k], b["dist"][k]), f"{name}: {k} differs between the ranks"
        assert a["log"] == b["log"], name  # the global loss, the same on both ranks
        for k, v in a["ref"].items():
            torch.testing.assert_close(
                a["dist"][k], v, atol=ATOL, rtol=RTOL, msg=lambda m, k=k, name=name: f"{name} {k}: {m}"
            )
        got, want = [e["loss"] for e in a["log"]], [e["loss"] for e in a["ref_log"]]
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12), name
        moved = [k for k, v in a["dist"].items() if not torch.equal(v, original[k])]
        assert moved, f"{name}: nothing trained"
        if "train" in CASES[name] and "lora_rank" not in CASES[name]:
            assert all(CASES[name]["train"] in k for k in moved), name
        if "lora_rank" in CASES[name]:
            assert all(k.endswith(("q_proj.weight", "v_proj.weight")) or "projector" in k for k in moved), name


def test_the_cases_exercise_uneven_and_imageless_shards():
    """The global batches of the cases do hit what the comparison is about."""
    _, images, _ = _samples()
    has = [i is not None for i in images]
    siu = _batches(len(images), 3, CASES["siu"]["steps"], CASES["siu"]["seed"])
    assert any(any(has[i] for i in b[0::2]) != any(has[i] for i in b[1::2]) for b in siu), "no rank-only image"
    for name in ("siu_renorm_projector", "siu_lora"):  # step 3 has no image: Adam must skip the projector
        steps = _batches(len(images), 3, CASES[name]["steps"], CASES[name]["seed"])
        assert [any(has[i] for i in b) for b in steps] == [True, True, False, True], name


@pytest.mark.slow
def test_siu_and_baselines_under_ddp_equal_one_process(tmp_path):
    _check(_run(_ddp_worker, tmp_path), list(CASES))


@pytest.mark.slow
def test_siu_and_baselines_under_fsdp2_equal_one_process(tmp_path):
    _check(_run(_fsdp_worker, tmp_path), FSDP_CASES)


def test_distributed_needs_a_process_group():
    from unlearn_ext.siu.train import FinetuneConfig, finetune_llm

    samples, images, vocab_mask = _samples()
    with pytest.raises(RuntimeError, match="process group"):
        finetune_llm(_model(), samples, images=images, vocab_mask=vocab_mask, pad_id=0,
                     config=FinetuneConfig(steps=1, distributed="ddp"))  # fmt: skip
    with pytest.raises(ValueError, match="distributed must be one of"):
        finetune_llm(_model(), samples, images=images, vocab_mask=vocab_mask, pad_id=0,
                     config=FinetuneConfig(steps=1, distributed="deepspeed"))  # fmt: skip


# --------------------------------------------------------------------------------------------
# The Hugging Face path: unlearn_concept on a tiny LLaVA
# --------------------------------------------------------------------------------------------

SIDE, PATCH = 28, 7
LLAVA_CASES = {
    "ddp": {"steps": 3, "batch_size": 3, "lr": 1e-2, "seed": 5},
    "ddp_lora": {"steps": 3, "batch_size": 3, "lr": 1e-2, "seed": 5, "lora_rank": 2},
    "fsdp": {"steps": 3, "batch_size": 3, "lr": 1e-2, "seed": 5},
}


def _tokenizer():
    from unlearn_ext.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _llava(image_id: int):
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=SIDE,
            patch_size=PATCH, num_channels=1,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=image_id + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        ),
        image_token_index=image_id, vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg).double().eval()


def _llava_worker(rank: int, world: int) -> dict:
    from unlearn_ext.siu.api import ConceptRequest, unlearn_concept
    from unlearn_ext.siu.train import FinetuneConfig

    tok = _tokenizer()
    image_id = len(tok)
    model = _llava(image_id)
    g = torch.Generator().manual_seed(3)
    request = ConceptRequest(
        concept="seven", image=torch.randn(1, SIDE, SIDE, generator=g, dtype=torch.float64), kind="digit",
        counterfactual_description="A round loop with a tail.", facts=["Seven is odd."],
        other_concepts={"Is three odd?": "Yes, three is odd."},
        identity_prompts=["Which digit is this?", "Which {kind} is in the picture?"],
        identity_answer="This is the digit {concept}.",
        retain_images=[(torch.randn(1, SIDE, SIDE, generator=g, dtype=torch.float64), "Which digit is this?",
                        "This is the digit three.")],
    )  # fmt: skip
    enc = {"image_token_id": image_id, "num_image_tokens": (SIDE // PATCH) ** 2}
    out: dict = {"tied": model.lm_head.weight is model.get_input_embeddings().weight}
    for name, hp in LLAVA_CASES.items():
        strategy = name.split("_")[0]
        torch.manual_seed(7)
        res = unlearn_concept(model, tok, request, config=FinetuneConfig(**hp, distributed=strategy), **enc)
        case = {"dist": _state(res.model), "log": res.log, "type": type(res.model).__name__}
        case["tied"] = res.model.lm_head.weight is res.model.get_input_embeddings().weight
        if rank == 0:
            torch.manual_seed(7)
            ref = unlearn_concept(model, tok, request, config=FinetuneConfig(**hp), **enc)
            case["ref"], case["ref_log"] = _state(ref.model), ref.log
        out[name] = case
    return out


@pytest.mark.slow
def test_unlearn_concept_on_hugging_face_llava_under_ddp_and_fsdp2(tmp_path, smollm2_tokenizer):
    runs = _run(_llava_worker, tmp_path)
    assert runs[0]["tied"]
    original = _llava(len(smollm2_tokenizer)).state_dict()
    for name in LLAVA_CASES:
        a, b = runs[0][name], runs[1][name]
        assert a["type"] == b["type"] == "LlavaForConditionalGeneration", name
        assert a["tied"] and b["tied"], f"{name}: the LM head is no longer tied to the token embedding"
        assert set(a["dist"]) == set(a["ref"]), name
        for k in a["dist"]:
            assert torch.equal(a["dist"][k], b["dist"][k]), f"{name}: {k} differs between the ranks"
            torch.testing.assert_close(
                a["dist"][k], a["ref"][k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k, name=name: f"{name} {k}: {m}"
            )
        assert [e["loss"] for e in a["log"]] == pytest.approx([e["loss"] for e in a["ref_log"]], rel=1e-10), name
        moved = {k for k, v in a["dist"].items() if not torch.equal(v, original[k])}
        if name.endswith("lora"):  # merged adapters: the attention projections of the decoder moved, only them
            assert moved and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                                 for k in moved), name  # fmt: skip
        else:
            assert any("vision_tower" in k for k in moved) and any("embed_tokens" in k for k in moved), name
