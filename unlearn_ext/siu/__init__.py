"""Single Image Unlearning (SIU, METHODS.md 2) for multimodal LLMs: the fine-tuning data of the four
targets, the dual masks, and the few-step fine-tuning with SIU's loss or a baseline's (GA, GA+KL,
PO) in :mod:`unlearn_ext.siu.train`. The loss is :class:`unlearn_ext.losses.FusedMaskedKLLoss`.
Not written yet (issue 4): LoRA through peft, the MiniMMU benchmark and its metrics."""

from unlearn_ext.siu.data import IDENTITY_PROMPTS, RECOGNITION_PROMPTS, SIUSample, build_siu_data
from unlearn_ext.siu.masks import EncodedSample, concept_token_ids, concept_vocab_mask, encode_sample, span_token_mask

__all__ = [
    "IDENTITY_PROMPTS",
    "RECOGNITION_PROMPTS",
    "EncodedSample",
    "SIUSample",
    "build_siu_data",
    "concept_token_ids",
    "concept_vocab_mask",
    "encode_sample",
    "span_token_mask",
]
