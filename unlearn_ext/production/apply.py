"""``unlearn apply``: deletion requests on a deployed checkpoint, checkpoint in, verified checkpoint out.

One run, under an exclusive lock on the output path:

1. take the lock; close intents a crashed run left open (``published`` if the intent's file is
   in place, else ``aborted``) and delete temporary files such a run left beside the output;
2. requests already published: all of them is a no-op that reports the earlier run; some of them is an
   error (the input would lack the earlier deletions); the same id with other content is an error;
0. (before anything is written, so bad input creates no file) load the input checkpoint from one read
   of its bytes (hashed), check its config against the dataset and the requests' expectations, build
   the forget / retain split, read the audit log;
4. evaluate, unlearn, evaluate again, check the acceptance gates; a failed gate publishes nothing,
   records ``rejected`` and returns (the CLI exits 3);
5. serialise the new checkpoint, check it loads back identical, append an ``intent`` record (with
   its sha256), write it to a temporary file, ``fsync``, rename it into place, ``fsync`` the folder,
   append ``published``.

The input checkpoint is only read. Killing the process at any point leaves the input, any earlier
output and the audit log intact and parseable (tests kill it with SIGKILL at each step; the
environment variable ``UNLEARN_EXT_APPLY_CRASH_AT`` names the step, for those tests only).
"""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn_ext.production.audit import (
    append_audit,
    pending_intents,
    published_runs,
    read_audit,
    sha256_file,
)
from unlearn_ext.production.lock import OutputLock
from unlearn_ext.production.request import DeletionRequest, MergedRequest, RequestError, load_requests, merge_requests

CRASH_ENV = "UNLEARN_EXT_APPLY_CRASH_AT"
CRASH_POINTS = ("locked", "loaded", "unlearned", "intent", "temp_written", "replaced", "published")
AUDIT_NAME = "unlearn-audit.jsonl"
#: Metrics recorded before and after (fractions in [0, 1]).
RECORDED_METRICS = (
    "forget_acc",
    "retain_acc",
    "test_acc",
    "forget_class_test_acc",
    "retain_class_test_acc",
    "mia",
)


@dataclass
class ApplyResult:
    """What :func:`apply_requests` did.

    ``status``: ``"published"`` (a new checkpoint is at ``output``), ``"noop"`` (every request had been
    published before: ``earlier`` is that run's intent record) or ``"rejected"`` (a gate failed:
    nothing was written but the audit record).
    """

    status: str
    run_id: str
    request_ids: list[str]
    output: Path
    audit: Path
    output_sha256: str | None = None
    input_sha256: str | None = None
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    earlier: dict[str, Any] | None = None
    recovered: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed_gates(self) -> list[str]:
        return [name for name, g in self.gates.items() if not g["pass"]]


def _maybe_crash(point: str) -> None:
    if os.environ.get(CRASH_ENV) == point:  # crash tests only
        os.kill(os.getpid(), signal.SIGKILL)


def _versions() -> dict[str, str]:
    import unlearn_ext

    return {
        "unlearn_ext": unlearn_ext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _recover(audit: Path, output: Path) -> list[dict[str, Any]]:
    """Close intents for ``output`` a crashed run left open; delete its leftover temporary files."""
    closed = []
    for intent in pending_intents(read_audit(audit), str(output)):
        on_disk = sha256_file(output)
        found = on_disk == intent["output"]["sha256"]
        closed.append(
            append_audit(
                audit,
                {
                    "event": "published" if found else "aborted",
                    "run_id": intent["run_id"],
                    "request_ids": intent.get("request_ids", []),
                    "recovered": True,
                    "output": {"path": str(output), "sha256": on_disk},
                    "reason": "the intent's checkpoint is in place (the run died after the rename)"
                    if found
                    else "the run died before its checkpoint was renamed into place; nothing was published",
                },
            )
        )
    for leftover in output.parent.glob(f".{output.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
    return closed


def _dataset_for(merged: MergedRequest, record: dict, source: str):
    from unlearn_ext.data import load_dataset

    meta = record.get("metadata") or {}
    recorded = meta.get("dataset") or (meta.get("key") or {}).get("dataset") or {}
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


def _check_config(model: nn.Module, dataset, merged: MergedRequest, source: str) -> None:
    config = model.config
    if tuple(config["input_shape"]) != tuple(dataset.input_shape) or config["num_classes"] != dataset.num_classes:
        raise RequestError(
            f"{source}'s config (input {list(config['input_shape'])}, {config['num_classes']} classes) does not match "
            f"dataset {dataset.name!r} (input {list(dataset.input_shape)}, {dataset.num_classes} classes)"
        )
    for key, expected in merged.model.items():
        if key not in config:
            raise RequestError(f"the request expects model {key}={expected!r}, but {source}'s config has no {key!r}")
        got = config[key]
        if (list(got) if isinstance(got, tuple) else got) != expected:
            raise RequestError(f"the request expects model {key}={expected!r}, but {source} has {key}={got!r}")


def _split(merged: MergedRequest, dataset, num_classes: int):
    from unlearn_ext.data import forget_split_from_ids, make_forget_split

    if merged.kind == "concept":
        raise NotImplementedError(
            "concept requests (forget a visual concept from one image) need a multimodal checkpoint; `unlearn apply` "
            "handles classifier checkpoints (forget.classes, forget.sample_ids) so far: run SIU through "
            "unlearn_ext.siu.unlearn_concept or `unlearn mmu`"
        )
    try:
        if merged.kind == "classes":
            unknown = [c for c in merged.classes or () if c >= num_classes]
            if unknown:
                raise ValueError(f"unknown class(es) {unknown}: the model has classes 0..{num_classes - 1}")
            return make_forget_split(dataset, classes=merged.classes, seed=merged.seed)
        return forget_split_from_ids(dataset, merged.sample_ids or (), seed=merged.seed)
    except ValueError as e:
        raise RequestError(f"requests {merged.request_ids}: {e}") from e


def _metrics(model: nn.Module, splits: dict, original: nn.Module | None, seed: int) -> dict[str, float]:
    from unlearn_ext.eval import evaluate

    out = evaluate(model, splits, original=original, seed=seed)
    return {k: float(out[k]) for k in RECORDED_METRICS if k in out}


def check_gates(merged: MergedRequest, before: dict[str, float], after: dict[str, float]) -> dict[str, dict]:
    """``{gate: {"value", "limit", "pass", "metric"}}`` for each gate of the merged request."""
    kept = "retain_class_test_acc" if merged.kind == "classes" else "test_acc"
    rules = {
        "max_forget_acc": ("forget_acc after", lambda: after["forget_acc"]),
        "max_forget_class_test_acc": ("forget_class_test_acc after", lambda: after["forget_class_test_acc"]),
        "max_retain_drop": ("retain_acc before - after", lambda: before["retain_acc"] - after["retain_acc"]),
        "max_test_drop": (f"{kept} before - after", lambda: before[kept] - after[kept]),
        "max_mia": ("mia after", lambda: after["mia"]),
    }
    out = {}
    for name, limit in merged.gates.items():
        metric, value = rules[name]
        v = float(value())
        out[name] = {"metric": metric, "value": v, "limit": limit, "pass": bool(v <= limit + 1e-12)}
    return out


def _lineage(record: dict | None) -> set[str]:
    """Request ids a checkpoint record says were applied to it (its ``unlearn_history``)."""
    history = ((record or {}).get("metadata") or {}).get("unlearn_history") or []
    return {rid for entry in history if isinstance(entry, dict) for rid in entry.get("request_ids", [])}


def _check_overwrite(output: Path, input_record: dict, overwrite: bool, all_done: bool, ids: list[str]) -> None:
    """Refuse to replace ``output`` without ``overwrite``, or when it carries deletions other than this
    run's ``ids`` that the input lacks (replacing it would bring forgotten data back)."""
    if not output.exists() or all_done:
        return
    if not overwrite:
        raise RequestError(f"{output} exists: pass overwrite=True (--overwrite) to replace it atomically")
    from unlearn_ext.models.checkpoint import read_checkpoint_record

    dropped = sorted(_lineage(read_checkpoint_record(output)) - _lineage(input_record) - set(ids))
    if dropped:
        raise RequestError(
            f"{output} carries published deletion requests {dropped} that the input checkpoint does not; replacing "
            "it would undo them: use that output as --checkpoint"
        )


def _history_entry(run_id: str, merged: MergedRequest, input_sha: str, after: dict) -> dict:
    return {
        "run_id": run_id,
        "request_ids": merged.request_ids,
        "method": merged.method,
        "hparams": dict(merged.hparams),
        "forget": {"kind": merged.kind, "classes": merged.classes, "num_sample_ids": len(merged.sample_ids or ())},
        "input_sha256": input_sha,
        "metrics_after": after,
    }


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def apply_requests(
    checkpoint: str | os.PathLike,
    requests: Sequence[str | os.PathLike] | Sequence[DeletionRequest],
    output: str | os.PathLike,
    *,
    audit: str | os.PathLike | None = None,
    overwrite: bool = False,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ApplyResult:
    """Apply deletion requests to ``checkpoint`` and publish the result at ``output`` (see the module doc).

    Args:
        checkpoint: the input ``.safetensors`` (written by :func:`unlearn_ext.models.save_checkpoint`);
            only read.
        requests: request file paths, or parsed :class:`DeletionRequest` objects; merged into one run.
        output: where the new checkpoint goes (never the input).
        audit: the JSON-lines audit log (default ``<output folder>/unlearn-audit.jsonl``).
        overwrite: replace an existing ``output`` (atomically; the old file stays whole until then).

    Returns:
        An :class:`ApplyResult` (``status`` "published", "noop" or "rejected").

    Raises:
        FileNotFoundError: a missing checkpoint or request file.
        RequestError: invalid or unmergeable requests, requests already applied elsewhere, an id re-filed
            with other content, a config that does not match, an unknown class or sample id,
            ``output`` = ``checkpoint``, an existing ``output`` without ``overwrite``.
        ValueError: a corrupt or truncated checkpoint, a method that cannot run on this forget set.
        LockedError: another apply holds the output's lock.
        NotImplementedError: concept requests (multimodal checkpoints).
    """
    from unlearn_ext.methods import get_method
    from unlearn_ext.models.checkpoint import atomic_write_bytes, checkpoint_bytes, load_checkpoint_bytes

    checkpoint, output = Path(checkpoint), Path(output)
    audit = Path(audit) if audit is not None else output.parent / AUDIT_NAME
    parsed = (
        list(requests)
        if requests and all(isinstance(r, DeletionRequest) for r in requests)
        else load_requests(list(requests))
    )
    merged = merge_requests(parsed)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    if _same_file(checkpoint, output):
        raise RequestError(f"the output {output} is the input checkpoint: apply never overwrites its input")
    if _same_file(audit, checkpoint) or _same_file(audit, output):
        raise RequestError(f"the audit log {audit} must not be the input or output checkpoint")
    run_id = uuid.uuid4().hex
    base = {"run_id": run_id, "request_ids": merged.request_ids, "host": socket.gethostname()}
    durations: dict[str, float] = {}

    # Everything that can be checked without writing is checked before the lock: bad input creates no file.
    t0 = time.perf_counter()
    data = checkpoint.read_bytes()
    input_sha = hashlib.sha256(data).hexdigest()
    model, record = load_checkpoint_bytes(data, source=str(checkpoint), device=device)
    in_lineage = sorted(set(merged.request_ids) & _lineage(record))
    if in_lineage:
        raise RequestError(
            f"requests {in_lineage} were already applied to {checkpoint} (its unlearn_history): nothing to do for them"
        )
    dataset, dataset_seed = _dataset_for(merged, record, str(checkpoint))
    _check_config(model, dataset, merged, str(checkpoint))
    split = _split(merged, dataset, model.config["num_classes"])
    batches = split.batches(batch_size=batch_size, seed=merged.seed)
    audit_records = read_audit(audit)  # a damaged log is refused before anything is written
    already = published_runs(audit_records)
    all_done = all(r.request_id in already for r in merged.requests)
    _check_overwrite(output, record, overwrite, all_done, merged.request_ids)
    durations["load"] = time.perf_counter() - t0

    with OutputLock(output):
        _maybe_crash("locked")
        recovered = _recover(audit, output)
        published = published_runs(read_audit(audit))
        done = [r for r in merged.requests if r.request_id in published]
        for r in done:
            earlier_digest = published[r.request_id].get("request_sha256", {}).get(r.request_id)
            if earlier_digest is not None and earlier_digest != r.digest:
                raise RequestError(
                    f"request id {r.request_id!r} was already applied (run {published[r.request_id]['run_id']}) with "
                    "different content: file the change under a new request id"
                )
        if done and len(done) == len(merged.requests):
            earlier = published[done[0].request_id]
            on_disk = sha256_file(earlier["output"]["path"])
            state = (
                "in place" if on_disk == earlier["output"]["sha256"] else ("missing" if on_disk is None else "changed")
            )
            earlier_runs = sorted({published[r.request_id]["run_id"] for r in done})
            append_audit(
                audit, {"event": "noop", **base, "earlier_run_ids": earlier_runs, "earlier_output_state": state}
            )
            return ApplyResult(
                "noop", run_id, merged.request_ids, Path(earlier["output"]["path"]), audit,
                output_sha256=earlier["output"]["sha256"], input_sha256=earlier.get("input", {}).get("sha256"),
                metrics_before=earlier.get("metrics_before", {}), metrics_after=earlier.get("metrics_after", {}),
                gates=earlier.get("gates", {}), earlier={**earlier, "output_state": state}, recovered=recovered,
            )  # fmt: skip
        if done:
            where = {r.request_id: published[r.request_id]["output"]["path"] for r in done}
            raise RequestError(
                f"requests {sorted(where)} were already applied ({where}); the rest "
                f"({[r.request_id for r in merged.requests if r.request_id not in where]}) must be applied to that "
                "output, or in a run without them"
            )
        _check_overwrite(output, record, overwrite, False, merged.request_ids)  # again, under the lock

        try:
            _maybe_crash("loaded")
            stage = "evaluate before"
            t0 = time.perf_counter()
            before = _metrics(model, batches, None, merged.seed)
            durations["evaluate_before"] = time.perf_counter() - t0

            stage = "unlearn"
            t0 = time.perf_counter()
            method = get_method(merged.method, seed=merged.seed, progress=progress, **merged.hparams)
            unlearned = method.unlearn(model, batches["forget"], batches["retain"])
            durations["unlearn"] = time.perf_counter() - t0
            _maybe_crash("unlearned")

            stage = "evaluate after"
            t0 = time.perf_counter()
            after = _metrics(unlearned, batches, model, merged.seed)
            gates = check_gates(merged, before, after)
            durations["evaluate_after"] = time.perf_counter() - t0
        except BaseException as e:
            if isinstance(e, Exception):
                failure = {"stage": stage, "error": f"{type(e).__name__}: {e}", "input": {"path": str(checkpoint)}}
                append_audit(audit, {"event": "failed", **base, **failure, "versions": _versions()})
            raise

        summary = {
            **base,
            "request_sha256": {r.request_id: r.digest for r in merged.requests},
            "input": {"path": str(checkpoint), "sha256": input_sha},
            "method": merged.method,
            "hparams": dict(merged.hparams),
            "seed": merged.seed,
            "forget": {**split.describe(), "sample_ids": list(merged.sample_ids) if merged.sample_ids else None},
            "dataset": {"name": dataset.name, "seed": dataset_seed},
            "metrics_before": before,
            "metrics_after": after,
            "gates": gates,
            "method_log_tail": method.log[-3:],
            "versions": _versions(),
        }
        result = ApplyResult(
            "rejected", run_id, merged.request_ids, output, audit, input_sha256=input_sha, metrics_before=before,
            metrics_after=after, gates=gates, durations=durations, recovered=recovered,
        )  # fmt: skip
        if result.failed_gates:
            rejected = {"failed_gates": result.failed_gates, "durations_s": durations}
            append_audit(audit, {"event": "rejected", **summary, **rejected})
            return result

        t0 = time.perf_counter()
        meta = dict(record.get("metadata") or {})
        meta["dataset"] = {"name": dataset.name, "seed": dataset_seed}
        meta["unlearn_history"] = [*meta.get("unlearn_history", []), _history_entry(run_id, merged, input_sha, after)]
        blob = checkpoint_bytes(unlearned.cpu(), metadata=meta)
        reloaded, _ = load_checkpoint_bytes(blob, source="the new checkpoint")
        if not _same_state(reloaded, unlearned):
            raise RuntimeError("the serialised checkpoint does not load back identical; nothing was published")
        out_sha = hashlib.sha256(blob).hexdigest()
        durations["serialise"] = time.perf_counter() - t0
        summary["output"] = {"path": str(output), "sha256": out_sha, "bytes": len(blob)}
        append_audit(audit, {"event": "intent", **summary, "durations_s": durations})
        _maybe_crash("intent")
        t0 = time.perf_counter()
        atomic_write_bytes(output, blob, before_replace=lambda _tmp: _maybe_crash("temp_written"))
        _maybe_crash("replaced")
        if sha256_file(output) != out_sha:
            raise RuntimeError(f"{output} does not hold the bytes just written (sha256 mismatch)")
        durations["write"] = time.perf_counter() - t0
        append_audit(audit, {"event": "published", **base, "output": summary["output"], "durations_s": durations})
        _maybe_crash("published")
        result.status, result.output_sha256 = "published", out_sha
        return result
