"""The classifier side of ``unlearn apply``: class and sample requests on a checkpoint written by
:func:`unlearn_ext.models.save_checkpoint`.

A job knows one kind of checkpoint: it loads it (checking it against the requests and building
what the method needs, before anything is written), evaluates a model, unlearns, checks the
gates and serialises the result. :mod:`unlearn_ext.production.apply` runs the rest (lock, audit,
idempotency, atomic publication) the same way for every kind.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unlearn_ext.production.request import MergedRequest, RequestError

#: Metrics recorded before and after (fractions in [0, 1]).
RECORDED_METRICS = (
    "forget_acc",
    "retain_acc",
    "test_acc",
    "forget_class_test_acc",
    "retain_class_test_acc",
    "mia",
)


def gate_results(merged: MergedRequest, rules: dict, before: dict, after: dict) -> dict[str, dict]:
    """``{gate: {"metric", "value", "limit", "pass"}}`` for each gate of ``merged``; ``rules`` maps a
    gate to ``(metric description, value(before, after))``."""
    out = {}
    for name, limit in merged.gates.items():
        metric, value = rules[name]
        v = float(value(before, after))
        out[name] = {"metric": metric, "value": v, "limit": limit, "pass": bool(v <= limit + 1e-12)}
    return out


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models have the same state_dict keys and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def check_expected_config(config: dict, expected: dict, source: str) -> None:
    """Raise a RequestError when a request's ``model`` expectations differ from the checkpoint config."""
    for key, want in expected.items():
        if key not in config:
            raise RequestError(f"the request expects model {key}={want!r}, but {source}'s config has no {key!r}")
        got = config[key]
        if (list(got) if isinstance(got, tuple) else got) != want:
            raise RequestError(f"the request expects model {key}={want!r}, but {source} has {key}={got!r}")


class ClassifierJob:
    """Class or sample requests on a classifier checkpoint (see the module doc)."""

    def __init__(
        self, merged: MergedRequest, data: bytes, source: str, *, device: str | torch.device, batch_size: int
    ) -> None:
        from unlearn_ext.models.checkpoint import load_checkpoint_bytes

        if merged.kind == "concept":
            raise RequestError(
                f"{source} is a classifier checkpoint: concept requests need a multimodal checkpoint "
                "(unlearn_ext.siu.checkpoint, e.g. `unlearn export-minimmu`)"
            )
        self.merged, self.source = merged, source
        self.model, self.record = load_checkpoint_bytes(data, source=source, device=device, cast=False)
        if self.record.get("tensors_sha256") is None:
            raise RequestError(
                f"{source} records no tensor checksum, so it cannot be verified: re-save it with "
                "unlearn_ext.models.save_checkpoint"
            )
        self.dataset, self.dataset_seed = self._dataset()
        self._check_config()
        self.split = self._split()
        self.batches = self.split.batches(batch_size=batch_size, seed=merged.seed)
        self.method = self._build_method()

    def _build_method(self):
        """The request's method, its hyperparameters checked now (before the lock and any work)."""
        from unlearn_ext.methods import get_method

        merged = self.merged
        try:
            method = get_method(merged.method, seed=merged.seed, **merged.hparams)
            method._check_common_hparams()
        except (TypeError, ValueError) as e:
            raise RequestError(f"requests {merged.request_ids}: method {merged.method!r}: {e}") from e
        return method

    def _dataset(self):
        from unlearn_ext.data import load_dataset

        merged, source = self.merged, self.source
        meta = self.record.get("metadata") or {}
        key = meta.get("key") or {}
        recorded = meta.get("dataset") or (key.get("dataset") if isinstance(key, dict) else None) or {}
        if not isinstance(recorded, dict):
            raise RequestError(f"{source}: corrupt metadata: its dataset record {recorded!r} is not an object")
        name = merged.dataset or recorded.get("name")
        if name is None:
            raise RequestError(
                f"{source} does not record its training dataset: say which in the request "
                '("dataset": {"name": "mnist", "seed": 0})'
            )
        if recorded.get("name") not in (None, name):
            raise RequestError(f"the request names dataset {name!r} but {source} was trained on {recorded['name']!r}")
        seed = merged.dataset_seed
        recorded_seed = recorded.get("seed", recorded.get("split_seed"))
        if seed is not None and recorded_seed is not None and seed != recorded_seed:
            raise RequestError(f"the request's dataset seed {seed} differs from the checkpoint's ({recorded_seed})")
        seed = seed if seed is not None else (recorded_seed if recorded_seed is not None else 0)
        return load_dataset(name, seed=seed), seed

    def _check_config(self) -> None:
        config, dataset, source = self.model.config, self.dataset, self.source
        if tuple(config["input_shape"]) != tuple(dataset.input_shape) or config["num_classes"] != dataset.num_classes:
            raise RequestError(
                f"{source}'s config (input {list(config['input_shape'])}, {config['num_classes']} classes) does not "
                f"match dataset {dataset.name!r} (input {list(dataset.input_shape)}, {dataset.num_classes} classes)"
            )
        check_expected_config(config, self.merged.model, source)

    def _split(self):
        from unlearn_ext.data import forget_split_from_ids, make_forget_split

        merged, num_classes = self.merged, self.model.config["num_classes"]
        try:
            if merged.kind == "classes":
                unknown = [c for c in merged.classes or () if c >= num_classes]
                if unknown:
                    raise ValueError(f"unknown class(es) {unknown}: the model has classes 0..{num_classes - 1}")
                return make_forget_split(self.dataset, classes=merged.classes, seed=merged.seed)
            return forget_split_from_ids(self.dataset, merged.sample_ids or (), seed=merged.seed)
        except ValueError as e:
            raise RequestError(f"requests {merged.request_ids}: {e}") from e

    def evaluate(self, model: nn.Module, original: nn.Module | None) -> tuple[dict[str, float], dict]:
        """``(metrics in [0, 1], details)`` of ``model`` on the forget / retain / test batches."""
        from unlearn_ext.eval import evaluate

        out = evaluate(model, self.batches, original=original, seed=self.merged.seed)
        return {k: float(out[k]) for k in RECORDED_METRICS if k in out}, {}

    def unlearn(self, progress: bool) -> nn.Module:
        self.method.progress = progress
        return self.method.unlearn(self.model, self.batches["forget"], self.batches["retain"])

    def request_digest(self, request) -> str:
        """What identifies ``request``: its JSON digest (the data it names is the bundled dataset's)."""
        return request.digest

    def log_tail(self) -> list:
        return getattr(self.method, "log", [])[-3:]

    def gates(self, before: dict, after: dict) -> dict[str, dict]:
        kept = "retain_class_test_acc" if self.merged.kind == "classes" else "test_acc"
        rules = {
            "max_forget_acc": ("forget_acc after", lambda b, a: a["forget_acc"]),
            "max_forget_class_test_acc": ("forget_class_test_acc after", lambda b, a: a["forget_class_test_acc"]),
            "max_retain_drop": ("retain_acc before - after", lambda b, a: b["retain_acc"] - a["retain_acc"]),
            "max_test_drop": (f"{kept} before - after", lambda b, a: b[kept] - a[kept]),
            "max_mia": ("mia after", lambda b, a: a["mia"]),
        }
        return gate_results(self.merged, rules, before, after)

    def describe(self) -> dict[str, Any]:
        """What the audit records about the forget set and the data."""
        merged = self.merged
        return {
            "forget": {**self.split.describe(), "sample_ids": list(merged.sample_ids) if merged.sample_ids else None},
            "dataset": {"name": self.dataset.name, "seed": self.dataset_seed},
            "method_hparams": self.method.hparams(),  # every hyperparameter used, defaults included
        }

    def history_forget(self) -> dict[str, Any]:
        merged = self.merged
        return {"kind": merged.kind, "classes": merged.classes, "num_sample_ids": len(merged.sample_ids or ())}

    def serialise(self, model: nn.Module, metadata: dict) -> bytes:
        """The new checkpoint's bytes, checked to load back identical to ``model``."""
        from unlearn_ext.models.checkpoint import checkpoint_bytes, load_checkpoint_bytes

        meta = {**metadata, "dataset": {"name": self.dataset.name, "seed": self.dataset_seed}}
        blob = checkpoint_bytes(model.cpu(), metadata=meta)
        reloaded, _ = load_checkpoint_bytes(blob, source="the new checkpoint")
        if not same_state(reloaded, model):
            raise RuntimeError("the serialised checkpoint does not load back identical; nothing was published")
        return blob
