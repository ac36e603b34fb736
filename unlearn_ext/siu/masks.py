"""SIU's dual masks on the model's own token sequence (METHODS.md 2.3).

* Token mask ``K_S`` (here ``token_mask``, True = in the KL): the answer tokens, minus the tokens of
  the sample's ``target_phrase`` (the new, contradicting text the KL must not pull back).
  The released code built it on ``input_ids`` while its logits had the 576 image tokens spliced in,
  so mask and positions were misaligned; :func:`encode_sample` builds the whole sequence itself,
  image placeholder tokens included, so every mask is indexed by the model's own positions.
* Vocabulary mask ``K_V`` (here ``vocab_mask``, True = in the KL): every id except the concept's
  tokens, so the KL does not preserve probability mass on the concept's own tokens.

The phrase is located by character offsets of the answer's tokenisation (a token is in the phrase
when its characters overlap the phrase), not by token-subsequence search, which fails when the
phrase tokenises differently inside the sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unlearn_ext.siu.data import SIUSample

__all__ = ["EncodedSample", "concept_token_ids", "concept_vocab_mask", "encode_sample", "span_token_mask"]

IGNORE_INDEX = -100


def span_token_mask(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[bool]:
    """True for each token whose character span ``[a, b)`` overlaps ``[start, end)``."""
    if not 0 <= start < end:
        raise ValueError(f"bad character span [{start}, {end})")
    return [a < end and b > start and b > a for a, b in offsets]


@dataclass(frozen=True)
class EncodedSample:
    """One sample as model inputs: all ``[T]`` tensors over the model's own sequence.

    ``input_ids`` includes ``num_image_tokens`` copies of ``image_token_id`` at the image's place;
    ``labels`` is ``input_ids`` on answer tokens and -100 elsewhere; ``token_mask`` is True on the
    answer tokens outside the target phrase (what the DMK loss keeps); ``phrase_mask`` marks the
    target phrase's tokens.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    token_mask: torch.Tensor
    phrase_mask: torch.Tensor
    image_positions: torch.Tensor  # int64 positions of the image tokens (empty without an image)


def _chat_prefix(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(f"Question: {prompt}\nAnswer:", add_special_tokens=True)["input_ids"]


def encode_sample(
    sample: SIUSample,
    tokenizer,
    *,
    image_token_id: int | None = None,
    num_image_tokens: int = 0,
    max_length: int | None = None,
) -> EncodedSample:
    """Tokenise ``sample`` into ``[image tokens] + chat prefix + answer + eos`` with SIU's masks.

    The image's ``num_image_tokens`` placeholder tokens go first (where a LLaVA-style model splices
    its visual tokens in). The answer is tokenised on its own with character offsets (a fast
    tokenizer is required) so the target phrase's tokens are known exactly.
    """
    if sample.has_image and (image_token_id is None or num_image_tokens < 1):
        raise ValueError("this sample has an image: pass image_token_id and num_image_tokens >= 1")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_sample needs a fast tokenizer (character offsets of the answer's tokens)")
    image = [image_token_id] * num_image_tokens if sample.has_image else []
    prefix = _chat_prefix(tokenizer, sample.prompt)
    enc = tokenizer(sample.answer, add_special_tokens=False, return_offsets_mapping=True)
    answer_ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    in_phrase = [False] * len(answer_ids)
    if sample.target_phrase:
        start = sample.answer.find(sample.target_phrase)
        if start < 0:
            raise ValueError(f"target_phrase {sample.target_phrase!r} does not occur in the answer {sample.answer!r}")
        in_phrase = span_token_mask(offsets, start, start + len(sample.target_phrase))
    ids = image + prefix + answer_ids + eos
    n_ctx = len(image) + len(prefix)
    labels = [IGNORE_INDEX] * n_ctx + answer_ids + eos
    phrase = [False] * n_ctx + in_phrase + [False] * len(eos)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"the sample has {len(ids)} tokens, more than max_length={max_length}")
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels_t = torch.tensor(labels, dtype=torch.long)
    phrase_t = torch.tensor(phrase, dtype=torch.bool)
    token_mask = (labels_t != IGNORE_INDEX) & ~phrase_t
    image_positions = torch.arange(len(image), dtype=torch.long)
    return EncodedSample(input_ids, labels_t, token_mask, phrase_t, image_positions)


def concept_token_ids(tokenizer, concept: str) -> list[int]:
    """Token ids of ``concept`` as it can appear in text: as-is, lower-case and capitalised, with and
    without a leading space (sorted, unique)."""
    concept = concept.strip()
    if not concept:
        raise ValueError("concept must be a non-empty string")
    variants = {concept, concept.lower(), concept[:1].upper() + concept[1:]}
    ids: set[int] = set()
    for v in variants:
        for text in (v, " " + v):
            ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def concept_vocab_mask(tokenizer, concept: str, vocab_size: int) -> torch.Tensor:
    """bool ``[vocab_size]``: False at the concept's token ids (:func:`concept_token_ids`), True elsewhere."""
    ids = concept_token_ids(tokenizer, concept)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"concept token ids {bad} are outside the vocabulary of size {vocab_size}")
    mask = torch.ones(vocab_size, dtype=torch.bool)
    mask[ids] = False
    return mask
