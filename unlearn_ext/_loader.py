"""Loads the compiled kernels (``unlearn_ext._C``) and keeps the reason when that fails.

``import unlearn_ext`` must work without the extension (a broken or missing build, or a torch
it was not built against); calling a compiled op then raises :class:`ExtensionNotBuiltError`
with the original error and the command that rebuilds it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

_REBUILD = "pip install --no-build-isolation -e .  (from the unlearn_ext checkout, after installing torch)"
_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")


class ExtensionNotBuiltError(RuntimeError):
    """The compiled kernels of unlearn_ext are not available in this process."""


def _read_build_info() -> dict[str, Any]:
    try:
        return json.loads(_BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return {}


BUILD_INFO: dict[str, Any] = _read_build_info()
_C: Any = None
LOAD_ERROR: BaseException | None = None

if os.environ.get("UNLEARN_EXT_SKIP_C", "0") == "1":
    LOAD_ERROR = ImportError("UNLEARN_EXT_SKIP_C=1 is set, so unlearn_ext._C was not loaded")
else:
    try:
        from unlearn_ext import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except (ImportError, OSError) as exc:
        LOAD_ERROR = exc
        built_for = BUILD_INFO.get("torch")
        hint = ""
        if built_for and built_for != torch.__version__:
            hint = f" It was built for torch {built_for}, and this process has torch {torch.__version__}."
        warnings.warn(
            f"unlearn_ext: the compiled kernels could not be loaded ({exc}).{hint} The 'reference' and "
            f"'triton' backends still work; rebuild with: {_REBUILD}",
            RuntimeWarning,
            stacklevel=2,
        )


def extension_loaded() -> bool:
    """True when ``unlearn_ext._C`` was imported and its ops are registered."""
    return LOAD_ERROR is None


def require_extension(op: str) -> None:
    """Raise :class:`ExtensionNotBuiltError` naming ``op`` when the compiled kernels are missing."""
    if LOAD_ERROR is not None:
        built_for = BUILD_INFO.get("torch")
        extra = f" (built for torch {built_for}, running torch {torch.__version__})" if built_for else ""
        raise ExtensionNotBuiltError(
            f"{op} needs the compiled unlearn_ext._C kernels, which failed to load{extra}: {LOAD_ERROR}. "
            f"Rebuild with: {_REBUILD}"
        ) from LOAD_ERROR


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether ``unlearn_ext::<op>`` has a compiled kernel for ``device``'s dispatch key."""
    if LOAD_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"unlearn_ext::{op}", key)
    except RuntimeError:
        return False


def compiled_build_info() -> dict[str, Any]:
    """Facts the compiled module reports about itself (empty when it is not loaded)."""
    if LOAD_ERROR is not None or _C is None:
        return {}
    return dict(_C.build_info())
