"""MMUBench-style metrics (METHODS.md 2.5) for a LLaVA-style model such as :class:`MiniLlava`.

All are pure functions of the models and data (no training, models left in eval mode):

* :func:`concept_hit_rate`: greedy answers to identity-probing prompts that name the concept
  (lower-case substring). Efficacy = 100 * (1 - hit rate) on the training image; generality = the
  same on held-out images of the concept.
* :func:`answer_accuracy`: answers that contain the expected word as a whole word (specificity: other concepts'
  images, and text-only facts).
* :func:`fluency_ppl`: perplexity of a model on reference answers (the original model's), with the
  concept's token ids excluded from the loss.
* :func:`diversity`: mean unique-word ratio of answers, in %.
* :func:`c_dis`: ``mean over answer positions whose gold token is a concept token of
  p_ref(c) * log(p_ref(c) / p(c))`` (the re-implementation's form; the released script's is
  undocumented enough that METHODS.md 2.5 leaves it open).
* :func:`min_k_prob`: Min-K% Prob (K = 40%): the mean of the lowest K% token log-likelihoods of each
  answer; membership inference compares it between forget and non-member samples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from unlearn_ext.siu.masks import IGNORE_INDEX, EncodedSample
from unlearn_ext.siu.train import collate

__all__ = ["answer_accuracy", "c_dis", "concept_hit_rate", "diversity", "fluency_ppl", "min_k_prob"]


def _answers(model, tokenizer, prompts, images, max_new_tokens) -> list[str]:
    from unlearn_ext.siu.minimmu import greedy_answers

    return greedy_answers(model, tokenizer, list(prompts), list(images), max_new_tokens=max_new_tokens)


def concept_hit_rate(
    model, tokenizer, prompts: Sequence[str], images: Sequence[torch.Tensor | None], concept: str,
    *, max_new_tokens: int = 16,
) -> tuple[float, list[str]]:  # fmt: skip
    """(fraction of greedy answers that contain ``concept`` (lower-case), the answers)."""
    if not prompts:
        raise ValueError("concept_hit_rate needs at least one prompt")
    answers = _answers(model, tokenizer, prompts, images, max_new_tokens)
    return sum(concept.lower() in a.lower() for a in answers) / len(answers), answers


def _names(answer: str, word: str) -> bool:
    """``word`` occurs in ``answer`` as a whole word, case-insensitively ("even" is not in "seven")."""
    return re.search(rf"(?<![a-z0-9]){re.escape(word.lower())}(?![a-z0-9])", answer.lower()) is not None


def answer_accuracy(
    model, tokenizer, prompts: Sequence[str], images: Sequence[torch.Tensor | None],
    expected: Sequence[str | Sequence[str]], *, max_new_tokens: int = 16,
) -> tuple[float, list[str]]:  # fmt: skip
    """(fraction of answers that contain their expected word as a whole word, case-insensitively,
    the answers). An entry of ``expected`` may list alternatives (``("eight", "8")``): any counts."""
    if not prompts or len(expected) != len(prompts):
        raise ValueError("answer_accuracy needs one expected word per prompt (and at least one prompt)")
    alternatives = [(e,) if isinstance(e, str) else tuple(e) for e in expected]
    if any(not alts for alts in alternatives):
        raise ValueError("an expected entry lists no words")
    answers = _answers(model, tokenizer, prompts, images, max_new_tokens)
    hits = sum(any(_names(a, w) for w in alts) for a, alts in zip(answers, alternatives, strict=True))
    return hits / len(answers), answers


def _logprobs(model, samples: Sequence[EncodedSample], images, pad_id: int):
    device = model.lm_head.weight.device  # evaluate where the model is (CPU or GPU); results on the CPU
    batch = {k: v.to(device) for k, v in collate(samples, pad_id).items()}
    imgs = [i for i in images if i is not None]
    pixels = torch.stack(imgs).to(device) if imgs else None
    with torch.no_grad():
        logits = model(batch["input_ids"], pixels, batch["attention_mask"])
    logp = F.log_softmax(logits[:, :-1].double(), -1).cpu()
    return logp, batch["labels"][:, 1:].cpu()


def fluency_ppl(
    model, samples: Sequence[EncodedSample], images: Sequence[torch.Tensor | None], concept_ids: Sequence[int],
    pad_id: int,
) -> float:  # fmt: skip
    """exp(mean answer-token NLL) of ``model`` on ``samples``, concept token ids excluded."""
    logp, labels = _logprobs(model, samples, images, pad_id)
    labels = labels.clone()
    if concept_ids:
        labels[torch.isin(labels, torch.tensor(list(concept_ids)))] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    if not keep.any():
        raise ValueError("no answer token is left once the concept's tokens are excluded")
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
    return math.exp(float(nll.mean()))


def diversity(answers: Sequence[str]) -> float:
    """Mean over answers of 100 * |unique words| / |words| (empty answers count 0)."""
    if not answers:
        raise ValueError("diversity needs at least one answer")
    scores = []
    for a in answers:
        words = a.lower().split()
        scores.append(100.0 * len(set(words)) / len(words) if words else 0.0)
    return sum(scores) / len(scores)


def c_dis(
    model, reference, samples: Sequence[EncodedSample], images: Sequence[torch.Tensor | None],
    concept_ids: Sequence[int], pad_id: int,
) -> float:  # fmt: skip
    """Mean of ``p_ref(c) * (log p_ref(c) - log p(c))`` over answer positions whose gold token c is a
    concept token (0 when there is none)."""
    logp, labels = _logprobs(model, samples, images, pad_id)
    logq, _ = _logprobs(reference, samples, images, pad_id)
    at = torch.isin(labels, torch.tensor(list(concept_ids))) & (labels != IGNORE_INDEX)
    if not at.any():
        return 0.0
    c = labels[at]
    lp, lq = logp[at].gather(-1, c[:, None]).squeeze(-1), logq[at].gather(-1, c[:, None]).squeeze(-1)
    return float((lq.exp() * (lq - lp)).mean())


def min_k_prob(
    model, samples: Sequence[EncodedSample], images: Sequence[torch.Tensor | None], pad_id: int, k: float = 0.4
) -> list[float]:
    """Per sample, the mean of its lowest ``k`` fraction of answer-token log-likelihoods (Min-K% Prob)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    logp, labels = _logprobs(model, samples, images, pad_id)
    token_ll = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    out = []
    for row, lab in zip(token_ll, labels, strict=True):
        vals = row[lab != IGNORE_INDEX].sort().values
        n = max(1, int(math.ceil(k * vals.numel())))
        out.append(float(vals[:n].mean()))
    return out
