"""The one protocol every unlearning method follows (DESIGN.md 5), the registry, and shared helpers.

A method is a keyword-only dataclass whose fields are its documented hyperparameters (plus ``seed``,
``inplace`` and ``progress``); ``.unlearn(model, forget, retain)`` returns the unlearned model and
fills ``.log``. ``forget`` / ``retain`` are re-iterable ``(inputs, targets)`` batches (a
``DataLoader``, :class:`unlearn_ext.data.TensorBatches`, a list); a one-shot iterator is materialised.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

_REGISTRY: dict[str, type[Unlearner]] = {}

#: Methods specified in DESIGN.md 5 whose issue has not landed yet.
PLANNED: dict[str, str] = {}
#: Methods of another setting: forgetting a visual concept from a (multimodal) LLM, not classes or
#: samples from a classifier.
CONCEPT_SETTING = {
    name: f"{name!r} forgets a visual concept from a (multimodal) LLM, not classes or samples from a "
    f"classifier: use unlearn_ext.siu.unlearn_concept(model, tokenizer, request, method={name!r}, ...) "
    "or the CLI's `unlearn mmu`"
    for name in ("siu", "ga", "ga_kl", "po")
}


def register(cls: type[Unlearner]) -> type[Unlearner]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"bad or duplicate method name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


#: Report order: the reference, the paper's method, then the baselines roughly by family.
_ORDER = (
    "retrain",
    "mnemonic",
    "opc",
    "muso",
    "finetune",
    "neggrad",
    "neggrad_plus",
    "random_label",
    "fisher_forgetting",
    "ssd",
    "salun",
    "scrub",
    "bad_teacher",
)


def available_methods() -> tuple[str, ...]:
    """Names of the methods implemented in this build, in report order."""
    rank = {n: i for i, n in enumerate(_ORDER)}
    return tuple(sorted(_REGISTRY, key=lambda n: rank.get(n, len(rank))))


def method_class(name: str) -> type[Unlearner]:
    """The class of method ``name``. Raises ValueError (unknown, or of the LLM concept setting) or
    NotImplementedError (planned)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in PLANNED:
        raise NotImplementedError(f"method {name!r} is not implemented yet: {PLANNED[name]}")
    if name in CONCEPT_SETTING:
        raise ValueError(CONCEPT_SETTING[name])
    raise ValueError(f"unknown unlearning method {name!r}; available: {', '.join(available_methods())}")


def get_method(name: str, **hparams: Any) -> Unlearner:
    """Instantiate method ``name`` with ``hparams``; an unknown hyperparameter raises a ValueError naming it."""
    cls = method_class(name)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no hyperparameter(s) {unknown}; it takes {sorted(known)}")
    return cls(**hparams)


@dataclass
class UnlearnResult:
    """What :func:`unlearn_ext.unlearn` returns: the model, wall time (seconds), the method's log."""

    model: nn.Module
    seconds: float
    log: list[dict]
    method: str
    hparams: dict


def unlearn(
    model: nn.Module, method: str, *, forget: Batches, retain: Batches | None = None, **hparams: Any
) -> UnlearnResult:
    """Run unlearning method ``method`` on ``model``: forget ``forget``, keep ``retain``.

    Returns an :class:`UnlearnResult`; the input model is unchanged unless ``inplace=True``.
    """
    m = get_method(method, **hparams)
    t0 = time.perf_counter()
    out = m.unlearn(model, forget, retain)
    return UnlearnResult(out, time.perf_counter() - t0, m.log, method, m.hparams())


def _reiterable(batches: Batches | None, what: str) -> Batches | None:
    if batches is None:
        return None
    try:
        it = iter(batches)
    except TypeError as e:
        raise TypeError(f"{what} must be an iterable of (inputs, targets) batches, got {type(batches).__name__}") from e
    if it is batches:  # a one-shot iterator or generator: keep its batches
        return list(it)
    return batches


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# Models trained data-parallel by unlearn_ext.distributed.unlearn_distributed whose copies need more
# than copy.deepcopy (FSDP2 modules refuse it): model -> function returning a plain full copy.
_COPIERS: weakref.WeakKeyDictionary[nn.Module, Callable[[], nn.Module]] = weakref.WeakKeyDictionary()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper trains (``model.module``); ``model`` otherwise."""
    ddp = getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", None)
    return model.module if ddp is not None and isinstance(model, ddp) else model


def model_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with its current weights (for teachers and reference models).

    Same as ``copy.deepcopy(model)`` for an ordinary module. Under data-parallel training
    (:func:`unlearn_ext.distributed.unlearn_distributed`) it is a plain, unwrapped, unsharded module
    on every rank: the ``.module`` of a ``DistributedDataParallel`` wrapper, or, for an FSDP2 model,
    a module with the full weights gathered from the shards (a collective: every rank calls it at the
    same point, as every rank runs the same method code).
    """
    copier = _COPIERS.get(model)
    if copier is not None:
        return copier()
    return copy.deepcopy(unwrap_model(model))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of a sharded ``DTensor`` (FSDP2 parameters; a collective)."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


@dataclass(kw_only=True)
class Unlearner:
    """Base of every method. Subclasses set ``name``, add hyperparameter fields and implement ``_unlearn``.

    Attributes:
        seed: seeds every random choice of the method (shuffles, noise, random labels).
        inplace: modify the given model instead of a copy.
        progress: show progress bars.
    """

    name: ClassVar[str] = ""
    requires_retain: ClassVar[bool] = True
    requires_forget_data: ClassVar[bool] = True

    seed: int = 0
    inplace: bool = False
    progress: bool = False
    log: list[dict] = field(default_factory=list, init=False, repr=False, compare=False)

    def hparams(self) -> dict:
        """The method's hyperparameters (tensors shown by shape)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.init and f.name not in ("inplace", "progress"):
                v = getattr(self, f.name)
                out[f.name] = f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else v
        return out

    def unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None = None) -> nn.Module:
        """Return the unlearned model (a copy unless ``inplace``), in eval mode."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._check_common_hparams()
        forget = _reiterable(forget, "forget")
        retain = _reiterable(retain, "retain")
        if forget is None:
            raise ValueError(f"{self.name}: the forget set is required")
        if self.requires_retain and retain is None:
            raise ValueError(f"{self.name} needs the retain set: pass retain=...")
        self.num_classes = check_batches(model, forget, "forget")
        if retain is not None:
            n_retain = check_batches(model, retain, "retain")
            self.num_classes = max(self.num_classes, n_retain)
        self.log = []
        work = model if self.inplace else copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._unlearn(work, forget, retain)
        for p in work.parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError(
                    f"{self.name} produced non-finite parameters (the hyperparameters diverged): {self.hparams()}"
                )
        return work.eval()

    def _unlearn(self, model: nn.Module, forget: Batches, retain: Batches | None) -> None:
        raise NotImplementedError

    def _check_common_hparams(self) -> None:
        """The hyperparameters most methods share, checked once for all: ``lr`` a positive finite
        number, ``epochs`` / ``steps`` positive integers (``None`` where a method allows it)."""
        import math

        for f in dataclasses.fields(self):
            if not f.init or f.name not in ("lr", "epochs", "steps"):
                continue
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "lr":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                    raise ValueError(f"{self.name}: lr must be a positive finite number, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.name}: {f.name} must be a positive integer, got {v!r}")


def check_batches(model: nn.Module, batches: Batches, what: str) -> int:
    """Validate ``(inputs, targets)`` batches against ``model``; returns the model's number of classes.

    Raises ValueError naming ``what`` for: no samples, a batch that is not a pair, non-integer or
    non-1-D targets, mismatched lengths, NaN/inf inputs, inputs the model cannot take (the first
    non-empty batch is run through the model; every later batch must have the same per-sample shape),
    targets out of the model's class range.
    """
    device = model_device(model)
    n, num_classes, sample_shape = 0, None, None
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"{what} batch {i} must be an (inputs, targets) pair")
        x, y = batch
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
            raise ValueError(f"{what} batch {i}: targets must be a 1-D integer tensor of class ids")
        if not isinstance(x, torch.Tensor) or x.shape[0] != y.shape[0]:
            raise ValueError(f"{what} batch {i}: inputs and targets must have the same batch size")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{what} batch {i}: inputs contain NaN or inf")
        if sample_shape is not None and y.numel() and tuple(x.shape[1:]) != sample_shape:
            raise ValueError(
                f"{what} batch {i}: inputs of shape {tuple(x.shape[1:])} (per sample), but earlier {what} "
                f"batches have shape {sample_shape}"
            )
        if sample_shape is None and y.numel():
            sample_shape = tuple(x.shape[1:])
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = model(x[:2].to(device))
            except (RuntimeError, ValueError) as e:
                raise ValueError(
                    f"the model cannot take the {what} inputs of shape {tuple(x.shape[1:])} (per sample): {e}"
                ) from e
            finally:
                model.train(was_training)
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ValueError(f"the model must return [B, num_classes] logits, got {getattr(out, 'shape', out)}")
            num_classes = out.shape[1]
        if y.numel() and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
            raise ValueError(f"{what} batch {i}: targets outside the model's classes 0..{num_classes - 1}")
        n += y.shape[0]
    if n == 0:
        raise ValueError(f"the {what} set is empty")
    return num_classes


def cycle(batches: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless iteration over re-iterable ``batches``."""
    while True:
        yield from batches


def labels_of(batches: Batches) -> torch.Tensor:
    """All targets of ``batches``, concatenated (int64)."""
    return torch.cat([y.reshape(-1).long().cpu() for _, y in batches])


def whole_forgotten_classes(forget: Batches, retain: Batches | None) -> list[int]:
    """Classes that appear in ``forget`` and never in ``retain`` (class forgetting)."""
    f = set(labels_of(forget).tolist())
    r = set(labels_of(retain).tolist()) if retain is not None else set()
    return sorted(f - r)


def random_wrong_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn uniformly from the classes other than ``y`` (per sample)."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator).to(y.device)
    return (y + shift) % num_classes


def interleave(*named: tuple[str, Batches], generator: torch.Generator) -> Iterator[tuple[str, Any]]:
    """All batches of several sources in one random order: yields ``(source_name, batch)``."""
    items = list(itertools.chain.from_iterable(((name, b) for b in batches) for name, batches in named))
    for i in torch.randperm(len(items), generator=generator).tolist():
        yield items[i]


def steps_per_epoch(*batches: Batches | None) -> int | None:
    try:
        return sum(len(b) for b in batches if b is not None)
    except TypeError:
        return None
