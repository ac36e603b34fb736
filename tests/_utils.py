"""Shared test helpers: capability checks, the tolerance table, input makers and comparisons.

Comparisons are against ``unlearn_ext.ops._reference`` evaluated in float64 on the very values the
op saw (low-precision inputs are upcast exactly), so the only error left is the op's own rounding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
import torch

# --------------------------------------------------------------------------------------------
# What can run here (computed, never guessed)
# --------------------------------------------------------------------------------------------


def cpp_available() -> bool:
    """The compiled C++ CPU kernels of unlearn_ext are loaded and registered."""
    from unlearn_ext import _loader

    return _loader.has_kernel("sq_grad_linear", "cpu")


def cpp_unavailable_reason() -> str:
    from unlearn_ext import _loader

    if _loader.LOAD_ERROR is not None:
        return f"unlearn_ext._C failed to load: {_loader.LOAD_ERROR}"
    return "unlearn_ext::sq_grad_linear has no CPU kernel registered"


def triton_interpret_set() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device() -> str:
    """Where the Triton tests run: CPU tensors under TRITON_INTERPRET=1, else the GPU when there is one."""
    if triton_interpret_set() or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def triton_available_here() -> bool:
    """Triton is importable and can run on :func:`triton_device` (interpreter on CPU, or a GPU)."""
    from unlearn_ext._triton import HAS_TRITON

    return HAS_TRITON and (triton_interpret_set() or torch.cuda.is_available())


def triton_unavailable_reason() -> str:
    from unlearn_ext._triton import HAS_TRITON, TRITON_IMPORT_ERROR

    if not HAS_TRITON:
        return f"Triton is not importable ({TRITON_IMPORT_ERROR})"
    return "TRITON_INTERPRET=1 is not set (it must be exported before Python starts) and there is no GPU"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def backend_device(backend: str) -> str:
    """The device whose tensors ``backend`` runs on in this test suite."""
    if backend == "triton":
        return triton_device()
    return "cuda" if backend == "cuda" else "cpu"


# --------------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------------

# rtol of ``assert_close_rel``: max |actual - expected| <= rtol * max |expected| (a norm-wise
# relative error; element-wise rtol is meaningless here because negative sample weights make some
# entries cancel to ~0).
#  * float64: every backend accumulates in float64; errors are ~1e-15 relative.
#  * float32: accumulation in float32 over up to a few thousand squared terms and T-long dot
#    products; observed <= 3e-6 relative, 1e-5 leaves margin without hiding real bugs (a wrong
#    tile or a dropped sample is an O(1) error).
#  * bfloat16/float16: the ops accumulate in float32 and a product of two bf16 (8-bit) or fp16
#    (11-bit mantissa) values is exact in float32, so against the float64 reference of the *same*
#    (rounded) inputs they are exactly as accurate as float32. The rule of DESIGN.md 6 (<= 2x plain
#    PyTorch's error) is checked on top by ``assert_low_precision_rule``.
TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}


def rtol_for(dtype: torch.dtype) -> float:
    return TOL[dtype]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _worst(actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual.double() - expected.double()).abs()
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return (
        f"worst element at {list(idx)}: actual {actual[idx].item()!r}, expected {expected[idx].item()!r}, "
        f"|diff| {diff[idx].item():.3e}"
    )


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max())


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, *, what: str = "") -> None:
    """Assert ``max|actual - expected| <= rtol * max|expected|`` (exact zeros when expected is all 0).

    Shapes must match exactly. On failure the message gives the worst element.
    """
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {list(actual.shape)} != expected {list(expected.shape)}"
    )
    if expected.numel() == 0:
        return
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    assert bool(torch.isfinite(a).all()), f"{what}: result has non-finite values; {_worst(a, e)}"
    scale = float(e.double().abs().max())
    err = max_abs_err(a, e)
    allowed = rtol * scale
    assert err <= allowed, (
        f"{what}: max abs error {err:.3e} > rtol {rtol:g} * max|expected| {scale:.3e} "
        f"(relative {err / scale if scale else float('inf'):.3e}); {_worst(a, e)}"
    )


def assert_results_close(actual, expected, rtol: float, *, what: str = "") -> None:
    """``assert_close_rel`` on a tensor or on matching tuples (weight, bias)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
        assert_close_rel(actual, expected, rtol, what=what)
        return
    assert isinstance(actual, tuple) and len(actual) == len(expected), (
        f"{what}: expected a tuple of {len(expected)} tensors, got {type(actual).__name__}"
    )
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close_rel(a, e, rtol, what=f"{what}[{i}]")


# --------------------------------------------------------------------------------------------
# Input makers
# --------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def make_tensor(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    layout: str = "contiguous",
    device: str | torch.device = "cpu",
    expand_dim: int = 0,
) -> torch.Tensor:
    """A fresh standard-normal tensor of ``shape`` with the memory ``layout``:

    * ``contiguous``;
    * ``transposed``: the last two dims are swapped in memory (stride 1 on dim -2);
    * ``sliced``: every other element of a larger tensor along dim 0 and a column window offset by
      one along the last dim (non-unit batch stride, non-zero storage offset);
    * ``expanded``: stride 0 along ``expand_dim`` (one slice broadcast).
    """
    shape = tuple(int(s) for s in shape)
    if layout == "contiguous":
        return torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    if layout == "transposed":
        assert len(shape) >= 2
        base = torch.randn((*shape[:-2], shape[-1], shape[-2]), dtype=torch.float64).to(dtype).to(device)
        out = base.transpose(-1, -2)
    elif layout == "sliced":
        big = (2 * shape[0] + 1, *shape[1:-1], shape[-1] + 3)
        base = torch.randn(big, dtype=torch.float64).to(dtype).to(device)
        out = base[1::2][: shape[0]][..., 1 : 1 + shape[-1]]
    elif layout == "expanded":
        one = list(shape)
        one[expand_dim] = 1
        out = torch.randn(one, dtype=torch.float64).to(dtype).to(device).expand(shape)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert tuple(out.shape) == shape
    assert not out.is_contiguous() or 1 in shape or 0 in shape, f"{layout} made a contiguous tensor"
    return out


def make_groups(batch: int, num_groups: int, *, empty: int | None = None, device="cpu") -> torch.Tensor:
    """Random int64 group ids in [0, num_groups) with group ``empty`` (if given) receiving no sample."""
    allowed = torch.tensor([k for k in range(num_groups) if k != empty])
    ids = allowed[torch.randint(0, allowed.numel(), (batch,))]
    if batch >= allowed.numel():  # every allowed group gets at least one sample
        ids[: allowed.numel()] = allowed[torch.randperm(allowed.numel())]
        ids = ids[torch.randperm(batch)]
    return ids.to(device)


def make_weights(batch: int, dtype: torch.dtype = torch.float32, *, device="cpu") -> torch.Tensor:
    """Sample weights: mostly positive, some exactly zero, some negative (when batch allows).

    The zeros and negatives sit at indices 1-4, never at the last sample, so dropping the last sample
    (an off-by-one) always changes the result.
    """
    w = torch.rand(batch, dtype=torch.float64) * 2 + 0.1
    for i, v in ((1, 0.0), (2, -0.75), (3, 0.0), (4, -1.5)):
        if i < batch - 1:
            w[i] = v
    return w.to(dtype).to(device)


# --------------------------------------------------------------------------------------------
# Plain PyTorch at the input dtype, for DESIGN.md 6's low-precision rule
# --------------------------------------------------------------------------------------------


def plain_sq_grad_linear(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_b w_b * einsum('bto,bti->boi', g, x)[b]**2`` per group, computed in x's dtype."""
    B = x.shape[0]
    x3 = x.reshape(B, -1, x.shape[-1])
    g3 = grad_out.reshape(B, -1, grad_out.shape[-1])
    sq = torch.einsum("bto,bti->boi", g3, x3) ** 2
    if sample_weight is not None:
        sq = sq * sample_weight.to(sq.dtype).view(-1, 1, 1)
    idx = torch.zeros(B, dtype=torch.long) if group is None else group.long()
    return torch.zeros((num_groups, *sq.shape[1:]), dtype=sq.dtype).index_add_(0, idx, sq)


def assert_low_precision_rule(
    actual: torch.Tensor, reference64: torch.Tensor, plain: torch.Tensor, *, k: float = 2.0, what: str = ""
) -> None:
    """DESIGN.md 6: our max error vs the float64 reference is at most ``k`` x plain PyTorch's error.

    The plain error is floored at float32 epsilon x max|reference| so a lucky exact plain result
    cannot make the bound zero.
    """
    assert tuple(actual.shape) == tuple(reference64.shape) == tuple(plain.shape)
    ours = max_abs_err(actual, reference64)
    theirs = max_abs_err(plain, reference64)
    floor = torch.finfo(torch.float32).eps * float(reference64.abs().max())
    bound = k * max(theirs, floor)
    assert ours <= bound, (
        f"{what}: error {ours:.3e} vs the float64 reference exceeds {k}x plain PyTorch's error "
        f"({theirs:.3e}, dtype {plain.dtype}); {_worst(actual.cpu(), reference64.cpu())}"
    )


# --------------------------------------------------------------------------------------------
# The CLI in a subprocess (crash tests)
# --------------------------------------------------------------------------------------------


def run_cli(args: Sequence[str], crash_at: str | None = None, *, timeout: float = 600, cwd=None):
    """``python -m unlearn_ext.cli *args`` from this checkout (in folder ``cwd``), one thread; ``crash_at``
    sets ``UNLEARN_EXT_APPLY_CRASH_AT`` (the apply step where the process SIGKILLs itself)."""
    import subprocess
    import sys
    from pathlib import Path

    from unlearn_ext.production.apply import CRASH_ENV

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "unlearn_ext.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


# The kernels with bfloat16/float16 paths (the fused LM-head losses on CUDA).
LOW_PRECISION_KERNELS = [
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.requires_cuda], id="cuda"),
    pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.requires_triton], id="triton"),
]


def skip_interpreted_bfloat16(backend: str, dtype: torch.dtype) -> None:
    """Skip a bfloat16 check of kernel outputs off a GPU. Measured: the Triton interpreter's float32 ->
    bfloat16 conversion truncates (also with fp_downcast_rounding), so a kernel's bfloat16 outputs
    carry twice the rounding error there; float16 rounds correctly and is checked everywhere."""
    if dtype == torch.bfloat16 and backend_device(backend) != "cuda":
        pytest.skip("bfloat16 kernel outputs are checked on a GPU (the Triton interpreter truncates)")


class UnlearnExtOpCalls:
    """A context manager recording every ``unlearn_ext::`` op the dispatcher runs below autograd
    (forward and backward ops alike) as ``(op name, args)``: ``with UnlearnExtOpCalls() as calls``."""

    def __enter__(self) -> list[tuple[str, tuple]]:
        from torch.utils._python_dispatch import TorchDispatchMode

        calls: list[tuple[str, tuple]] = []

        class _Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "unlearn_ext":
                    calls.append((func._opname, args))
                return func(*args, **(kwargs or {}))

        self._mode = _Record()
        self._mode.__enter__()
        return calls

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


HEAD_INPUTS = ("hidden", "weight", "bias")


def assert_grad_requests(loss_fn, d: dict, leaves: Sequence[str], reduction: str) -> None:
    """For a fused LM-head loss ``loss_fn(d)``: with only ``leaves`` of ``d``'s hidden/weight/bias
    requiring grad, the forward op's ``grad_mask`` (mean/sum: computed in the forward) or the
    backward op's ``output_mask`` (none: recomputed) asks for exactly those gradients, and autograd
    fills exactly those ``.grad``s; with nothing to differentiate no backward op runs."""
    for k in HEAD_INPUTS:
        d[k] = d[k].detach().clone().requires_grad_(k in leaves)
    want = [k in leaves for k in HEAD_INPUTS]
    with UnlearnExtOpCalls() as calls:
        loss = loss_fn(d)
        if leaves:
            loss.sum().backward()
    masks = [args[-1] for _, args in calls]
    if reduction == "none":
        assert masks == ([[False] * 3, want] if leaves else [[False] * 3]), masks
    else:
        assert masks == [want], masks
    for k in HEAD_INPUTS:
        assert (d[k].grad is not None) == (k in leaves), k


def assert_only_masked_grads(mask: Sequence[bool], got: Sequence, full: Sequence) -> None:
    """Gradient outputs ``got`` of an op called with ``mask`` (hidden, weight, bias) against the same
    op's ``full`` outputs with every gradient asked for: equal where asked, empty placeholders (not
    computed at all) elsewhere."""
    for wanted, a, b in zip(mask, got, full, strict=True):
        if wanted:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        else:
            assert a.numel() == 0, a.shape
