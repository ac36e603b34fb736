"""``unlearn apply``: deletion requests on a deployed checkpoint, checkpoint in, verified checkpoint out.

Two kinds of checkpoint, one flow: a classifier (class and sample requests,
:mod:`unlearn_ext.production.classifier`) or a multimodal model with its tokenizer (concept requests,
:mod:`unlearn_ext.production.concept`). The kind comes from the checkpoint's record.

1. before anything is written (so bad input creates no file): load the input checkpoint from one
   read of its bytes (hashed), check it against the requests (config, dataset, classes, sample ids,
   images), read the audit log;
2. take an exclusive lock on the output path; close intents a crashed run left open (``published``
   if the intent's file is in place, else ``aborted``) and delete temporary files such a run left
   beside the output;
3. requests already published: all of them is a no-op that reports the earlier run; some of them is an
   error (the input would lack the earlier deletions); the same id with other content is an error;
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
import json
import os
import platform
import re
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
    #: Concept requests: ``{"before": {...}, "after": {...}}`` with the greedy answers to the identity
    #: prompts about the forget image (``forget_image_answers``).
    details: dict[str, Any] = field(default_factory=dict)

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


def _absolute(path: Path) -> Path:
    """``path`` with its folder resolved (absolute, symlinks in the folder followed), its name kept."""
    return path.parent.resolve() / path.name


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
    for leftover in _leftover_temp_files(output):
        leftover.unlink(missing_ok=True)
    return closed


def _leftover_temp_files(output: Path) -> list[Path]:
    """Temporary files :func:`~unlearn_ext.models.checkpoint.atomic_write_bytes` makes for ``output``
    (``mkstemp``: ``.<name>.<8 random characters>.tmp``), and no other output's."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    if not output.parent.is_dir():
        return []
    return [p for p in output.parent.iterdir() if pattern.fullmatch(p.name)]


def _published_from(records: list[dict[str, Any]], input_sha: str) -> dict[str, dict[str, Any]]:
    """``{request_id: intent}`` of the published runs that started from the checkpoint with sha256
    ``input_sha`` (latest wins): a request published for another model is not done for this one."""
    return published_runs(
        r for r in records if r.get("event") != "intent" or r.get("input", {}).get("sha256") == input_sha
    )


def _audit_publish_failure(
    audit: Path, base: dict, stage: str, error: Exception, output: Path, out_sha: str | None
) -> None:
    """Close a run that failed while publishing: ``failed`` before its intent was written, ``aborted``
    after it when the output does not hold the new bytes; when it does (the failure came after the
    rename) the intent stays open for the next run's recovery to close as ``published``."""
    message = f"{type(error).__name__}: {error}"
    try:
        if stage == "serialise":
            append_audit(audit, {"event": "failed", **base, "stage": stage, "error": message, "versions": _versions()})
        elif stage == "write" and sha256_file(output) != out_sha:
            reason = "publishing failed before the checkpoint was in place; nothing was published"
            append_audit(audit, {"event": "aborted", **base, "stage": stage, "error": message, "reason": reason})
    except OSError:
        pass  # the audit log itself is what failed: the error raised is the one to report


def _make_job(merged: MergedRequest, data: bytes, source: str, device, batch_size: int):
    """The job for this checkpoint's kind: a multimodal checkpoint (concept requests) or a classifier
    (class and sample requests); a request of the other kind is a RequestError."""
    from unlearn_ext.models.checkpoint import _META_KEY, _safetensors_metadata
    from unlearn_ext.production.classifier import ClassifierJob
    from unlearn_ext.siu.checkpoint import is_multimodal_record

    try:
        record = json.loads(_safetensors_metadata(data)[_META_KEY])
    except (ValueError, KeyError, TypeError):
        record = None  # the classifier loader reports what is wrong with the file
    if not isinstance(record, dict):
        record = None
    if is_multimodal_record(record):
        from unlearn_ext.production.concept import ConceptJob

        return ConceptJob(merged, data, source, device=device)
    return ClassifierJob(merged, data, source, device=device, batch_size=batch_size)


def _lineage(record: dict | None) -> set[str]:
    """Request ids a checkpoint record says were applied to it (its ``unlearn_history``)."""
    meta = record.get("metadata") if isinstance(record, dict) else None
    history = meta.get("unlearn_history") if isinstance(meta, dict) else None
    if not isinstance(history, list):
        return set()
    ids = (entry.get("request_ids") for entry in history if isinstance(entry, dict))
    return {rid for group in ids if isinstance(group, list) for rid in group if isinstance(rid, str)}


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


def _history_entry(run_id: str, merged: MergedRequest, forget: dict, input_sha: str, after: dict) -> dict:
    return {
        "run_id": run_id,
        "request_ids": merged.request_ids,
        "method": merged.method,
        "hparams": dict(merged.hparams),
        "forget": forget,
        "input_sha256": input_sha,
        "metrics_after": after,
    }


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
            A concept request on a classifier checkpoint or a class / sample request on a multimodal
            one; a missing or unreadable image of a concept request.
        ValueError: a corrupt or truncated checkpoint, a method that cannot run on this forget set.
        LockedError: another apply holds the output's lock.
    """
    from unlearn_ext.models.checkpoint import atomic_write_bytes

    # One spelling of each path in the audit log and its recovery (relative paths and symlinked folders
    # resolved; a symlink at the output itself is replaced as a link, as os.replace does).
    checkpoint, output = _absolute(Path(checkpoint)), _absolute(Path(output))
    audit = _absolute(Path(audit)) if audit is not None else output.parent / AUDIT_NAME
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
    job = _make_job(merged, data, str(checkpoint), device, batch_size)
    model, record = job.model, job.record
    in_lineage = sorted(set(merged.request_ids) & _lineage(record))
    if in_lineage:
        raise RequestError(
            f"requests {in_lineage} were already applied to {checkpoint} (its unlearn_history): nothing to do for them"
        )
    audit_records = read_audit(audit)  # a damaged log is refused before anything is written
    already = set(_published_from(audit_records, input_sha))
    on_disk = sha256_file(output) if output.exists() else None
    for intent in pending_intents(audit_records, str(output)):  # a run that died after its rename
        if on_disk is not None and intent.get("output", {}).get("sha256") == on_disk:
            already.update(intent.get("request_ids", []))
    all_done = all(r.request_id in already for r in merged.requests)
    _check_overwrite(output, record, overwrite, all_done, merged.request_ids)
    durations["load"] = time.perf_counter() - t0

    with OutputLock(output):
        _maybe_crash("locked")
        recovered = _recover(audit, output)
        records = read_audit(audit)
        anywhere = published_runs(records)
        for r in merged.requests:  # an id means one request, whichever model it was applied to
            earlier_digest = anywhere.get(r.request_id, {}).get("request_sha256", {}).get(r.request_id)
            # (an audit written before image digests were part of a concept request's identity holds
            # the JSON digest alone)
            if earlier_digest is not None and earlier_digest not in (job.request_digest(r), r.digest):
                raise RequestError(
                    f"request id {r.request_id!r} was already applied (run {anywhere[r.request_id]['run_id']}) with "
                    "different content: file the change under a new request id"
                )
        published = _published_from(records, input_sha)
        done = [r for r in merged.requests if r.request_id in published]
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
            before, before_details = job.evaluate(model, None)
            durations["evaluate_before"] = time.perf_counter() - t0

            stage = "unlearn"
            t0 = time.perf_counter()
            unlearned = job.unlearn(progress)
            durations["unlearn"] = time.perf_counter() - t0
            _maybe_crash("unlearned")

            stage = "evaluate after"
            t0 = time.perf_counter()
            after, after_details = job.evaluate(unlearned, model)
            gates = job.gates(before, after)
            durations["evaluate_after"] = time.perf_counter() - t0
        except BaseException as e:
            if isinstance(e, Exception):
                failure = {"stage": stage, "error": f"{type(e).__name__}: {e}", "input": {"path": str(checkpoint)}}
                append_audit(audit, {"event": "failed", **base, **failure, "versions": _versions()})
            raise

        summary = {
            **base,
            "request_sha256": {r.request_id: job.request_digest(r) for r in merged.requests},
            "input": {"path": str(checkpoint), "sha256": input_sha},
            "method": merged.method,
            "hparams": dict(merged.hparams),
            "seed": merged.seed,
            **job.describe(),
            "metrics_before": before,
            "metrics_after": after,
            **({"details_before": before_details, "details_after": after_details} if before_details else {}),
            "gates": gates,
            "method_log_tail": job.log_tail(),
            "versions": _versions(),
        }
        result = ApplyResult(
            "rejected", run_id, merged.request_ids, output, audit, input_sha256=input_sha, metrics_before=before,
            metrics_after=after, gates=gates, durations=durations, recovered=recovered,
            details={"before": before_details, "after": after_details} if before_details else {},
        )  # fmt: skip
        if result.failed_gates:
            rejected = {"failed_gates": result.failed_gates, "durations_s": durations}
            append_audit(audit, {"event": "rejected", **summary, **rejected})
            return result

        stage, out_sha = "serialise", None
        try:
            t0 = time.perf_counter()
            meta = dict(record.get("metadata") or {})
            entry = _history_entry(run_id, merged, job.history_forget(), input_sha, after)
            meta["unlearn_history"] = [*meta.get("unlearn_history", []), entry]
            blob = job.serialise(unlearned, meta)
            out_sha = hashlib.sha256(blob).hexdigest()
            durations["serialise"] = time.perf_counter() - t0
            summary["output"] = {"path": str(output), "sha256": out_sha, "bytes": len(blob)}
            append_audit(audit, {"event": "intent", **summary, "durations_s": durations})
            stage = "write"
            _maybe_crash("intent")
            t0 = time.perf_counter()
            atomic_write_bytes(output, blob, before_replace=lambda _tmp: _maybe_crash("temp_written"))
            _maybe_crash("replaced")
            if sha256_file(output) != out_sha:
                raise RuntimeError(f"{output} does not hold the bytes just written (sha256 mismatch)")
            durations["write"] = time.perf_counter() - t0
            stage = "published"
            append_audit(audit, {"event": "published", **base, "output": summary["output"], "durations_s": durations})
        except Exception as e:
            _audit_publish_failure(audit, base, stage, e, output, out_sha)
            raise
        _maybe_crash("published")
        result.status, result.output_sha256 = "published", out_sha
        return result
