"""safetensors checkpoints of the bundled classifiers, with their config and mnemonic codes.

A checkpoint holds the model's ``state_dict`` (codes included, as the ``mnemonic_codes`` buffer) and,
in the safetensors metadata, a JSON record: the architecture config, the training recipe and any
user metadata. Writes go to a temporary file in the same folder, then an atomic rename, so an
existing file is never left half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from unlearn_ext.models.initial_head import INITIAL_HEAD_BUFFER, attach_initial_head
from unlearn_ext.models.mnemonic_codes import CODES_BUFFER, attach_codes
from unlearn_ext.models.vision import build_model

_META_KEY = "unlearn_ext"
FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Save a model built by :func:`build_model` (it has ``.config``) to ``path`` (``.safetensors``)."""
    from safetensors.torch import save

    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError("save_checkpoint needs a model built by unlearn_ext.models.build_model (it has .config)")
    record = {
        "format": FORMAT_VERSION,
        "config": config,
        "train_config": getattr(model, "train_config", None),
        "metadata": metadata or {},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={_META_KEY: json.dumps(record)}))
    return Path(path)


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`. Returns ``(model in eval mode, record)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file, not an unlearn_ext checkpoint, or its tensors do
            not match its config (a corrupt or foreign checkpoint).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors checkpoint (corrupt or truncated?): {e}") from e
    if _META_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file but not an unlearn_ext checkpoint (no {_META_KEY!r} metadata)")
    try:
        record = json.loads(meta[_META_KEY])
        config = dict(record["config"])
        arch = config.pop("arch")
        input_shape = tuple(config.pop("input_shape"))
        num_classes = config.pop("num_classes")
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt unlearn_ext metadata: {e}") from e
    try:
        model = build_model(arch, input_shape, num_classes, **config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt or foreign unlearn_ext config {record['config']!r}: {e}") from e
    codes = tensors.pop(CODES_BUFFER, None)
    initial_head = tensors.pop(INITIAL_HEAD_BUFFER, None)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not match the recorded {arch} config: {e}") from e
    try:
        if codes is not None:
            attach_codes(model, codes)
        if initial_head is not None:
            attach_initial_head(model, initial_head)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    model.train_config = record.get("train_config")
    return model.to(device).eval(), record
