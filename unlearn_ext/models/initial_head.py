"""The classifier head's initialisation ``w0``, kept on the model (MUSO needs it, METHODS.md 3.2).

MUSO's relabelling treats the last linear layer as a linear model over the learned features, trained
from its initialisation: ``w0``, the final ``nn.Linear`` before training. It is stored as the
persistent buffer ``initial_head`` ``[C, d + 1]`` (weight, then bias as the last column; zeros when the
layer has no bias), so it travels with ``state_dict``, checkpoints and copies like the mnemonic codes.
"""

from __future__ import annotations

import torch
from torch import nn

from unlearn_ext.models.heads import final_linear

INITIAL_HEAD_BUFFER = "initial_head"


def head_matrix(layer: nn.Linear) -> torch.Tensor:
    """``[C, d + 1]``: the layer's weight with its bias (or zeros) appended as the last column."""
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features, device=layer.weight.device)
    return torch.cat([layer.weight.detach(), bias.detach().to(layer.weight.dtype)[:, None]], dim=1)


def attach_initial_head(model: nn.Module, head: torch.Tensor | None = None) -> nn.Module:
    """Store ``head`` (default: the model's final ``nn.Linear`` as it is now, i.e. call this before
    training) as the persistent buffer ``initial_head``. Returns ``model``.

    Raises:
        ValueError: a model without a final ``nn.Linear``, a ``head`` of the wrong shape or with NaN/inf,
            or an unrelated attribute already named ``initial_head``.
    """
    layer = final_linear(model)
    expected = (layer.out_features, layer.in_features + 1)
    if head is None:
        head = head_matrix(layer)
    if not isinstance(head, torch.Tensor) or tuple(head.shape) != expected or not head.is_floating_point():
        got = tuple(head.shape) if isinstance(head, torch.Tensor) else type(head).__name__
        raise ValueError(f"initial head must be a floating tensor of shape {list(expected)} [C, d + 1], got {got}")
    if not bool(torch.isfinite(head).all()):
        raise ValueError("initial head contains NaN or inf")
    if hasattr(model, INITIAL_HEAD_BUFFER) and INITIAL_HEAD_BUFFER not in dict(model.named_buffers(recurse=False)):
        raise ValueError(f"model already has an attribute {INITIAL_HEAD_BUFFER!r} that is not its initial-head buffer")
    model.register_buffer(
        INITIAL_HEAD_BUFFER, head.detach().to(device=layer.weight.device, dtype=torch.float32).clone(), persistent=True
    )
    return model


def get_initial_head(model: nn.Module) -> torch.Tensor | None:
    """The model's stored head initialisation ``[C, d + 1]``, or ``None`` when it has none."""
    return dict(model.named_buffers(recurse=False)).get(INITIAL_HEAD_BUFFER)
