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

Data parallelism (``FinetuneConfig.distributed = "ddp"`` or ``"fsdp"``, every rank of an
initialised ``torch.distributed`` process group calling :func:`finetune_llm` with the same model,
samples and config): every rank draws the same global batch of ``batch_size`` samples per step and
takes its part of it, DistributedSampler-style (rank ``r`` of ``W``: samples ``r, r + W, ...`` of
the batch). One step's computation (the student's hidden states, the reference's under no_grad,
the fused loss on both LM heads) is the forward of one module holding the student (and, under
FSDP2, the reference), which is what ``DistributedDataParallel`` / ``fully_shard`` wrap, so DDP's
gradient hooks see the loss and FSDP2 gathers the LM heads (in the root unit) for the loss. Under
FSDP2 the units are the language model's decoder layers (of the student and of the reference);
everything else, vision tower and LM heads included, is the root unit.

Normalisation: a step's loss is ``ce_weight * (CE summed over the batch's answer tokens) / (their
number) + kl_weight * (KL summed over its masked tokens) / (their number)``, and the counts are
those of the *global* batch: each rank evaluates the fused loss with ``reduction="sum"`` and the
weights divided by the global counts (known on every rank, which holds the whole batch), times
``W``, and DDP / FSDP2 average the gradients over the ``W`` ranks. The gradient is then the
single-process gradient of the whole batch, up to float rounding, for any split (shards of unequal
sizes or token counts; a rank left without a sample when ``batch_size < W`` contributes zero).
Parameters that a rank's shard does not reach (the vision tower and projector when the shard has
no image) get an exactly-zero gradient term on that rank, so every rank reduces the same set of
gradients; a parameter reached on no rank has its gradient set back to None before the Adam step,
as in one process, so Adam skips it there too.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unlearn_ext._progress import progress_bar
from unlearn_ext.losses import FusedMaskedKLLoss
from unlearn_ext.siu.masks import IGNORE_INDEX, EncodedSample

__all__ = ["LOSSES", "FinetuneConfig", "FinetuneResult", "collate", "finetune_llm"]

#: (ce_weight, kl_weight, use the token mask) of each objective; SIU's come from the config.
LOSSES = {"siu": None, "ga": (-1.0, 0.0, False), "ga_kl": (-1.0, 1.0, False), "po": (1.0, 0.0, False)}
#: Values of ``FinetuneConfig.distributed``.
DISTRIBUTED = (None, "ddp", "fsdp")


@dataclass(kw_only=True)
class FinetuneConfig:
    """Hyperparameters of the few-step fine-tuning.

    ``alpha`` / ``beta``: SIU's CE and DMK weights (0.9 / 0.75, the values the re-implementation
    cites from the paper). ``steps`` optimiser steps of ``batch_size`` samples (cycling through the
    data in a seeded order), Adam at ``lr``. ``temperature`` and ``renormalize`` go to the KL.
    ``seed`` fixes the batch order and LoRA's initialisation.
    ``train`` names the parameters to train: ``"all"``, or a substring that a parameter's name must
    contain (e.g. ``"multi_modal_projector"``); everything else is frozen. ``lora_rank``: train
    LoRA adapters (through ``peft``) on the ``lora_targets`` linear layers instead, plus the
    parameters named by ``train`` when it is not ``"all"``; the adapters are merged into the
    returned model, so it has the input's architecture.

    ``distributed``: None (one process, the default), or ``"ddp"`` / ``"fsdp"`` to train data-parallel
    over the initialised process group (``DistributedDataParallel`` or FSDP2's ``fully_shard``); every
    rank must call :func:`finetune_llm` with the same arguments. See the module docstring.
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
    distributed: str | None = None


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
    # The adapters' random initialisation comes from cfg.seed, like the batch order (not from the
    # caller's global RNG state, which would make a run depend on what ran before it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LoraModel(model, config, "default")


def _trainable(student: nn.Module, cfg: FinetuneConfig):
    """Add LoRA adapters when ``cfg.lora_rank`` and freeze all but the trained parameters (in place).
    Returns ``(peft LoraModel or None, [trained parameters])``."""
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
    return lora, params


def finetune_llm(
    model: nn.Module,
    samples: Sequence[EncodedSample],
    *,
    images: Sequence[torch.Tensor | None],
    vocab_mask: torch.Tensor | None,
    pad_id: int,
    config: FinetuneConfig | None = None,
    progress: bool = False,
    group: Any = None,
    ddp_options: Mapping[str, Any] | None = None,
    fsdp_options: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` for ``config.steps`` steps with ``config.objective``'s loss.

    Args:
        samples: encoded samples (:func:`unlearn_ext.siu.encode_sample`).
        images: per sample, its image as ``pixel_values`` for one image (``[C, H, W]``) or None.
        vocab_mask: bool ``[V]``, SIU's vocabulary mask (ignored by the baselines).
        pad_id: the padding token id.
        group: with ``config.distributed``: the process group (the default group when None).
        ddp_options, fsdp_options: keyword arguments of ``DistributedDataParallel`` / of
            ``fully_shard`` (e.g. ``mp_policy``), with ``config.distributed`` ``"ddp"`` / ``"fsdp"``.

    Returns: the trained copy (LoRA merged; with ``config.distributed``, a plain unwrapped,
    unsharded module with the same weights on every rank), the seconds, and one ``{"step",
    "loss"}`` per step (the global batch's loss, the same on every rank).

    Raises:
        ValueError: bad arguments. RuntimeError: ``config.distributed`` without a process group.
        FloatingPointError: the loss became NaN or inf (on every rank at once when distributed).
    """
    cfg = config or FinetuneConfig()
    if cfg.objective not in LOSSES:
        raise ValueError(f"objective must be one of {sorted(LOSSES)}, got {cfg.objective!r}")
    if cfg.distributed not in DISTRIBUTED:
        raise ValueError(f"distributed must be one of {DISTRIBUTED}, got {cfg.distributed!r}")
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
    if cfg.distributed is not None:
        return _finetune_distributed(
            model, samples, images, vocab_mask, pad_id, cfg, progress, (ce_w, kl_w, use_token_mask),
            group=group, options=(ddp_options if cfg.distributed == "ddp" else fsdp_options) or {},
        )  # fmt: skip
    loss_fn = FusedMaskedKLLoss(
        kl_weight=kl_w, ce_weight=ce_w, temperature=cfg.temperature, renormalize=cfg.renormalize,
        backend=cfg.backend,
    )  # fmt: skip

    t0 = time.perf_counter()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    # Eval mode throughout: a few steps on one image must not re-estimate normalisation statistics
    # (BatchNorm in a vision encoder) from it, and dropout would only add noise to so few steps.
    student = copy.deepcopy(model).eval()
    lora, params = _trainable(student, cfg)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    device = next(student.parameters()).device  # batches go where the model is (CPU or GPU)
    if vocab_mask is not None:
        vocab_mask = vocab_mask.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    log: list[dict] = []
    with progress_bar(cfg.steps, cfg.objective, progress) as advance:
        for step in range(cfg.steps):
            if len(order) < cfg.batch_size:
                order += torch.randperm(len(samples), generator=gen).tolist()
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            batch = {k: v.to(device) for k, v in collate([samples[i] for i in idx], pad_id).items()}
            imgs = [images[i] for i in idx if images[i] is not None]
            pixel_values = torch.stack(imgs).to(device) if imgs else None
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
            if loss.requires_grad:  # else no trained parameter is reached (train="multi_modal_projector", no image)
                loss.backward()
            opt.step()
            value = float(loss.detach())
            log.append({"step": step, "loss": value})
            advance(1, f"loss {value:.3f}")
    if lora is not None:
        student = lora.merge_and_unload()
    student.requires_grad_(True)
    return FinetuneResult(student, time.perf_counter() - t0, log)


# --------------------------------------------------------------------------------------------
# Data-parallel training (FinetuneConfig.distributed)
# --------------------------------------------------------------------------------------------


def _reached_leaves(t: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor that ``t``'s autograd graph accumulates a gradient into."""
    out: set[int] = set()
    seen = set()
    stack = [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes
        if var is not None:
            out.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return out


def _output_requires_grad(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and not out.requires_grad:
        return out.requires_grad_(True)
    return out


class _TrainStep(nn.Module):
    """One step's computation as one forward: what DDP / FSDP2 wrap (see the module docstring).

    ``student`` is a submodule; ``reference`` (None when the objective has no KL term) is one only
    when ``register_reference`` (FSDP2: then it is sharded too, its frozen parameters taking no
    gradient); under DDP it is a plain attribute, a full frozen copy on every rank that DDP neither
    broadcasts nor tracks. ``checked``: names (in ``student``) of the trainable parameters whose use
    can depend on the data (all of them under DDP; those of the FSDP2 root unit): the forward
    returns, per name, whether this rank's loss reached it, and adds an exactly-zero term for those
    it did not reach, so that every rank's backward produces (and reduces) the same gradients.
    """

    def __init__(
        self, student: nn.Module, reference: nn.Module | None, *, register_reference: bool, checked: list[str],
        loss_options: dict,
    ) -> None:  # fmt: skip
        super().__init__()
        self.student = student
        if register_reference:
            self.reference = reference
        else:
            object.__setattr__(self, "_plain_reference", reference)
        self.checked = checked
        self.loss_options = loss_options

    def _reference(self) -> nn.Module | None:
        return self._modules.get("reference", getattr(self, "_plain_reference", None))

    def forward(
        self, input_ids, attention_mask, labels, token_mask, pixel_values, vocab_mask, ce_weight, kl_weight
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        h = _hidden(self.student, batch, pixel_values)
        reference = self._reference()
        if reference is not None:
            with torch.no_grad():
                h_ref = _hidden(reference, batch, pixel_values)
            ref_head = reference.lm_head
        else:  # no KL term: no reference (its weight in the loss is 0)
            h_ref, ref_head = h.detach(), self.student.lm_head
        loss_fn = FusedMaskedKLLoss(kl_weight=kl_weight, ce_weight=ce_weight, reduction="sum", **self.loss_options)
        loss = loss_fn(
            h, self.student.lm_head, h_ref, ref_head, token_mask=token_mask, vocab_mask=vocab_mask, labels=labels
        )
        # Inside the forward the parameters are the ones autograd sees (FSDP2: the root's unsharded ones).
        params = [self.student.get_parameter(n) for n in self.checked]
        reached = _reached_leaves(loss) if params else set()
        used = [id(p) in reached for p in params]
        missing = [p.reshape(-1)[:1].sum() for p, u in zip(params, used, strict=True) if not u]
        if missing:
            loss = loss + torch.stack(missing).sum() * 0.0
        return loss, torch.tensor(used, dtype=torch.float64, device=loss.device)


def _finetune_distributed(
    model: nn.Module,
    samples: Sequence[EncodedSample],
    images: Sequence[torch.Tensor | None],
    vocab_mask: torch.Tensor | None,
    pad_id: int,
    cfg: FinetuneConfig,
    progress: bool,
    weights: tuple[float, float, bool],
    *,
    group: Any,
    options: Mapping[str, Any],
) -> FinetuneResult:
    """:func:`finetune_llm` under DDP or FSDP2 (the arguments are already checked)."""
    import torch.distributed as dist

    from unlearn_ext import distributed as ud
    from unlearn_ext.methods._base import model_device

    strategy = cfg.distributed
    ud._require_group(f"finetune_llm with distributed={strategy!r}", group)
    ce_w, kl_w, use_token_mask = weights
    r, w = ud.rank(group), ud.world_size(group)
    device = model_device(model)
    t0 = time.perf_counter()
    reference = copy.deepcopy(model).eval().requires_grad_(False) if kl_w != 0 else None
    student = copy.deepcopy(model).eval()
    lora, params = _trainable(student, cfg)
    name_of = {id(p): n for n, p in student.named_parameters()}
    names = [name_of[id(p)] for p in params]
    loss_options = {"temperature": cfg.temperature, "renormalize": cfg.renormalize, "backend": cfg.backend}

    template = None
    if strategy == "ddp":
        step_module = _TrainStep(
            student, reference, register_reference=False, checked=list(dict.fromkeys(names)), loss_options=loss_options
        )
        wrapped = ud._wrap_ddp(step_module, group, options)  # DDP starts every rank from rank 0's student
    else:
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # rank 0's student (LoRA's random initialisation included)
            ud.broadcast_buckets([*student.parameters(), *student.buffers()], group=group)
        template = copy.deepcopy(student).to(device="meta")
        units = ud._decoder_layers(student) + (ud._decoder_layers(reference) if reference is not None else [])
        # A frozen token embedding (LoRA) gives the first decoder layer an input that needs no
        # gradient on a rank whose shard has no image, and FSDP2 then reduces that layer's gradients
        # late, out of order with the ranks whose input does: make the input need one everywhere.
        for m in student.modules():
            if any(isinstance(c, nn.ModuleList) for c in m.children()):
                for c in m.children():
                    if isinstance(c, nn.Embedding):
                        c.register_forward_hook(_output_requires_grad)
        in_units = {id(p) for u in units for p in u.parameters()}
        checked = [n for n in dict.fromkeys(names) if id(student.get_parameter(n)) not in in_units]
        step_module = _TrainStep(
            student, reference, register_reference=True, checked=checked, loss_options=loss_options
        )
        mesh = ud._fsdp_mesh(group, device)
        for u in units:
            fully_shard(u, mesh=mesh, **options)
        wrapped = fully_shard(step_module, mesh=mesh, **options)
        params = [student.get_parameter(n) for n in names]  # the sharded parameters now
    checked_params = [student.get_parameter(n) for n in step_module.checked]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    vm = vocab_mask.to(device) if vocab_mask is not None and cfg.objective == "siu" else None
    order: list[int] = []
    log: list[dict] = []
    with progress_bar(cfg.steps, cfg.objective, progress and r == 0) as advance:
        for step in range(cfg.steps):
            if len(order) < cfg.batch_size:
                order += torch.randperm(len(samples), generator=gen).tolist()
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            # The global batch's token counts normalise both terms on every rank.
            whole = collate([samples[i] for i in idx], pad_id)
            kl_tokens = whole["token_mask"] if use_token_mask else whole["labels"] != IGNORE_INDEX
            n_ce = int((whole["labels"][:, 1:] != IGNORE_INDEX).sum())
            n_kl = int(kl_tokens[:, 1:].sum())
            mine = idx[r::w]
            share = float(w) if mine else 0.0  # no sample here: a zero-weight step on one, in lockstep
            mine = mine or idx[:1]
            batch = {k: v.to(device) for k, v in collate([samples[i] for i in mine], pad_id).items()}
            imgs = [images[i] for i in mine if images[i] is not None]
            pixel_values = torch.stack(imgs).to(device) if imgs else None
            token_mask = batch["token_mask"] if use_token_mask else batch["labels"] != IGNORE_INDEX
            loss, used = wrapped(
                batch["input_ids"], batch["attention_mask"], batch["labels"], token_mask, pixel_values, vm,
                ce_w * share / max(n_ce, 1), kl_w * share / max(n_kl, 1),
            )  # fmt: skip
            # One collective: the global loss (each rank's share / W) and, per checked parameter,
            # how many ranks reached it.
            status = torch.cat([(loss.detach() / w).reshape(1).to(torch.float64), used * (share > 0)])
            dist.all_reduce(status, group=group)
            value = float(status[0])
            if not torch.isfinite(status[0]):
                raise FloatingPointError(f"{cfg.objective}: the loss became {value} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, n in zip(checked_params, status[1:].tolist(), strict=True):
                if n == 0:  # reached on no rank: no gradient, as in one process (Adam skips it)
                    p.grad = None
            opt.step()
            log.append({"step": step, "loss": value})
            advance(1, f"loss {value:.3f}")
    if strategy == "ddp":
        del wrapped, step_module  # DDP's hooks go with its reducer
        out = student
    else:
        out = ud._gathered_copy(student, template, device)  # a collective: the full weights on every rank
    if lora is not None:
        lora.model = out  # merge the adapters of the plain module (for FSDP2, the gathered copy)
        out = lora.merge_and_unload()
    out.requires_grad_(True)
    return FinetuneResult(out.eval(), time.perf_counter() - t0, log)
