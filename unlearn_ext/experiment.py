"""One unlearning experiment on bundled data: train (or load from cache) the original model with
mnemonic codes and the retrained reference, run methods, evaluate everything.

Used by ``unlearn demo``, ``unlearn run`` and ``benchmarks/bench_methods.py``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import unlearn_ext
from unlearn_ext._cache import cache_path
from unlearn_ext._progress import progress_bar
from unlearn_ext.data import ForgetSplit, load_dataset, make_forget_split
from unlearn_ext.eval import deep_forgetting_metrics, evaluate, take_samples
from unlearn_ext.methods import available_methods, get_method
from unlearn_ext.models import DEFAULT_TRAIN_CONFIGS, TrainConfig, load_checkpoint, save_checkpoint, train_classifier

CLASS_KEYS = ("forget_acc", "retain_acc", "test_acc", "forget_class_test_acc", "retain_class_test_acc", "mia")


@dataclass
class ExperimentSpec:
    """What to run. ``classes`` xor ``fraction`` selects the forget set (see :func:`make_forget_split`)."""

    dataset: str = "mnist"
    arch: str = "mlp"
    classes: tuple[int, ...] | None = (0,)
    fraction: float | None = None
    seed: int = 0
    methods: Sequence[str] = ()
    hparams: dict[str, dict] = field(default_factory=dict)
    train_config: TrainConfig | None = None
    batch_size: int = 128
    fresh: bool = False
    use_cache: bool = True
    deep: bool = True
    """Add the deep-forgetting metrics (FM and fine-tuning recovery attacks, CKA, linear probe) to every row."""
    deep_options: dict = field(default_factory=dict)
    """Options of :func:`unlearn_ext.eval.deep_forgetting_metrics` (e.g. ``inversion_samples``)."""
    strategy: str = "ddp"
    """Under torchrun (an initialised process group with more than one rank): ``"ddp"`` or ``"fsdp"``
    (FSDP2) for the fine-tuning methods; one-shot methods run whole on every rank. Unused otherwise."""


def _versions() -> dict:
    import platform

    return {"unlearn_ext": unlearn_ext.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _trained(
    kind: str, spec: ExperimentSpec, split: ForgetSplit, idx: torch.Tensor | None, progress: bool
) -> tuple[nn.Module, float, bool]:
    """:func:`_trained_here`; under torchrun rank 0 trains (or loads) first and the other ranks then
    load its cached model, so one model is trained once and every rank starts from the same weights."""
    from unlearn_ext.distributed import is_distributed, is_main_process

    if not (is_distributed() and spec.use_cache):
        return _trained_here(kind, spec, split, idx, progress)
    import torch.distributed as dist

    result = _trained_here(kind, spec, split, idx, progress) if is_main_process() else None
    dist.barrier()
    return result if result is not None else _trained_here(kind, spec, split, idx, False)


def _trained_here(
    kind: str, spec: ExperimentSpec, split: ForgetSplit, idx: torch.Tensor | None, progress: bool
) -> tuple[nn.Module, float, bool]:
    """Train (or load from the cache) a model on the training samples ``idx`` (None: all).
    Returns ``(model, training seconds as measured when it was trained, loaded_from_cache)``."""
    ds = split.dataset
    config = spec.train_config or DEFAULT_TRAIN_CONFIGS[spec.arch]
    key = {
        "kind": kind,
        "dataset": ds.describe(),
        "arch": spec.arch,
        "train": config.to_dict(),
        "seed": spec.seed,
        "forget": split.describe() if kind == "retrain" else None,
        "torch": torch.__version__.split("+")[0],
        "format": 2,  # 2: models carry their initial head (MUSO's w0)
    }
    path = cache_path(kind, key)
    if spec.use_cache and not spec.fresh and path.is_file():
        try:
            model, record = load_checkpoint(path)
            return model, float(record["metadata"]["train_seconds"]), True
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"ignoring an unreadable cached model {path} ({e}); training again", stacklevel=2)
    x, y = (ds.x_train, ds.y_train) if idx is None else (ds.x_train[idx], ds.y_train[idx])
    t0 = time.perf_counter()
    model = train_classifier(
        spec.arch,
        x,
        y,
        num_classes=ds.num_classes,
        config=config,
        seed=spec.seed if kind == "original" else spec.seed + 1000,
        progress=progress,
        description=f"train {kind} {spec.arch}",
    )
    seconds = time.perf_counter() - t0
    if spec.use_cache:
        save_checkpoint(model, path, metadata={"train_seconds": seconds, "key": key})
    return model, seconds, False


def _run_method(method, original: nn.Module, batches: dict, strategy: str) -> nn.Module:
    """``method.unlearn`` on one process; under torchrun the fine-tuning methods run data-parallel
    (:func:`unlearn_ext.distributed.unlearn_distributed`, each rank its shard of every batch)."""
    from unlearn_ext.distributed import DDP_METHODS, is_distributed, unlearn_distributed

    if is_distributed() and method.name in DDP_METHODS:
        return unlearn_distributed(
            original, method, forget=batches["forget"], retain=batches["retain"], strategy=strategy
        ).model
    return method.unlearn(original, batches["forget"], batches["retain"])


def run_experiment(spec: ExperimentSpec, *, progress: bool = True) -> dict:
    """Run ``spec``; returns the report dict (DESIGN.md 5 shape, accuracies in [0, 1])."""
    if spec.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {spec.strategy!r}")
    methods = list(spec.methods) or [m for m in available_methods() if m != "retrain"]
    for name in spec.hparams:
        if name not in methods:
            raise ValueError(f"hyperparameters given for {name!r}, which is not among the methods run: {methods}")
    unlearners = {name: get_method(name, seed=spec.seed, **spec.hparams.get(name, {})) for name in methods}
    ds = load_dataset(spec.dataset, seed=spec.seed)
    split = make_forget_split(ds, classes=spec.classes, fraction=spec.fraction, seed=spec.seed)
    batches = split.batches(batch_size=spec.batch_size, seed=spec.seed)
    eval_splits = {k: v for k, v in batches.items()}

    original, original_seconds, original_cached = _trained("original", spec, split, None, progress)
    retrained, retrain_seconds, retrain_cached = _trained("retrain", spec, split, split.retain_idx, progress)

    options: dict | None = None
    if spec.deep:
        options = dict(spec.deep_options)
        if "finetune_batches" not in options and options.get("finetune_steps", 1) > 0:
            # One retain subset for every row, so the fine-tuning attack is the same for all.
            n = options.pop("finetune_samples", 256)
            options["finetune_batches"] = take_samples(batches["retain"], n, seed=spec.seed)

    def deep_for(model: nn.Module) -> dict:
        """evaluate()'s deep-forgetting arguments for ``model`` (none when ``spec.deep`` is off)."""
        if options is None:
            return {}
        return {"deep": True, "deep_options": {**options, "retrained": None if model is retrained else retrained}}

    rows: dict[str, dict] = {}
    retrained_metrics = evaluate(retrained, eval_splits, seed=spec.seed)
    deep_retrain = {}
    if options is not None:  # its accuracies and MIA are in retrained_metrics already
        deep_retrain = deep_forgetting_metrics(retrained, original, eval_splits, seed=spec.seed, **options)
    rows["original"] = {
        **evaluate(
            original, eval_splits, original=original, retrained=retrained_metrics, seed=spec.seed, **deep_for(original)
        ),
        "seconds": original_seconds,  # training time of the original model, not an unlearning time
        "speedup_vs_retrain": None,  # not an unlearning method: nothing was unlearned
        "cached": original_cached,
    }
    rows["retrain"] = {
        **deep_retrain,
        **retrained_metrics,
        "avg_gap": 0.0,
        "seconds": retrain_seconds,
        "speedup_vs_retrain": 1.0,
        "cached": retrain_cached,
    }
    with progress_bar(len(unlearners), "methods", progress) as advance:
        for name, method in unlearners.items():
            method.progress = progress
            t0 = time.perf_counter()
            error = None
            try:
                model = _run_method(method, original, batches, spec.strategy)
            except (ValueError, FloatingPointError, NotImplementedError) as e:
                error = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t0
            if error is not None:
                rows[name] = {
                    "error": error,
                    "seconds": seconds,
                    "speedup_vs_retrain": None,
                    "hparams": method.hparams(),
                }
            else:
                rows[name] = {
                    **evaluate(
                        model,
                        eval_splits,
                        original=original,
                        retrained=retrained_metrics,
                        seed=spec.seed,
                        **deep_for(model),
                    ),  # fmt: skip
                    "seconds": seconds,
                    "speedup_vs_retrain": retrain_seconds / max(seconds, 1e-9),
                    "hparams": method.hparams(),
                }
            advance(1, name)
    return {
        "dataset": ds.describe(),
        "model": {**original.config, "train_config": (spec.train_config or DEFAULT_TRAIN_CONFIGS[spec.arch]).to_dict()},
        "forget": split.describe(),
        "seed": spec.seed,
        "versions": _versions(),
        "threads": torch.get_num_threads(),
        "world_size": _world_size(),
        "strategy": spec.strategy if _world_size() > 1 else None,
        "methods": rows,
    }


def _world_size() -> int:
    from unlearn_ext.distributed import world_size

    return world_size()
