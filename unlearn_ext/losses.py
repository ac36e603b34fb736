"""``nn.Module`` losses over the fused ops, taking a Hugging Face causal LM's pieces directly."""

from __future__ import annotations

import torch
from torch import nn

from unlearn_ext.ops.masked_kl import REDUCTIONS, fused_linear_masked_kl

__all__ = ["FusedMaskedKLLoss"]


def _head(head: nn.Module | torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, torch.Tensor):
        return head, None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be an nn.Linear-like module with .weight [V, H] or a weight tensor")
    return weight, getattr(head, "bias", None)


class FusedMaskedKLLoss(nn.Module):
    """SIU's dual masked KL (+ cross-entropy) on a causal LM's hidden states and LM head.

    ``loss = kl_weight * KL(reference || current) over (token_mask, vocab_mask) + ce_weight * CE``,
    computed by :func:`unlearn_ext.ops.fused_linear_masked_kl` without materialising logits.

    Args (constructor): ``kl_weight``, ``ce_weight``, ``temperature``, ``renormalize``,
    ``ignore_index``, ``reduction``, ``backend`` as in the op; ``shift`` (default True): the
    causal-LM convention, position ``t`` predicts token ``t + 1``: hidden states drop the last
    position and ``labels`` / ``token_mask`` drop the first, so ``token_mask[b, t]`` marks the
    *predicted* token ``t`` (for example the tokens of the phrase to forget, image tokens included
    in the positions).

    Forward:
        hidden_states: ``[B, T, H]`` (or ``[N, H]`` with ``shift=False``), e.g. the last entry of
            ``model(..., output_hidden_states=True).hidden_states`` (after the final norm).
        lm_head: the model's ``lm_head`` (``nn.Linear``) or its weight ``[V, H]``.
        ref_hidden_states, ref_lm_head: the same from the frozen reference model (no gradient).
        token_mask: bool ``[B, T]``: tokens in the KL (default: all). vocab_mask: bool ``[V]``.
        labels: ``[B, T]`` token ids for the CE (``ignore_index`` skipped); needed when ``ce_weight``.
    """

    def __init__(
        self,
        *,
        kl_weight: float = 1.0,
        ce_weight: float = 0.0,
        temperature: float = 1.0,
        renormalize: bool = False,
        ignore_index: int = -100,
        reduction: str = "mean",
        shift: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
        self.kl_weight, self.ce_weight, self.temperature = kl_weight, ce_weight, temperature
        self.renormalize, self.ignore_index, self.reduction = renormalize, ignore_index, reduction
        self.shift, self.backend = shift, backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        lm_head: nn.Module | torch.Tensor,
        ref_hidden_states: torch.Tensor,
        ref_lm_head: nn.Module | torch.Tensor,
        *,
        token_mask: torch.Tensor | None = None,
        vocab_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss: a scalar (mean/sum) or per-token ``[B, T - shift]`` (none)."""
        weight, bias = _head(lm_head, "lm_head")
        ref_weight, ref_bias = _head(ref_lm_head, "ref_lm_head")
        if hidden_states.shape[:-1] != ref_hidden_states.shape[:-1]:
            raise ValueError(
                f"hidden_states {list(hidden_states.shape)} and ref_hidden_states {list(ref_hidden_states.shape)} "
                "must have the same leading (batch, sequence) dimensions"
            )
        lead = hidden_states.shape[:-1]
        for t, name in ((token_mask, "token_mask"), (labels, "labels")):
            if t is not None and t.shape != lead:
                raise ValueError(
                    f"{name} must have shape {list(lead)} (hidden_states' leading dims), got {list(t.shape)}"
                )
        if self.shift:
            if hidden_states.dim() != 3:
                raise ValueError(f"shift=True needs [B, T, H] hidden states, got {list(hidden_states.shape)}")
            hidden_states, ref_hidden_states = hidden_states[:, :-1], ref_hidden_states[:, :-1]
            token_mask = token_mask[:, 1:] if token_mask is not None else None
            labels = labels[:, 1:] if labels is not None else None
        out_shape = hidden_states.shape[:-1]
        loss = fused_linear_masked_kl(
            hidden_states.reshape(-1, hidden_states.shape[-1]),
            weight,
            ref_hidden_states.reshape(-1, ref_hidden_states.shape[-1]).detach(),
            ref_weight.detach(),
            bias=bias,
            ref_bias=ref_bias.detach() if ref_bias is not None else None,
            token_mask=token_mask.reshape(-1) if token_mask is not None else None,
            vocab_mask=vocab_mask,
            target=labels.reshape(-1) if labels is not None else None,
            ce_weight=self.ce_weight,
            kl_weight=self.kl_weight,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            renormalize=self.renormalize,
            reduction=self.reduction,
            backend=self.backend,
        )
        return loss.reshape(out_shape) if self.reduction == "none" else loss
