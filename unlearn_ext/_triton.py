"""Whether Triton is importable and can run on a device.

Triton kernels run on CUDA devices, or on the CPU through Triton's interpreter when the
environment variable ``TRITON_INTERPRET=1`` is set before the kernels are defined (CI does this).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_VERSION: str | None = triton.__version__
    TRITON_IMPORT_ERROR: BaseException | None = None
except ImportError as exc:  # Triton is an optional extra: pip install unlearn_ext[triton]
    HAS_TRITON = False
    TRITON_VERSION = None
    TRITON_IMPORT_ERROR = exc


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str) -> bool:
    """Whether a Triton kernel can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    kind = torch.device(device).type
    if interpreter_enabled():
        return kind == "cpu"
    return kind == "cuda" and torch.cuda.is_available()


def triton_unavailable_reason(device: torch.device | str) -> str:
    """A sentence saying why Triton cannot run on ``device`` (empty when it can)."""
    if not HAS_TRITON:
        return f"Triton is not installed ({TRITON_IMPORT_ERROR}); pip install 'unlearn_ext[triton]'"
    kind = torch.device(device).type
    if interpreter_enabled():
        if kind != "cpu":
            return "TRITON_INTERPRET=1 is set, so Triton kernels run only on CPU tensors"
        return ""
    if kind == "cpu":
        return "Triton runs on CUDA devices; on the CPU set TRITON_INTERPRET=1 (slow, for testing)"
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if kind != "cuda":
        return f"Triton does not run on {kind} tensors"
    return ""
