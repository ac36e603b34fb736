"""Production unlearning: deletion requests applied to deployed checkpoints (``unlearn apply``), with
acceptance gates, atomic publication, an append-only audit log and a crash-safe output lock."""

from unlearn_ext.production.apply import ApplyResult, apply_requests
from unlearn_ext.production.audit import AuditError, read_audit, sha256_file
from unlearn_ext.production.lock import LockedError, OutputLock
from unlearn_ext.production.request import (
    DeletionRequest,
    MergedRequest,
    RequestError,
    load_requests,
    merge_requests,
    parse_request,
)

__all__ = [
    "ApplyResult",
    "AuditError",
    "DeletionRequest",
    "LockedError",
    "MergedRequest",
    "OutputLock",
    "RequestError",
    "apply_requests",
    "load_requests",
    "merge_requests",
    "parse_request",
    "read_audit",
    "sha256_file",
]
