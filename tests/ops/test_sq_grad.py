"""Tests of the squared per-sample gradient ops (DESIGN.md 4.1): sq_grad_linear, sq_grad_conv2d,
sq_grad_embedding, on every backend available here, against the float64 torch.func references.

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` (slow: shapes stay small there).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _utils import (
    TOL,
    accum_dtype,
    assert_close_rel,
    assert_low_precision_rule,
    assert_results_close,
    backend_device,
    make_groups,
    make_tensor,
    make_weights,
    plain_sq_grad_linear,
)

from unlearn_ext import _loader, sq_grad_conv2d, sq_grad_embedding, sq_grad_linear
from unlearn_ext.ops import _reference as ref

REPO = Path(__file__).resolve().parents[2]
OPS = torch.ops.unlearn_ext

# --------------------------------------------------------------------------------------------
# Backends and algorithms
# --------------------------------------------------------------------------------------------

_BACKEND_MARKS = {
    "auto": [pytest.mark.requires_cpp],
    "cpp": [pytest.mark.requires_cpp],
    "triton": [pytest.mark.triton, pytest.mark.requires_triton],
    "cuda": [pytest.mark.cuda, pytest.mark.requires_cuda],
    "reference": [],
}
_ALGORITHMS = {
    "auto": ("auto",),  # "auto" on CPU is the cpp kernel; its own algorithm choice is tested once
    "cpp": ("auto", "segmented", "hadamard", "per_sample"),
    "triton": ("auto", "segmented", "hadamard"),
    "cuda": ("auto", "segmented", "hadamard", "per_sample"),
}


def backends(*names: str) -> list:
    return [pytest.param(b, marks=_BACKEND_MARKS[b], id=b) for b in names]


def backend_algorithms(*names: str) -> list:
    return [pytest.param(b, a, marks=_BACKEND_MARKS[b], id=f"{b}-{a}") for b in names for a in _ALGORITHMS[b]]


KERNEL_BACKENDS = ("auto", "cpp", "triton", "cuda")


def _skip_if_missing(backend: str, op: str = "sq_grad_linear") -> str:
    """Return the device of ``backend``; skip when its compiled kernel is absent (CUDA builds)."""
    if backend == "cuda" and not _loader.has_kernel(op, "cuda"):
        pytest.skip(f"unlearn_ext was built without the CUDA kernel of {op}")
    return backend_device(backend)


def _cpu64(t: torch.Tensor | None) -> torch.Tensor | None:
    """Move to the CPU; floating tensors become float64 (exactly: every dtype used embeds in it)."""
    if t is None:
        return None
    t = t.detach().cpu()
    return t.double() if t.dtype.is_floating_point else t


def _ref_linear(x, g, *, group=None, num_groups=1, sample_weight=None, with_bias=False):
    return ref.sq_grad_linear_reference(
        _cpu64(x),
        _cpu64(g),
        group=_cpu64(group),
        num_groups=num_groups,
        sample_weight=_cpu64(sample_weight),
        with_bias=with_bias,
    )


def _ref_conv(x, g, ws, stride, padding, dilation, groups, **kw):
    kw = {k: _cpu64(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return ref.sq_grad_conv2d_reference(_cpu64(x), _cpu64(g), ws, stride, padding, dilation, groups, **kw)


def _ref_embedding(ids, g, num_embeddings, **kw):
    kw = {k: _cpu64(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return ref.sq_grad_embedding_reference(_cpu64(ids), _cpu64(g), num_embeddings, **kw)


def _check_dtype(result, dtype: torch.dtype) -> None:
    acc = accum_dtype(dtype)
    for t in result if isinstance(result, tuple) else (result,):
        assert t.dtype == acc, f"result dtype {t.dtype}, expected the accumulator dtype {acc}"


# ============================================================================================
# 1. Linear vs the float64 reference
# ============================================================================================

LINEAR_DIMS = {"odd": (37, 53), "tiles": (70, 130), "tiny": (1, 1)}  # (d_in, d_out)


@pytest.mark.parametrize("config", ["plain", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", list(LINEAR_DIMS))
@pytest.mark.parametrize("T", [1, 2, 5, 17])
@pytest.mark.parametrize(("backend", "algorithm"), backend_algorithms(*KERNEL_BACKENDS))
def test_linear_matches_reference(backend, algorithm, T, dims, dtype, config):
    device = _skip_if_missing(backend)
    B = 7
    d_in, d_out = LINEAR_DIMS[dims]
    x = make_tensor((B, T, d_in), dtype, device=device)
    g = make_tensor((B, T, d_out), dtype, device=device)
    kw = {}
    if config == "grouped":  # 3 groups, group 1 receives no sample; weights >0, =0 and <0; bias
        kw = dict(
            group=make_groups(B, 3, empty=1, device=device),
            num_groups=3,
            sample_weight=make_weights(B, dtype, device=device),
            with_bias=True,
        )
    res = sq_grad_linear(x, g, backend=backend, algorithm=algorithm, **kw)
    expected = _ref_linear(x, g, **kw)
    _check_dtype(res, dtype)
    assert_results_close(res, expected, TOL[dtype], what=f"{backend}/{algorithm}")
    if config == "grouped":
        assert res[0][1].abs().max() == 0 and res[1][1].abs().max() == 0, "the empty group is not zero"


LAYOUTS = [
    "x_transposed",
    "g_transposed",
    "sliced",
    "g_expanded_batch",
    "g_expanded_tokens",
    "g_expanded_features",
    "x_expanded_batch",
    "4d",
    "4d_permuted",
    "2d",
    "2d_transposed",
]


def _linear_layout_inputs(layout: str, dtype, device, B=6, T=5, d_in=37, d_out=70):
    mk = lambda shape, lay="contiguous", dim=0: make_tensor(shape, dtype, layout=lay, device=device, expand_dim=dim)
    if layout == "x_transposed":
        return mk((B, T, d_in), "transposed"), mk((B, T, d_out))
    if layout == "g_transposed":
        return mk((B, T, d_in)), mk((B, T, d_out), "transposed")
    if layout == "sliced":
        return mk((B, T, d_in), "sliced"), mk((B, T, d_out), "sliced")
    if layout == "g_expanded_batch":
        return mk((B, T, d_in)), mk((B, T, d_out), "expanded", 0)
    if layout == "g_expanded_tokens":
        return mk((B, T, d_in)), mk((B, T, d_out), "expanded", 1)
    if layout == "g_expanded_features":
        return mk((B, T, d_in)), mk((B, T, d_out), "expanded", 2)
    if layout == "x_expanded_batch":
        return mk((B, T, d_in), "expanded", 0), mk((B, T, d_out), "sliced")
    if layout == "4d":
        return mk((B, 3, 4, d_in)), mk((B, 3, 4, d_out))
    if layout == "4d_permuted":  # flattening the middle dims cannot be a view
        x = mk((B, 4, 3, d_in)).transpose(1, 2)
        g = mk((B, 3, 4, d_out), "sliced")
        return x, g
    if layout == "2d":
        return mk((B, d_in)), mk((B, d_out))
    if layout == "2d_transposed":
        return mk((B, d_in), "transposed"), mk((B, d_out), "transposed")
    raise AssertionError(layout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("backend", "algorithm"), backend_algorithms("cpp", "triton", "cuda"))
def test_linear_layouts(backend, algorithm, layout, dtype):
    device = _skip_if_missing(backend)
    x, g = _linear_layout_inputs(layout, dtype, device)
    B = x.shape[0]
    group = make_groups(B, 2, device=device)
    w = make_weights(B, dtype, device=device)
    res = sq_grad_linear(
        x, g, group=group, num_groups=2, sample_weight=w, with_bias=True, backend=backend, algorithm=algorithm
    )
    expected = _ref_linear(x, g, group=group, num_groups=2, sample_weight=w, with_bias=True)
    assert_results_close(res, expected, TOL[dtype], what=f"{backend}/{algorithm}/{layout}")


@pytest.mark.requires_cpp
@pytest.mark.parametrize("T", [1, 3, 300, 600])
def test_linear_auto_algorithm_long_sequences(T):
    """algorithm="auto" switches algorithm with T (segmented up to 512 tokens, then per-sample)."""
    x = make_tensor((3, T, 40), torch.float32)
    g = make_tensor((3, T, 20), torch.float32, layout="transposed")
    group = torch.tensor([1, 0, 1])
    expected = _ref_linear(x, g, group=group, num_groups=2)
    for algorithm in ("auto", "segmented"):
        res = sq_grad_linear(x, g, group=group, num_groups=2, backend="cpp", algorithm=algorithm)
        assert_close_rel(res, expected, TOL[torch.float32], what=algorithm)


@pytest.mark.parametrize(("backend", "algorithm"), backend_algorithms("triton"))
def test_triton_launches_groups_in_slices_of_the_grid_limit(monkeypatch, backend, algorithm):
    """Groups are the Triton grid's third axis, which CUDA caps at 65535: the launchers walk them in
    slices of MAX_GROUPS_PER_LAUNCH (2 here, so 5 groups take 3 launches; one group is empty)."""
    from unlearn_ext.ops import _sq_grad_triton

    monkeypatch.setattr(_sq_grad_triton, "MAX_GROUPS_PER_LAUNCH", 2)
    device = _skip_if_missing(backend)
    B = 11
    x = make_tensor((B, 3, 19), torch.float64, device=device)
    g = make_tensor((B, 3, 23), torch.float64, device=device)
    group = make_groups(B, 5, empty=3, device=device)
    w = make_weights(B, torch.float64, device=device)
    kw = dict(group=group, num_groups=5, sample_weight=w, with_bias=True)
    res = sq_grad_linear(x, g, backend=backend, algorithm=algorithm, **kw)
    assert_results_close(res, _ref_linear(x, g, **kw), TOL[torch.float64], what=algorithm)


LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
@pytest.mark.parametrize(("backend", "algorithm"), backend_algorithms("cpp", "triton", "cuda"))
def test_linear_low_precision(backend, algorithm, dtype, T):
    """bf16/fp16 inputs, float32 result: within float32 accuracy of the float64 reference of the same
    values, and (DESIGN.md 6) at most 2x the error of plain PyTorch in that dtype."""
    device = _skip_if_missing(backend)
    B, d_in, d_out = 9, 37, 70
    x = make_tensor((B, T, d_in), dtype, device=device)
    g = make_tensor((B, T, d_out), dtype, device=device)
    group = make_groups(B, 3, empty=2, device=device)
    w = make_weights(B, dtype, device=device)  # representable in dtype: plain and ours see the same w
    kw = dict(group=group, num_groups=3, sample_weight=w)
    res = sq_grad_linear(x, g, backend=backend, algorithm=algorithm, **kw)
    assert res.dtype == torch.float32
    expected = _ref_linear(x, g, **kw)
    assert_close_rel(res, expected, TOL[dtype], what=f"{backend}/{algorithm}/{dtype}")
    plain = plain_sq_grad_linear(x.cpu(), g.cpu(), group=group.cpu(), num_groups=3, sample_weight=w.cpu())
    assert_low_precision_rule(res, expected, plain, what=f"{backend}/{algorithm}/{dtype}")


# ============================================================================================
# 2. CPU threading modes and microkernel ISA variants
# ============================================================================================

# Mirrors csrc/cpu/sq_grad_segmented.cpp (kMinTokensPerThread, kPrivateBytes): which multi-thread
# mode a call takes. Used only to check that each test case really exercises the mode it names.
_MIN_TOKENS_PER_THREAD = 1024
_PRIVATE_BYTES = 6 << 20


def _cpu_parallel_mode(group, weight, T, d_out, d_in, elem_bytes, threads) -> str:
    gid = group.long().cpu()
    order = torch.sort(gid, stable=True).indices
    if weight is not None:
        order = order[weight.cpu()[order] != 0]
    sorted_groups = gid[order].tolist()
    n = len(sorted_groups)
    if threads <= 1:
        return "single"
    bounds = [n * r // threads for r in range(threads + 1)]
    private = 0
    for r in range(1, threads):
        if bounds[r + 1] > bounds[r]:
            span = sorted_groups[bounds[r + 1] - 1] - sorted_groups[bounds[r]] + 1
            private += span * d_out * d_in * elem_bytes
    if n * T < threads * _MIN_TOKENS_PER_THREAD or private > _PRIVATE_BYTES:
        return "tiles"
    return "samples"


THREAD_CASES = {
    # name: (threads, B, T, d_in, d_out, num_groups, expected mode)
    "samples_T32": (2, 128, 32, 40, 50, 3, "samples"),
    "samples_T1": (2, 4096, 1, 33, 45, 2, "samples"),
    "tiles_private_too_big": (2, 64, 32, 256, 256, 64, "tiles"),
    "tiles_few_tokens": (2, 7, 5, 70, 130, 3, "tiles"),
    "single_thread": (1, 128, 32, 70, 130, 16, "single"),
}


@pytest.mark.requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(THREAD_CASES))
def test_linear_cpu_threading_modes(case, dtype, num_threads):
    threads, B, T, d_in, d_out, K, mode = THREAD_CASES[case]
    if case == "tiles_private_too_big":  # every sample its own group, 4 groups left empty
        group = torch.randperm(B) % (K - 4)
    else:
        group = make_groups(B, K)
    w = make_weights(B, dtype)
    elem = 8 if dtype == torch.float64 else 4
    assert _cpu_parallel_mode(group, w, T, d_out, d_in, elem, threads) == mode, "test case misses its mode"
    x = make_tensor((B, T, d_in), dtype)
    g = make_tensor((B, T, d_out), dtype)
    torch.set_num_threads(threads)
    res = sq_grad_linear(x, g, group=group, num_groups=K, sample_weight=w, backend="cpp", algorithm="segmented")
    # Accumulating into a non-zero `out` must add (thread 0 writes `out` directly, others privately).
    out = torch.rand((K, d_out, d_in), dtype=accum_dtype(dtype))
    out0 = out.clone()
    with torch.no_grad():
        sq_grad_linear(x, g, group=group, num_groups=K, sample_weight=w, backend="cpp", out=out)
    torch.set_num_threads(num_threads)
    expected = _ref_linear(x, g, group=group, num_groups=K, sample_weight=w)
    assert_close_rel(res, expected, TOL[dtype], what=case)
    assert_close_rel(out - out0, expected, 2 * TOL[dtype], what=case)


@pytest.mark.requires_cpp
def test_conv2d_cpu_sample_parallel(num_threads):
    """Conv2d lowered to the linear kernel with T = H_out*W_out = 256 tokens per sample."""
    B, c_in, c_out = 8, 3, 8
    x = make_tensor((B, c_in, 18, 18), torch.float32)
    g = make_tensor((B, c_out, 16, 16), torch.float32)
    group = make_groups(B, 3)
    assert _cpu_parallel_mode(group, None, 256, c_out, c_in * 9, 4, 2) == "samples"
    torch.set_num_threads(2)
    res = sq_grad_conv2d(x, g, (c_out, c_in, 3, 3), group=group, num_groups=3, backend="cpp")
    torch.set_num_threads(num_threads)
    assert_close_rel(res, _ref_conv(x, g, (c_out, c_in, 3, 3), 1, 0, 1, 1, group=group, num_groups=3), 1e-5)


_ISA_SCRIPT = r"""
import json, torch
from unlearn_ext import _loader, sq_grad_linear
from unlearn_ext.ops._reference import sq_grad_linear_reference as ref
torch.manual_seed(0)
out = {"isa": None, "errors": {}}
try:
    out["isa"] = _loader.compiled_build_info().get("cpu_kernel_isa")
except Exception as exc:
    out["build_info_error"] = f"{type(exc).__name__}: {exc}"
try:
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for T, threads, B, d_in, d_out in ((1, 1, 9, 37, 53), (5, 1, 9, 37, 53), (1, 2, 3000, 33, 20),
                                           (16, 2, 200, 70, 45)):
            torch.set_num_threads(threads)
            x = torch.randn(B, d_in, T).to(dtype).transpose(1, 2)  # strided feature dim: packed path
            g = torch.randn(B, T, d_out).to(dtype)
            grp = torch.randint(0, 3, (B,))
            w = torch.rand(B).to(dtype)
            for name, xx in (("contiguous", x.contiguous()), ("transposed", x)):
                res = sq_grad_linear(xx, g, group=grp, num_groups=3, sample_weight=w, algorithm="segmented")
                exp = ref(x.double(), g.double(), group=grp, num_groups=3, sample_weight=w.double())
                key = f"{dtype}-T{T}-threads{threads}-{name}"
                out["errors"][key] = float((res.double() - exp).abs().max() / exp.abs().max())
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out))
"""


def _run_python(code: str, env_updates: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k, v in env_updates.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300
    )


def _result_line(proc: subprocess.CompletedProcess) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"no result (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")


@pytest.mark.requires_cpp
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_isa_variants(isa):
    """UNLEARN_EXT_CPU_ISA forces each microkernel variant (read once per process: subprocesses)."""
    proc = _run_python(_ISA_SCRIPT, {"UNLEARN_EXT_CPU_ISA": isa, "OMP_NUM_THREADS": "2"})
    result = _result_line(proc)
    problem = result.get("error") or result.get("build_info_error") or ""
    if "this CPU has no" in problem:
        pytest.skip(f"this CPU cannot run the {isa} microkernel: {problem}")
    assert not problem, problem
    assert result["isa"] == isa
    assert len(result["errors"]) == 24
    for key, err in result["errors"].items():
        dtype = {"torch.float64": torch.float64, "torch.float32": torch.float32}.get(key.split("-")[0])
        tol = TOL[dtype] if dtype is not None else TOL[torch.bfloat16]
        assert err <= tol, f"{isa} {key}: relative error {err:.3e} > {tol:g}"


@pytest.mark.requires_cpp
def test_cpu_isa_invalid_value_raises():
    proc = _run_python(_ISA_SCRIPT, {"UNLEARN_EXT_CPU_ISA": "bogus"})
    result = _result_line(proc)
    for key in ("error", "build_info_error"):
        assert result.get(key, "").startswith("ValueError: UNLEARN_EXT_CPU_ISA must be avx512, avx2 or baseline"), (
            result
        )
        assert "'bogus'" in result[key]


# ============================================================================================
# 3. out= accumulation
# ============================================================================================


def _linear_case(device, with_bias):
    B = 6
    x, g = make_tensor((B, 4, 37), device=device), make_tensor((B, 4, 70), device=device)
    kw = dict(
        group=make_groups(B, 3, empty=0, device=device),
        num_groups=3,
        sample_weight=make_weights(B, device=device),
    )
    shapes = [(3, 70, 37)] + ([(3, 70)] if with_bias else [])
    return (
        lambda **o: sq_grad_linear(x, g, with_bias=with_bias, **kw, **o),
        _ref_linear(x, g, with_bias=with_bias, **kw),
        shapes,
    )


def _conv_case(device, with_bias):
    x, g = make_tensor((3, 4, 7, 6), device=device), make_tensor((3, 6, 5, 2), device=device)
    ws, conv = (6, 2, 3, 2), dict(stride=(2, 2), padding=(2, 0), dilation=(1, 2), groups=2)
    kw = dict(group=torch.tensor([1, 0, 1], device=device), num_groups=2)
    expected = _ref_conv(x, g, ws, *conv.values(), with_bias=with_bias, **kw)
    shapes = [(2, *ws)] + ([(2, 6)] if with_bias else [])
    return lambda **o: sq_grad_conv2d(x, g, ws, **conv, with_bias=with_bias, **kw, **o), expected, shapes


def _embedding_case(device, with_bias):
    ids = torch.randint(0, 9, (5, 6), device=device)
    g = make_tensor((5, 6, 70), device=device)
    kw = dict(padding_idx=2, group=torch.tensor([0, 1, 1, 0, 1], device=device), num_groups=2)
    return lambda **o: sq_grad_embedding(ids, g, 9, **kw, **o), _ref_embedding(ids, g, 9, **kw), [(2, 9, 70)]


OUT_CASES = {
    "linear": (_linear_case, False),
    "linear_bias": (_linear_case, True),
    "conv2d": (_conv_case, False),
    "conv2d_bias": (_conv_case, True),
    "embedding": (_embedding_case, False),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda", "reference"))
def test_out_accumulates(backend, case):
    device = _skip_if_missing(backend)
    make, with_bias = OUT_CASES[case]
    call, expected, shapes = make(device, with_bias)
    outs = tuple(torch.rand(s, device=device) for s in shapes)
    start = tuple(o.clone() for o in outs)
    out_arg = outs if with_bias else outs[0]
    with torch.no_grad():
        r1 = call(out=out_arg, backend=backend)
        r2 = call(out=out_arg, backend=backend)
    for r in (r1, r2):  # returns the very tensors it was given
        got = r if isinstance(r, tuple) else (r,)
        assert all(a is b for a, b in zip(got, outs, strict=True))
    exp = expected if isinstance(expected, tuple) else (expected,)
    for o, s, e in zip(outs, start, exp, strict=True):
        assert_close_rel(o - s, 2 * e, 1e-5, what=f"{case} out after two calls")


def _out_error_cases(backend: str = "cpp"):
    x, g = torch.randn(4, 3, 5), torch.randn(4, 3, 6)
    lin = lambda **kw: sq_grad_linear(x, g, backend=backend, **kw)
    conv = lambda **kw: sq_grad_conv2d(
        torch.randn(2, 4, 5, 5), torch.randn(2, 6, 3, 3), (6, 4, 3, 3), backend=backend, **kw
    )
    emb = lambda **kw: sq_grad_embedding(torch.tensor([[1, 2]]), torch.randn(1, 2, 3), 4, backend=backend, **kw)
    return {
        "shape": (lambda: lin(out=torch.zeros(1, 5, 6)), ValueError, r"out must have shape \[1, 6, 5\]"),
        "groups_shape": (
            lambda: lin(num_groups=2, out=torch.zeros(1, 6, 5)),
            ValueError,
            "out must have shape",
        ),
        "dtype": (
            lambda: lin(out=torch.zeros(1, 6, 5, dtype=torch.float64)),
            ValueError,
            "out must be torch.float32",
        ),
        "bf16_dtype": (
            lambda: sq_grad_linear(
                x.bfloat16(), g.bfloat16(), backend=backend, out=torch.zeros(1, 6, 5, dtype=torch.bfloat16)
            ),
            ValueError,
            "out must be torch.float32",
        ),
        "noncontiguous": (
            lambda: lin(out=torch.zeros(1, 5, 6).transpose(1, 2)),
            ValueError,
            "out must be contiguous",
        ),
        "device": (lambda: lin(out=torch.zeros(1, 6, 5, device="meta")), RuntimeError, "out is on meta"),
        "not_tensor": (lambda: lin(out=[[0.0]]), ValueError, "out must be a tensor, or a pair"),
        "bias_needs_pair": (lambda: lin(with_bias=True, out=torch.zeros(1, 6, 5)), ValueError, "out="),
        "pair_without_bias": (
            lambda: lin(out=(torch.zeros(1, 6, 5), torch.zeros(1, 6))),
            ValueError,
            "out must be",
        ),
        "bias_shape": (
            lambda: lin(with_bias=True, out=(torch.zeros(1, 6, 5), torch.zeros(1, 5))),
            ValueError,
            "bias_out must have shape",
        ),
        "bias_dtype": (
            lambda: lin(with_bias=True, out=(torch.zeros(1, 6, 5), torch.zeros(1, 6, dtype=torch.float64))),
            ValueError,
            "bias_out must be",
        ),
        "conv_shape": (lambda: conv(out=torch.zeros(1, 6, 4, 3, 2)), ValueError, "out must have shape"),
        "conv_device": (
            lambda: conv(out=torch.zeros(1, 6, 4, 3, 3, device="meta")),
            RuntimeError,
            "out is on",
        ),
        "embedding_dtype": (
            lambda: emb(out=torch.zeros(1, 4, 3, dtype=torch.float64)),
            ValueError,
            "out must be",
        ),
        "embedding_shape": (lambda: emb(out=torch.zeros(1, 5, 3)), ValueError, "out must have shape"),
        "embedding_noncontiguous": (
            lambda: emb(out=torch.zeros(1, 3, 4).transpose(1, 2)),
            ValueError,
            "out must be contiguous",
        ),
    }


@pytest.mark.parametrize("backend", backends("cpp", "triton", "reference"))
@pytest.mark.parametrize("case", list(_out_error_cases()))
def test_out_invalid_raises(case, backend):
    fn, exc, match = _out_error_cases(backend)[case]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize(
    "op",
    [
        pytest.param("linear", marks=pytest.mark.requires_cpp),
        pytest.param("conv2d", marks=pytest.mark.requires_cpp),
        pytest.param("embedding", marks=pytest.mark.requires_cpp),
    ],
)
def test_out_with_requires_grad_raises(op):
    x = torch.randn(4, 3, 5, requires_grad=True)
    g = torch.randn(4, 3, 6)
    w = torch.rand(4, requires_grad=True)
    if op == "linear":
        with pytest.raises(RuntimeError, match="out= accumulates in place and is not differentiable"):
            sq_grad_linear(x, g, out=torch.zeros(1, 6, 5))
        with pytest.raises(RuntimeError, match="out="):
            sq_grad_linear(x.detach(), g, sample_weight=w, out=torch.zeros(1, 6, 5))
        with torch.no_grad():  # allowed without grad mode
            out = sq_grad_linear(x, g, out=torch.zeros(1, 6, 5))
        assert_close_rel(out, _ref_linear(x, g), 1e-5)
    elif op == "conv2d":
        xc = torch.randn(2, 4, 5, 5, requires_grad=True)
        with pytest.raises(RuntimeError, match="out="):
            sq_grad_conv2d(xc, torch.randn(2, 6, 3, 3), (6, 4, 3, 3), out=torch.zeros(1, 6, 4, 3, 3))
    else:
        ge = torch.randn(1, 2, 3, requires_grad=True)
        with pytest.raises(RuntimeError, match="out="):
            sq_grad_embedding(torch.tensor([[1, 2]]), ge, 4, out=torch.zeros(1, 4, 3))


# ============================================================================================
# 4. Empty and degenerate inputs
# ============================================================================================


@pytest.mark.parametrize(("backend", "algorithm"), backend_algorithms("cpp", "triton", "cuda"))
@pytest.mark.parametrize(
    "case", ["batch0", "batch0_2d", "tokens0", "all_weights_zero", "d_in0", "d_out0", "single_used_group"]
)
def test_linear_degenerate(case, backend, algorithm):
    device = _skip_if_missing(backend)
    B, T, d_in, d_out, K = 5, 3, 7, 9, 4
    group = torch.tensor([3, 3, 3, 3, 3])
    w = None
    if case == "batch0":
        B, group = 0, torch.zeros(0, dtype=torch.long)
        w = torch.zeros(0)
    elif case == "batch0_2d":
        B, T, group = 0, None, torch.zeros(0, dtype=torch.long)
    elif case == "tokens0":
        T = 0
    elif case == "all_weights_zero":
        w = torch.zeros(B)
    elif case == "d_in0":
        d_in = 0
    elif case == "d_out0":
        d_out = 0
    shape_x = (B, d_in) if T is None else (B, T, d_in)
    shape_g = (B, d_out) if T is None else (B, T, d_out)
    x, g = torch.randn(shape_x, device=device), torch.randn(shape_g, device=device)
    group = group.to(device)
    w = None if w is None else w.to(device)
    fw, fb = sq_grad_linear(
        x, g, group=group, num_groups=K, sample_weight=w, with_bias=True, backend=backend, algorithm=algorithm
    )
    assert fw.shape == (K, d_out, d_in) and fb.shape == (K, d_out)
    assert fw.dtype == fb.dtype == torch.float32
    # expected, by the formula (computed by the formula here, independently of every backend)
    ew = torch.zeros(K, d_out, d_in, dtype=torch.float64)
    eb = torch.zeros(K, d_out, dtype=torch.float64)
    if case not in ("batch0", "batch0_2d", "tokens0", "all_weights_zero") and d_out > 0:
        x3, g3 = _cpu64(x), _cpu64(g)
        ew[3] = torch.einsum("bto,bti->boi", g3, x3).square().sum(0)
        eb[3] = g3.sum(1).square().sum(0)
    assert_close_rel(fw, ew, 1e-5, what="weight")
    assert_close_rel(fb, eb, 1e-5, what="bias")
    assert fw[:3].count_nonzero() == 0 and fb[:3].count_nonzero() == 0


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_reference_backend_empty_batch(op):
    if op == "linear":
        res = sq_grad_linear(torch.randn(0, 3, 5), torch.randn(0, 3, 6), backend="reference")
        assert res.shape == (1, 6, 5)
    else:
        res = sq_grad_conv2d(torch.randn(0, 4, 5, 5), torch.randn(0, 6, 3, 3), (6, 4, 3, 3), backend="reference")
        assert res.shape == (1, 6, 4, 3, 3)
    assert res.count_nonzero() == 0


@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
@pytest.mark.parametrize("case", ["batch0", "all_weights_zero", "unused_groups"])
def test_conv2d_degenerate(case, backend):
    device = _skip_if_missing(backend, "sq_grad_conv2d")
    B = 0 if case == "batch0" else 3
    x, g = torch.randn(B, 4, 5, 5, device=device), torch.randn(B, 6, 3, 3, device=device)
    w = torch.zeros(B, device=device) if case == "all_weights_zero" else None
    group = torch.full((B,), 2, device=device)
    fw, fb = sq_grad_conv2d(
        x,
        g,
        (6, 2, 3, 3),
        groups=2,
        group=group,
        num_groups=4,
        sample_weight=w,
        with_bias=True,
        backend=backend,
    )
    assert fw.shape == (4, 6, 2, 3, 3) and fb.shape == (4, 6)
    if case == "unused_groups":
        exp = _ref_conv(x, g, (6, 2, 3, 3), 1, 0, 1, 2, group=group, num_groups=4, with_bias=True)
        assert_results_close((fw, fb), exp, 1e-5)
        assert fw[[0, 1, 3]].abs().max() == 0
    else:
        assert fw.abs().max() == 0 and fb.abs().max() == 0


@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
@pytest.mark.parametrize("case", ["tokens0", "all_padding", "all_weights_zero", "unused_ids_and_groups"])
def test_embedding_degenerate(case, backend):
    device = _skip_if_missing(backend, "sq_grad_embedding")
    ids = torch.randint(0, 3, (4, 0 if case == "tokens0" else 5), device=device)
    if case == "all_padding":
        ids.fill_(1)
    g = torch.randn(*ids.shape, 6, device=device)
    w = torch.zeros(4, device=device) if case == "all_weights_zero" else None
    group = torch.tensor([0, 0, 2, 0], device=device)
    res = sq_grad_embedding(ids, g, 7, padding_idx=1, group=group, num_groups=4, sample_weight=w, backend=backend)
    assert res.shape == (4, 7, 6)
    exp = _ref_embedding(ids, g, 7, padding_idx=1, group=group, num_groups=4, sample_weight=w)
    assert_close_rel(res, exp, 1e-5)
    assert res[[1, 3]].abs().max() == 0 and res[:, 3:].abs().max() == 0 and res[:, 1].abs().max() == 0


@pytest.mark.parametrize("backend", backends("cpp", "triton", "reference"))
def test_embedding_empty_batch(backend):
    res = sq_grad_embedding(torch.zeros(0, 3, dtype=torch.long), torch.randn(0, 3, 5), 4, backend=backend)
    assert res.shape == (1, 4, 5) and res.abs().max() == 0


# ============================================================================================
# 5. Bad input
# ============================================================================================


def _bad_linear_cases():
    x, g = torch.randn(4, 3, 5), torch.randn(4, 3, 6)
    xn = x.clone()
    xn[1, 2, 3] = float("nan")
    gi = g.clone()
    gi[0, 0, 0] = float("inf")
    return {
        "batch_mismatch": ((x, g[:3]), {}, ValueError, "grad_out has batch size 3 but x has 4"),
        "sequence_mismatch": ((x, g[:, :2]), {}, ValueError, r"grad_out's middle \(sequence\) dimensions"),
        "4d_sequence_mismatch": (
            (torch.randn(4, 2, 3, 5), torch.randn(4, 3, 2, 6)),
            {},
            ValueError,
            "grad_out's middle",
        ),
        "rank_mismatch": ((x, g[:, 0]), {}, ValueError, "grad_out must have the same rank as x"),
        "rank1": ((x[0, 0], g[0, 0]), {}, ValueError, "x must be"),
        "int_x": ((x.long(), g), {}, ValueError, "x must be float32"),
        "int_grad_out": ((x, g.int()), {}, ValueError, "grad_out must be float32"),
        "mixed_dtypes": (
            (x, g.double()),
            {},
            ValueError,
            r"x \(torch.float32\) and grad_out \(torch.float64\)",
        ),
        "x_not_tensor": ((x.numpy(), g), {}, TypeError, "x must be a torch.Tensor"),
        "grad_out_device": ((x, g.to("meta")), {}, RuntimeError, "grad_out is on meta"),
        "group_out_of_range": (
            (x, g),
            dict(group=torch.tensor([0, 1, 3, 1]), num_groups=3),
            ValueError,
            "group id 3 is out of range for num_groups=3",
        ),
        "group_default_num_groups": (
            (x, g),
            dict(group=torch.tensor([0, 1, 0, 1])),
            ValueError,
            "out of range for num_groups=1",
        ),
        "group_negative": (
            (x, g),
            dict(group=torch.tensor([0, -1, 0, 0]), num_groups=2),
            ValueError,
            "group ids",
        ),
        "group_float": (
            (x, g),
            dict(group=torch.tensor([0.0, 1, 0, 0]), num_groups=2),
            ValueError,
            "group must",
        ),
        "group_bool": (
            (x, g),
            dict(group=torch.ones(4, dtype=torch.bool), num_groups=2),
            ValueError,
            "group must",
        ),
        "group_shape": (
            (x, g),
            dict(group=torch.tensor([0, 1, 0]), num_groups=2),
            ValueError,
            r"group must have",
        ),
        "group_2d": (
            (x, g),
            dict(group=torch.zeros(4, 1, dtype=torch.long), num_groups=2),
            ValueError,
            "group must",
        ),
        "group_device": (
            (x, g),
            dict(group=torch.zeros(4, dtype=torch.long, device="meta")),
            RuntimeError,
            "group is on meta",
        ),
        "num_groups_zero": ((x, g), dict(num_groups=0), ValueError, "num_groups must be at least 1"),
        "num_groups_float": ((x, g), dict(num_groups=2.0), TypeError, "num_groups must be an int"),
        "weight_shape": (
            (x, g),
            dict(sample_weight=torch.ones(3)),
            ValueError,
            r"sample_weight must have shape \[4\]",
        ),
        "weight_nan": (
            (x, g),
            dict(sample_weight=torch.tensor([1.0, float("nan"), 1.0, 1.0])),
            ValueError,
            "sample_weight contains NaN",
        ),
        "weight_inf": (
            (x, g),
            dict(sample_weight=torch.tensor([1.0, 1.0, float("inf"), 1.0])),
            ValueError,
            "sample_weight contains NaN or inf",
        ),
        "weight_int": (
            (x, g),
            dict(sample_weight=torch.ones(4, dtype=torch.long)),
            ValueError,
            "sample_weight must",
        ),
        "unknown_algorithm": ((x, g), dict(algorithm="fast"), ValueError, "algorithm must be one of"),
        "nan_x": ((xn, g), {}, ValueError, "non-finite"),
        "inf_grad_out": ((x, gi), {}, ValueError, "non-finite"),
        "nan_x_bias": ((xn, g), dict(with_bias=True), ValueError, "non-finite"),
    }


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Triton interpreter on NaN
@pytest.mark.parametrize("backend", backends("cpp", "triton"))
@pytest.mark.parametrize("case", list(_bad_linear_cases()))
def test_linear_bad_input(case, backend):
    args, kw, exc, match = _bad_linear_cases()[case]
    with pytest.raises(exc, match=match):
        sq_grad_linear(*args, backend=backend, **kw)


@pytest.mark.requires_triton
@pytest.mark.triton
def test_triton_rejects_per_sample_algorithm():
    dev = backend_device("triton")
    with pytest.raises(ValueError, match="algorithm='per_sample' is not a Triton kernel"):
        sq_grad_linear(
            torch.randn(2, 3, 4, device=dev), torch.randn(2, 3, 5, device=dev), backend="triton", algorithm="per_sample"
        )


def test_unknown_backend_raises():
    x, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        sq_grad_linear(x, g, backend="numpy")
    with pytest.raises(ValueError, match="backend must be one of"):
        sq_grad_conv2d(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 1, 1), (2, 2, 3, 3), backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        sq_grad_embedding(torch.tensor([[0]]), torch.randn(1, 1, 2), 3, backend="")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-tensor error; a CUDA device is present")
def test_cuda_backend_on_cpu_tensors_raises():
    x, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        sq_grad_linear(x, g, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        sq_grad_conv2d(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 1, 1), (2, 2, 3, 3), backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        sq_grad_embedding(torch.tensor([[0]]), torch.randn(1, 1, 2), 3, backend="cuda")


_NO_INTERPRETER_SCRIPT = r"""
import json, torch
from unlearn_ext import sq_grad_conv2d, sq_grad_embedding, sq_grad_linear
from unlearn_ext._triton import HAS_TRITON
res = {"has_triton": HAS_TRITON}
calls = {
    "linear": lambda: sq_grad_linear(torch.randn(2, 3, 4), torch.randn(2, 3, 5), backend="triton"),
    "conv2d": lambda: sq_grad_conv2d(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 1, 1), (2, 2, 3, 3),
                                     backend="triton"),
    "embedding": lambda: sq_grad_embedding(torch.tensor([[0]]), torch.randn(1, 1, 2), 3, backend="triton"),
}
for name, call in calls.items():
    try:
        call()
        res[name] = "no error"
    except Exception as exc:
        res[name] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(res))
"""


def test_triton_backend_without_interpreter_raises():
    proc = _run_python(_NO_INTERPRETER_SCRIPT, {"TRITON_INTERPRET": None})
    result = _result_line(proc)
    for name in ("linear", "conv2d", "embedding"):
        msg = result[name]
        assert msg.startswith(f"RuntimeError: sq_grad_{name}: backend='triton' cannot run on cpu"), msg
        if result["has_triton"]:
            assert "TRITON_INTERPRET=1" in msg, msg


@pytest.mark.requires_cpp
@pytest.mark.parametrize(
    "case",
    [
        "rank4",
        "algorithm",
        "nan",
        "group_range",
        "group_negative",
        "weight_nan",
        "weight_shape",
        "mixed",
        "batch",
        "seq",
        "out_shape",
        "out_dtype",
        "out_noncontig",
        "bias_out_shape",
        "num_groups",
    ],
)
def test_cpp_op_validates_directly(case):
    """The C++ op validates its own inputs (it is reachable through torch.ops without the Python layer)."""
    x, g = torch.randn(4, 3, 5), torch.randn(4, 3, 6)
    grp, w = None, None
    K = 1
    if case == "rank4":
        x, g, match = x[None], g[None], r"x must be \[B, d_in\] or \[B, T, d_in\]"
    elif case == "nan":
        x[0, 0, 0] = float("nan")
        match = "out has non-finite values"
    elif case == "group_range":
        grp, K, match = torch.tensor([0, 1, 2, 1]), 2, "group id 2 is out of range for num_groups=2"
    elif case == "group_negative":
        grp, K, match = torch.tensor([0, 1, -2, 1]), 2, "group ids must be >= 0"
    elif case == "weight_nan":
        w, match = torch.tensor([1.0, float("nan"), 0.0, 1.0]), "sample_weight contains NaN"
    elif case == "weight_shape":
        w, match = torch.ones(5), r"sample_weight must have shape \[4\]"
    elif case == "mixed":
        g, match = g.double(), "must have the same dtype"
    elif case == "batch":
        g, match = g[:2], "grad_out has batch size 2 but x has 4"
    elif case == "seq":
        g, match = g[:, :1], "grad_out has sequence length 1 but x has 3"
    elif case == "num_groups":
        K, match = 0, "num_groups must be at least 1"
    else:
        match = None
    if case == "algorithm":
        with pytest.raises(ValueError, match="algorithm must be one of"):
            OPS.sq_grad_linear(x, g, grp, K, w, False, "fastest")
        return
    if case.startswith(("out", "bias")):
        out, bias_out = torch.zeros(1, 6, 5), None
        if case == "out_shape":
            out, match = torch.zeros(2, 6, 5), r"out must have shape \[1, 6, 5\]"
        elif case == "out_dtype":
            out, match = torch.zeros(1, 6, 5, dtype=torch.float64), "out must be Float"
        elif case == "out_noncontig":
            out, match = torch.zeros(1, 5, 6).transpose(1, 2), "out must be contiguous"
        else:
            bias_out, match = torch.zeros(1, 5), r"bias_out must have shape \[1, 6\]"
        with pytest.raises(ValueError, match=match):
            OPS.sq_grad_linear_(x, g, None, 1, None, out, bias_out)
        return
    with pytest.raises(ValueError, match=match):
        OPS.sq_grad_linear(x, g, grp, K, w, True)


@pytest.mark.requires_cpp
@pytest.mark.parametrize("case", ["ids_rank", "ids_float", "ids_range", "padding_idx", "grad_out_shape"])
def test_cpp_embedding_op_validates_directly(case):
    ids, g, V, pad = torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 4), 5, None
    if case == "ids_rank":
        ids, match = ids[None], "ids must have 2 dimensions"
    elif case == "ids_float":
        ids, match = ids.float(), "ids must be an int64 or int32 tensor"
    elif case == "ids_range":
        ids, match = torch.tensor([[1, 5, 0]]), r"ids must be in \[0, num_embeddings=5\)"
    elif case == "padding_idx":
        pad, match = 5, r"padding_idx must be in \[0, 5\)"
    else:
        g, match = torch.randn(1, 2, 4), "grad_out has shape"
    with pytest.raises(ValueError, match=match):
        OPS.sq_grad_embedding(ids, g, V, pad, None, 1, None)


_TRITON_RAW_OUT_SCRIPT = r"""
import json, torch
import unlearn_ext
out = torch.zeros(1, 3, 3)
try:
    x, g = torch.randn(2, 3, 5), torch.randn(2, 3, 6)
    torch.ops.unlearn_ext.sq_grad_linear_triton_(x, g, None, 1, None, out, None)
    res = "no error"
except Exception as exc:
    res = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(res))
"""


@pytest.mark.triton
@pytest.mark.requires_triton
def test_triton_inplace_op_validates_out():
    proc = _run_python(_TRITON_RAW_OUT_SCRIPT, {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, f"the process died (rc={proc.returncode}): {proc.stderr[-500:]}"
    assert _result_line(proc).startswith("ValueError: out must have shape")


# ============================================================================================
# 6. Conv2d
# ============================================================================================

CONV_CASES = list(
    itertools.product(
        [1, 2],  # stride
        [0, 1, (2, 0)],  # padding
        [1, 2],  # dilation
        [1, 2, 4],  # groups
        [(1, 1), (3, 3), (2, 3)],  # kernel
    )
)


def _conv_inputs(stride, padding, dilation, groups, kernel, dtype, *, B=3, H=9, W=7, c_in=4, c_out=8, device="cpu"):
    ws = (c_out, c_in // groups, *kernel)
    x = make_tensor((B, c_in, H, W), dtype, device=device)
    y = F.conv2d(torch.zeros(1, c_in, H, W), torch.zeros(ws), None, stride, padding, dilation, groups)
    g = make_tensor((B, c_out, *y.shape[2:]), dtype, device=device)
    return x, g, ws


def _conv_id(case) -> str:
    s, p, d, gr, k = case
    return f"s{s}-p{p if isinstance(p, int) else ''.join(map(str, p))}-d{d}-g{gr}-k{k[0]}x{k[1]}"


@pytest.mark.requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[_conv_id(c) for c in CONV_CASES])
def test_conv2d_cpp_matches_reference(case, dtype):
    stride, padding, dilation, groups, kernel = case
    x, g, ws = _conv_inputs(*case, dtype)
    B = x.shape[0]
    kw = dict(group=make_groups(B, 3, empty=1), num_groups=3, sample_weight=make_weights(B, dtype), with_bias=True)
    res = sq_grad_conv2d(x, g, ws, stride, padding, dilation, groups, backend="cpp", **kw)
    _check_dtype(res, dtype)
    assert_results_close(res, _ref_conv(x, g, ws, stride, padding, dilation, groups, **kw), TOL[dtype])


TRITON_CONV_CASES = [
    (1, 0, 1, 1, (1, 1)),
    (1, 1, 1, 1, (3, 3)),
    (2, (2, 0), 1, 2, (2, 3)),
    (1, 0, 2, 4, (3, 3)),
    (2, 1, 2, 2, (3, 3)),
    (1, (2, 0), 1, 4, (2, 3)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", TRITON_CONV_CASES, ids=[_conv_id(c) for c in TRITON_CONV_CASES])
@pytest.mark.parametrize("backend", backends("triton", "cuda"))
def test_conv2d_kernels_match_reference(backend, case, dtype):
    device = _skip_if_missing(backend, "sq_grad_conv2d")
    stride, padding, dilation, groups, kernel = case
    x, g, ws = _conv_inputs(*case, dtype, device=device)
    B = x.shape[0]
    kw = dict(
        group=torch.tensor([2, 0, 2], device=device),
        num_groups=3,
        sample_weight=make_weights(B, dtype, device=device),
        with_bias=True,
    )
    res = sq_grad_conv2d(x, g, ws, stride, padding, dilation, groups, backend=backend, **kw)
    _check_dtype(res, dtype)
    assert_results_close(res, _ref_conv(x, g, ws, stride, padding, dilation, groups, **kw), TOL[dtype])


@pytest.mark.parametrize("layout", ["channels_last", "x_sliced", "g_expanded"])
@pytest.mark.parametrize(("backend", "algorithm"), backend_algorithms("cpp", "triton", "cuda"))
def test_conv2d_layouts_and_algorithms(backend, algorithm, layout):
    device = _skip_if_missing(backend, "sq_grad_conv2d")
    case = (2, 1, 1, 2, (3, 3))
    x, g, ws = _conv_inputs(*case, torch.float32, B=4, H=11, W=8, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        g = g.to(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    elif layout == "x_sliced":
        x = torch.randn(8, 5, 11, 9, device=device)[::2, 1:, :, 1:]
        assert not x.is_contiguous() and x.shape == (4, 4, 11, 8)
    else:
        g = g[:1].expand_as(g)
    kw = dict(group=torch.tensor([1, 0, 1, 1], device=device), num_groups=2, with_bias=True)
    res = sq_grad_conv2d(x, g, ws, *case[:4], backend=backend, algorithm=algorithm, **kw)
    assert_results_close(res, _ref_conv(x, g, ws, *case[:4], **kw), 1e-5, what=f"{layout}/{algorithm}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
def test_conv2d_low_precision(backend, dtype):
    """Float32 accumulation; DESIGN.md 6 against plain PyTorch (unfold + einsum in that dtype)."""
    device = _skip_if_missing(backend, "sq_grad_conv2d")
    case = (1, 1, 1, 1, (3, 3))
    x, g, ws = _conv_inputs(*case, dtype, device=device)
    res = sq_grad_conv2d(x, g, ws, 1, 1, backend=backend)
    assert res.dtype == torch.float32
    expected = _ref_conv(x, g, ws, 1, 1, 1, 1)
    assert_close_rel(res, expected, TOL[dtype])
    cols = F.unfold(x.cpu(), ws[2:], padding=1).transpose(1, 2)  # [B, L, C_in*kh*kw] in dtype
    plain = plain_sq_grad_linear(cols, g.cpu().flatten(2).transpose(1, 2)).view(1, *ws)
    assert_low_precision_rule(res, expected, plain)


@pytest.mark.parametrize("backend", backends("cpp", "triton"))
@pytest.mark.parametrize(
    "case",
    [
        "spatial_size",
        "channels_not_divisible",
        "c_out_not_divisible",
        "grad_out_channels",
        "x_rank",
        "weight_shape",
    ],
)
def test_conv2d_bad_input(case, backend):
    x, g, ws, groups = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 3, 3), (6, 4, 3, 3), 1
    if case == "spatial_size":
        g, match = torch.randn(2, 6, 4, 3), r"grad_out must have spatial size \[3, 3\]"
    elif case == "channels_not_divisible":
        ws, groups, match = (6, 2, 3, 3), 3, r"x has 4 channels but weight_shape \[6, 2, 3, 3\] with groups=3"
    elif case == "c_out_not_divisible":
        g, ws, groups, match = (
            torch.randn(2, 5, 3, 3),
            (5, 2, 3, 3),
            2,
            r"C_out=5\) must be divisible by groups=2",
        )
    elif case == "grad_out_channels":
        g, match = torch.randn(2, 7, 3, 3), "grad_out has 7 channels"
    elif case == "x_rank":
        x, match = torch.randn(2, 4, 5), r"x must be \[B, C_in, H, W\]"
    else:
        ws, match = (6, 4, 3), "weight_shape must be 4 positive ints"
    with pytest.raises(ValueError, match=match):
        sq_grad_conv2d(x, g, ws, groups=groups, backend=backend)


# ============================================================================================
# 7. Embedding
# ============================================================================================


@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda", "reference"))
def test_embedding_repeated_ids_summed_before_squaring(backend):
    """One sample with id 1 twice: its row gradient is (g0 + g1), so F = (g0 + g1)**2, not g0**2 + g1**2."""
    device = _skip_if_missing(backend, "sq_grad_embedding")
    ids = torch.tensor([[1, 1, 2], [2, 0, 2]], device=device)
    g = torch.tensor(
        [[[1.0, 2.0], [3.0, -4.0], [5.0, 6.0]], [[1.0, -1.0], [7.0, 0.5], [-2.0, 3.0]]],
        dtype=torch.float64,
        device=device,
    )
    res = sq_grad_embedding(ids, g, 4, backend=backend)
    expected = torch.tensor(
        [[[7.0**2, 0.5**2], [4.0**2, (-2.0) ** 2], [5.0**2 + (-1.0) ** 2, 6.0**2 + 2.0**2], [0.0, 0.0]]],
        dtype=torch.float64,
    )
    assert_close_rel(res, expected, 1e-14)
    assert_close_rel(res, _ref_embedding(ids, g, 4), 1e-14)
    squares_summed = torch.zeros(1, 4, 2, dtype=torch.float64)
    squares_summed[0].index_add_(0, ids.cpu().flatten(), g.cpu().reshape(-1, 2).square())
    assert (res.cpu() - squares_summed).abs().max() > 1, "the case does not distinguish the two orders"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("padding_idx", [None, 3, -1])
@pytest.mark.parametrize("ids_shape", [(6, 9), (6, 2, 4), (6,)], ids=["BxT", "Bx2x4", "B"])
@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
def test_embedding_matches_reference(backend, ids_shape, padding_idx, ids_dtype, dtype):
    device = _skip_if_missing(backend, "sq_grad_embedding")
    V, d = 11, 70  # d > 64 spans two column strips/blocks
    ids = torch.randint(0, 5, ids_shape, dtype=ids_dtype, device=device)  # few distinct ids: many repeats
    ids[ids == 4] = V - 1  # the last row (padding_idx=-1) occurs too
    g = make_tensor((*ids_shape, d), dtype, device=device)
    B = ids_shape[0]
    kw = dict(
        padding_idx=padding_idx,
        group=make_groups(B, 3, empty=1, device=device),
        num_groups=3,
        sample_weight=make_weights(B, dtype, device=device),
    )
    res = sq_grad_embedding(ids, g, V, backend=backend, **kw)
    _check_dtype(res, dtype)
    assert_close_rel(res, _ref_embedding(ids, g, V, **kw), TOL[dtype])
    if padding_idx is not None:
        assert res[:, padding_idx % V].abs().max() == 0


@pytest.mark.parametrize("layout", ["g_transposed", "g_sliced", "g_expanded", "ids_sliced"])
@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
def test_embedding_layouts(backend, layout):
    device = _skip_if_missing(backend, "sq_grad_embedding")
    ids = torch.randint(0, 6, (5, 8), device=device)
    g = make_tensor((5, 8, 33), device=device)
    if layout == "g_transposed":
        g = make_tensor((5, 8, 33), layout="transposed", device=device)
    elif layout == "g_sliced":
        g = make_tensor((5, 8, 33), layout="sliced", device=device)
    elif layout == "g_expanded":
        g = make_tensor((5, 8, 33), layout="expanded", expand_dim=1, device=device)
    else:
        ids = torch.randint(0, 6, (10, 9), device=device)[::2, 1:]
    res = sq_grad_embedding(
        ids, g, 6, group=torch.tensor([0, 1, 0, 1, 1], device=device), num_groups=2, backend=backend
    )
    assert_close_rel(res, _ref_embedding(ids, g, 6, group=torch.tensor([0, 1, 0, 1, 1]), num_groups=2), 1e-5)


@pytest.mark.parametrize("backend", backends("cpp", "triton"))
@pytest.mark.parametrize(
    "case", ["id_too_large", "id_negative", "float_ids", "padding_idx", "grad_out_shape", "scalar_ids", "nan"]
)
def test_embedding_bad_input(case, backend):
    ids, g, V, kw = torch.tensor([[1, 2]]), torch.randn(1, 2, 3), 4, {}
    if case == "id_too_large":
        ids, match = torch.tensor([[1, 4]]), r"ids must be in \[0, num_embeddings=4\), got values in \[1, 4\]"
    elif case == "id_negative":
        ids, match = torch.tensor([[-1, 2]]), r"ids must be in \[0, num_embeddings=4\)"
    elif case == "float_ids":
        ids, match = ids.float(), "ids must be an int64 or int32 tensor"
    elif case == "padding_idx":
        kw, match = dict(padding_idx=4), "padding_idx must be in"
    elif case == "grad_out_shape":
        g, match = torch.randn(1, 3, 3), "grad_out must have shape"
    elif case == "scalar_ids":
        ids, g, match = torch.tensor(1), torch.randn(3), "ids must be"
    else:
        g, match = torch.full((1, 2, 3), float("nan")), "non-finite"
    with pytest.raises(ValueError, match=match):
        sq_grad_embedding(ids, g, V, backend=backend, **kw)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
def test_embedding_low_precision(backend, dtype):
    device = _skip_if_missing(backend, "sq_grad_embedding")
    ids = torch.randint(0, 4, (5, 7), device=device)
    g = make_tensor((5, 7, 20), dtype, device=device)
    res = sq_grad_embedding(ids, g, 6, backend=backend)
    assert res.dtype == torch.float32
    expected = _ref_embedding(ids, g, 6)
    assert_close_rel(res, expected, TOL[dtype])
    # plain PyTorch in dtype: per-sample row sums by index_add, squared, summed
    per = torch.zeros(5, 6, 20, dtype=dtype)
    for b in range(5):
        per[b].index_add_(0, ids[b].cpu(), g[b].cpu())
    plain = per.square().sum(0, keepdim=True)
    assert_low_precision_rule(res, expected, plain)


# ============================================================================================
# 8. Gradients
# ============================================================================================


@pytest.mark.requires_cpp
@pytest.mark.parametrize("wrt", ["all", "x", "grad_out", "sample_weight"])
@pytest.mark.parametrize("shape", ["3d", "2d", "4d"])
def test_linear_gradcheck(shape, wrt):
    B, d_in, d_out = 4, 5, 6
    mid = {"3d": (3,), "2d": (), "4d": (2, 2)}[shape]
    x = torch.randn(B, *mid, d_in, dtype=torch.float64, requires_grad=wrt in ("all", "x"))
    g = torch.randn(B, *mid, d_out, dtype=torch.float64, requires_grad=wrt in ("all", "grad_out"))
    w = torch.randn(B, dtype=torch.float64, requires_grad=wrt in ("all", "sample_weight"))
    group = torch.tensor([0, 2, 0, 2])
    fn = lambda x, g, w: sq_grad_linear(x, g, group=group, num_groups=3, sample_weight=w, with_bias=True, backend="cpp")
    assert torch.autograd.gradcheck(fn, (x, g, w))


@pytest.mark.requires_cpp
def test_conv2d_gradcheck():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    group = torch.tensor([1, 0, 1])
    fn = lambda x, g, w: sq_grad_conv2d(
        x, g, (4, 2, 3, 3), (1, 2), 1, (2, 1), 2, group=group, num_groups=2, sample_weight=w, with_bias=True,
        backend="cpp",
    )  # fmt: skip
    assert torch.autograd.gradcheck(fn, (x, g, w))


@pytest.mark.requires_cpp
def test_embedding_gradcheck():
    ids = torch.tensor([[1, 1, 2, 0], [0, 3, 1, 3]])
    g = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    fn = lambda g, w: sq_grad_embedding(
        ids, g, 5, padding_idx=0, group=torch.tensor([1, 0]), num_groups=2, sample_weight=w, backend="cpp"
    )
    assert torch.autograd.gradcheck(fn, (g, w))


def _grads_vs_reference(run, run_ref, inputs):
    """Gradients of <upstream, op(inputs)> for a random upstream gradient, op vs reference."""
    out = run(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    ups = [torch.randn(o.shape, dtype=o.dtype, device=o.device) for o in out]
    loss = sum((o * u).sum() for o, u in zip(out, ups, strict=True))
    got = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
    exp_out = run_ref(*ref_inputs)
    exp_out = exp_out if isinstance(exp_out, tuple) else (exp_out,)
    loss_ref = sum((o * u.cpu().double()).sum() for o, u in zip(exp_out, ups, strict=True))
    expected = torch.autograd.grad(loss_ref, ref_inputs)
    return got, expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
def test_linear_grad_vs_reference(backend, dtype):
    device = _skip_if_missing(backend)
    B = 5
    x = make_tensor((B, 4, 37), dtype, device=device).requires_grad_()
    g = make_tensor((B, 4, 70), dtype, device=device).requires_grad_()
    w = make_weights(B, dtype, device=device).requires_grad_()
    group = make_groups(B, 3, empty=0, device=device)
    kw = dict(group=group, num_groups=3, with_bias=True)
    got, exp = _grads_vs_reference(
        lambda x, g, w: sq_grad_linear(x, g, sample_weight=w, backend=backend, **kw),
        lambda x, g, w: ref.sq_grad_linear_reference(x, g, sample_weight=w, **{**kw, "group": group.cpu()}),
        [x, g, w],
    )
    for name, a, e in zip(("x", "grad_out", "sample_weight"), got, exp, strict=True):
        assert a.dtype == dtype
        assert_close_rel(a, e, TOL[dtype], what=f"d/d{name}")


@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
def test_conv2d_grad_vs_reference(backend):
    device = _skip_if_missing(backend, "sq_grad_conv2d")
    x = make_tensor((3, 4, 7, 6), torch.float64, device=device).requires_grad_()
    g = make_tensor((3, 6, 5, 2), torch.float64, device=device).requires_grad_()
    w = make_weights(3, torch.float64, device=device).requires_grad_()
    conv = ((6, 2, 3, 2), (2, 2), (2, 0), (1, 2), 2)
    kw = dict(group=torch.tensor([1, 0, 1]), num_groups=2, with_bias=True)
    got, exp = _grads_vs_reference(
        lambda x, g, w: sq_grad_conv2d(
            x, g, *conv, sample_weight=w, backend=backend, **{**kw, "group": kw["group"].to(device)}
        ),
        lambda x, g, w: ref.sq_grad_conv2d_reference(x, g, *conv, sample_weight=w, **kw),
        [x, g, w],
    )
    for name, a, e in zip(("x", "grad_out", "sample_weight"), got, exp, strict=True):
        assert_close_rel(a, e, 1e-10, what=f"d/d{name}")


@pytest.mark.parametrize("backend", backends("cpp", "triton", "cuda"))
def test_embedding_grad_vs_reference(backend):
    device = _skip_if_missing(backend, "sq_grad_embedding")
    ids = torch.randint(0, 5, (4, 6), device=device)
    g = make_tensor((4, 6, 9), torch.float64, device=device).requires_grad_()
    w = make_weights(4, torch.float64, device=device).requires_grad_()
    kw = dict(padding_idx=2, num_groups=2)
    group = torch.tensor([1, 0, 1, 1])
    got, exp = _grads_vs_reference(
        lambda g, w: sq_grad_embedding(ids, g, 5, sample_weight=w, group=group.to(device), backend=backend, **kw),
        lambda g, w: ref.sq_grad_embedding_reference(ids.cpu(), g, 5, sample_weight=w, group=group, **kw),
        [g, w],
    )
    for name, a, e in zip(("grad_out", "sample_weight"), got, exp, strict=True):
        assert_close_rel(a, e, 1e-10, what=f"d/d{name}")


@pytest.mark.parametrize("op", [pytest.param("sq_grad_linear", marks=pytest.mark.requires_cpp)])
def test_linear_op_backward_2d_inputs(op):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, dtype=torch.float64)
    fw, _ = getattr(OPS, op)(x, g, None, 1, None, False)
    (gx,) = torch.autograd.grad(fw.sum(), x)
    expected = sq_grad_linear(x, g, backend="cpp")
    (gx_exp,) = torch.autograd.grad(expected.sum(), x)
    assert_close_rel(gx, gx_exp, 1e-12)


# ============================================================================================
# 9. opcheck
# ============================================================================================


def _opcheck_samples():
    """(op name, args builder, requires_grad) for the functional ops and their in-place forms."""
    grp2, w4 = torch.tensor([0, 1, 0, 1]), torch.rand(4)

    def lin(rg):
        return (
            torch.randn(4, 3, 5, requires_grad=rg),
            torch.randn(4, 3, 6, requires_grad=rg),
            grp2,
            2,
            torch.rand(4, requires_grad=rg),
            True,
            "auto",
        )

    def lin_t1(rg):
        return (
            torch.randn(3, 1, 70, requires_grad=rg),
            torch.randn(3, 1, 9, requires_grad=rg),
            None,
            1,
            None,
            False,
            "segmented",
        )

    def lin_(rg):
        return (
            torch.randn(4, 3, 5),
            torch.randn(4, 3, 6),
            grp2,
            2,
            w4,
            torch.zeros(2, 6, 5),
            torch.zeros(2, 6),
            "auto",
        )

    def lin_nobias_(rg):
        return (
            torch.randn(4, 2, 5),
            torch.randn(4, 2, 6),
            None,
            1,
            None,
            torch.zeros(1, 6, 5),
            None,
            "hadamard",
        )

    conv_geom = ([4, 2, 3, 3], [1, 2], [1, 1], [2, 1], 2)

    def conv(rg):
        return (
            torch.randn(2, 4, 5, 6, requires_grad=rg),
            torch.randn(2, 4, 3, 3, requires_grad=rg),
            *conv_geom,
            torch.tensor([1, 0]),
            2,
            torch.rand(2, requires_grad=rg),
            True,
            "auto",
        )

    def conv_(rg):
        return (
            torch.randn(2, 4, 5, 6),
            torch.randn(2, 4, 3, 3),
            *conv_geom,
            torch.tensor([1, 0]),
            2,
            None,
            torch.zeros(2, 4, 2, 3, 3),
            torch.zeros(2, 4),
            "auto",
        )

    def emb(rg):
        return (
            torch.tensor([[1, 1, 2], [0, 3, 1]]),
            torch.randn(2, 3, 4, requires_grad=rg),
            5,
            0,
            torch.tensor([1, 0]),
            2,
            torch.rand(2, requires_grad=rg),
        )

    def emb_(rg):
        return (
            torch.tensor([[1, 1, 2], [0, 3, 1]], dtype=torch.int32),
            torch.randn(2, 3, 4),
            5,
            None,
            None,
            1,
            None,
            torch.zeros(1, 5, 4),
        )

    samples = []
    for base, device, marks in (
        ("", "cpu", [pytest.mark.requires_cpp]),
        ("", "cuda", [pytest.mark.cuda, pytest.mark.requires_cuda]),
        ("_triton", "triton", [pytest.mark.triton, pytest.mark.requires_triton]),
    ):
        for name, build, grads in (
            ("sq_grad_linear", lin, (False, True)),
            ("sq_grad_linear", lin_t1, (False, True)),
            ("sq_grad_linear_", lin_, (False,)),
            ("sq_grad_linear_", lin_nobias_, (False,)),
            ("sq_grad_conv2d", conv, (False, True)),
            ("sq_grad_conv2d_", conv_, (False,)),
            ("sq_grad_embedding", emb, (False, True)),
            ("sq_grad_embedding_", emb_, (False,)),
        ):
            op = name[:-1] + base + "_" if name.endswith("_") else name + base
            for rg in grads:
                tag = f"{op}-{device}-{build.__name__}-{'grad' if rg else 'nograd'}"
                samples.append(pytest.param(op, build, rg, device, marks=marks, id=tag))
    return samples


def _on_device(args: tuple, device: str) -> tuple:
    """The sample's tensors on ``device`` (leaves keep their requires_grad)."""
    return tuple(
        a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )


@pytest.mark.parametrize(("op", "build", "requires_grad", "device"), _opcheck_samples())
def test_opcheck(op, build, requires_grad, device):
    device = backend_device("triton") if device == "triton" else device
    if device == "cuda" and not op.endswith(("_triton", "_triton_")) and not _loader.has_kernel(op.rstrip("_"), "cuda"):
        pytest.skip("unlearn_ext was built without CUDA kernels")
    torch.library.opcheck(getattr(OPS, op), _on_device(build(requires_grad), device))


# ============================================================================================
# 10. torch.compile
# ============================================================================================


@pytest.mark.parametrize(
    ("op", "backend"),
    [
        pytest.param("linear", "cpp", marks=pytest.mark.requires_cpp, id="linear-cpp"),
        pytest.param("conv2d", "cpp", marks=pytest.mark.requires_cpp, id="conv2d-cpp"),
        pytest.param("embedding", "cpp", marks=pytest.mark.requires_cpp, id="embedding-cpp"),
        pytest.param(
            "linear",
            "triton",
            marks=[pytest.mark.triton, pytest.mark.requires_triton],
            id="linear-triton",
        ),
    ],
)
def test_compile_fullgraph(op, backend):
    torch._dynamo.reset()
    if op == "linear":
        args = (torch.randn(4, 3, 37), torch.randn(4, 3, 70), torch.tensor([0, 2, 0, 2]), torch.rand(4))

        def fn(x, g, group, w):
            return sq_grad_linear(x, g, group=group, num_groups=3, sample_weight=w, with_bias=True, backend=backend)

        expected = _ref_linear(*args[:2], group=args[2], num_groups=3, sample_weight=args[3], with_bias=True)
    elif op == "conv2d":
        args = (torch.randn(2, 4, 5, 6), torch.randn(2, 4, 3, 3), torch.tensor([1, 0]))

        def fn(x, g, group):
            return sq_grad_conv2d(x, g, (4, 2, 3, 3), (1, 2), 1, (2, 1), 2, group=group, num_groups=2, backend=backend)

        expected = _ref_conv(*args[:2], (4, 2, 3, 3), (1, 2), 1, (2, 1), 2, group=args[2], num_groups=2)
    else:
        args = (torch.tensor([[1, 1, 2], [0, 3, 1]]), torch.randn(2, 3, 4))

        def fn(ids, g):
            return sq_grad_embedding(ids, g, 5, padding_idx=0, backend=backend)

        expected = _ref_embedding(*args, 5, padding_idx=0)
    args = _on_device(args, backend_device(backend))
    eager = fn(*args)
    compiled = torch.compile(fn, fullgraph=True)(*args)
    assert_results_close(compiled, eager, 1e-6, what="compiled vs eager")
    assert_results_close(compiled, expected, 1e-5, what="compiled vs reference")


@pytest.mark.requires_cpp
def test_compile_backward_aot_eager():
    """Fake kernel + autograd registration under torch.compile (aot_eager: no inductor codegen)."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    g = torch.randn(4, 3, 6, requires_grad=True)
    w = torch.rand(4, requires_grad=True)

    def fn(x, g, w):
        fw, fb = sq_grad_linear(x, g, group=torch.tensor([0, 1, 0, 1]), num_groups=2, sample_weight=w,
                                with_bias=True, backend="cpp")  # fmt: skip
        return (fw * fw.detach().sign()).sum() + fb.square().sum()

    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, g, w), (x, g, w))
    exp = torch.autograd.grad(fn(x, g, w), (x, g, w))
    for a, e in zip(got, exp, strict=True):
        assert_close_rel(a, e, 1e-5)
