"""Single Image Unlearning (SIU, METHODS.md 2) for multimodal LLMs.

* :func:`unlearn_concept`: forget a visual concept from one image with SIU or a baseline of the
  same setting (GA, GA+KL, PO); :class:`ConceptRequest` says what and with which text.
* :mod:`unlearn_ext.siu.data` / :mod:`unlearn_ext.siu.masks`: the four-target data and the dual
  masks on the model's own sequence; :mod:`unlearn_ext.siu.train`: the few-step fine-tuning through
  :class:`unlearn_ext.losses.FusedMaskedKLLoss` (optionally LoRA through peft).
* :mod:`unlearn_ext.siu.minimmu`, :mod:`unlearn_ext.siu.metrics`, :mod:`unlearn_ext.siu.benchmark`:
  MiniMMU (SmolLM2-135M + a digit vision encoder), MMUBench's metrics, and the experiment behind
  ``unlearn mmu`` and ``benchmarks/bench_siu.py``.
"""

from unlearn_ext.siu.api import CONCEPT_METHODS, ConceptRequest, concept_training_data, unlearn_concept
from unlearn_ext.siu.data import IDENTITY_PROMPTS, RECOGNITION_PROMPTS, SIUSample, build_siu_data
from unlearn_ext.siu.masks import EncodedSample, concept_token_ids, concept_vocab_mask, encode_sample, span_token_mask

__all__ = [
    "CONCEPT_METHODS",
    "IDENTITY_PROMPTS",
    "RECOGNITION_PROMPTS",
    "ConceptRequest",
    "EncodedSample",
    "SIUSample",
    "build_siu_data",
    "concept_token_ids",
    "concept_training_data",
    "concept_vocab_mask",
    "encode_sample",
    "span_token_mask",
    "unlearn_concept",
]
