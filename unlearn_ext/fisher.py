"""Model-level diagonal Fisher: hooks that feed layer inputs and output gradients to the fused ops.

``diagonal_fisher(model, batches)`` runs one forward and one backward per batch. Forward hooks keep
each supported layer's input; tensor hooks on the layer's output receive the gradient of the summed
per-sample losses, and the layer's squared per-sample gradients go straight into the Fisher buffers
through :mod:`unlearn_ext.ops` (no ``[B, *param.shape]`` per-sample gradients, and no weight
gradients: parameters are frozen during the pass). Supported layers: ``nn.Linear``, ``nn.Conv2d``
(zero padding), ``nn.Embedding``, ``nn.LayerNorm``, RMSNorm layers (``nn.RMSNorm`` and Hugging Face
``*RMSNorm``), BatchNorm in eval mode, and Hugging Face ``Conv1D``. Tied parameters and parameters of
other layers are exact through ``torch.func`` per-sample gradients, with a warning naming them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from unlearn_ext.ops import sq_grad_conv2d, sq_grad_embedding, sq_grad_linear
from unlearn_ext.ops._common import accum_dtype

__all__ = ["causal_lm_targets", "diagonal_fisher", "per_sample_cross_entropy", "supported_layer_kind"]

GRANULARITIES = ("sample", "token", "batch")
LABEL_MODES = ("empirical", "sampled")
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Losses and targets
# --------------------------------------------------------------------------------------------


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find logits in the model output of type {type(outputs).__name__}: return a tensor, an object "
        "with .logits, or a tuple whose first item is the logits; or pass loss_fn"
    )


def per_sample_cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, summed over every non-batch position; ``-100`` targets are ignored.

    Args:
        outputs: ``[B, C]`` or ``[B, T, V]`` logits, or a model output with ``.logits``.
        targets: ``[B]`` or ``[B, T]`` class ids aligned with the logits (for causal LMs, already
            shifted: see :func:`causal_lm_targets`).

    Returns:
        ``[B]`` float32 (float64 for float64 logits) losses.
    """
    logits = _logits(outputs)
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point:
        raise TypeError("targets must be an integer tensor of class ids for the default cross-entropy loss")
    acc = accum_dtype(logits.dtype)
    if logits.dim() == 2:
        if targets.shape != logits.shape[:1]:
            raise ValueError(
                f"targets must have shape {list(logits.shape[:1])} for [B, C] logits, got {list(targets.shape)}"
            )
        return F.cross_entropy(logits.to(acc), targets.long(), ignore_index=IGNORE_INDEX, reduction="none")
    if logits.dim() >= 3:
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets must have shape {list(logits.shape[:-1])} for logits {list(logits.shape)}, "
                f"got {list(targets.shape)}"
            )
        flat = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).to(acc),
            targets.reshape(-1).long(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        return flat.view(logits.shape[0], -1).sum(1)
    raise ValueError(f"logits must be [B, C] or [B, T, V], got shape {list(logits.shape)}")


def causal_lm_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets aligned with a causal LM's logits: ``targets[:, t] = input_ids[:, t + 1]``.

    The last position, and positions whose next token is padding (``attention_mask == 0``), get -100.
    """
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        targets[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return targets


def _sample_targets(outputs: Any, targets: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Targets drawn from the model's own predictive distribution (Monte-Carlo "true" Fisher)."""
    logits = _logits(outputs).detach()
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    draws = torch.multinomial(probs.cpu(), 1, generator=generator).view(logits.shape[:-1]).to(logits.device)
    if targets is not None and isinstance(targets, torch.Tensor) and targets.shape == draws.shape:
        draws = torch.where(targets == IGNORE_INDEX, torch.full_like(draws, IGNORE_INDEX), draws)
    return draws


# --------------------------------------------------------------------------------------------
# Layer support
# --------------------------------------------------------------------------------------------


def _is_rmsnorm(m: nn.Module) -> bool:
    if isinstance(m, getattr(nn, "RMSNorm", ())):
        return m.weight is not None
    weight = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and (hasattr(m, "variance_epsilon") or hasattr(m, "eps"))
    )


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    if m.padding_mode != "zeros":
        return None
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            return None  # asymmetric 'same' padding
        return (total[0] // 2, total[1] // 2)
    return tuple(m.padding)  # type: ignore[return-value]


def supported_layer_kind(m: nn.Module) -> str | None:
    """The hook kind used for ``m`` ("linear", "conv2d", ...), or None when it needs the fallback."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv2d" if _conv_padding(m) is not None else None
    if isinstance(m, nn.Embedding):
        return "embedding"
    if isinstance(m, nn.LayerNorm):
        return "layernorm" if m.elementwise_affine else None
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm" if m.affine else None
    if _is_rmsnorm(m):
        return "rmsnorm"
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None:
        return "hf_conv1d"  # GPT-2 style: y = x @ W + b with W [d_in, d_out]
    return None


def _layer_params(m: nn.Module, kind: str) -> dict[str, nn.Parameter]:
    out = {}
    for attr in ("weight", "bias"):
        p = getattr(m, attr, None)
        if isinstance(p, nn.Parameter):
            out[attr] = p
    return out


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str
    params: dict[str, str]  # attr -> parameter name (only those we compute by hooks)
    inputs: list[torch.Tensor] = field(default_factory=list)
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    disabled: bool = False  # moved to the torch.func path


@dataclass
class _BatchContext:
    batch_size: int
    group: torch.Tensor | None  # [B] int64 or None


class _FisherPass:
    def __init__(self, model, fisher, num_groups, granularity, backend):
        self.model = model
        self.fisher = fisher
        self.num_groups = num_groups
        self.granularity = granularity
        self.backend = backend
        self.layers: list[_Layer] = []
        self.ctx: _BatchContext | None = None
        self.handles: list[Any] = []

    # ---- hooks ----
    def install(self) -> None:
        for layer in self.layers:
            self.handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _make_forward_hook(self, layer: _Layer):
        def hook(module, args, output):
            if self.ctx is None or layer.disabled or not args or not isinstance(output, torch.Tensor):
                return None
            index = len(layer.inputs)
            layer.inputs.append(args[0].detach())
            if output.requires_grad:
                output.register_hook(self._make_grad_hook(layer, index))
                return None
            # No graph reaches this output (parameters are frozen and the input needs no gradient, as
            # for a first layer): start one at a leaf here and hand on a copy, so that in-place ops
            # downstream (e.g. ReLU(inplace=True)) do not touch the leaf.
            leaf = output.detach().requires_grad_()
            leaf.register_hook(self._make_grad_hook(layer, index))
            return leaf.clone()

        return hook

    def _make_grad_hook(self, layer: _Layer, index: int):
        def hook(g):
            if layer.disabled:
                return None
            layer.grads[index] = g.detach()
            if len(layer.grads) == len(layer.inputs):
                self._accumulate(layer)
            return None

        return hook

    def begin_batch(self, ctx: _BatchContext) -> None:
        self.ctx = ctx
        for layer in self.layers:
            layer.inputs.clear()
            layer.grads.clear()

    def end_batch(self) -> None:
        for layer in self.layers:
            if layer.inputs and len(layer.grads) != len(layer.inputs):
                # some calls produced outputs that did not reach the loss: use what arrived
                if layer.grads:
                    layer.inputs = [layer.inputs[i] for i in sorted(layer.grads)]
                    layer.grads = {i: g for i, (_, g) in enumerate(sorted(layer.grads.items()))}
                    self._accumulate(layer)
            layer.inputs.clear()
            layer.grads.clear()
        self.ctx = None

    # ---- per-layer accumulation ----
    def _batch_first(self, t: torch.Tensor, B: int, layer: _Layer) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] == B:
            return t
        if t.dim() >= 3 and t.shape[1] == B:
            return t.transpose(0, 1)
        raise RuntimeError(
            f"layer {layer.name!r}: its input has shape {list(t.shape)} with no batch dimension of size {B} "
            "(the number of per-sample losses); diagonal_fisher needs batch-first layer inputs"
        )

    def _accumulate(self, layer: _Layer) -> None:
        assert self.ctx is not None
        B = self.ctx.batch_size
        xs = [self._batch_first(layer.inputs[i], B, layer) for i in range(len(layer.inputs))]
        gs = [self._batch_first(layer.grads[i], B, layer) for i in range(len(layer.inputs))]
        layer.inputs.clear()
        layer.grads.clear()
        kind = layer.kind
        if kind == "conv2d":
            if len(xs) > 1:
                raise RuntimeError(
                    f"Conv2d {layer.name!r} is called {len(xs)} times in one forward; its per-sample Fisher "
                    "needs the torch.func path (internal error: it should have been routed there)"
                )
            self._units(kind, layer, xs[0], gs[0])
            return
        # Several calls of one layer in a forward: the sample's gradient sums over calls, i.e. over
        # the concatenation of their tokens.
        if kind == "embedding":
            x = torch.cat([x.reshape(B, -1) for x in xs], 1) if len(xs) > 1 else xs[0].reshape(B, -1)
            d = gs[0].shape[-1]
            g = torch.cat([g.reshape(B, -1, d) for g in gs], 1) if len(gs) > 1 else gs[0].reshape(B, -1, d)
        elif kind == "batchnorm":
            x = torch.cat([x.reshape(B, x.shape[1], -1) for x in xs], 2) if len(xs) > 1 else xs[0]
            g = torch.cat([g.reshape(B, g.shape[1], -1) for g in gs], 2) if len(gs) > 1 else gs[0]
        else:
            x = torch.cat([x.reshape(B, -1, x.shape[-1]) for x in xs], 1) if len(xs) > 1 else xs[0]
            g = torch.cat([g.reshape(B, -1, g.shape[-1]) for g in gs], 1) if len(gs) > 1 else gs[0]
        self._units(kind, layer, x, g)

    def _units(self, kind: str, layer: _Layer, x: torch.Tensor, g: torch.Tensor) -> None:
        """Apply the granularity: per sample, per token (each token its own unit), or per batch/group."""
        group = self.ctx.group
        B = x.shape[0]
        if self.granularity == "sample":
            self._layer_fisher(kind, layer, x, g, group)
        elif self.granularity == "token":
            x_t, g_t = _flat_tokens(kind, x, g)
            reps = x_t.shape[0] // B
            gt = None if group is None else group.repeat_interleave(reps)
            self._layer_fisher(kind, layer, x_t, g_t, gt)
        else:  # batch: every group's samples form one unit (their gradients are summed)
            keys = [None] if group is None else torch.unique(group).tolist()
            for k in keys:
                idx = None if k is None else (group == k).nonzero().flatten()
                kt = None if k is None else torch.tensor([k], device=group.device)
                if kind == "conv2d":
                    self._conv_batch_unit(layer, x, g, idx, 0 if k is None else k)
                else:
                    self._layer_fisher(kind, layer, *_merge_units(kind, x, g, idx), kt)

    def _conv_batch_unit(self, layer: _Layer, x, g, idx, k: int) -> None:
        """The squared summed gradient of a group's samples: one ordinary weight-gradient GEMM."""
        m = layer.module
        if idx is not None:
            x, g = x.index_select(0, idx), g.index_select(0, idx)
        fw = self.fisher.get(layer.params.get("weight", ""))
        fb = self.fisher.get(layer.params.get("bias", ""))
        if fw is not None:
            gw = torch.nn.grad.conv2d_weight(
                x.to(fw.dtype),
                m.weight.shape,
                g.to(fw.dtype),
                m.stride,
                _conv_padding(m),
                m.dilation,
                m.groups,
            )
            fw[k] += gw.square()
        if fb is not None:
            fb[k] += g.to(fb.dtype).sum((0, 2, 3)).square()

    def _layer_fisher(self, kind, layer, x, g, group) -> None:
        m = layer.module
        K = self.num_groups
        w_name = layer.params.get("weight")
        b_name = layer.params.get("bias")
        fw = self.fisher.get(w_name) if w_name else None
        fb = self.fisher.get(b_name) if b_name else None
        be = self.backend
        if kind == "linear" or kind == "hf_conv1d":
            x2 = x.to(g.dtype) if x.dtype != g.dtype else x
            if kind == "hf_conv1d":
                tmp = (
                    torch.zeros((K, g.shape[-1], x.shape[-1]), dtype=fw.dtype, device=fw.device)
                    if fw is not None
                    else None
                )
                if tmp is not None:
                    sq_grad_linear(x2, g, group=group, num_groups=K, out=tmp, backend=be)
                    fw.add_(tmp.transpose(1, 2))
                if fb is not None:
                    _vector_fisher(fb, g.reshape(g.shape[0], -1, g.shape[-1]).sum(1), group)
                return
            if fw is not None and fb is not None:
                sq_grad_linear(x2, g, group=group, num_groups=K, with_bias=True, out=(fw, fb), backend=be)
            elif fw is not None:
                sq_grad_linear(x2, g, group=group, num_groups=K, out=fw, backend=be)
            elif fb is not None:
                _vector_fisher(fb, g.reshape(g.shape[0], -1, g.shape[-1]).sum(1), group)
            return
        if kind == "conv2d":
            x2 = x.to(g.dtype) if x.dtype != g.dtype else x
            args = (x2, g, tuple(m.weight.shape), m.stride, _conv_padding(m), m.dilation, m.groups)
            if fw is not None and fb is not None:
                sq_grad_conv2d(*args, group=group, num_groups=K, with_bias=True, out=(fw, fb), backend=be)
            elif fw is not None:
                sq_grad_conv2d(*args, group=group, num_groups=K, out=fw, backend=be)
            elif fb is not None:
                _vector_fisher(fb, g.sum((2, 3)), group)
            return
        if kind == "embedding":
            if fw is not None:
                sq_grad_embedding(
                    x,
                    g,
                    m.num_embeddings,
                    padding_idx=m.padding_idx,
                    group=group,
                    num_groups=K,
                    out=fw,
                    backend=be,
                )
            return
        # Affine norms: dy/dweight = normalised input, dy/dbias = 1, per feature (channel).
        if kind == "batchnorm":
            acc = fw.dtype if fw is not None else fb.dtype
            shape = (1, -1) + (1,) * (x.dim() - 2)
            xhat = (x.to(acc) - m.running_mean.to(acc).view(shape)) * torch.rsqrt(
                m.running_var.to(acc).view(shape) + m.eps
            )
            reduce_dims = tuple(range(2, x.dim()))
            if fw is not None:
                _vector_fisher(fw, (g.to(acc) * xhat).sum(reduce_dims) if reduce_dims else g.to(acc) * xhat, group)
            if fb is not None:
                _vector_fisher(fb, g.to(acc).sum(reduce_dims) if reduce_dims else g.to(acc), group)
            return
        acc = fw.dtype if fw is not None else fb.dtype
        xa = x.to(acc)
        if kind == "layernorm":
            dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
            mean = xa.mean(dims, keepdim=True)
            var = xa.var(dims, unbiased=False, keepdim=True)
            xhat = (xa - mean) * torch.rsqrt(var + m.eps)
        else:  # rmsnorm
            eps = getattr(m, "variance_epsilon", None)
            if eps is None:
                eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            if isinstance(m, getattr(nn, "RMSNorm", ())):
                xhat = xa * torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps)
            else:  # Hugging Face RMSNorms normalise in float32, then cast back to the input dtype
                xf = x.to(torch.float32)
                xhat = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype).to(acc)
        nd = (fw if fw is not None else fb).dim() - 1  # dims of the affine parameter
        B = x.shape[0]
        flat = (B, -1, *x.shape[x.dim() - nd :])
        if fw is not None:
            _vector_fisher(fw, (g.to(acc) * xhat).reshape(flat).sum(1), group)
        if fb is not None:
            _vector_fisher(fb, g.to(acc).reshape(flat).sum(1), group)


def _vector_fisher(out: torch.Tensor, per_unit: torch.Tensor, group: torch.Tensor | None) -> None:
    """out[group[b]] += per_unit[b]**2 (per_unit [B, *shape], out [K, *shape])."""
    idx = torch.zeros(per_unit.shape[0], dtype=torch.long, device=out.device) if group is None else group
    out.index_add_(0, idx, per_unit.to(out.dtype).square())


def _flat_tokens(kind: str, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token becomes a unit: [B, T..., d] -> [B*T, 1, d] (embedding ids [B*T, 1])."""
    B = x.shape[0]
    if kind == "embedding":
        ids = x.reshape(B, -1)
        T = ids.shape[1]
        return ids.reshape(B * T, 1), g.reshape(B * T, 1, g.shape[-1])
    d_in, d_out = x.shape[-1], g.shape[-1]
    x3 = x.reshape(B, -1, d_in)
    T = x3.shape[1]
    return x3.reshape(B * T, 1, d_in), g.reshape(B * T, 1, d_out)


def _merge_units(kind, x, g, idx):
    """The samples ``idx`` (all when None) as one unit: their tokens concatenated."""
    if idx is not None:
        x, g = x.index_select(0, idx), g.index_select(0, idx)
    if kind == "embedding":
        return x.reshape(1, -1), g.reshape(1, -1, g.shape[-1])
    if kind == "batchnorm":
        c = x.shape[1]
        return x.transpose(0, 1).reshape(1, c, -1), g.transpose(0, 1).reshape(1, c, -1)
    return x.reshape(1, -1, x.shape[-1]), g.reshape(1, -1, g.shape[-1])


# --------------------------------------------------------------------------------------------
# torch.func fallback for tied parameters and unsupported layers
# --------------------------------------------------------------------------------------------


def _call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _index_batch(inputs: Any, idx: torch.Tensor) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.index_select(0, idx)
    if isinstance(inputs, Mapping):
        return {k: _index_batch(v, idx) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_index_batch(v, idx) for v in inputs)
    return inputs


def _fallback_fisher(model, names, inputs, targets, loss_fn, group, granularity, fisher, chunk_size):
    """Exact per-sample (or per-group) gradients of ``names`` via torch.func, squared into ``fisher``."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def unit_loss(p, inp, tgt):
        inp1 = _unsqueeze_tree(inp)
        out = functional_call(model, p, _as_args(inp1), _as_kwargs(inp1))
        return loss_fn(out, tgt.unsqueeze(0)).sum()

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*performance drop because we have not yet implemented the batching rule.*"
        )
        if granularity == "sample":
            B = targets.shape[0]
            idx = torch.zeros(B, dtype=torch.long, device=targets.device) if group is None else group
            if not _VMAP_FAILED.get(id(model), False):
                try:
                    per = vmap(grad(unit_loss), in_dims=(None, 0, 0), randomness="different", chunk_size=chunk_size)(
                        params, inputs, targets
                    )
                except RuntimeError as exc:  # data-dependent control flow in the model (e.g. HF masks)
                    if "vmap" not in str(exc):
                        raise
                    _VMAP_FAILED[id(model)] = True
                    warnings.warn(
                        f"diagonal_fisher: torch.func.vmap cannot batch this model ({str(exc)[:120]}...); the "
                        "fallback parameters use torch.func.grad one sample at a time",
                        stacklevel=4,
                    )
                else:
                    for n in names:
                        fisher[n].index_add_(0, idx, per[n].to(fisher[n].dtype).square())
                    return
            unit_grad = grad(unit_loss)
            for b in range(B):
                sel = torch.tensor([b], device=targets.device)
                gb = unit_grad(params, _squeeze_tree(_index_batch(inputs, sel)), targets[b])
                k = int(idx[b])
                for n in names:
                    fisher[n][k] += gb[n].to(fisher[n].dtype).square()
            return
        # batch: one gradient per group present in the batch
        groups = [None] if group is None else torch.unique(group).tolist()
        for k in groups:
            if k is None:
                inp, tgt, kk = inputs, targets, 0
            else:
                idx = (group == k).nonzero().flatten()
                inp, tgt, kk = _index_batch(inputs, idx), targets.index_select(0, idx), k

            def group_loss(p, inp=inp, tgt=tgt):
                return loss_fn(functional_call(model, p, _as_args(inp), _as_kwargs(inp)), tgt).sum()

            gk = grad(group_loss)(params)
            for n in names:
                fisher[n][kk] += gk[n].to(fisher[n].dtype).square()


# Models on which vmap failed once (by id): later batches go straight to the per-sample loop.
_VMAP_FAILED: dict[int, bool] = {}


def _squeeze_tree(inp):
    if isinstance(inp, torch.Tensor):
        return inp.squeeze(0)
    if isinstance(inp, Mapping):
        return {k: _squeeze_tree(v) for k, v in inp.items()}
    if isinstance(inp, (tuple, list)):
        return type(inp)(_squeeze_tree(v) for v in inp)
    return inp


def _unsqueeze_tree(inp):
    if isinstance(inp, torch.Tensor):
        return inp.unsqueeze(0)
    if isinstance(inp, Mapping):
        return {k: _unsqueeze_tree(v) for k, v in inp.items()}
    if isinstance(inp, (tuple, list)):
        return type(inp)(_unsqueeze_tree(v) for v in inp)
    return inp


def _as_args(inp):
    return () if isinstance(inp, Mapping) else (inp,)


def _as_kwargs(inp):
    return dict(inp) if isinstance(inp, Mapping) else None


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _batch_groups(groups, inputs, targets, extra, B, num_groups, device) -> torch.Tensor | None:
    if extra is not None:
        gid = extra
    elif groups is None:
        return None
    elif isinstance(groups, str):
        if groups not in ("targets", "labels"):
            raise ValueError(f"groups must be None, 'targets', or a callable, got {groups!r}")
        gid = targets
    elif callable(groups):
        gid = groups(inputs, targets)
    else:
        raise TypeError(
            f"groups must be None, 'targets', or a callable (inputs, targets) -> ids, got {type(groups).__name__}"
        )
    if not isinstance(gid, torch.Tensor) or gid.dtype.is_floating_point or gid.dtype == torch.bool:
        raise ValueError("group ids must be an integer tensor")
    gid = gid.to(device).long()
    if gid.shape != (B,):
        raise ValueError(f"group ids must have shape [{B}] (one per sample), got {list(gid.shape)}")
    if B and (int(gid.min()) < 0 or int(gid.max()) >= num_groups):
        raise ValueError(
            f"group ids must be in [0, num_groups={num_groups}), got values in [{int(gid.min())}, {int(gid.max())}]"
        )
    return gid


@contextlib.contextmanager
def _frozen(params: Iterable[nn.Parameter]):
    params = list(params)
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in zip(params, saved, strict=True):
            p.requires_grad_(r)


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    groups: str | Callable[[Any, Any], torch.Tensor] | None = None,
    num_groups: int = 1,
    granularity: str = "sample",
    labels: str = "empirical",
    seed: int = 0,
    params: Iterable[str] | None = None,
    backend: str = "auto",
    fallback_chunk_size: int | None = 8,
    return_counts: bool = False,
    progress: bool = False,
    _allow_empty: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Diagonal Fisher of ``model``'s parameters: the sum over units of squared per-unit gradients.

    Args:
        model: any ``nn.Module``; called as ``model(inputs)`` (``model(**inputs)`` for a mapping).
        batches: iterable of ``(inputs, targets)`` or ``(inputs, targets, group_ids)``.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (summed, never averaged).
            Default: :func:`per_sample_cross_entropy` (``[B, C]`` or ``[B, T, V]`` logits, or ``.logits``;
            ``-100`` targets ignored).
        groups: ``None``; ``"targets"`` (group = class label, e.g. one Fisher per class in one pass);
            or ``groups(inputs, targets) -> int [B]``. Ids must be in ``[0, num_groups)``.
        num_groups: K; with K > 1 every result gains a leading group dimension.
        granularity: ``"sample"`` (per-sample gradients), ``"token"`` (each token's contribution
            to a sequence layer is its own unit) or ``"batch"`` (the square of each batch's, or each
            group's within a batch, summed gradient).
        labels: ``"empirical"`` (the given targets) or ``"sampled"`` (targets drawn from the model's
            predictive distribution, seeded by ``seed``: the Monte-Carlo "true" Fisher; default loss only).
        params: parameter names to include (default: every parameter with ``requires_grad``).
        backend: kernel backend passed to the ops (``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"``, ``"reference"``).
        fallback_chunk_size: ``vmap`` chunk size of the ``torch.func`` path for tied/unsupported parameters.
        return_counts: also return the number of units per group (``[K]`` int64) to turn sums into means.
        progress: show a progress bar over batches.
        _allow_empty: private (:func:`unlearn_ext.distributed.distributed_diagonal_fisher`): no samples
            give zero sums and counts instead of the ValueError, for a rank whose data shard is empty.

    Returns:
        ``{param_name: Tensor}``, each ``[*param.shape]`` (``[K, *param.shape]`` when ``num_groups > 1``),
        float32 (float64 for float64 parameters); plus the counts when ``return_counts``.

    Raises:
        ValueError: bad arguments, a non-finite per-sample loss (the batch index is named), an empty
            ``batches``, BatchNorm in training mode (it couples samples).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if labels == "sampled" and loss_fn is not None:
        raise ValueError(
            "labels='sampled' draws targets from the logits, so it needs the default cross-entropy loss_fn"
        )
    loss = loss_fn or per_sample_cross_entropy

    named = dict(model.named_parameters(remove_duplicate=False))
    unique_named = dict(model.named_parameters())
    if params is None:
        wanted = {n for n, p in unique_named.items() if p.requires_grad}
    else:
        wanted = set(params)
        unknown = wanted - set(unique_named)
        if unknown:
            raise ValueError(f"unknown parameter names in params: {sorted(unknown)}")
    if not wanted:
        raise ValueError("no parameters to compute the Fisher of (all are frozen, or params is empty)")
    canonical = {id(p): n for n, p in unique_named.items()}
    owners: dict[int, int] = {}
    for _, p in named.items():
        owners[id(p)] = owners.get(id(p), 0) + 1

    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise ValueError(
                f"BatchNorm {mod_name!r} normalises with batch statistics (training mode or "
                "track_running_stats=False), which couples the samples of a batch so per-sample gradients "
                "are not defined; call model.eval() first"
            )

    device = next(iter(unique_named.values())).device
    first = next(iter(unique_named.values()))
    acc = accum_dtype(first.dtype)
    shape_of = {n: p.shape for n, p in unique_named.items()}
    fisher = {n: torch.zeros((num_groups, *shape_of[n]), dtype=acc, device=device) for n in sorted(wanted)}

    fp = _FisherPass(model, fisher, num_groups, granularity, backend)
    hooked: set[str] = set()
    for mod_name, m in model.named_modules():
        kind = supported_layer_kind(m)
        if kind is None:
            continue
        mine: dict[str, str] = {}
        for attr, p in _layer_params(m, kind).items():
            n = canonical[id(p)]
            if n in wanted and owners[id(p)] == 1:
                mine[attr] = n
        if mine:
            fp.layers.append(_Layer(mod_name, m, kind, mine))
            hooked.update(mine.values())
    if granularity == "token":
        spatial = [layer.name for layer in fp.layers if layer.kind in ("conv2d", "batchnorm")]
        if spatial:
            raise NotImplementedError(
                f"granularity='token' is defined for sequence layers (Linear, Embedding, LayerNorm/RMSNorm); "
                f"{spatial} have no token axis: use granularity='sample' or 'batch', or leave them out with params="
            )
    fallback = sorted(wanted - hooked)
    if fallback:
        tied = [n for n in fallback if owners[id(unique_named[n])] > 1]
        other = [n for n in fallback if n not in tied]
        parts = []
        if tied:
            parts.append(f"tied parameters {tied}")
        if other:
            parts.append(f"parameters of unsupported layers {other}")
        if granularity == "token":
            raise NotImplementedError(
                f"granularity='token' needs hooks on every parameter's layer, but {' and '.join(parts)} need the "
                "torch.func path, which has no per-token decomposition; use granularity='sample' or pass params="
            )
        warnings.warn(
            f"diagonal_fisher: {' and '.join(parts)} use exact torch.func per-sample gradients (slower, more "
            "memory) instead of the fused kernels",
            stacklevel=2,
        )

    counts = torch.zeros(num_groups, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    iterator: Iterable[Any] = batches
    if progress:
        from rich.progress import track

        iterator = track(batches, description="diagonal Fisher", transient=True)
    seen = 0
    fp.install()
    try:
        with _frozen(unique_named.values()):
            for bi, batch in enumerate(iterator):
                if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                    raise ValueError(
                        f"batch {bi}: batches must yield (inputs, targets) or (inputs, targets, group_ids), "
                        f"got {type(batch).__name__}"
                    )
                inputs, targets = _to_device(batch[0], device), _to_device(batch[1], device)
                extra = batch[2] if len(batch) == 3 else None
                outputs = _call_model_tracked(model, inputs, fp)
                if labels == "sampled":
                    targets = _sample_targets(
                        outputs, targets if isinstance(targets, torch.Tensor) else None, generator
                    )
                per_sample = loss(outputs, targets)
                if not isinstance(per_sample, torch.Tensor) or per_sample.dim() != 1:
                    raise ValueError(
                        f"batch {bi}: loss_fn must return per-sample losses of shape [B], got "
                        f"{getattr(per_sample, 'shape', type(per_sample).__name__)}"
                    )
                B = per_sample.shape[0]
                if not bool(torch.isfinite(per_sample.detach()).all()):
                    bad = (~torch.isfinite(per_sample.detach())).nonzero().flatten()[:5].tolist()
                    raise ValueError(f"batch {bi}: non-finite per-sample loss for samples {bad}")
                gid = _batch_groups(groups, inputs, targets, extra, B, num_groups, device)
                fp.ctx.batch_size = B
                fp.ctx.group = gid
                _route_unhookable(fp, fallback, B)
                if per_sample.requires_grad:
                    per_sample.sum().backward()
                fp.end_batch()
                if fallback:
                    _fallback_fisher(
                        model, fallback, inputs, targets, loss, gid, granularity, fisher, fallback_chunk_size
                    )
                units = _units_in_batch(granularity, B, gid, targets, num_groups)
                counts += units
                seen += B
    finally:
        fp.remove()
    if seen == 0 and not _allow_empty:
        raise ValueError("batches yielded no samples: the Fisher of an empty set is undefined")
    result = fisher if num_groups > 1 else {n: t[0] for n, t in fisher.items()}
    return (result, counts) if return_counts else result


def _call_model_tracked(model: nn.Module, inputs: Any, fp: _FisherPass) -> Any:
    fp.begin_batch(_BatchContext(batch_size=-1, group=None))
    return _call_model(model, inputs)


def _route_unhookable(fp: _FisherPass, fallback: list[str], batch_size: int) -> None:
    """Layers whose hooks cannot see per-sample gradients go to the torch.func path: inputs shared by
    the whole batch (e.g. GPT-2's position embedding sees [1, T] ids), and Conv2d layers called more
    than once per forward."""
    for layer in list(fp.layers):
        if not layer.inputs:
            continue
        why = None
        if layer.kind == "conv2d" and len(layer.inputs) > 1:
            why = f"is called {len(layer.inputs)} times per forward"
        elif any(not _has_batch_dim(x, batch_size) for x in layer.inputs):
            shapes = [list(x.shape) for x in layer.inputs]
            why = f"gets inputs {shapes} without a batch dimension of size {batch_size} (shared by all samples)"
        if why is None:
            continue
        if fp.granularity == "token":
            raise NotImplementedError(
                f"granularity='token': layer {layer.name!r} {why}, so its per-token contributions cannot be "
                "separated; use granularity='sample' or leave its parameters out with params="
            )
        warnings.warn(
            f"diagonal_fisher: layer {layer.name!r} {why}; its parameters use exact torch.func per-sample gradients",
            stacklevel=3,
        )
        layer.disabled = True
        fp.layers.remove(layer)
        fallback.extend(sorted(layer.params.values()))
        layer.inputs.clear()
        layer.grads.clear()


def _has_batch_dim(x: torch.Tensor, batch_size: int) -> bool:
    if x.dim() >= 1 and x.shape[0] == batch_size:
        return True
    return x.dim() >= 3 and x.shape[1] == batch_size


def _units_in_batch(granularity, B, gid, targets, num_groups) -> torch.Tensor:
    counts = torch.zeros(num_groups, dtype=torch.long)
    if granularity == "batch":
        if gid is None:
            counts[0] += 1
        else:
            counts[torch.unique(gid).cpu()] += 1
        return counts
    per = 1
    if granularity == "token" and isinstance(targets, torch.Tensor) and targets.dim() > 1:
        per = math.prod(targets.shape[1:])
    if gid is None:
        counts[0] += B * per
    else:
        counts += torch.bincount(gid.cpu(), minlength=num_groups) * per
    return counts
