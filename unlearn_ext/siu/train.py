"""A few fine-tuning steps of a (multimodal) causal LM on encoded samples, with SIU's loss or a baseline's.

One trainer serves SIU and the baselines of the same setting (METHODS.md 2.3, 2.6); they differ in
the data and in the weights of the two terms of :class:`unlearn_ext.losses.FusedMaskedKLLoss`:

* ``siu``: ``alpha * CE + beta * DMK`` on the four-target data (token mask = answer tokens outside
  the target phrase, vocabulary mask = every id except the concept's);
* ``ga``: ``-CE`` on question/answer pairs that name the concept (gradient ascent);
* ``ga_kl``: ``KL(P_orig || Q) - CE`` on the same batch, the KL over every answer token and the whole
  vocabulary (the released baseline);
* ``po``: ``CE`` on refusal answers ("I do not know who that is").

The model is any module with ``.model(input_ids=..., pixel_values=..., attention_mask=...)``
returning ``.last_hidden_state`` and an ``.lm_head`` (Hugging Face ``LlavaForConditionalGeneration``,
``LlamaForCausalLM`` and the MiniMMU model all have that shape); the reference model is a frozen copy
of the input. The input model is never modified; the copy is trained in eval mode (see below).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from unlearn_ext._progress import progress_bar
from unlearn_ext.losses import FusedMaskedKLLoss
from unlearn_ext.siu.masks import IGNORE_INDEX, EncodedSample

__all__ = ["LOSSES", "FinetuneConfig", "FinetuneResult", "collate", "finetune_llm"]

#: (ce_weight, kl_weight, use the token mask) of each objective; SIU's come from the config.
LOSSES = {"siu": None, "ga": (-1.0, 0.0, False), "ga_kl": (-1.0, 1.0, False), "po": (1.0, 0.0, False)}


@dataclass(kw_only=True)
class FinetuneConfig:
    """Hyperparameters of the few-step fine-tuning.

    ``alpha`` / ``beta``: SIU's CE and DMK weights (0.9 / 0.75, the values the re-implementation
    cites from the paper). ``steps`` optimiser steps of ``batch_size`` samples (cycling through the
    data in a seeded order), Adam at ``lr``. ``temperature`` and ``renormalize`` go to the KL.
    ``train`` names the parameters to train: ``"all"``, or a substring that a parameter's name must
    contain (e.g. ``"multi_modal_projector"``); everything else is frozen. ``lora_rank``: train
    LoRA adapters (through ``peft``) on the ``lora_targets`` linear layers instead, plus the
    parameters named by ``train`` when it is not ``"all"``; the adapters are merged into the
    returned model, so it has the input's architecture.
    """

    objective: str = "siu"
    alpha: float = 0.9
    beta: float = 0.75
    steps: int = 6
    batch_size: int = 4
    lr: float = 3e-4
    temperature: float = 1.0
    renormalize: bool = False
    train: str = "all"
    seed: int = 0
    backend: str = "auto"
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default 2 * lora_rank
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class FinetuneResult:
    model: nn.Module
    seconds: float
    log: list[dict] = field(default_factory=list)


def collate(samples: Sequence[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded samples into a batch: input_ids, labels, token_mask, attention_mask ``[B, T]``."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    t = max(s.input_ids.numel() for s in samples)
    b = len(samples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    token_mask = torch.zeros(b, t, dtype=torch.bool)
    attn = torch.zeros(b, t, dtype=torch.long)
    for i, s in enumerate(samples):
        n = s.input_ids.numel()
        ids[i, :n], labels[i, :n], token_mask[i, :n], attn[i, :n] = s.input_ids, s.labels, s.token_mask, 1
    return {"input_ids": ids, "labels": labels, "token_mask": token_mask, "attention_mask": attn}


def _hidden(model: nn.Module, batch: dict, pixel_values: torch.Tensor | None) -> torch.Tensor:
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    return model.model(**kwargs).last_hidden_state


def _add_lora(model: nn.Module, cfg: FinetuneConfig):
    """Inject LoRA adapters into ``model`` in place; returns the peft ``LoraModel`` (for merging)."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError as exc:
        raise ModuleNotFoundError("lora_rank needs peft: pip install peft") from exc
    if cfg.lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {cfg.lora_rank}")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in cfg.lora_targets if t in names]
    if not targets:
        raise ValueError(f"none of lora_targets {list(cfg.lora_targets)} names a Linear layer of the model")
    config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, target_modules=targets, lora_dropout=0.0
    )
    return LoraModel(model, config, "default")


def finetune_llm(
    model: nn.Module,
    samples: Sequence[EncodedSample],
    *,
    images: Sequence[torch.Tensor | None],
    vocab_mask: torch.Tensor | None,
    pad_id: int,
    config: FinetuneConfig | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` for ``config.steps`` steps with ``config.objective``'s loss.

    Args:
        samples: encoded samples (:func:`unlearn_ext.siu.encode_sample`).
        images: per sample, its image as ``pixel_values`` for one image (``[C, H, W]``) or None.
        vocab_mask: bool ``[V]``, SIU's vocabulary mask (ignored by the baselines).
        pad_id: the padding token id.
    """
    cfg = config or FinetuneConfig()
    if cfg.objective not in LOSSES:
        raise ValueError(f"objective must be one of {sorted(LOSSES)}, got {cfg.objective!r}")
    if not samples:
        raise ValueError("the fine-tuning set is empty")
    if len(images) != len(samples):
        raise ValueError(f"images has {len(images)} entries for {len(samples)} samples (None for text-only)")
    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ValueError("steps and batch_size must be >= 1 and lr > 0")
    for s, img in zip(samples, images, strict=True):
        if (s.image_positions.numel() > 0) != (img is not None):
            raise ValueError("a sample has image tokens but no image, or an image but no image tokens")
    if cfg.objective == "siu":
        ce_w, kl_w, use_token_mask = cfg.alpha, cfg.beta, True
    else:
        ce_w, kl_w, use_token_mask = LOSSES[cfg.objective]
    loss_fn = FusedMaskedKLLoss(
        kl_weight=kl_w, ce_weight=ce_w, temperature=cfg.temperature, renormalize=cfg.renormalize,
        backend=cfg.backend,
    )  # fmt: skip

    t0 = time.perf_counter()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    # Eval mode throughout: a few steps on one image must not re-estimate normalisation statistics
    # (BatchNorm in a vision encoder) from it, and dropout would only add noise to so few steps.
    student = copy.deepcopy(model).eval()
    lora = None
    if cfg.lora_rank is not None:
        lora = _add_lora(student, cfg)
        params = [p for n, p in student.named_parameters() if "lora_" in n]
        params += [p for n, p in student.named_parameters() if cfg.train != "all" and cfg.train in n]
    else:
        params = [p for n, p in student.named_parameters() if cfg.train == "all" or cfg.train in n]
    if not params:
        raise ValueError(f"no parameter name contains {cfg.train!r}")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    log: list[dict] = []
    with progress_bar(cfg.steps, cfg.objective, progress) as advance:
        for step in range(cfg.steps):
            if len(order) < cfg.batch_size:
                order += torch.randperm(len(samples), generator=gen).tolist()
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            batch = collate([samples[i] for i in idx], pad_id)
            imgs = [images[i] for i in idx if images[i] is not None]
            pixel_values = torch.stack(imgs) if imgs else None
            h = _hidden(student, batch, pixel_values)
            if kl_w != 0:
                with torch.no_grad():
                    h_ref = _hidden(reference, batch, pixel_values)
            else:  # no KL term: the reference is not run
                h_ref = h.detach()
            token_mask = batch["token_mask"] if use_token_mask else batch["labels"] != IGNORE_INDEX
            loss = loss_fn(
                h, student.lm_head, h_ref, reference.lm_head, token_mask=token_mask,
                vocab_mask=vocab_mask if cfg.objective == "siu" else None, labels=batch["labels"],
            )  # fmt: skip
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"{cfg.objective}: the loss became {float(loss.detach())} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            log.append({"step": step, "loss": value})
            advance(1, f"loss {value:.3f}")
    if lora is not None:
        student = lora.merge_and_unload()
    student.requires_grad_(True)
    return FinetuneResult(student, time.perf_counter() - t0, log)
