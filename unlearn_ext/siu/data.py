"""SIU's multifaceted fine-tuning data (METHODS.md 2.2): the four targets built from one image.

1. *Aligning with unseen concepts*: the image with identity-probing prompts, answered with a
   fictitious name (``target_phrase`` = that name).
2. *Assigning a new visual description*: the image with "do you recognise <concept>?", answered
   "no" plus a counterfactual description (``target_phrase`` = the whole answer).
3. *Decoupling factual knowledge*: text only, "are you aware of <concept>?", answered with the
   concept's facts (no target phrase: the KL keeps every position).
4. *Preserving non-targeted knowledge*: text only, about other concepts, with their normal answers.

The prompts and answers are plain strings; the caller's chat template / processor turns them into
token sequences (:mod:`unlearn_ext.siu.masks` then builds the token and vocabulary masks on the
model's own sequence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["IDENTITY_PROMPTS", "RECOGNITION_PROMPTS", "SIUSample", "build_siu_data"]

#: Identity-probing prompts of target 1 (nine paraphrases, as in the released data).
IDENTITY_PROMPTS: tuple[str, ...] = (
    "What is shown in this image?",
    "What is in this picture?",
    "Can you tell me what this image shows?",
    "Identify what is in the photo.",
    "What do you see in this image?",
    "Describe what this picture is of.",
    "What is depicted here?",
    "Which {kind} is this?",
    "Name the {kind} in this image.",
)
#: Prompts of target 2 ("{concept}" is filled in).
RECOGNITION_PROMPTS: tuple[str, ...] = (
    "Do you recognise {concept} in the image?",
    "Is {concept} in this picture?",
)


@dataclass(frozen=True)
class SIUSample:
    """One fine-tuning example.

    Attributes:
        kind: which of the four targets (1-4).
        prompt: the user turn (without the image placeholder; ``has_image`` says whether the image
            goes with it).
        answer: the assistant turn the model is trained to produce (CE on its tokens).
        has_image: the forget image accompanies the prompt (targets 1 and 2).
        target_phrase: the span of ``answer`` whose positions are left out of the KL (the new,
            contradicting text), or None (the KL keeps every answer position).
    """

    kind: int
    prompt: str
    answer: str
    has_image: bool
    target_phrase: str | None


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value.strip()


def build_siu_data(
    concept: str,
    *,
    fictitious_name: str,
    counterfactual_description: str,
    facts: Sequence[str],
    other_concepts: Mapping[str, str],
    kind: str = "person",
    identity_prompts: Sequence[str] = IDENTITY_PROMPTS,
    recognition_prompts: Sequence[str] = RECOGNITION_PROMPTS,
    identity_answers: str | Sequence[str] = "This is {name}.",
) -> list[SIUSample]:
    """The four-target fine-tuning set for forgetting ``concept`` from one image.

    Args:
        concept: the concept's name as it appears in answers (e.g. "Donald Trump", "seven").
        fictitious_name: the unseen name the model learns to give for the image (target 1).
        counterfactual_description: a visual description that does not match the concept (target 2).
        facts: textual facts about the concept to keep (target 3), one answer each.
        other_concepts: ``{question: answer}`` pairs about other concepts to preserve (target 4).
        kind: what the concept is ("person", "digit", ...), used in some identity prompts.
        identity_prompts, recognition_prompts: the prompt paraphrases of targets 1 and 2
            (``{kind}`` / ``{concept}`` placeholders are filled in).
        identity_answers: target 1's answer template (``{name}``: the fictitious name), one for
            every identity prompt or one per prompt. The default "This is {name}." is the released
            data's form; a model that answers a prompt in its own words ("The image shows the
            number three.") learns more from its own template with the name swapped, since the
            masked KL then keeps the very tokens that the cross-entropy teaches.

    Returns: samples of kinds 1, 2, 3 and 4, in that order.

    Raises:
        ValueError: an empty field, no facts or no other concepts, a fictitious name equal to the
            concept, or a counterfactual description that names the concept.
    """
    concept = _check_text(concept, "concept")
    fictitious_name = _check_text(fictitious_name, "fictitious_name")
    counterfactual_description = _check_text(counterfactual_description, "counterfactual_description")
    if fictitious_name.lower() == concept.lower():
        raise ValueError("fictitious_name must differ from the concept")
    if concept.lower() in counterfactual_description.lower():
        raise ValueError("counterfactual_description must not name the concept (it is what the model learns to say)")
    facts = [_check_text(f, "a fact") for f in facts]
    if not facts:
        raise ValueError("facts must hold at least one textual fact about the concept (target 3)")
    if not other_concepts:
        raise ValueError("other_concepts must hold at least one question/answer pair (target 4)")
    if not identity_prompts or not recognition_prompts:
        raise ValueError("identity_prompts and recognition_prompts must not be empty")

    templates = [identity_answers] * len(identity_prompts) if isinstance(identity_answers, str) else identity_answers
    if len(templates) != len(identity_prompts):
        raise ValueError(f"identity_answers has {len(templates)} templates for {len(identity_prompts)} prompts")
    samples: list[SIUSample] = []
    for p, template in zip(identity_prompts, templates, strict=True):
        if "{name}" not in template:
            raise ValueError(f"an identity answer template must contain {{name}} (the fictitious name): {template!r}")
        answer = template.replace("{name}", fictitious_name)
        samples.append(SIUSample(1, p.format(kind=kind), answer, True, fictitious_name))
    for p in recognition_prompts:
        answer = f"No, I do not see {concept} here. {counterfactual_description}"
        samples.append(SIUSample(2, p.format(concept=concept), answer, True, answer))
    for fact in facts:
        samples.append(SIUSample(3, f"Are you aware of {concept}?", fact, False, None))
    for question, answer in other_concepts.items():
        samples.append(SIUSample(4, _check_text(question, "a question"), _check_text(answer, "an answer"), False, None))
    return samples
