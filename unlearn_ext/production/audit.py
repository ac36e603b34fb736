"""The append-only audit log of ``unlearn apply``: one JSON object per line, never rewritten.

Events (``"event"``):

* ``"intent"``: a checkpoint is about to be published (written before the rename, with the output's
  sha256, the metrics and the gate results);
* ``"published"``: the rename happened (``recovered: true`` when a later run found the intent's file
  in place after a crash);
* ``"aborted"``: a later run found an intent whose file never appeared (the process died before the
  rename);
* ``"rejected"``: a gate failed, nothing was published;
* ``"failed"``: an error stopped the run before publishing;
* ``"noop"``: every request id of the run had been published already;
* ``"repair"``: written by :func:`append_audit` right after a torn last line (an interrupted write)
  before it appends on a fresh line; :func:`read_audit` skips a damaged line only when a ``repair``
  record follows it, so the log stays readable after the append.

Each record is written with a single ``write`` on a file opened with ``O_APPEND`` and ``fsync``ed, so
records never interleave; a process killed mid-write can at worst leave a last line without its
newline, which :func:`read_audit` reports and skips; the next append starts on a new line with a
``repair`` record that marks the fragment, so later reads skip it too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from unlearn_ext.models.checkpoint import fsync_directory


class AuditError(ValueError):
    """The audit log is unreadable: a corrupt record before its last line."""


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def sha256_file(path: str | os.PathLike) -> str | None:
    """Hex sha256 of a file's bytes, or None when it does not exist."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def read_audit(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of the audit log (``[]`` when it does not exist).

    Raises:
        AuditError: a line before the last that is not a JSON object (the log was edited or damaged:
            apply refuses to add to it).
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # the last line lacks its newline: a write that did not finish
    records = []
    damaged: tuple[int, Exception] | None = None  # a bad line, pardoned only if a repair record follows
    for number, raw in enumerate(lines[:-1] if not torn else lines, start=1):
        if not raw.strip():
            continue
        is_last = number == len(lines) and torn
        try:
            record = _parse_record(raw)
        except ValueError as e:
            if damaged is not None:
                break
            if is_last:
                warnings.warn(f"{path}: skipping an incomplete last record (a write was interrupted)", stacklevel=2)
                continue
            damaged = (number, e)
            continue
        if damaged is not None:
            if record.get("event") != "repair":
                break
            damaged = None
        records.append(record)  # (a complete last record whose newline was lost is kept)
    if damaged is not None:
        number, e = damaged
        raise AuditError(f"{path}: line {number} is not a valid audit record ({e}); the log is damaged") from e
    return records


def _parse_record(raw: bytes) -> dict[str, Any]:
    record = json.loads(raw)
    if not isinstance(record, dict) or "event" not in record:
        raise ValueError("not an audit record")
    return record


def append_audit(path: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """Append ``record`` (``time`` and ``pid`` added) as one line; returns what was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": utc_now(), "pid": os.getpid(), **record}
    line = json.dumps(record, sort_keys=False, default=str).encode() + b"\n"
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a torn last line: mark it, then start on a fresh one
                    reason = "the line before this one had no newline (an interrupted write): skipped unless whole"
                    repair = {"time": record["time"], "pid": record["pid"], "event": "repair", "reason": reason}
                    line = b"\n" + json.dumps(repair).encode() + b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_directory(path.parent)
    return record


def published_runs(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{request_id: the intent record of the run that published it}`` (latest wins)."""
    records = list(records)
    intents = {r["run_id"]: r for r in records if r.get("event") == "intent" and "run_id" in r}
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("event") == "published" and r.get("run_id") in intents:
            intent = intents[r["run_id"]]
            for rid in intent.get("request_ids", []):
                out[rid] = intent
    return out


def pending_intents(records: Iterable[dict[str, Any]], output: str) -> list[dict[str, Any]]:
    """Intents for ``output`` that no ``published`` / ``aborted`` record closes (a crashed run)."""
    records = list(records)
    closed = {r.get("run_id") for r in records if r.get("event") in ("published", "aborted")}
    return [
        r
        for r in records
        if r.get("event") == "intent" and r.get("run_id") not in closed and r.get("output", {}).get("path") == output
    ]
