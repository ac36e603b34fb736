"""The split ``model = head . features`` of a classifier whose last layer is an ``nn.Linear``
(METHODS.md 4.2: m = g . f). OPC, the feature-mapping attack, CKA and linear probing need the
penultimate features ``f(x)`` and the final linear layer ``g``.
"""

from __future__ import annotations

import torch
from torch import nn


def final_linear(model: nn.Module) -> nn.Linear:
    """The model's output layer: the last ``nn.Linear`` registered in it (for :class:`MLP` and
    :class:`SmallCNN`, the layer producing the logits). Raises ValueError when there is none."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: cannot split it into features and a head")
    return last


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features ``[B, d]`` = the input of :func:`final_linear`, logits ``[B, C]``) of one
    forward pass of ``model`` on ``x``; gradients flow through both (the caller picks the mode)."""
    layer = final_linear(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(
            f"the final nn.Linear of {type(model).__name__} ran {len(captured)} times in one forward pass; "
            "features are defined only when it runs exactly once"
        )
    feats = captured[0]
    if feats.dim() != 2 or logits.dim() != 2 or feats.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected [B, d] features and [B, C] logits, got {list(feats.shape)} and {list(logits.shape)}"
        )
    return feats, logits
