"""The user cache of trained reference models (``unlearn demo`` / ``unlearn run``).

Location: ``$UNLEARN_EXT_CACHE``, else ``$XDG_CACHE_HOME/unlearn_ext``, else ``~/.cache/unlearn_ext``.
Entries are checkpoints named by a hash of everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("UNLEARN_EXT_CACHE"):
        return Path(os.environ["UNLEARN_EXT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unlearn_ext"


def cache_path(kind: str, key: dict) -> Path:
    """``<cache>/<kind>-<sha256 of key>.safetensors``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / f"{kind}-{digest}.safetensors"
