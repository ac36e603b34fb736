"""Mnemonic codes (METHODS.md 1.2): one fixed Uniform[0, 1) image per class, mixed into training.

Codes are stored on the model as the persistent buffer ``mnemonic_codes`` (``[C, *input_shape]``), so
they travel with ``state_dict``, checkpoints and copies, and forgetting reuses exactly the training codes.
"""

from __future__ import annotations

import torch
from torch import nn

CODES_BUFFER = "mnemonic_codes"


def make_codes(num_classes: int, input_shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    """``[num_classes, *input_shape]`` float32 codes drawn i.i.d. Uniform[0, 1), seeded, not normalised."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    return torch.rand((num_classes, *input_shape), generator=g)


def attach_codes(model: nn.Module, codes: torch.Tensor) -> nn.Module:
    """Store ``codes`` on ``model`` (persistent buffer ``mnemonic_codes``). Returns ``model``."""
    if not isinstance(codes, torch.Tensor) or not codes.is_floating_point() or codes.dim() < 2:
        raise ValueError("codes must be a floating tensor [num_classes, *input_shape]")
    if not torch.isfinite(codes).all():
        raise ValueError("codes contain NaN or inf")
    if hasattr(model, CODES_BUFFER) and CODES_BUFFER not in dict(model.named_buffers(recurse=False)):
        raise ValueError(f"model already has an attribute {CODES_BUFFER!r} that is not its codes buffer")
    ref = next(model.parameters(), None)
    codes = codes.detach().to(device=ref.device if ref is not None else codes.device, dtype=torch.float32)
    model.register_buffer(CODES_BUFFER, codes.clone(), persistent=True)
    return model


def get_codes(model: nn.Module) -> torch.Tensor | None:
    """The model's mnemonic codes, or ``None`` when it was trained without them."""
    return dict(model.named_buffers(recurse=False)).get(CODES_BUFFER)
