"""Helpers shared by the public ops: argument checks with clear messages, and backend choice."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unlearn_ext import _loader
from unlearn_ext._triton import triton_available, triton_unavailable_reason

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ops accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def check_same_device(tensors: Sequence[tuple[str, torch.Tensor | None]]) -> torch.device:
    present = [(n, t) for n, t in tensors if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise RuntimeError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; move them to the same device"
            )
    return first.device


def check_accumulator(
    t: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device, name: str
) -> None:
    """An in-place accumulator: a contiguous tensor of exactly this shape, dtype and device."""
    check_tensor(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} (the accumulator dtype), got {t.dtype}")
    if t.device != device:
        raise RuntimeError(f"{name} is on {t.device} but the inputs are on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_group_weight(
    group: torch.Tensor | None,
    num_groups: int,
    sample_weight: torch.Tensor | None,
    batch: int,
) -> None:
    """Validate ``group`` ([B] integer ids in [0, num_groups)) and ``sample_weight`` ([B], finite)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    if group is not None:
        check_tensor(group, "group")
        if group.dtype.is_floating_point or group.dtype.is_complex or group.dtype == torch.bool:
            raise ValueError(f"group must be an integer tensor, got {group.dtype}")
        if group.shape != (batch,):
            raise ValueError(f"group must have shape [{batch}] (one id per sample), got {list(group.shape)}")
        if batch > 0 and not _is_tracing(group):
            lo, hi = int(group.min()), int(group.max())
            if lo < 0:
                raise ValueError(f"group ids must be >= 0, got {lo}")
            if hi >= num_groups:
                raise ValueError(
                    f"group id {hi} is out of range for num_groups={num_groups} (num_groups must exceed every group id)"
                )
    if sample_weight is not None:
        check_tensor(sample_weight, "sample_weight")
        if not sample_weight.dtype.is_floating_point:
            raise ValueError(f"sample_weight must be a floating-point tensor, got {sample_weight.dtype}")
        if sample_weight.shape != (batch,):
            raise ValueError(f"sample_weight must have shape [{batch}], got {list(sample_weight.shape)}")
        if batch > 0 and not _is_tracing(sample_weight) and not bool(torch.isfinite(sample_weight).all()):
            raise ValueError("sample_weight contains NaN or inf")


def _is_tracing(t: torch.Tensor) -> bool:
    """True for fake/meta tensors (torch.compile tracing), where values cannot be inspected."""
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, FakeTensor) or torch.compiler.is_compiling()


def resolve_backend(backend: str, device: torch.device, op: str, *, has_cuda_kernel: bool = True) -> str:
    """Turn ``backend`` into one of cpp/cuda/triton/reference for tensors on ``device``, or raise.

    ``auto`` picks the fastest available kernel (C++ on CPU; CUDA, else Triton, on GPUs) and never
    falls back to the reference silently.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    kind = device.type
    if backend == "reference":
        return backend
    if backend == "auto":
        if kind == "cpu":
            _loader.require_extension(op)
            return "cpp"
        if kind == "cuda":
            if has_cuda_kernel and _loader.has_kernel(op, device):
                return "cuda"
            if triton_available(device):
                return "triton"
            raise RuntimeError(
                f"{op}: no kernel for {device}: the CUDA kernels were not built "
                f"({_cuda_missing_reason()}) and Triton cannot run ({triton_unavailable_reason(device)})"
            )
        raise RuntimeError(f"{op}: no kernel for {kind} tensors (supported: cpu, cuda); use backend='reference'")
    if backend == "cpp":
        if kind != "cpu":
            raise ValueError(f"{op}: backend='cpp' runs on CPU tensors, got {kind}; use 'cuda' or 'triton'")
        _loader.require_extension(op)
        return backend
    if backend == "cuda":
        if kind != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got {kind}")
        if not has_cuda_kernel or not _loader.has_kernel(op, device):
            raise RuntimeError(f"{op}: the CUDA kernel is not available ({_cuda_missing_reason()})")
        return backend
    # triton
    if not triton_available(device):
        raise RuntimeError(f"{op}: backend='triton' cannot run on {device}: {triton_unavailable_reason(device)}")
    return backend


def _cuda_missing_reason() -> str:
    if not _loader.extension_loaded():
        return f"unlearn_ext._C failed to load: {_loader.LOAD_ERROR}"
    if not _loader.BUILD_INFO.get("with_cuda"):
        return "this build of unlearn_ext has no CUDA kernels; rebuild where torch has CUDA"
    return "no CUDA kernel registered"


def head_grad_mask(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reduction: str) -> list[bool]:
    """The ``grad_mask`` of a fused LM-head loss (hidden, weight, bias): which of them autograd will
    want a gradient for, so the forward computes those and no other (a frozen head's ``[V, H]``
    weight gradient is the largest buffer of the op). All False under ``torch.no_grad()``, for
    ``reduction="none"`` and for float16: their gradients are computed in the backward op. float16
    because a forward cannot know the upstream gradient: ``dLoss/dz`` stored in float16 before a
    loss scaler's factor arrives underflows (a mean over 8192 tokens at V = 128256 makes its entries
    about 1e-9), where the backward op computes it with the factor in its coefficients, as plain
    PyTorch does (at 1.5x the GEMM work: the logits are computed again)."""
    if reduction == "none" or not torch.is_grad_enabled() or hidden.dtype == torch.float16:
        return [False, False, False]
    return [t is not None and t.requires_grad for t in (hidden, weight, bias)]


def head_grad_fakes(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: Sequence[bool]):
    """Fake ``(grad_hidden, grad_weight, grad_bias)`` of a fused LM-head op: full shapes where ``mask``
    (hidden, weight, bias) asks for them, distinct empty tensors elsewhere."""
    return (
        hidden.new_empty(hidden.shape) if mask[0] else hidden.new_empty(0),
        weight.new_empty(weight.shape) if mask[1] else hidden.new_empty(0),
        bias.new_empty(bias.shape) if mask[2] and bias is not None else hidden.new_empty(0),
    )


def output_mask(needs: Sequence[bool], has_bias: bool) -> list[bool]:
    """The gradients a fused LM-head op computes for ``needs`` (hidden, weight, bias first: a
    ``grad_mask``, or ``ctx.needs_input_grad`` for the backward ops' ``output_mask``): no bias
    gradient without a bias."""
    return [bool(needs[0]), bool(needs[1]), bool(needs[2]) and has_bias]


def scale_saved_grads(saved, grad_loss: torch.Tensor, needs: Sequence[bool], has_bias: bool, computed: Sequence[bool]):
    """Backward of a fused loss whose forward already computed the gradients ``computed`` says
    (its ``grad_mask``), ``saved = (dh, dw, db)``: each scaled by the scalar upstream ``grad_loss``,
    or ``None`` where ``needs`` (the first three ``ctx.needs_input_grad``) says no. An upstream
    gradient of exactly 1 (``loss.backward()``) returns the saved tensors as they are: the ``[V, H]``
    weight gradient is the largest buffer, and a scaled copy would double it. Only a plain tensor's
    value is inspected (not a fake or functional tensor under tracing, which always multiplies)."""
    for name, need, done in zip(("hidden", "weight", "bias"), needs[:3], computed, strict=True):
        if need and not done and (name != "bias" or has_bias):
            raise RuntimeError(
                f"the gradient of {name} is needed but the forward did not compute it ({name} did not require "
                "grad when the loss was computed): compute the loss again after setting requires_grad"
            )
    gh, gw, gb = saved
    if type(grad_loss) is torch.Tensor and grad_loss.device.type != "meta":
        # The factor in full precision: a bfloat16 copy of it (0.3 -> 0.30078) would scale every
        # gradient by the same wrong amount.
        s = float(grad_loss)
        out = [t if s == 1.0 else t * s for t in (gh, gw, gb)]
    else:
        out = [t * grad_loss for t in (gh, gw, gb)]  # a 0-dim factor keeps t's dtype, computed in opmath
    return (
        out[0] if needs[0] else None,
        out[1] if needs[1] else None,
        out[2] if has_bias and needs[2] else None,
    )
