"""Self-contained safetensors checkpoints of a multimodal :class:`~unlearn_ext.siu.minimmu.MiniLlava`.

One file holds everything ``unlearn apply`` needs to forget a concept from a deployed multimodal
model, with no network and no other file:

* every weight of the model (vision encoder, projector, language model; a tied LM head is stored
  once and re-tied on load);
* its tokenizer, as the files ``save_pretrained`` writes (``tokenizer.json``, its config and chat
  template), stored as ``uint8`` tensors under ``__tokenizer__.<file name>`` so the checksum covers
  them and the header stays small;
* in the ``unlearn_ext`` metadata record: ``config`` (``arch = "minillava"``, the image placeholder
  id, the number of visual tokens, the encoder width, the image shape, and the language model's
  Hugging Face config), ``image_preprocess`` (how an image file becomes ``pixel_values``),
  ``concept_defaults`` (the questions the model was trained to answer about images: the default
  identity prompts of a concept request), user ``metadata`` (lineage: ``unlearn_history``) and
  ``tensors_sha256`` (verified on load).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from unlearn_ext.models.checkpoint import (
    _META_KEY,
    _safetensors_metadata,
    atomic_write_bytes,
    tensors_digest,
)

__all__ = [
    "MULTIMODAL_ARCH",
    "is_multimodal_record",
    "load_image",
    "load_multimodal_checkpoint",
    "load_multimodal_checkpoint_bytes",
    "multimodal_checkpoint_bytes",
    "save_multimodal_checkpoint",
]

MULTIMODAL_ARCH = "minillava"
FORMAT_VERSION = 1
_TOKENIZER_PREFIX = "__tokenizer__."
#: ConceptRequest text fields a checkpoint may give defaults for.
CONCEPT_DEFAULT_KEYS = frozenset({"kind", "identity_prompts", "identity_answer", "recognition_prompts", "refusal"})


def is_multimodal_record(record: dict | None) -> bool:
    """Whether a checkpoint record (from :func:`~unlearn_ext.models.checkpoint.read_checkpoint_record`)
    describes a multimodal checkpoint of this module."""
    config = record.get("config") if isinstance(record, dict) else None
    return isinstance(config, dict) and config.get("arch") == MULTIMODAL_ARCH


def _check_preprocess(pre: dict, channels: int) -> dict:
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"images with {channels} channels are not supported (1: grayscale, 3: RGB)")
    out = {"mode": mode, "scale": float(pre.get("scale", 255.0))}
    for key in ("mean", "std"):
        v = pre.get(key, 0.0 if key == "mean" else 1.0)
        vals = [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * channels
        if len(vals) != channels:
            raise ValueError(f"image_preprocess {key} has {len(vals)} values for {channels} channels")
        out[key] = vals
    if any(s <= 0 for s in out["std"]) or out["scale"] <= 0:
        raise ValueError("image_preprocess std and scale must be positive")
    return out


def _tokenizer_tensors(tokenizer) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        files = sorted(p for p in Path(d).rglob("*") if p.is_file())
        return {
            _TOKENIZER_PREFIX + str(p.relative_to(d)): torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
            for p in files
        }


def multimodal_checkpoint_bytes(
    model: nn.Module,
    tokenizer,
    *,
    image_shape: tuple[int, int, int],
    image_preprocess: dict | None = None,
    concept_defaults: dict | None = None,
    metadata: dict | None = None,
) -> bytes:
    """The safetensors bytes of a :class:`MiniLlava` with its tokenizer (see the module doc).

    Args:
        image_shape: ``(C, H, W)`` of the model's ``pixel_values`` for one image.
        image_preprocess: ``{"scale", "mean", "std"}``: ``pixel_values = (pixel / scale - mean) / std``
            per channel (defaults 255, 0, 1).
        concept_defaults: defaults for a concept request's text (:data:`CONCEPT_DEFAULT_KEYS`).
    """
    from safetensors.torch import save

    from unlearn_ext.siu.minimmu import MiniLlava

    if not isinstance(model, MiniLlava):
        raise TypeError(f"multimodal checkpoints hold a MiniLlava, got {type(model).__name__}")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    bad = sorted(set(concept_defaults or {}) - CONCEPT_DEFAULT_KEYS)
    if bad:
        raise ValueError(f"unknown concept_defaults {bad}; allowed: {sorted(CONCEPT_DEFAULT_KEYS)}")
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in first_of:  # tied weights (the LM head and the input embeddings): stored once
            aliases[name] = first_of[key]
            continue
        first_of[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    tensors.update(_tokenizer_tensors(tokenizer))
    lm_config = model.model.decoder.config.to_dict()
    config = {
        "arch": MULTIMODAL_ARCH,
        "image_token_id": int(model.image_token_id),
        "num_image_tokens": int(model.num_image_tokens),
        "width": int(model.model.vision.width),
        "input_shape": [int(s) for s in image_shape],
        "lm_model_type": lm_config.get("model_type"),
        "lm": lm_config,
    }
    record = {
        "format": FORMAT_VERSION,
        "config": config,
        "image_preprocess": _check_preprocess(image_preprocess or {}, image_shape[0]),
        "concept_defaults": dict(concept_defaults or {}),
        "aliases": aliases,
        "metadata": metadata or {},
        "tensors_sha256": tensors_digest(tensors),
    }
    return save(tensors, metadata={_META_KEY: json.dumps(record, default=str)})


def save_multimodal_checkpoint(model: nn.Module, tokenizer, path: str | os.PathLike, **kw) -> Path:
    """Write :func:`multimodal_checkpoint_bytes` to ``path`` atomically (temp file, fsync, rename)."""
    atomic_write_bytes(path, multimodal_checkpoint_bytes(model, tokenizer, **kw))
    return Path(path)


def _build_model(config: dict) -> nn.Module:
    import transformers

    from unlearn_ext.siu.minimmu import MiniLlava

    lm_dict = dict(config["lm"])
    model_type = lm_dict.pop("model_type", config.get("lm_model_type"))
    lm_config = transformers.AutoConfig.for_model(model_type, **lm_dict)
    lm = transformers.AutoModelForCausalLM.from_config(lm_config)
    return MiniLlava(
        lm, image_token_id=int(config["image_token_id"]), num_image_tokens=int(config["num_image_tokens"]),
        width=int(config["width"]),
    )  # fmt: skip


def _load_tokenizer(files: dict[str, bytes]):
    import transformers

    with tempfile.TemporaryDirectory() as d:
        root = Path(d).resolve()  # TMPDIR may be a symbolic link
        for name, data in files.items():
            target = root / name
            if root not in target.resolve().parents:
                raise ValueError(f"tokenizer file name {name!r} leaves the tokenizer folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return transformers.AutoTokenizer.from_pretrained(root)


def load_multimodal_checkpoint_bytes(
    data: bytes, *, source: str = "<bytes>", device: str | torch.device = "cpu"
) -> tuple[nn.Module, object, dict]:
    """Load a multimodal checkpoint from its bytes: ``(model in eval mode, tokenizer, record)``.

    Raises:
        ValueError: not a readable safetensors file, not a multimodal unlearn_ext checkpoint, a checksum
            mismatch, NaN/inf weights, or tensors that do not match the recorded config.
    """
    from safetensors.torch import load

    try:
        meta = _safetensors_metadata(data)
        tensors = load(data)
    except Exception as e:
        raise ValueError(f"{source} is not a readable safetensors checkpoint (corrupt or truncated?): {e}") from e
    try:
        record = json.loads(meta[_META_KEY])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{source} is not an unlearn_ext checkpoint (no readable {_META_KEY!r} metadata)") from e
    if not is_multimodal_record(record):
        raise ValueError(f"{source} is not a multimodal (MiniLlava) checkpoint")
    if not isinstance(record.get("metadata", {}), dict) or not isinstance(record.get("aliases", {}), dict):
        raise ValueError(f"{source}: corrupt unlearn_ext metadata: 'metadata' and 'aliases' must be JSON objects")
    recorded = record.get("tensors_sha256")
    if recorded is None or recorded != tensors_digest(tensors):
        raise ValueError(f"{source}: the tensor data does not match the checksum recorded when it was saved (corrupt)")
    files = {
        k[len(_TOKENIZER_PREFIX) :]: bytes(tensors.pop(k).numpy())
        for k in list(tensors)
        if k.startswith(_TOKENIZER_PREFIX)
    }
    if not files:
        raise ValueError(f"{source}: the checkpoint holds no tokenizer")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{source}: tensors {bad[:5]} contain NaN or inf (a corrupt or diverged checkpoint)")
    try:
        model = _build_model(record["config"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: e.g. a negative size
        raise ValueError(f"{source}: corrupt or foreign multimodal config: {e}") from e
    for alias, target in (record.get("aliases") or {}).items():
        if target not in tensors:
            raise ValueError(f"{source}: tied tensor {alias!r} points at {target!r}, which is missing")
        tensors[alias] = tensors[target]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: tensors do not match the recorded MiniLlava config: {e}") from e
    try:
        tokenizer = _load_tokenizer(files)
    except Exception as e:  # transformers raises several types for unreadable tokenizer files
        raise ValueError(f"{source}: its tokenizer does not load: {e}") from e
    return model.to(device).eval(), tokenizer, record


def load_multimodal_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, object, dict]:
    """:func:`load_multimodal_checkpoint_bytes` from a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return load_multimodal_checkpoint_bytes(path.read_bytes(), source=str(path), device=device)


def load_image(path: str | os.PathLike, record: dict, *, data: bytes | None = None) -> torch.Tensor:
    """An image file (any format Pillow reads) as the checkpoint's ``pixel_values`` for one image,
    ``[C, H, W]`` float32: converted to the recorded mode, resized to ``H x W`` (bilinear) when it
    differs, then ``(pixel / scale - mean) / std`` per channel. ``data``: the file's bytes, already
    read (so that what is hashed is what is decoded); ``path`` then only names it in errors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file Pillow cannot read.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if data is None and not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    c, h, w = record["config"]["input_shape"]
    pre = record["image_preprocess"]
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im = im.convert(pre["mode"])
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e
    x = torch.from_numpy(arr.copy()).reshape(h, w, c).permute(2, 0, 1) / pre["scale"]
    mean = torch.tensor(pre["mean"]).view(c, 1, 1)
    std = torch.tensor(pre["std"]).view(c, 1, 1)
    return ((x - mean) / std).contiguous()


def save_image(pixel_values: torch.Tensor, path: str | os.PathLike, record: dict) -> Path:
    """Write one image's ``pixel_values`` ``[C, H, W]`` as an image file (PNG by its suffix), undoing
    the record's preprocessing, so that :func:`load_image` reads it back to within 1/255 per pixel."""
    from PIL import Image

    pre = record["image_preprocess"]
    c = pixel_values.shape[0]
    mean = torch.tensor(pre["mean"]).view(c, 1, 1)
    std = torch.tensor(pre["std"]).view(c, 1, 1)
    pixels = ((pixel_values.detach().cpu().float() * std + mean) * pre["scale"]).round().clamp(0, 255)
    arr = pixels.to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode=pre["mode"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_minimmu(
    path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    per_digit: int = 3,
    built=None,
    progress: bool = False,
) -> dict:
    """Write the MiniMMU model (built and cached on first use, see
    :func:`unlearn_ext.siu.minimmu.build_minimmu`) as a multimodal checkpoint at ``path``: the
    deployed model ``unlearn apply`` takes concept requests for. ``images``: a folder to receive,
    per digit ``d``, its first ``per_digit`` test-split images (``digit<d>_<k>.png``; the model never
    trained on them), to file requests with.

    Returns ``{"checkpoint": path, "bytes": size, "images": [paths]}``.
    """
    from unlearn_ext.siu.minimmu import IMAGE_QA, build_minimmu

    model, tok, ds, _ = built if built is not None else build_minimmu(progress=progress)
    record_pre = {"scale": 255.0, "mean": ds.mean, "std": ds.std}
    defaults = {
        "kind": "digit",
        "identity_prompts": [q for q, _ in IMAGE_QA],
        "identity_answer": [a.replace("{word}", "{concept}") for _, a in IMAGE_QA],
    }
    blob = multimodal_checkpoint_bytes(
        model, tok, image_shape=tuple(ds.input_shape), image_preprocess=record_pre, concept_defaults=defaults,
        metadata={"dataset": {"name": ds.name, "seed": 0}, "model": "minimmu"},
    )  # fmt: skip
    atomic_write_bytes(path, blob)
    written = []
    if images is not None:
        record = {"config": {"input_shape": list(ds.input_shape)}, "image_preprocess": _check_preprocess(record_pre, 1)}
        for d in range(ds.num_classes):
            for k, idx in enumerate((ds.y_test == d).nonzero().flatten()[:per_digit].tolist()):
                written.append(str(save_image(ds.x_test[idx], Path(images) / f"digit{d}_{k}.png", record)))
    return {"checkpoint": str(path), "bytes": len(blob), "images": written}
