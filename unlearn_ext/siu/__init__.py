"""Single Image Unlearning (SIU, METHODS.md 2) for multimodal LLMs: the fine-tuning data of the four
targets and the dual masks. The loss is :class:`unlearn_ext.losses.FusedMaskedKLLoss`; the
``siu`` method and the MiniMMU benchmark are not written yet (issue 4)."""

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
