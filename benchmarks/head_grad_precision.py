"""Error of an LM head's [V, H] weight gradient summed over k chunks of tokens in bfloat16/float16,
against one GEMM's (plain PyTorch's), both measured against float64: why the fused LM-head losses
sum it in float32 past 2 chunks (csrc/include/unlearn_ext/linear_head.h, kMaxLowPrecisionChunks).

The data are those of tests/ops/test_head_grad_sums.py: hidden states sharing a direction (as LM
hidden states do) and a softmax-shaped dLoss/dz. CPU GEMMs; the ratio is a property of rounding,
not of the device.

    python benchmarks/head_grad_precision.py [--seeds 6] [--out head_grad_precision]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops"))

import _harness as H  # noqa: E402
from test_head_grad_sums import _err, _shared_direction_inputs  # noqa: E402

from unlearn_ext.ops._head_chunks import HeadGradSums  # noqa: E402

CHUNKS = (1, 2, 3, 4, 8, 16, 64)


def ratios(dtype: torch.dtype, chunks: int, seed: int, n: int = 1024, h: int = 48, v: int = 300) -> dict:
    """(in-place low-precision sums, float32 sums) max-error ratios to one GEMM's."""
    dz, hidden = _shared_direction_inputs(n, h, v, dtype, seed)
    want = dz.double().T @ hidden.double()
    one = _err(dz.T @ hidden, want)
    m = -(-n // chunks)
    acc = dz[:m].T @ hidden[:m]
    sums = HeadGradSums(v, h, True, False, dtype, "cpu", chunks)
    sums.add(dz[:m], hidden[:m])
    for n0 in range(m, n, m):
        acc.addmm_(dz[n0 : n0 + m].T, hidden[n0 : n0 + m])
        sums.add(dz[n0 : n0 + m], hidden[n0 : n0 + m])
    return {"in_place": _err(acc, want) / one, "shipped": _err(sums.result()[0], want) / one}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--out", default="head_grad_precision")
    args = ap.parse_args()
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for k in CHUNKS:
            rs = [ratios(dtype, k, s) for s in range(args.seeds)]
            row = {
                "dtype": str(dtype).replace("torch.", ""),
                "chunks": k,
                "in_place_max": max(r["in_place"] for r in rs),
                "in_place_mean": sum(r["in_place"] for r in rs) / len(rs),
                "shipped_max": max(r["shipped"] for r in rs),
            }
            rows.append(row)
            print(
                f"{row['dtype']:>8} chunks {k:>3}: in-place max {row['in_place_max']:.2f}x "
                f"(mean {row['in_place_mean']:.2f}x), shipped (float32 past 2) max {row['shipped_max']:.2f}x"
            )
    payload = {"seeds": args.seeds, "shape": {"N": 1024, "H": 48, "V": 300}, "rows": rows}
    payload["environment"] = H.environment_info("cpu")
    print(f"wrote {H.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
