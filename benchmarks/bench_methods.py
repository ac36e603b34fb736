"""Every unlearning method on the bundled MNIST: mean over seeds and forgotten classes.

Per (seed, class): the original model (trained with mnemonic codes, the paper's MLP recipe) and the
retrained-from-scratch reference come from the user cache (trained on first use, the training time
recorded then); each method runs on the original and is evaluated against the retrained model.
Checks issue 3's mnemonic targets. Writes ``benchmarks/results/<out>.json``.

    python benchmarks/bench_methods.py                       # 3 seeds x classes 0 3 7, MLP
    python benchmarks/bench_methods.py --seeds 0 --classes 0 --model cnn
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from unlearn_ext._progress import progress_session  # noqa: E402
from unlearn_ext.experiment import ExperimentSpec, run_experiment  # noqa: E402

METRICS = ("forget_acc", "forget_class_test_acc", "retain_class_test_acc", "test_acc", "mia", "avg_gap", "seconds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--classes", type=int, nargs="+", default=[0, 3, 7])
    p.add_argument("--methods", nargs="+", default=None, help="default: every implemented method")
    p.add_argument("--fresh", action="store_true", help="retrain cached models")
    p.add_argument("--out", default=None, help="results file name (default methods_<dataset>_<model>)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    runs = []
    t0 = time.perf_counter()
    with progress_session(not args.no_progress):
        for seed in args.seeds:
            for cls in args.classes:
                spec = ExperimentSpec(
                    dataset=args.dataset,
                    arch=args.model,
                    classes=(cls,),
                    seed=seed,
                    methods=tuple(args.methods or ()),
                    fresh=args.fresh,
                )
                report = run_experiment(spec, progress=not args.no_progress)
                runs.append({"seed": seed, "class": cls, "methods": report["methods"]})
                model_info = report["model"]

    names = list(runs[0]["methods"])
    summary = {}
    for name in names:
        rows = [r["methods"][name] for r in runs if "error" not in r["methods"][name]]
        summary[name] = {
            "runs": len(rows),
            "failed_runs": len(runs) - len(rows),
            **_harness.mean_and_std(rows, METRICS),
        }

    retrain_s = summary["retrain"]["seconds"]
    for name, entry in summary.items():
        if "seconds" in entry and name != "original":  # the original's seconds are training, not unlearning
            entry["speedup_vs_retrain"] = retrain_s / max(entry["seconds"], 1e-9)

    targets = {}
    if "mnemonic" in summary:
        m, rt = summary["mnemonic"], summary["retrain"]
        targets = {
            "mnemonic forget-class test acc <= 5%": (m["forget_class_test_acc"], m["forget_class_test_acc"] <= 0.05),
            "mnemonic kept-class test acc >= retrain - 3 pts": (
                m["retain_class_test_acc"] - rt["retain_class_test_acc"],
                m["retain_class_test_acc"] >= rt["retain_class_test_acc"] - 0.03,
            ),
            "mnemonic >= 50x faster than retraining": (m["speedup_vs_retrain"], m["speedup_vs_retrain"] >= 50),
        }

    def pct(e, k):
        return f"{100 * e[k]:.1f} ± {100 * e[k + '_std']:.1f}" if k in e else "-"

    _harness.print_table(
        f"{args.dataset} / {args.model}: mean ± std over seeds {args.seeds} x classes {args.classes}",
        ["method", "forget %", "fgt-cls test %", "kept-cls test %", "test %", "MIA %", "gap pts", "s", "x retrain"],
        [
            [
                n,
                pct(e, "forget_acc"),
                pct(e, "forget_class_test_acc"),
                pct(e, "retain_class_test_acc"),
                pct(e, "test_acc"),
                pct(e, "mia"),
                pct(e, "avg_gap"),
                f"{e['seconds']:.3g}" if "seconds" in e else "-",
                f"{e['speedup_vs_retrain']:.3g}" if "speedup_vs_retrain" in e else "-",
            ]
            for n, e in summary.items()
        ],
    )
    for label, (value, ok) in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {value:.4g}")
    payload = {
        "benchmark": "methods",
        "dataset": args.dataset,
        "model": model_info,
        "seeds": args.seeds,
        "classes": args.classes,
        "environment": _harness.environment_info("cpu"),
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - t0,
        "summary": summary,
        "targets": {k: {"value": v, "pass": ok} for k, (v, ok) in targets.items()},
        "runs": runs,
    }
    path = _harness.write_json(args.out or f"methods_{args.dataset}_{args.model}", payload)
    print(f"wrote {path}")
    return 0 if all(ok for _, ok in targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
