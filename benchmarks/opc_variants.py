"""What was tried to make OPC resist the feature-mapping (FM) recovery attack (issue 5).

For each forgotten class (seed 0; the cached original and retrained models of ``bench_opc.py``):
OPC on the logits and on the penultimate features at the default lambda / epochs and at lambda 2 /
10 epochs, and one variant outside the paper that contracts the forget set's features toward the
original model's mean *retain* feature instead of the origin (the FM attack maps the origin back to
the forgotten class: see the README). Each model gets the standard and deep-forgetting metrics.
Writes ``benchmarks/results/<out>.json``.

    python benchmarks/opc_variants.py --model cnn          # classes 0 and 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from unlearn_ext.data import load_dataset, make_forget_split  # noqa: E402
from unlearn_ext.eval import evaluate, penultimate_features  # noqa: E402
from unlearn_ext.experiment import ExperimentSpec, _trained  # noqa: E402
from unlearn_ext.methods import get_method  # noqa: E402
from unlearn_ext.methods.opc import OPC  # noqa: E402
from unlearn_ext.ops import fused_linear_ce_norm  # noqa: E402

VARIANTS = {
    "logits, lambda 0.5, 5 epochs (default)": {},
    "logits, lambda 2, 10 epochs": {"norm_weight": 2.0, "epochs": 10},
    "features, lambda 0.5, 5 epochs": {"on": "features"},
    "features, lambda 2, 10 epochs": {"on": "features", "norm_weight": 2.0, "epochs": 10},
}
KEYS = (
    "forget_acc",
    "retain_acc",
    "retain_class_test_acc",
    "fm_recovered_forget_acc",
    "fm_recovered_test_acc",
    "fm_linear_recovered_forget_acc",
    "ft_recovered_forget_acc",
    "cka_original_forget",
    "probe_forget_class_test_acc",
)


class OPCToRetainMean(OPC):
    """Experiment, not a method of the library: features mode, contracted toward ``center``."""

    center: torch.Tensor

    def _loss(self, feats, head, y, is_forget):
        retain = ~is_forget
        ce = fused_linear_ce_norm(feats[retain], head.weight, y[retain], bias=head.bias, backend=self.backend)
        norm = (feats[is_forget] - self.center).square().sum(1).mean()
        return ce + self.norm_weight * norm, float(ce.detach()), float(norm.detach())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn", choices=("mlp", "cnn"))
    p.add_argument("--classes", type=int, nargs="+", default=[0, 3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results file name (default opc_variants_<model>)")
    args = p.parse_args(argv)

    rows = []
    t0 = time.perf_counter()
    ds = load_dataset("mnist", seed=args.seed)
    for cls in args.classes:
        spec = ExperimentSpec(arch=args.model, classes=(cls,), seed=args.seed)
        split = make_forget_split(ds, classes=(cls,), seed=args.seed)
        b = split.batches(seed=args.seed)
        original, _, _ = _trained("original", spec, split, None, False)
        retrained, _, _ = _trained("retrain", spec, split, split.retain_idx, False)
        models = {
            name: get_method("opc", seed=args.seed, **hp).unlearn(original, b["forget"], b["retain"])
            for name, hp in VARIANTS.items()
        }
        to_mean = OPCToRetainMean(seed=args.seed, on="features")
        to_mean.center = penultimate_features(original, b["retain"])[0].mean(0)
        models["features -> original's mean retain feature (not OPC)"] = to_mean.unlearn(
            original, b["forget"], b["retain"]
        )
        models["retrain"] = retrained
        for name, model in models.items():
            r = evaluate(model, b, original=original, deep=True, deep_options={"retrained": retrained})
            rows.append({"class": cls, "variant": name, **{k: r[k] for k in KEYS}})

    _harness.print_table(
        f"OPC variants, {args.model}, seed {args.seed} (%; CKA x100)",
        ["class", ("variant", "left"), "forget", "retain", "kept-cls test", "FM fgt", "FM test", "FT fgt", "CKA",
         "probe"],
        [[r["class"], r["variant"], *[f"{100 * r[k]:.1f}" for k in KEYS]] for r in rows],
    )  # fmt: skip
    payload = {
        "benchmark": "opc_variants",
        "model": args.model,
        "seed": args.seed,
        "classes": args.classes,
        "environment": _harness.environment_info("cpu"),
        "wall_seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    print(f"wrote {_harness.write_json(args.out or f'opc_variants_{args.model}', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
