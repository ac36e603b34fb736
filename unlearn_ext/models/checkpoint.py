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
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from unlearn_ext.models.initial_head import INITIAL_HEAD_BUFFER, attach_initial_head
from unlearn_ext.models.mnemonic_codes import CODES_BUFFER, attach_codes
from unlearn_ext.models.vision import build_model

_META_KEY = "unlearn_ext"
FORMAT_VERSION = 1


def fsync_directory(path: str | os.PathLike) -> None:
    """``fsync`` a directory so a rename or a new file inside it survives a power loss (POSIX; a no-op
    where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, *, before_replace: Callable[[Path], None] | None = None
) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, ``fsync``, ``os.replace``
    and an ``fsync`` of the folder: readers see the old file or the new one, never a partial one.

    ``before_replace(temp_path)`` runs after the temporary file is complete and synced, just before
    the rename (the crash tests stop the process there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600: give it the replaced file's mode, or the umask's default.
        if path.exists():
            mode = path.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name): the checksum a
    checkpoint records so that silent corruption of its data (a flipped byte) is detected on load."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_bytes(model: nn.Module, *, metadata: dict | None = None) -> bytes:
    """The safetensors bytes :func:`save_checkpoint` writes for ``model`` (built by :func:`build_model`)."""
    from safetensors.torch import save

    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError("save_checkpoint needs a model built by unlearn_ext.models.build_model (it has .config)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    record = {
        "format": FORMAT_VERSION,
        "config": config,
        "train_config": getattr(model, "train_config", None),
        "metadata": metadata or {},
        "tensors_sha256": tensors_digest(tensors),
    }
    return save(tensors, metadata={_META_KEY: json.dumps(record)})


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Save a model built by :func:`build_model` (it has ``.config``) to ``path`` (``.safetensors``), atomically."""
    atomic_write_bytes(path, checkpoint_bytes(model, metadata=metadata))
    return Path(path)


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`. Returns ``(model in eval mode, record)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file, not an unlearn_ext checkpoint, or its tensors do
            not match its config (a corrupt or foreign checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return load_checkpoint_bytes(path.read_bytes(), source=str(path), device=device)


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, JSON header)."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"header length {n} runs past the end of the {len(data)}-byte file")
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("the safetensors __metadata__ is not a JSON object")
    return meta


def read_checkpoint_record(path: str | os.PathLike) -> dict | None:
    """The unlearn_ext record (config, train_config, metadata) from a checkpoint's header only, without
    reading its tensors; None when the file is missing, unreadable or not an unlearn_ext checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= 100 * 2**20:
                return None
            meta = _safetensors_metadata(head + f.read(n))
        record = json.loads(meta[_META_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def load_checkpoint_bytes(
    data: bytes, *, source: str = "<bytes>", device: str | torch.device = "cpu", cast: bool = True
) -> tuple[nn.Module, dict]:
    """:func:`load_checkpoint` from the file's bytes (so they can be hashed and loaded from one read);
    ``source`` names the file in errors. Parameters saved in another float dtype (e.g. float64) are
    loaded as float32 with a warning, or refused with ``cast=False``."""
    from safetensors.torch import load

    path = source
    try:
        meta = _safetensors_metadata(data)
        tensors = load(data)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors checkpoint (corrupt or truncated?): {e}") from e
    if _META_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file but not an unlearn_ext checkpoint (no {_META_KEY!r} metadata)")
    try:
        record = json.loads(meta[_META_KEY])
        if not isinstance(record, dict) or not isinstance(record.get("metadata", {}), dict):
            raise TypeError("the record and its 'metadata' must be JSON objects")
        config = dict(record["config"])
        arch = config.pop("arch")
        if arch == "minillava":
            raise ValueError(
                f"{path} is a multimodal (MiniLlava) checkpoint, not a classifier: load it with "
                "unlearn_ext.siu.checkpoint.load_multimodal_checkpoint"
            )
        input_shape = tuple(config.pop("input_shape"))
        num_classes = config.pop("num_classes")
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt unlearn_ext metadata: {e}") from e
    try:
        model = build_model(arch, input_shape, num_classes, **config)
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: torch refuses e.g. a negative size
        raise ValueError(f"{path}: corrupt or foreign unlearn_ext config {record['config']!r}: {e}") from e
    recorded = record.get("tensors_sha256") if isinstance(record, dict) else None
    if recorded is not None and recorded != tensors_digest(tensors):
        raise ValueError(f"{path}: the tensor data does not match the checksum recorded when it was saved (corrupt)")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path}: tensors {bad[:5]} contain NaN or inf (a corrupt or diverged checkpoint)")
    codes = tensors.pop(CODES_BUFFER, None)
    initial_head = tensors.pop(INITIAL_HEAD_BUFFER, None)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) > 1:
        raise ValueError(f"{path}: the parameters mix dtypes {sorted(map(str, float_dtypes))} (corrupt or foreign)")
    saved = float_dtypes.pop() if float_dtypes else torch.float32
    if saved != torch.float32:  # the models, data and methods run in float32
        if not cast:
            raise ValueError(
                f"{path} holds {saved} parameters; unlearn_ext's models, data and methods run in float32, so "
                "the result would be a float32 checkpoint: convert it explicitly (model.float()) and save that"
            )
        warnings.warn(f"{path}: {saved} parameters loaded as float32", stacklevel=3)
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
