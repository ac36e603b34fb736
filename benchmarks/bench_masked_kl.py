"""Benchmark of fused_linear_masked_kl (SIU's loss, DESIGN.md 4.2): forward + backward.

    python benchmarks/bench_masked_kl.py [--quick] [--device cpu|cuda] [--out NAME] [--ce] [--frozen-head]

One case: ``N`` tokens, hidden size ``H``, vocabulary ``V`` (default SmolLM2's sizes: N=2048,
H=576, V=49152, float32 on CPU; N=8192, H=4096, V=128256, bfloat16 on CUDA), the current and
the reference model each with its own LM head, a random 5% vocabulary mask, every token in the
KL (and, with ``--ce``, a cross-entropy on every token). Gradients flow to the current hidden
states and head weight; with ``--frozen-head`` to the hidden states only (SIU with LoRA below a
frozen LM head: no ``[V, H]`` weight gradient). Providers:

* ``floor``: the four GEMMs any implementation must do (both heads' logits, dL/dh, dL/dW; three
  with a frozen head), on random data of the same shapes: the compute floor.
* ``torch``: plain PyTorch: both models' full ``[N, V]`` logits, ``log_softmax``, the masked KL
  (as ``kl_div`` computes it), mean over tokens, ``backward()``.
* ``cpp`` / ``cuda`` / ``triton``: ``unlearn_ext.fused_linear_masked_kl(..., backend=...)``.
* ``liger`` (CUDA only, when liger-kernel is installed): ``LigerFusedLinearJSD`` with
  ``beta=0`` (forward KL from the teacher), which has no vocabulary mask: the same GEMMs and
  softmaxes, a different loss. Reported for its time and memory.

Correctness comes first: every provider's loss and gradients on the first 128 tokens are compared
with the float64 reference (``unlearn_ext.ops._reference``); a failing provider is not timed.
CPU peak memory: peak RSS of one call beyond the RSS before it, in a fresh child process.
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
from unlearn_ext.ops import fused_linear_masked_kl  # noqa: E402
from unlearn_ext.ops._reference import fused_linear_masked_kl_reference  # noqa: E402

OP = "fused_linear_masked_kl"
CHECK_TOKENS = 128
TOL = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2}


def default_case(device: str, quick: bool, ce: bool, frozen_head: bool = False) -> dict[str, Any]:
    if quick:
        case = dict(N=256, H=64, V=4096, dtype="float32")
    elif device == "cuda":
        case = dict(N=8192, H=4096, V=128256, dtype="bfloat16")
    else:
        case = dict(N=2048, H=576, V=49152, dtype="float32")
    return dict(case, ce=ce, frozen_head=frozen_head, seed=0)


def make_inputs(case: dict[str, Any], device: str, tokens: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    n = case["N"] if tokens is None else tokens
    dt = getattr(torch, case["dtype"])

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    d = {
        "hidden": rnd(case["N"], case["H"])[:n],
        "weight": rnd(case["V"], case["H"], scale=case["H"] ** -0.5),
        "ref_hidden": rnd(case["N"], case["H"])[:n],
        "ref_weight": rnd(case["V"], case["H"], scale=case["H"] ** -0.5),
        "vocab_mask": (torch.rand(case["V"], generator=g) < 0.05).to(device),
        "target": torch.randint(0, case["V"], (case["N"],), generator=g)[:n].to(device),
    }
    return {k: v.contiguous() for k, v in d.items()}


def plain_torch(hidden, weight, ref_hidden, ref_weight, vocab_mask, target, ce):
    z = hidden @ weight.T
    with torch.no_grad():
        logp = F.log_softmax((ref_hidden @ ref_weight.T).float(), -1)
    logq = F.log_softmax(z.float(), -1)
    kl = (F.kl_div(logq, logp, log_target=True, reduction="none") * vocab_mask).sum(-1).mean()
    return kl + F.cross_entropy(z.float(), target) if ce else kl


def make_provider(provider: str, case: dict[str, Any], d: dict[str, torch.Tensor]):
    """A zero-argument callable running forward + backward; returns (loss, dh, dW or None when the
    head is frozen)."""
    ce = case["ce"]
    frozen = case.get("frozen_head", False)
    if provider == "floor":
        n, v = d["hidden"].shape[0], d["weight"].shape[0]
        g = torch.randn(n, v, dtype=d["hidden"].dtype, device=d["hidden"].device)

        def floor():
            d["hidden"] @ d["weight"].T
            d["ref_hidden"] @ d["ref_weight"].T
            return None, g @ d["weight"], None if frozen else g.T @ d["hidden"]

        return floor

    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(not frozen)
    kw = dict(vocab_mask=d["vocab_mask"], target=d["target"] if ce else None, ce_weight=1.0 if ce else 0.0)

    if provider == "torch":

        def loss_fn():
            return plain_torch(h, w, d["ref_hidden"], d["ref_weight"], d["vocab_mask"], d["target"], ce)

    elif provider == "reference":

        def loss_fn():
            return fused_linear_masked_kl_reference(h, w, d["ref_hidden"], d["ref_weight"], **kw)

    elif provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0)

        def loss_fn():
            return jsd(h, w, d["ref_hidden"], d["ref_weight"])

    else:

        def loss_fn():
            return fused_linear_masked_kl(h, w, d["ref_hidden"], d["ref_weight"], **kw, backend=provider)

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
    if provider in ("cuda", "triton", "liger") and device.type != "cuda":
        return "CUDA only"
    if provider == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
    return None


def check(provider: str, case: dict[str, Any], device: str) -> dict[str, Any]:
    """Loss and gradients on the first CHECK_TOKENS tokens against the float64 reference."""
    if provider in ("floor", "liger"):
        return {"ok": True, "note": "n/a (" + ("the GEMMs only" if provider == "floor" else "a different loss") + ")"}
    sub = dict(case, N=min(case["N"], CHECK_TOKENS))
    d = make_inputs(case, device, tokens=sub["N"])
    got = make_provider(provider, sub, d)()
    d64 = {k: (v.double() if v.is_floating_point() else v) for k, v in d.items()}
    want = make_provider("reference", sub, d64)()
    names = ("loss", "d_hidden") if case.get("frozen_head") else ("loss", "d_hidden", "d_weight")
    return H.check_against_reference(got[: len(names)], want[: len(names)], names, TOL[case["dtype"]])


def main() -> None:
    parser = H.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--ce", action="store_true", help="add a cross-entropy term on every token")
    parser.add_argument("--frozen-head", action="store_true", help="no gradient for the head weight (LoRA below it)")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--size", nargs=3, type=int, metavar=("N", "H", "V"), default=None)
    args = parser.parse_args()
    device = H.resolve_device(args.device)
    case = default_case(device.type, args.quick, args.ce, args.frozen_head)
    if args.size:
        case.update(N=args.size[0], H=args.size[1], V=args.size[2])
    min_run = args.min_run_time or (0.05 if args.quick else 1.0)
    providers = args.providers or (
        ["floor", "torch", "cpp"] if device.type == "cpu" else ["floor", "torch", "liger", "cuda", "triton"]
    )
    H.configure_memory_subprocess(preload=["unlearn_ext"])
    print(f"fused_linear_masked_kl: {case}", flush=True)
    rows = H.run_providers(
        providers, device,
        make_run=lambda p: make_provider(p, case, make_inputs(case, device.type)),
        check=lambda p: check(p, case, device.type),
        skip_reason=lambda p: skip_reason(p, device),
        memory_factory=memory_factory, memory_spec=lambda p: {"case": case, "provider": p},
        min_run_time=min_run, memory=not args.no_memory,
    )  # fmt: skip
    H.print_provider_table(
        f"fused_linear_masked_kl fwd+bwd, N={case['N']} H={case['H']} V={case['V']} {case['dtype']}"
        + (" +CE" if case["ce"] else "")
        + (" frozen head" if case["frozen_head"] else ""),
        rows,
    )
    name = args.out or (
        f"masked_kl_{device.type}"
        + ("_quick" if args.quick else "")
        + ("_ce" if args.ce else "")
        + ("_frozen_head" if args.frozen_head else "")
    )
    path = H.write_json(name, {"case": case, "environment": H.environment_info(device), "rows": rows})
    print(f"wrote {path}")
    if any(r.get("status") == "FAILED" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
