"""Benchmark of the per-sample squared-gradient (diagonal Fisher) ops, DESIGN.md 4.1 and 6.

    python benchmarks/bench_fisher.py [--quick] [--device cpu|cuda] [--out NAME]
                                      [--only PROVIDERS] [--shapes CASE ...]

Every case computes ``F = sum_b P_b**2`` (P_b: sample b's weight gradient) of one layer from its
inputs and output gradients, with these providers:

* ``floor``: the plain weight-gradient computation on the same data (Linear:
  ``grad_out.reshape(-1, d_out).T @ x.reshape(-1, d_in)``; Conv2d: ``torch.nn.grad.conv2d_weight``;
  Embedding: the dense ``index_add``). Same FLOPs as one Fisher; every ``x_floor`` is relative to it.
* ``fwd_bwd``: a plain forward + backward of the same layer (what Opacus and BackPACK pay on top of
  their own work, since that is how they get the layer inputs and output gradients).
* ``reference``: ``torch.func`` ``vmap(grad)`` per-sample gradients squared and summed
  (``unlearn_ext.ops._reference``), fed sample chunks when the per-sample gradients would exceed
  the memory budget.
* ``opacus``: ``GradSampleModule(layer, loss_reduction="sum")``, forward, ``y.backward(grad_out)``,
  ``(grad_sample**2).sum(0)``; includes the forward/backward.
* ``backpack``: ``extend(layer)`` with ``SumGradSquared`` and the loss ``(layer(x) * grad_out).sum()``
  (its output gradient is exactly grad_out); includes the forward/backward.
* ``loop``: a Python loop over samples (``P = g[b].T @ x[b]; F += P*P``, as ``addcmul_``).
* ``cpp``, ``triton``, ``cuda``: ``unlearn_ext.sq_grad_<layer>(..., backend=...)``; ``cpp:ALGO``
  (and ``--algorithms``) also times ``algorithm=ALGO``. Triton is timed only on CUDA, never under
  ``TRITON_INTERPRET``.

Correctness is checked before timing against a float64 ``torch.func`` reference on the same data
(``--check full``: the whole batch, the provider's own first call; ``subset``: the first 64
samples, with a fresh provider call on that subset); a provider that fails is reported FAILED and is
not timed. On CPU, Opacus/BackPACK/the reference are fed sample chunks so that their per-sample
gradients stay within ``--mem-budget-gib`` (an out-of-memory on CPU is the kernel's OOM killer, not
an exception); on CUDA they run on the whole batch and an out-of-memory error is recorded as OOM.

CPU peak memory runs each provider once more in a fresh child process (``_harness``: forked from a
server that has only imported the libraries; ``--mem-start spawn`` for new interpreters), the max
over ``--mem-repeats`` runs. On a shared machine pass ``--wait-idle S``: each timing then waits up
to S seconds for other processes to leave the CPUs; timings during which other processes used more
than 10% of the CPUs are marked BUSY (2 OpenMP threads on 2 busy cores can be 10-100x slower).
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as H  # noqa: E402

import unlearn_ext  # noqa: E402
from unlearn_ext import _loader  # noqa: E402
from unlearn_ext._triton import HAS_TRITON, interpreter_enabled  # noqa: E402
from unlearn_ext.ops import _reference  # noqa: E402

PROVIDERS = ("floor", "fwd_bwd", "reference", "opacus", "backpack", "loop", "cpp", "triton", "cuda")
KERNEL_BACKENDS = ("cpp", "triton", "cuda")
ALGORITHMS = ("segmented", "hadamard", "per_sample")
PEERS_WITH_FWD_BWD = ("opacus", "backpack")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Max normwise relative error (max|F - F_ref| / max|F_ref|) accepted, by input dtype.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
SUBSET_SAMPLES = 64
# Bytes held per materialised per-sample gradient element: the gradient, its square, a temporary.
MATERIALISE_FACTOR = 3
# Above this many per-sample gradient elements, --check auto compares on the first 64 samples.
FULL_CHECK_MAX_ELEMS = 1 << 33
# CPU targets of the issue for cpp on the default Linear sweep: max x_floor by T, max MiB beyond F.
CPU_TARGETS = {1: 1.1, 4: 2.5, 16: 1.3, 128: 1.1}
CPU_TARGET_EXTRA_MIB = 10.0
# A CPU timing during which other processes used more than this share of the CPUs is "BUSY".
BUSY = 0.1

warnings.filterwarnings("ignore", module=r"opacus(\.|$)")
warnings.filterwarnings("ignore", message=r".*(secure RNG|full_backward_hook|register_backward_hook).*")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def linear_case(B: int, T: int, d_in: int, d_out: int, dtype: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "linear",
        "label": f"linear T={T}",
        "B": B,
        "T": T,
        "d_in": d_in,
        "d_out": d_out,
        "dtype": dtype,
        "seed": 0,
        **extra,
    }


def conv_case(B, C_in, C_out, k, H, W, dtype, stride=1, padding=1, **extra) -> dict[str, Any]:
    return {
        "kind": "conv2d",
        "label": "conv2d",
        "B": B,
        "C_in": C_in,
        "C_out": C_out,
        "k": k,
        "H": H,
        "W": W,
        "stride": stride,
        "padding": padding,
        "dtype": dtype,
        "seed": 1,
        **extra,
    }


def embedding_case(B, T, V, d, dtype, **extra) -> dict[str, Any]:
    return {
        "kind": "embedding",
        "label": "embedding",
        "B": B,
        "T": T,
        "V": V,
        "d": d,
        "dtype": dtype,
        "seed": 2,
        **extra,
    }


def default_cases(device: str, quick: bool) -> list[dict[str, Any]]:
    if device == "cpu" and not quick:
        tokens = 8192
        cases = [
            linear_case(tokens // T, T, 512, 1024, "float32", target_x_floor=CPU_TARGETS[T]) for T in (1, 4, 16, 128)
        ]
        return cases + [
            conv_case(32, 64, 64, 3, 32, 32, "float32"),
            embedding_case(16, 256, 8192, 256, "float32"),
        ]
    if device == "cpu":  # --quick
        cases = [linear_case(512 // T, T, 64, 128, "float32") for T in (1, 4, 16, 128)]
        return cases + [conv_case(4, 8, 16, 3, 12, 12, "float32"), embedding_case(4, 32, 512, 32, "float32")]
    if quick:  # small CUDA smoke run
        cases = [linear_case(2048 // T, T, 1024, 2048, "bfloat16") for T in (1, 128, 2048)]
        return cases + [
            conv_case(16, 64, 64, 3, 32, 32, "bfloat16"),
            embedding_case(4, 512, 32000, 512, "bfloat16"),
        ]
    # H100: Llama-3-8B MLP up-projection, 16,384 tokens (B=8, T=2048 as in the issue, plus T=1, 128).
    cases = [linear_case(16384 // T, T, 4096, 14336, "bfloat16") for T in (1, 128, 2048)]
    return cases + [
        conv_case(128, 64, 64, 3, 32, 32, "bfloat16"),  # ResNet-18 CIFAR-10 block, batch 128
        embedding_case(8, 2048, 128256, 4096, "bfloat16"),  # Llama-3-8B token embedding
    ]


def parse_case(text: str, defaults: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
    """A preset label of ``defaults`` (``T=16``, ``linear-T16``, ``conv2d``, ``embedding``), or
    ``kind:key=val,...`` (e.g. ``linear:B=64,T=16,d_in=512,d_out=1024``)."""
    key = text.strip().lower().replace(" ", "").replace("-", "").replace("linear", "")
    for case in defaults:
        label = case["label"].lower().replace(" ", "").replace("-", "").replace("linear", "")
        if key == label or (key.startswith("t") and "=" not in key and label == "t=" + key[1:]):
            return dict(case)
    if ":" not in text:
        names = ", ".join(c["label"].replace(" ", "-") for c in defaults)
        raise SystemExit(f"error: unknown --shapes entry {text!r}; presets: {names}; or kind:key=val,...")
    kind, _, body = text.partition(":")
    kv: dict[str, Any] = {"dtype": dtype}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        kv[k.strip()] = v.strip() if k.strip() == "dtype" else int(v)
    makers = {"linear": linear_case, "conv2d": conv_case, "embedding": embedding_case}
    if kind not in makers:
        raise SystemExit(f"error: --shapes kind must be linear, conv2d or embedding, got {kind!r}")
    try:
        case = makers[kind](**kv)
    except TypeError as exc:
        raise SystemExit(f"error: bad --shapes entry {text!r}: {exc}") from None
    if kind == "conv2d":
        case["label"] = f"conv2d B={case['B']} {case['C_in']}->{case['C_out']} {case['H']}x{case['W']}"
    elif kind == "embedding":
        case["label"] = f"embedding B={case['B']} T={case['T']} V={case['V']}"
    return case


def describe(case: dict[str, Any]) -> str:
    if case["kind"] == "linear":
        return (
            f"B={case['B']} T={case['T']} d_in={case['d_in']} d_out={case['d_out']} "
            f"{case['dtype']}{' (2-D input)' if case['T'] == 1 else ''}"
        )
    if case["kind"] == "conv2d":
        return (
            f"B={case['B']} C_in={case['C_in']} C_out={case['C_out']} {case['k']}x{case['k']} "
            f"{case['H']}x{case['W']} stride={case['stride']} pad={case['padding']} "
            f"{case['dtype']}"
        )
    return f"B={case['B']} T={case['T']} V={case['V']} d={case['d']} {case['dtype']}"


def weight_shape(case: dict[str, Any]) -> tuple[int, ...]:
    if case["kind"] == "linear":
        return (case["d_out"], case["d_in"])
    if case["kind"] == "conv2d":
        return (case["C_out"], case["C_in"], case["k"], case["k"])
    return (case["V"], case["d"])


def fisher_bytes(case: dict[str, Any]) -> int:
    """Bytes of the result F (float32 accumulator; float64 for float64 inputs)."""
    return math.prod(weight_shape(case)) * (8 if case["dtype"] == "float64" else 4)


def acc_dtype(case: dict[str, Any]) -> torch.dtype:
    return torch.float64 if case["dtype"] == "float64" else torch.float32


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_inputs(case: dict[str, Any], device: str | torch.device, subset: int | None = None) -> dict:
    """Inputs of ``case`` drawn from its seed (the same on every call); ``subset``: first samples."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    B = case["B"]
    if case["kind"] == "linear":
        mid = () if case["T"] == 1 else (case["T"],)  # T=1: plain 2-D (non-sequence) inputs
        inputs = {"x": randn(B, *mid, case["d_in"]), "g": randn(B, *mid, case["d_out"])}
    elif case["kind"] == "conv2d":
        k, s, p = case["k"], case["stride"], case["padding"]
        ho = (case["H"] + 2 * p - k) // s + 1
        wo = (case["W"] + 2 * p - k) // s + 1
        inputs = {"x": randn(B, case["C_in"], case["H"], case["W"]), "g": randn(B, case["C_out"], ho, wo)}
    else:
        ids = torch.randint(0, case["V"], (B, case["T"]), generator=gen, device=device)
        inputs = {"ids": ids, "g": randn(B, case["T"], case["d"])}
    if subset is not None:
        inputs = {k: v[:subset].contiguous() for k, v in inputs.items()}
    return inputs


def n_samples(inputs: dict) -> int:
    return inputs["g"].shape[0]


def _chunks(B: int, chunk: int | None):
    step = B if not chunk else max(1, chunk)
    return [(b, min(B, b + step)) for b in range(0, B, step)]


def sample_chunk(case: dict[str, Any], provider: str, device: str, budget_bytes: int, B: int) -> int | None:
    """Samples per call for providers that materialise per-sample gradients, or None (whole batch)."""
    if provider not in ("reference", "opacus", "backpack"):
        return None
    if device == "cuda" and provider != "reference":
        return None  # on CUDA the peers run on the whole batch; an OOM is recorded as such
    if provider == "backpack" and case["kind"] == "linear" and case["T"] == 1:
        return None  # BackPACK's closed form (G*G)^T (X*X) for 2-D inputs holds no per-sample grads
    elem = 8 if case["dtype"] == "float64" else 4
    per_sample = math.prod(weight_shape(case)) * elem * MATERIALISE_FACTOR
    if B * per_sample <= budget_bytes:
        return None
    chunk = max(1, budget_bytes // per_sample)
    n = math.ceil(B / chunk)
    return math.ceil(B / n)


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


def _layer(case: dict[str, Any], device, dtype) -> nn.Module:
    if case["kind"] == "linear":
        m = nn.Linear(case["d_in"], case["d_out"], bias=False)
    elif case["kind"] == "conv2d":
        m = nn.Conv2d(case["C_in"], case["C_out"], case["k"], case["stride"], case["padding"], bias=False)
    else:
        m = nn.Embedding(case["V"], case["d"])
    return m.to(device=device, dtype=dtype)


def _layer_input(case, inputs):
    return inputs["ids"] if case["kind"] == "embedding" else inputs["x"]


def _sq_sum(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    t = t if t.dtype == acc else t.to(acc)
    return t.square().sum(0)


def make_provider(
    provider: str,
    case: dict[str, Any],
    inputs: dict,
    device: torch.device | str,
    chunk: int | None = None,
):
    """A zero-argument callable returning this provider's F for ``inputs`` (shape of the weight)."""
    device = torch.device(device)
    kind, acc = case["kind"], acc_dtype(case)
    dtype = DTYPES[case["dtype"]]
    g = inputs["g"]
    B = n_samples(inputs)
    wshape = weight_shape(case)
    name, _, algo = provider.partition(":")
    algo = algo or "auto"

    if name == "floor":
        if kind == "linear":
            x2, g2 = inputs["x"].reshape(-1, case["d_in"]), g.reshape(-1, case["d_out"])
            return lambda: g2.T @ x2
        if kind == "conv2d":
            x = inputs["x"]
            return lambda: torch.nn.grad.conv2d_weight(x, wshape, g, case["stride"], case["padding"])
        ids1, g2 = inputs["ids"].reshape(-1), g.reshape(-1, case["d"])
        return lambda: torch.zeros(wshape, dtype=g.dtype, device=device).index_add_(0, ids1, g2)

    if name == "fwd_bwd":
        layer, inp = _layer(case, device, dtype), _layer_input(case, inputs)

        def fwd_bwd():
            layer.weight.grad = None
            layer(inp).backward(g)
            return layer.weight.grad

        return fwd_bwd

    if name == "reference":
        parts = _chunks(B, chunk)
        if kind == "linear":
            x = inputs["x"]
            one = lambda a, b: _reference.sq_grad_linear_reference(x[a:b], g[a:b])[0]  # noqa: E731
        elif kind == "conv2d":
            x, s, p = inputs["x"], case["stride"], case["padding"]
            one = lambda a, b: _reference.sq_grad_conv2d_reference(x[a:b], g[a:b], wshape, s, p)[0]  # noqa: E731
        else:
            ids = inputs["ids"]
            one = lambda a, b: _reference.sq_grad_embedding_reference(ids[a:b], g[a:b], case["V"])[0]  # noqa: E731

        def reference():
            out = one(*parts[0])
            for a, b in parts[1:]:
                out += one(a, b)
            return out

        return reference

    if name == "opacus":
        from opacus import GradSampleModule

        layer, inp = _layer(case, device, dtype), _layer_input(case, inputs)
        gsm = GradSampleModule(layer, loss_reduction="sum")
        parts = _chunks(B, chunk)

        def opacus():
            out = None
            for a, b in parts:
                gsm.zero_grad(set_to_none=True)  # grad_sample would otherwise accumulate as a list
                gsm(inp[a:b]).backward(g[a:b])
                part = _sq_sum(layer.weight.grad_sample, acc)
                out = part if out is None else out.add_(part)
                del part
            gsm.zero_grad(set_to_none=True)
            return out

        return opacus

    if name == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        layer, inp = extend(_layer(case, device, dtype)), _layer_input(case, inputs)
        parts = _chunks(B, chunk)

        def run_backpack():
            out = None
            for a, b in parts:
                layer.weight.grad = None
                with backpack(SumGradSquared()):
                    loss = (layer(inp[a:b]) * g[a:b]).sum()  # d loss / d output == grad_out
                    loss.backward()
                sgs = layer.weight.sum_grad_squared
                del layer.weight.sum_grad_squared
                sgs = sgs if sgs.dtype == acc else sgs.to(acc)
                out = sgs if out is None else out.add_(sgs)
            layer.weight.grad = None
            return out

        return run_backpack

    if name == "loop":
        if kind == "linear":
            x3 = inputs["x"].reshape(B, -1, case["d_in"])
            g3 = g.reshape(B, -1, case["d_out"])
            per = lambda b: g3[b].T @ x3[b]  # noqa: E731
        elif kind == "conv2d":
            x, s, p = inputs["x"], case["stride"], case["padding"]
            per = lambda b: torch.nn.grad.conv2d_weight(x[b : b + 1], wshape, g[b : b + 1], s, p)  # noqa: E731
        else:
            ids = inputs["ids"]
            per = lambda b: torch.zeros(wshape, dtype=g.dtype, device=device).index_add_(0, ids[b], g[b])  # noqa: E731

        def loop():
            out = torch.zeros(wshape, dtype=acc, device=device)
            for b in range(B):
                pb = per(b)
                pb = pb if pb.dtype == acc else pb.to(acc)
                out.addcmul_(pb, pb)  # F += P*P without the temporary
            return out

        return loop

    if name in KERNEL_BACKENDS:
        if kind == "linear":
            x = inputs["x"]
            return lambda: unlearn_ext.sq_grad_linear(x, g, backend=name, algorithm=algo)
        if kind == "conv2d":
            x, s, p = inputs["x"], case["stride"], case["padding"]
            return lambda: unlearn_ext.sq_grad_conv2d(x, g, wshape, s, p, backend=name, algorithm=algo)
        if algo != "auto":
            raise ValueError("sq_grad_embedding has no algorithm= argument")
        ids = inputs["ids"]
        return lambda: unlearn_ext.sq_grad_embedding(ids, g, case["V"], backend=name)

    raise ValueError(f"unknown provider {provider!r}")


def build_call(spec: dict[str, Any]):
    """Child-process factory for peak-memory runs: inputs from the seed, then the provider."""
    inputs = make_inputs(spec["case"], spec["device"], spec.get("subset"))
    return make_provider(spec["provider"], spec["case"], inputs, spec["device"], spec.get("chunk"))


def skip_reason(provider: str, case: dict[str, Any], device: torch.device) -> str | None:
    """Why ``provider`` cannot run here (None when it can)."""
    name, _, algo = provider.partition(":")
    if algo and (name not in KERNEL_BACKENDS or case["kind"] == "embedding"):
        return f"{name} has no algorithm= choice for {case['kind']}"
    if name == "opacus":
        try:
            import opacus  # noqa: F401
        except ImportError as exc:
            return f"opacus not installed ({exc})"
    if name == "backpack":
        try:
            import backpack  # noqa: F401
        except ImportError as exc:
            return f"backpack-for-pytorch not installed ({exc})"
    if name == "cpp":
        if device.type != "cpu":
            return "the C++ kernel runs on CPU tensors (use --device cpu)"
        if not _loader.extension_loaded():
            return f"unlearn_ext._C not loaded: {_loader.LOAD_ERROR}"
    if name == "cuda":
        if device.type != "cuda":
            return "needs --device cuda"
        op = f"sq_grad_{case['kind']}"
        if not _loader.has_kernel(op, device):
            return f"no CUDA kernel for {op} in this build (build info: {_loader.compiled_build_info()})"
    if name == "triton":
        if interpreter_enabled():
            return "TRITON_INTERPRET=1 is set: interpreted Triton is never timed"
        if not HAS_TRITON:
            return "Triton is not installed"
        if device.type != "cuda":
            return "Triton runs on CUDA only (interpreted Triton is never timed)"
    return None


# --------------------------------------------------------------------------------------------
# Float64 ground truth
# --------------------------------------------------------------------------------------------


def reference_f64(case: dict[str, Any], inputs: dict, device, budget_bytes: int) -> torch.Tensor:
    """F in float64 from ``torch.func`` per-sample gradients, fed sample chunks within the budget."""
    case64 = dict(case, dtype="float64")
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    chunk = sample_chunk(case64, "reference", "cpu", budget_bytes, n_samples(inputs))
    return make_provider("reference", case64, inputs64, device, chunk)()


def per_token_f64(case: dict[str, Any], inputs: dict) -> torch.Tensor | None:
    """Linear only: the per-token (T=1) quantity ``(G*G)^T (X*X)``, to name a wrong provider's result."""
    if case["kind"] != "linear":
        return None
    x2 = inputs["x"].reshape(-1, case["d_in"]).double()
    g2 = inputs["g"].reshape(-1, case["d_out"]).double()
    return g2.square().T @ x2.square()


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_case(case: dict[str, Any], providers: list[str], args, device: torch.device) -> dict[str, Any]:
    dev = device.type
    budget = int(args.mem_budget_gib * (1 << 30))
    if args.wait_idle > 0 and dev == "cpu":
        idle = H.wait_for_idle(args.wait_idle)
        if idle is not None and idle >= BUSY:
            _log(f"note: the machine is still busy (others use {100 * idle:.0f}% of the CPUs); going on")
    inputs = make_inputs(case, device)
    B = n_samples(inputs)
    per_sample_elems = B * math.prod(weight_shape(case))
    check_mode = args.check
    if check_mode == "auto":
        check_mode = "full" if per_sample_elems <= FULL_CHECK_MAX_ELEMS else "subset"
    subset = min(SUBSET_SAMPLES, B) if check_mode == "subset" else None
    tol = TOLERANCE[case["dtype"]]

    timing_loads: list[float] = []  # other processes' CPU share during each timing
    t0 = time.perf_counter()
    check_inputs = inputs if subset is None else make_inputs(case, device, subset)
    ref = reference_f64(case, check_inputs, device, budget)
    ref_s = time.perf_counter() - t0
    scope = f"all {B} samples" if subset is None else f"first {subset} of {B} samples"
    _log(f"\n== {case['label']}: {describe(case)}; float64 reference on {scope} in {ref_s:.1f} s")
    per_token = None

    def measure(fn, **kw) -> dict[str, Any]:
        """time_fn, after waiting for an idle machine; a timing disturbed by other processes is
        retried up to --busy-retries times (unless slow), keeping the least disturbed one."""
        shared = args.wait_idle > 0 and dev == "cpu"
        best = None
        for attempt in range(1 + (args.busy_retries if shared else 0)):
            if shared:
                H.wait_for_idle(args.wait_idle, window_s=0.5)
            snap = H.cpu_snapshot() if dev == "cpu" else None
            timing = H.time_fn(fn, device, args.min_run_time, **kw)
            timing["other_cpu_load"] = H.other_cpu_load(snap, H.cpu_snapshot())
            timing["attempts"] = attempt + 1
            load = timing["other_cpu_load"]
            if best is None or (load or 0.0) < (best["other_cpu_load"] or 0.0):
                best = timing
            if load is None or load <= BUSY or timing["median_ms"] > 5000:
                break
            kw = dict(kw, warmup=0, estimate_s=timing["median_ms"] / 1e3)
        if best["other_cpu_load"] is not None:
            timing_loads.append(best["other_cpu_load"])
        return best

    rows: list[dict[str, Any]] = []
    floor_times: list[float] = []  # per-call times (per block of calls) of both floor timings
    floor_runs = 0
    order = ["floor", *[p for p in providers if p != "floor"], "floor"]  # floor timed first and last
    for i, provider in enumerate(order):
        name = provider.partition(":")[0]
        if provider == "floor" and i == len(order) - 1:  # the floor's second timing
            floor_row = rows[0]
            if floor_row["status"] != "ok":
                continue
            fn = make_provider("floor", case, inputs, device)
            again = measure(fn)
            del fn
            floor_times += again["times_ms"]
            floor_runs += again["runs"]
            if again["other_cpu_load"] is not None and again["other_cpu_load"] > BUSY:
                floor_row["notes"].append(f"BUSY (2nd timing): others used {100 * again['other_cpu_load']:.0f}%")
            med, iqr = H.median_iqr(floor_times)
            floor_row.update(median_ms=med, iqr_ms=iqr, runs=floor_runs)
            floor_row["notes"].append("timed first and last, pooled")
            continue
        row: dict[str, Any] = {"provider": provider, "status": "ok", "notes": [], "check": None}
        rows.append(row)
        if name in PEERS_WITH_FWD_BWD:
            row["includes_forward_backward"] = True
            row["notes"].append("incl. fwd+bwd")
        if name == "loop":
            row["notes"].append(f"{B} iterations")
        if name == "floor":
            row["notes"].append("plain weight grad")
        if name == "fwd_bwd":
            row["notes"].append("plain layer fwd+bwd")
        reason = skip_reason(provider, case, device)
        if reason:
            row.update(status="skipped", reason=reason)
            _log(f"  {provider:<12} skipped: {reason}")
            continue
        chunk = sample_chunk(case, name, dev, budget, B)
        if chunk:
            n = math.ceil(B / chunk)
            row["chunk"] = chunk
            row["notes"].append(f"{n} chunks x {chunk} samples (memory budget)")
        fn = None
        try:
            fn = make_provider(provider, case, inputs, device, chunk)
            # Correctness first: the provider's first call (or a fresh call on the subset).
            estimate = None
            check_chunk = chunk if subset is None else sample_chunk(case, name, dev, budget, subset)
            if name in ("floor", "fwd_bwd"):
                row["check"] = "n/a (the plain gradient, not the Fisher)"
            else:
                if subset is None:
                    H.synchronize(device)
                    t1 = time.perf_counter()
                    res = fn()
                    H.synchronize(device)
                    estimate = time.perf_counter() - t1
                else:
                    res = make_provider(provider, case, check_inputs, device, check_chunk)()
                chk = H.check_close(res, ref, tol)
                del res
                row["max_rel_err"] = chk["max_rel_err"]
                row["check"] = f"vs float64 reference, {scope}"
                if not chk["ok"]:
                    row["status"] = "FAILED"
                    row["reason"] = chk.get("note") or f"max rel. error {chk['max_rel_err']:.3g} > {tol:g}"
                    if case["kind"] == "linear" and case["T"] > 1:
                        per_token = per_token if per_token is not None else per_token_f64(case, check_inputs)
                        again = make_provider(provider, case, check_inputs, device, check_chunk)
                        tok = H.check_close(again(), per_token, tol)
                        if tok["ok"]:
                            row["status"] = "FAILED: different quantity"
                            row["reason"] = "matches the per-TOKEN Fisher, not the per-sample (sequence) one"
                    _log(f"  {provider:<12} {row['status']}: {row['reason']} (not timed)")
                    continue
            timing = measure(
                fn,
                warmup=0 if estimate is not None else 1,
                estimate_s=estimate,
                slow_s=args.slow_s,
                slow_budget_s=args.slow_budget_s,
                slow_max_reps=args.slow_max_reps,
            )
            load = timing["other_cpu_load"]
            if load is not None and load > BUSY:
                row["notes"].append(f"BUSY: others used {100 * load:.0f}% of the CPUs")
            if provider == "floor":
                floor_times += timing["times_ms"]
                floor_runs += timing["runs"]
            row.update({k: v for k, v in timing.items() if k != "times_ms"})
            if not args.no_memory:
                if dev == "cuda":
                    mem = H.peak_memory(device, fn=fn, warmup=False)
                else:
                    spec = {"case": case, "provider": provider, "device": "cpu", "chunk": chunk}
                    fast = timing["median_ms"] < 2000
                    runs = [
                        H.peak_memory(device, factory=build_call, spec=spec, warmup=fast)
                        for _ in range(args.mem_repeats if fast else 1)
                    ]
                    peaks = [m["peak_extra_mib"] for m in runs if m.get("peak_extra_mib") is not None]
                    mem = max(runs, key=lambda m: m.get("peak_extra_mib") or -1.0)
                    if len(peaks) > 1:
                        row["peak_extra_mib_runs"] = peaks  # the max is reported
                row["peak_extra_mib"] = mem.get("peak_extra_mib")
                if mem.get("peak_extra_mib") is not None:
                    row["beyond_output_mib"] = mem["peak_extra_mib"] - fisher_bytes(case) / H.MIB
                    row["memory_method"] = mem.get("method")
                else:
                    row["memory_note"] = mem.get("note")
                    if mem.get("oom"):
                        row["notes"].append("memory run: OOM")
        except Exception as exc:  # noqa: BLE001 - one provider must not stop the sweep
            if H.is_oom(exc):
                row.update(status="OOM", reason=str(exc).splitlines()[0][:200])
            else:
                row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        finally:
            del fn
            _free(device)
        _log(
            f"  {provider:<12} {row['status']}"
            + (f" {row['median_ms']:.3f} ms" if "median_ms" in row else "")
            + (f", peak +{row['peak_extra_mib']:.1f} MiB" if row.get("peak_extra_mib") is not None else "")
            + (f", err {row['max_rel_err']:.2e}" if row.get("max_rel_err") is not None else "")
            + (f" [{row['reason']}]" if row.get("reason") else "")
        )

    floor_ms = rows[0].get("median_ms") if rows and rows[0]["status"] == "ok" else None
    for row in rows:
        if floor_ms and row.get("median_ms") is not None:
            row["x_floor"] = row["median_ms"] / floor_ms
    target = None
    if "target_x_floor" in case:
        cpp = next((r for r in rows if r["provider"] == "cpp"), None)
        target = {
            "provider": "cpp",
            "max_x_floor": case["target_x_floor"],
            "max_beyond_output_mib": CPU_TARGET_EXTRA_MIB,
        }
        if cpp is None or cpp["status"] != "ok":
            target["result"] = "MISS"
            target["why"] = "cpp did not run" if cpp is None else f"cpp {cpp['status']}"
        else:
            ok_t = cpp.get("x_floor") is not None and cpp["x_floor"] <= case["target_x_floor"]
            beyond = cpp.get("beyond_output_mib")
            ok_m = beyond is not None and beyond <= CPU_TARGET_EXTRA_MIB
            if beyond is None and ok_t:
                target["result"] = "PASS (time only; memory not measured)"
            else:
                target["result"] = "PASS" if ok_t and ok_m else "MISS"
            target["time_ok"], target["memory_ok"] = ok_t, ok_m if beyond is not None else None
            cpp["target"] = target["result"]
    load = max(timing_loads) if timing_loads else None
    if load is not None:
        _log(f"  (other processes used at most {100 * load:.0f}% of the CPUs during this case's timings)")
    return {
        "case": case,
        "description": describe(case),
        "other_cpu_load": load,
        "output_mib": fisher_bytes(case) / H.MIB,
        "check_scope": scope,
        "tolerance": tol,
        "reference_seconds": ref_s,
        "rows": rows,
        "target": target,
    }


def _target_cell(row: dict[str, Any], result: dict[str, Any]) -> str:
    t = result["target"]
    if t is None or row["provider"] != "cpp":
        return ""
    return f"{t['result']} <={t['max_x_floor']}x,<={t['max_beyond_output_mib']:.0f}MiB"


def print_summary(results: list[dict[str, Any]], device: torch.device, meta: dict[str, Any]) -> None:
    any_target = any(r["target"] for r in results)
    cols: list[Any] = [
        ("case", "left"),
        ("provider", "left"),
        ("status", "left"),
        "time ms",
        "IQR ms",
        "runs",
        "x_floor",
        "peak MiB",
        "beyond F MiB",
        "max rel err",
    ]
    if any_target:
        cols.append(("target", "left"))
    cols.append(("notes", "left"))
    table_rows = []
    for res in results:
        for row in res["rows"]:
            status = row["status"]
            notes = ([row["reason"]] if row.get("reason") else []) + row["notes"]
            if row.get("memory_note"):
                notes.append(row["memory_note"])
            cells = [
                res["case"]["label"],
                row["provider"],
                status,
                H.format_float(row.get("median_ms"), 4),
                H.format_float(row.get("iqr_ms"), 2) if row.get("runs", 0) > 1 else "-",
                row.get("runs", ""),
                H.format_float(row.get("x_floor"), 3, suffix="x"),
                H.format_float(row.get("peak_extra_mib"), 3),
                H.format_float(row.get("beyond_output_mib"), 3),
                H.format_float(row.get("max_rel_err"), 2) if (row.get("check") or "").startswith("vs") else "n/a",
            ]
            if any_target:
                cells.append(_target_cell(row, res))
            cells.append("; ".join(notes))
            table_rows.append(cells)
    title = f"Diagonal Fisher (sum of squared per-sample gradients) on {meta['device']}"
    caption_lines = [
        *(
            f"{r['case']['label']}: {r['description']}; F {r['output_mib']:.3g} MiB; checked on "
            f"{r['check_scope']}"
            + (
                f"; others used <={100 * r['other_cpu_load']:.0f}% of the CPUs during timings"
                if r.get("other_cpu_load") is not None
                else ""
            )
            for r in results
        ),
        "x_floor = time / time of the plain weight-gradient computation on the same data. peak MiB = "
        + (
            "max_memory_allocated minus allocated before the call"
            if device.type == "cuda"
            else "VmHWM - VmRSS before the call, in a fresh child process"
        )
        + "; beyond F = peak minus the float32 result F. max rel err = max|F - F64| / max|F64|.",
    ]
    H.print_table(title, cols, table_rows, caption="\n".join(caption_lines), section_by=0)


def main(argv: list[str] | None = None) -> int:
    p = H.make_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated providers (floor is always timed); choices: "
        + ", ".join(PROVIDERS)
        + "; cpp:ALGO etc. for an algorithm",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="cases: preset labels (T=1, T=16, linear-T128, conv2d, embedding) "
        "or kind:key=val,... e.g. linear:B=64,T=16,d_in=512,d_out=1024",
    )
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="dtype of --shapes kind:... cases")
    p.add_argument(
        "--algorithms",
        action="store_true",
        help="also time each algorithm= of the kernel backends: " + ", ".join(ALGORITHMS),
    )
    p.add_argument(
        "--check",
        choices=("auto", "full", "subset"),
        default="auto",
        help="correctness check on the whole batch (full) or the first 64 samples (subset); "
        "auto: full unless the per-sample gradients exceed 2^33 elements",
    )
    p.add_argument(
        "--mem-budget-gib",
        type=float,
        default=None,
        help="memory for materialised per-sample gradients before providers get sample "
        "chunks (default 4 on CPU, 16 on CUDA)",
    )
    p.add_argument(
        "--mem-start",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="how CPU peak-memory child processes start",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each case and each timing, wait up to S seconds for other processes to idle the CPUs",
    )
    p.add_argument(
        "--mem-repeats",
        type=int,
        default=None,
        help="CPU peak memory: max over this many child runs (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--busy-retries",
        type=int,
        default=2,
        help="with --wait-idle: re-time a BUSY timing up to this many times (calls under 5 s)",
    )
    p.add_argument("--slow-s", type=float, default=1.0, help="calls slower than this get few repetitions")
    p.add_argument("--slow-budget-s", type=float, default=30.0, help="seconds of repetitions for a slow call")
    p.add_argument("--slow-max-reps", type=int, default=3, help="max repetitions of a slow call")
    args = p.parse_args(argv)

    device = H.resolve_device(args.device)
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 1.0
    if args.mem_repeats is None:
        args.mem_repeats = 1 if args.quick else 3
    if args.mem_budget_gib is None:
        args.mem_budget_gib = 16.0 if device.type == "cuda" else 4.0
    if args.quick:
        args.slow_budget_s = min(args.slow_budget_s, 5.0)

    defaults = default_cases(device.type, args.quick)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    cases = [parse_case(s, defaults, dtype) for s in args.shapes] if args.shapes else defaults
    if args.only:
        providers = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [
            s
            for s in providers
            if s.partition(":")[0] not in PROVIDERS or (s.partition(":")[2] and s.partition(":")[2] not in ALGORITHMS)
        ]
        if bad:
            raise SystemExit(
                f"error: unknown provider(s) {bad}; choices: {', '.join(PROVIDERS)} "
                f"(kernel backends take :{'|:'.join(ALGORITHMS)})"
            )
    else:
        providers = list(PROVIDERS)
    if args.algorithms:
        providers += [f"{b}:{a}" for b in KERNEL_BACKENDS if b in providers for a in ALGORITHMS]
    providers = ["floor", *dict.fromkeys(p for p in providers if p != "floor")]

    if device.type == "cpu" and not args.no_memory:
        H.configure_memory_subprocess(args.mem_start, preload=("unlearn_ext", "opacus", "backpack", "__main__"))
        usable, note = H.rss_probe_status()
        if not usable:
            _log(f"note: {note}")
    meta = H.environment_info(device, packages=("opacus", "backpack-for-pytorch"))
    _log(
        f"device: {meta['device']}; torch {meta['torch']}; threads {meta['torch_num_threads']}; "
        f"build {meta.get('unlearn_ext_build_info')}"
    )
    if interpreter_enabled():
        _log("note: TRITON_INTERPRET=1 is set: Triton is skipped (interpreted kernels are never timed)")

    t_start = time.perf_counter()
    results = [run_case(case, providers, args, device) for case in cases]
    wall = time.perf_counter() - t_start
    targets = [dict(r["target"], case=r["case"]["label"]) for r in results if r["target"]]

    mode = "quick" if args.quick else ("custom" if args.shapes else "default")
    name = args.out or (
        "fisher_quick"
        if args.quick and device.type == "cpu"
        else f"fisher_quick_{device.type}"
        if args.quick
        else f"fisher_{device.type}"
    )
    meta["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": "fisher",
        "op": "sq_grad_linear / sq_grad_conv2d / sq_grad_embedding",
        "mode": mode,
        "argv": sys.argv[1:] if argv is None else argv,
        "meta": meta,
        "settings": {
            "min_run_time_s": args.min_run_time,
            "slow_call_s": args.slow_s,
            "mem_budget_gib": args.mem_budget_gib,
            "mem_repeats": args.mem_repeats,
            "wait_idle_s": args.wait_idle,
            "busy_retries": args.busy_retries,
            "busy_threshold": BUSY,
            "check": args.check,
            "providers": providers,
            "wall_seconds": round(wall, 1),
        },
        "definitions": {
            "x_floor": "median time / median time of the floor provider (plain weight gradient, same data)",
            "peak_extra_mib": "CPU: VmHWM - VmRSS before the call in a fresh child process (inputs built "
            "before; one warm-up call first unless the call takes > 2 s; the max over mem_repeats child "
            "runs, once for calls > 2 s). CUDA: max_memory_allocated - "
            "memory_allocated before the call. The result counts.",
            "beyond_output_mib": "peak_extra_mib minus the float32 result F",
            "max_rel_err": "max|F - F_ref| / max|F_ref| against a float64 torch.func reference",
            "opacus/backpack": "timings include the layer forward and backward they need to get the "
            "inputs and output gradients; compare with the fwd_bwd row (plain forward+backward)",
            "chunk": "samples per call when a provider's per-sample gradients would exceed mem_budget_gib",
        },
        "cases": results,
        "targets": targets,
    }
    path = H.write_json(name, payload)  # first, so that nothing below can lose the results

    print_summary(results, device, meta)
    loads = [r["other_cpu_load"] for r in results if r.get("other_cpu_load") is not None]
    if loads and max(loads) > BUSY:
        _log(
            f"WARNING: other processes used up to {100 * max(loads):.0f}% of the CPUs during timings "
            "(rows marked BUSY); those timings are disturbed. Re-run them on an idle machine (--wait-idle)."
        )
    if targets:
        _log("CPU targets (cpp): " + ", ".join(f"{t['case']}: {t['result']}" for t in targets))
    _log(f"wrote {path.relative_to(H.REPO_ROOT) if path.is_relative_to(H.REPO_ROOT) else path} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
