"""Benchmark of fused_linear_ce_norm (OPC's loss, DESIGN.md 4.3): forward + backward.

    python benchmarks/bench_ce_norm.py [--quick] [--device cpu|cuda] [--out NAME] [--forget F]

One case: ``N`` rows, hidden size ``H``, ``V`` classes / vocabulary entries (default N=2048,
H=576, V=49152, float32 on CPU; N=8192, H=4096, V=131072, bfloat16 on CUDA), a random fraction
``--forget`` (default 0.25) of the rows forgotten (squared-norm penalty, weight 1), cross-entropy on
the others. Gradients flow to the hidden states and the head weight. Providers:

* ``floor``: the three GEMMs any implementation must do (logits, dL/dh, dL/dW) on random data of the
  same shapes: the compute floor.
* ``torch``: plain PyTorch: full ``[N, V]`` logits, ``cross_entropy`` on the retained rows, the
  squared norm on the forgotten rows, ``backward()``.
* ``compile``: ``torch.compile`` of the same plain function (inductor).
* ``cpp`` / ``cuda`` / ``triton``: ``unlearn_ext.fused_linear_ce_norm(..., backend=...)``.
* ``liger`` / ``cce`` (CUDA only, when installed): Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
  and cut-cross-entropy's ``linear_cross_entropy`` on all rows: plain CE without the norm term (the
  same GEMMs, a different loss), reported for their time and memory.

Correctness comes first: every provider's loss and gradients on the first 128 rows are compared with
the float64 reference (``unlearn_ext.ops._reference``); a failing provider is not timed. CPU peak
memory: peak RSS of one call beyond the RSS before it, in a fresh child process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as H  # noqa: E402

from unlearn_ext import _loader  # noqa: E402
from unlearn_ext.ops import fused_linear_ce_norm  # noqa: E402
from unlearn_ext.ops._reference import fused_linear_ce_norm_reference  # noqa: E402

OP = "fused_linear_ce_norm"
CHECK_ROWS = 128
TOL = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2}
PEERS_WITHOUT_NORM = ("liger", "cce")


def default_case(device: str, quick: bool, forget: float) -> dict[str, Any]:
    if quick:
        return dict(N=256, H=64, V=4096, dtype="float32", forget=forget, seed=0)
    if device == "cuda":
        return dict(N=8192, H=4096, V=131072, dtype="bfloat16", forget=forget, seed=0)
    return dict(N=2048, H=576, V=49152, dtype="float32", forget=forget, seed=0)


def make_inputs(case: dict[str, Any], device: str, rows: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    n = case["N"] if rows is None else rows
    dt = getattr(torch, case["dtype"])
    d = {
        "hidden": torch.randn(case["N"], case["H"], generator=g)[:n],
        "weight": torch.randn(case["V"], case["H"], generator=g) * case["H"] ** -0.5,
        "target": torch.randint(0, case["V"], (case["N"],), generator=g)[:n],
        "forget_mask": (torch.rand(case["N"], generator=g) < case["forget"])[:n],
    }
    return {k: (v.to(dt) if v.is_floating_point() else v).to(device).contiguous() for k, v in d.items()}


def plain_torch(hidden, weight, target, forget_mask):
    """OPC's loss as a user writes it: full logits, CE on retained rows, squared norm on forgotten rows."""
    z = (hidden @ weight.T).float()
    ce = F.cross_entropy(z[~forget_mask], target[~forget_mask]) if bool((~forget_mask).any()) else z.sum() * 0
    norm = z[forget_mask].square().sum(1).mean() if bool(forget_mask.any()) else z.sum() * 0
    return ce + norm


def _plain_torch_static(hidden, weight, target, forget_mask):
    """The same loss without data-dependent indexing (for torch.compile's graph)."""
    z = (hidden @ weight.T).float()
    keep = (~forget_mask).float()
    ce = (F.cross_entropy(z, target, reduction="none") * keep).sum() / keep.sum().clamp_min(1)
    fm = forget_mask.float()
    return ce + (z.square().sum(1) * fm).sum() / fm.sum().clamp_min(1)


def make_provider(provider: str, case: dict[str, Any], d: dict[str, torch.Tensor]):
    """A zero-argument callable running forward + backward; returns (loss, dh, dW)."""
    if provider == "floor":
        n, v = d["hidden"].shape[0], d["weight"].shape[0]
        g = torch.randn(n, v, dtype=d["hidden"].dtype, device=d["hidden"].device)

        def floor():
            d["hidden"] @ d["weight"].T
            return None, g @ d["weight"], g.T @ d["hidden"]

        return floor

    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    t, f = d["target"], d["forget_mask"]
    if provider == "torch":

        def loss_fn():
            return plain_torch(h, w, t, f)

    elif provider == "compile":
        compiled = torch.compile(_plain_torch_static)

        def loss_fn():
            return compiled(h, w, t, f)

    elif provider == "reference":

        def loss_fn():
            return fused_linear_ce_norm_reference(h, w, t, forget_mask=f)

    elif provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def loss_fn():
            return liger(w, h, t)

    elif provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def loss_fn():
            return linear_cross_entropy(h, w, t)

    else:

        def loss_fn():
            return fused_linear_ce_norm(h, w, t, forget_mask=f, backend=provider)

    def run():
        h.grad = w.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), h.grad, w.grad

    return run


def memory_factory(spec: dict[str, Any]):
    """Module-level (picklable) factory for the CPU peak-memory child."""
    d = make_inputs(spec["case"], "cpu")
    return make_provider(spec["provider"], spec["case"], d)


def skip_reason(provider: str, device: torch.device) -> str | None:
    if provider == "cpp" and (device.type != "cpu" or not _loader.has_kernel(OP, "cpu")):
        return "CPU only" if device.type != "cpu" else "C++ kernel not built"
    if provider == "cuda" and (device.type != "cuda" or not _loader.has_kernel(OP, device)):
        return "CUDA only" if device.type != "cuda" else "CUDA kernel not built"
    if provider in ("triton", *PEERS_WITHOUT_NORM) and device.type != "cuda":
        return "CUDA only"
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}.get(provider)
    if module:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed"
    return None


def check(provider: str, case: dict[str, Any], device: str) -> dict[str, Any]:
    """Loss and gradients on the first CHECK_ROWS rows against the float64 reference."""
    if provider in ("floor", *PEERS_WITHOUT_NORM):
        return {
            "ok": True,
            "note": "n/a (" + ("the GEMMs only" if provider == "floor" else "CE without the norm") + ")",
        }
    sub = dict(case, N=min(case["N"], CHECK_ROWS))
    d = make_inputs(case, device, rows=sub["N"])
    got = make_provider(provider, sub, d)()
    d64 = {k: (v.double() if v.is_floating_point() else v) for k, v in d.items()}
    want = make_provider("reference", sub, d64)()
    return H.check_against_reference(got, want, ("loss", "d_hidden", "d_weight"), TOL[case["dtype"]])


def main() -> None:
    parser = H.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--forget", type=float, default=0.25, help="fraction of rows forgotten (norm penalty)")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--size", nargs=3, type=int, metavar=("N", "H", "V"), default=None)
    args = parser.parse_args()
    if not 0.0 <= args.forget <= 1.0:
        parser.error(f"--forget must be in [0, 1], got {args.forget}")
    device = H.resolve_device(args.device)
    case = default_case(device.type, args.quick, args.forget)
    if args.size:
        case.update(N=args.size[0], H=args.size[1], V=args.size[2])
    min_run = args.min_run_time or (0.05 if args.quick else 1.0)
    providers = args.providers or (
        ["floor", "torch", "compile", "cpp"]
        if device.type == "cpu"
        else ["floor", "torch", "compile", "liger", "cce", "cuda", "triton"]
    )
    H.configure_memory_subprocess(preload=["unlearn_ext"])
    print(f"fused_linear_ce_norm: {case}", flush=True)
    rows = H.run_providers(
        providers, device,
        make_run=lambda p: make_provider(p, case, make_inputs(case, device.type)),
        check=lambda p: check(p, case, device.type),
        skip_reason=lambda p: skip_reason(p, device),
        memory_factory=memory_factory, memory_spec=lambda p: {"case": case, "provider": p},
        min_run_time=min_run, memory=not args.no_memory,
    )  # fmt: skip
    H.print_provider_table(
        f"fused_linear_ce_norm fwd+bwd, N={case['N']} H={case['H']} V={case['V']} {case['dtype']}, "
        f"{case['forget']:.0%} of rows forgotten",
        rows,
    )
    name = args.out or f"ce_norm_{device.type}" + ("_quick" if args.quick else "")
    path = H.write_json(name, {"case": case, "environment": H.environment_info(device), "rows": rows})
    print(f"wrote {path}")
    if any(r.get("status") == "FAILED" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
