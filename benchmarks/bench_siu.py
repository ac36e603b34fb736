"""MiniMMU: SIU against GA, GA+KL and PO on a real (small) multimodal model, on a CPU.

    python benchmarks/bench_siu.py [--digits D ...] [--methods M ...] [--seeds S ...] [--out NAME]
    python benchmarks/bench_siu.py --merge results/a.json results/b.json --out NAME

Runs of one protocol can go side by side (one digit per process, ``OMP_NUM_THREADS=1`` each) and
be merged afterwards with ``--merge`` (:func:`unlearn_ext.siu.benchmark.merge_reports`).

The experiment is :func:`unlearn_ext.siu.benchmark.run_minimmu` (its docstring defines the data and
the metrics; ``unlearn mmu`` runs the same thing from the CLI). The model is MiniMMU
(``unlearn_ext.siu.minimmu.build_minimmu``: SmolLM2-135M-Instruct with a vision connector trained
on the bundled MNIST digits, cached after the first build). It then runs every method on a tiny
random Hugging Face ``LlavaForConditionalGeneration`` (``hf_llava_check``) to prove the HF path. Writes
``benchmarks/results/<out>.json`` (the report, plus the environment) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as H  # noqa: E402

from unlearn_ext.report import print_mmu_table  # noqa: E402
from unlearn_ext.siu.benchmark import (  # noqa: E402
    add_spec_arguments,
    hf_llava_check,
    merge_reports,
    run_minimmu,
    spec_from_args,
)
from unlearn_ext.siu.minimmu import build_minimmu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_arguments(p)
    p.add_argument("--out", default="siu_minimmu")
    p.add_argument("--no-hf", action="store_true", help="skip the tiny random HF LLaVA integration check")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge these reports of one protocol into --out")
    args = p.parse_args()
    # Merging needs the model only for the HF check (its tokenizer and an image).
    built = build_minimmu(progress=not args.no_progress) if not (args.merge and args.no_hf) else None
    if args.merge:
        report = merge_reports([json.loads(Path(f).read_text()) for f in args.merge])
    else:
        spec = spec_from_args(args)
        report = run_minimmu(spec, built=built, progress=not args.no_progress, log=lambda s: print(s, flush=True))
    print_mmu_table(report)
    if not args.no_hf:
        _, tok, ds, _ = built
        image = ds.x_train[int((ds.y_train == 7).nonzero()[0])]
        report["hf_llava"] = hf_llava_check(tok, image)
        print(f"HF LLaVA (tiny, random) integration path: {report['hf_llava']}")
    report["environment"] = H.environment_info("cpu")
    print(f"wrote {H.write_json(args.out, report)}")


if __name__ == "__main__":
    main()
