"""Cost of MUSO's relabelling operator (issue 6): our streamed Gram form against the released code's.

The operator is the projector onto the retain features' row space, ``Pi = Z^T (Z Z^T + eps I)^-1 Z``
(``Z`` ``[N, d + 1]``: retain features with a 1 appended). Providers, on the same features:

* ``gram`` (ours, ``unlearn_ext.methods.muso.retain_projector``): ``G = Z^T Z`` accumulated over row
  chunks of *all* ``N`` retain rows, then ``I - eps (G + eps I)^-1`` by one ``(d+1) x (d+1)`` Cholesky:
  O(N d^2 + d^3) time, O(d^2) memory beyond the features.
* ``released_nxn`` (the released code's first commit): ``Z_s^T (Z_s Z_s^T + eps I)^-1 Z_s`` on a random
  ``subset`` of the rows (0.2 in the code): an ``N_s x N_s`` solve, O(N_s^3) time, O(N_s^2) memory.
* ``released_nxn_full``: the same on all ``N`` rows (what the exact operator costs that way), skipped
  when its ``N x N`` matrix would exceed ``--max-nxn-gib``.

Checks that ``gram`` equals ``released_nxn_full`` (when run) before reporting. Cases: features of the
bundled MNIST CNN (3600 retain rows, d+1 = 129), and random ResNet-18-sized features (d+1 = 513) for
CIFAR-10-sized retain sets (45000 rows; 4500 for a 10x smaller one). float64, CPU.

    python benchmarks/bench_muso_relabel.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from unlearn_ext.methods.muso import retain_projector  # noqa: E402

EPS = 1e-2


def gram_projector(z: torch.Tensor, eps: float, chunk: int = 4096) -> torch.Tensor:
    gram = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
    for start in range(0, z.shape[0], chunk):
        block = z[start : start + chunk]
        gram += block.T @ block
    return retain_projector(gram, eps)


def nxn_projector(z: torch.Tensor, eps: float) -> torch.Tensor:
    n = z.shape[0]
    return z.T @ torch.linalg.solve(z @ z.T + eps * torch.eye(n, dtype=z.dtype), z)


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def _cnn_features() -> torch.Tensor:
    from unlearn_ext.data import load_dataset, make_forget_split
    from unlearn_ext.experiment import ExperimentSpec, _trained
    from unlearn_ext.models.heads import features_and_logits

    ds = load_dataset("mnist", seed=0)
    split = make_forget_split(ds, fraction=0.1, seed=0)
    model, _, _ = _trained("original", ExperimentSpec(arch="cnn", fraction=0.1, seed=0), split, None, False)
    x, _ = split.tensors()["retain"]
    with torch.no_grad():
        feats, _ = features_and_logits(model.eval(), x)
    return torch.cat([feats.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)


def _random_features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # ReLU features of rank well below d, as a trained network's are
    basis = torch.randn(64, d - 1, generator=g, dtype=torch.float64)
    z = torch.relu(torch.randn(n, 64, generator=g, dtype=torch.float64) @ basis)
    return torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subset", type=float, default=0.2, help="the released code's subset_ratio")
    ap.add_argument("--max-nxn-gib", type=float, default=4.0, help="skip N x N matrices larger than this")
    ap.add_argument("--out", default="muso_relabel_cpu")
    args = ap.parse_args(argv)

    cases = [("MNIST CNN features", _cnn_features())]
    cases += [(f"random ReLU features, N={n}", _random_features(n, 513, seed=n)) for n in (4500, 45000)]
    rows, g = [], torch.Generator().manual_seed(0)
    for label, z in cases:
        n, d1 = z.shape
        n_s = max(1, round(args.subset * n))
        t_gram, p_gram = _time(lambda z=z: gram_projector(z, EPS), args.repeats)
        sub = z[torch.randperm(n, generator=g)[:n_s]]
        t_sub, _ = _time(lambda sub=sub: nxn_projector(sub, EPS), args.repeats)
        row = {"case": label, "N": n, "d_plus_1": d1, "N_subset": n_s, "gram_s": t_gram, "released_nxn_s": t_sub}
        if n * n * 8 / 2**30 <= args.max_nxn_gib:
            t_full, p_full = _time(lambda z=z: nxn_projector(z, EPS), 1)
            err = float((p_gram - p_full).abs().max())
            if err > 1e-6:
                raise SystemExit(f"{label}: the Gram-form projector differs from the N x N one by {err:.3g}")
            row.update(released_nxn_full_s=t_full, max_abs_diff=err)
        else:
            row["released_nxn_full_s"] = None
            row["released_nxn_full_note"] = f"skipped: the {n} x {n} float64 matrix is {n * n * 8 / 2**30:.1f} GiB"
        rows.append(row)
        print(f"{label}: done", flush=True)

    _harness.print_table(
        f"MUSO relabelling operator, eps={EPS}, float64, CPU ({torch.get_num_threads()} threads), median of "
        f"{args.repeats}",
        ["case", "N", "d+1", "gram (ours, all N)", f"released N_s x N_s (N_s = {args.subset:g} N)", "ratio",
         "released on all N", "ratio", "max |diff|"],
        [
            [r["case"], r["N"], r["d_plus_1"], f"{1e3 * r['gram_s']:.1f} ms", f"{1e3 * r['released_nxn_s']:.1f} ms",
             f"{r['released_nxn_s'] / r['gram_s']:.0f}x",
             "-" if r["released_nxn_full_s"] is None else f"{1e3 * r['released_nxn_full_s']:.0f} ms",
             "-" if r["released_nxn_full_s"] is None else f"{r['released_nxn_full_s'] / r['gram_s']:.0f}x",
             f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"]
            for r in rows
        ],
    )  # fmt: skip
    payload = {
        "benchmark": "muso_relabel",
        "eps": EPS,
        "subset": args.subset,
        "environment": _harness.environment_info("cpu"),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(f"wrote {_harness.write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
