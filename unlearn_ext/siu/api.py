"""One call to forget a visual concept from a (multimodal) LLM: SIU or a baseline of its setting.

:func:`unlearn_concept` builds the method's fine-tuning data from one image of the concept (SIU's
four targets, or the identity Q/A pairs of GA / GA+KL / PO), encodes it on the model's own sequence
(image placeholder tokens included), builds SIU's vocabulary mask from the concept's token ids and
runs :func:`unlearn_ext.siu.train.finetune_llm`. The input model is not modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from unlearn_ext.siu.data import IDENTITY_PROMPTS, RECOGNITION_PROMPTS, SIUSample, build_siu_data
from unlearn_ext.siu.masks import concept_vocab_mask, encode_sample
from unlearn_ext.siu.train import LOSSES, FinetuneConfig, FinetuneResult, finetune_llm

__all__ = ["CONCEPT_METHODS", "ConceptRequest", "concept_training_data", "unlearn_concept"]

#: The methods of the single-image concept setting (METHODS.md 2.3, 2.6).
CONCEPT_METHODS = tuple(LOSSES)


@dataclass(kw_only=True)
class ConceptRequest:
    """What to forget, and the text that SIU and the baselines train on.

    Attributes:
        concept: the concept's name as it appears in answers ("Donald Trump", "seven").
        image: the one forget image, as the model's ``pixel_values`` for one image (``[C, H, W]``).
        fictitious_name, counterfactual_description, facts, other_concepts: SIU's targets 1-4
            (:func:`unlearn_ext.siu.build_siu_data`).
        kind: what the concept is ("person", "digit"), used in identity prompts.
        identity_prompts: the questions about the image (SIU's target 1 and the baselines' data).
        identity_answer: the original answer naming the concept, ``{concept}`` filled in (GA and
            GA+KL ascend on it); one template, or one per identity prompt. SIU's type-1 answers
            are the same templates with the fictitious name in place of the concept.
        refusal: PO's answer to the identity prompts.
        retain_images: ``(image, question, answer)`` triples with images of *other* concepts and
            their normal answers, added to SIU's type-4 data. The released SIU data has text-only
            type-4 samples; on MiniMMU a 135M model then named every image with the fictitious
            name, and one image per other concept fixed that (README, "Single Image Unlearning").
    """

    concept: str
    image: torch.Tensor
    fictitious_name: str = "Zorblat"
    counterfactual_description: str = ""
    facts: Sequence[str] = ()
    other_concepts: Mapping[str, str] = field(default_factory=dict)
    kind: str = "person"
    identity_prompts: Sequence[str] = IDENTITY_PROMPTS
    recognition_prompts: Sequence[str] = RECOGNITION_PROMPTS
    identity_answer: str | Sequence[str] = "This is {concept}."
    refusal: str = "I do not know who that is."
    retain_images: Sequence[tuple[torch.Tensor, str, str]] = ()


def _siu_identity_answers(request: ConceptRequest, n: int) -> list[str]:
    """SIU's type-1 answers: the request's identity answers (the model's own phrasing) with the
    fictitious name in place of the concept, as ``{name}`` templates."""
    templates = request.identity_answer
    if isinstance(templates, str):
        templates = [templates] * n
    if len(templates) != n:
        raise ValueError(f"identity_answer has {len(templates)} answers for {n} identity prompts")
    out = []
    for t in templates:
        if "{concept}" not in t:
            raise ValueError(f"identity_answer must contain {{concept}} (SIU puts the fictitious name there): {t!r}")
        out.append(t.replace("{concept}", "{name}"))
    return out


def concept_training_data(
    method: str, request: ConceptRequest, tokenizer, *, image_token_id: int, num_image_tokens: int
) -> tuple[list, list[torch.Tensor | None]]:
    """``(encoded samples, per-sample image or None)`` of ``method`` for ``request``."""
    if method not in CONCEPT_METHODS:
        raise ValueError(f"unknown concept-unlearning method {method!r}; available: {', '.join(CONCEPT_METHODS)}")
    if not isinstance(request.image, torch.Tensor) or request.image.dim() < 2:
        raise ValueError("request.image must be one image's pixel_values tensor, e.g. [C, H, W]")
    if not torch.isfinite(request.image).all():
        raise ValueError("request.image holds NaN or inf")
    prompts = [p.format(kind=request.kind) for p in request.identity_prompts]
    if not prompts:
        raise ValueError("identity_prompts must not be empty")
    retain: list[tuple[SIUSample, torch.Tensor]] = []
    if method == "siu":
        data = build_siu_data(
            request.concept,
            fictitious_name=request.fictitious_name,
            counterfactual_description=request.counterfactual_description,
            facts=request.facts,
            other_concepts=request.other_concepts,
            kind=request.kind,
            identity_prompts=request.identity_prompts,
            recognition_prompts=request.recognition_prompts,
            identity_answers=_siu_identity_answers(request, len(prompts)),
        )
        for img, question, answer in request.retain_images:
            if request.concept.lower() in answer.lower():
                raise ValueError(f"a retain_images answer names the concept {request.concept!r}: {answer!r}")
            retain.append((SIUSample(4, question, answer, True, None), img))
    elif method in ("ga", "ga_kl"):
        templates = request.identity_answer
        if isinstance(templates, str):
            templates = [templates] * len(prompts)
        if len(templates) != len(prompts):
            raise ValueError(f"identity_answer has {len(templates)} answers for {len(prompts)} identity prompts")
        answers = [t.format(concept=request.concept) for t in templates]
        for a in answers:
            if request.concept.lower() not in a.lower():
                raise ValueError(f"identity_answer must name the concept (GA ascends on it), got {a!r}")
        data = [SIUSample(1, p, a, True, None) for p, a in zip(prompts, answers, strict=True)]
    else:  # po
        data = [SIUSample(1, p, request.refusal, True, None) for p in prompts]
    enc = {"image_token_id": image_token_id, "num_image_tokens": num_image_tokens}
    samples = [encode_sample(s, tokenizer, **enc) for s in data]
    samples += [encode_sample(s, tokenizer, **enc) for s, _ in retain]
    images = [request.image if s.has_image else None for s in data] + [img for _, img in retain]
    return samples, images


def unlearn_concept(
    model: nn.Module,
    tokenizer,
    request: ConceptRequest,
    *,
    method: str = "siu",
    image_token_id: int,
    num_image_tokens: int,
    config: FinetuneConfig | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Forget ``request.concept`` from ``model`` with ``method`` (siu, ga, ga_kl or po).

    Args:
        model: a LLaVA-shaped model (``.model(input_ids=, pixel_values=, attention_mask=)`` returning
            ``.last_hidden_state``, and ``.lm_head``): Hugging Face ``LlavaForConditionalGeneration``
            or :class:`unlearn_ext.siu.minimmu.MiniLlava`. It is not modified.
        tokenizer: the model's tokenizer (a chat template is used when it has one).
        image_token_id, num_image_tokens: the image placeholder id and how many of them stand for
            one image in the model's sequence.
        config: the fine-tuning hyperparameters; its ``objective`` is set to ``method``.

    Returns: a :class:`FinetuneResult` (the unlearned copy, seconds, the per-step loss log).
    """
    samples, images = concept_training_data(
        method, request, tokenizer, image_token_id=image_token_id, num_image_tokens=num_image_tokens
    )
    vocab = model.lm_head.weight.shape[0]
    vocab_mask = concept_vocab_mask(tokenizer, request.concept, vocab) if method == "siu" else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = replace(config or FinetuneConfig(), objective=method)
    return finetune_llm(model, samples, images=images, vocab_mask=vocab_mask, pad_id=pad, config=cfg, progress=progress)
