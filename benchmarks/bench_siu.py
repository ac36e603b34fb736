"""MiniMMU: SIU against GA, GA+KL and PO on a real (small) multimodal model, on a CPU.

    python benchmarks/bench_siu.py [--digits 7 3 0] [--steps 24] [--lr 1e-3] [--lora-rank 16] [--out NAME]

The experiment is :func:`unlearn_ext.siu.benchmark.run_minimmu` (its docstring defines the data and
the metrics; ``unlearn mmu`` runs the same thing from the CLI). The model is MiniMMU
(``unlearn_ext.siu.minimmu.build_minimmu``: SmolLM2-135M-Instruct with a vision connector trained
on the bundled MNIST digits, cached after the first build). It then runs every method on a tiny
random Hugging Face ``LlavaForConditionalGeneration`` (``hf_llava_check``) to prove the HF path. Writes
``benchmarks/results/<out>.json`` (the report, plus the environment) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as H  # noqa: E402

from unlearn_ext.report import print_mmu_table  # noqa: E402
from unlearn_ext.siu.api import CONCEPT_METHODS  # noqa: E402
from unlearn_ext.siu.benchmark import MMUSpec, hf_llava_check, run_minimmu  # noqa: E402
from unlearn_ext.siu.minimmu import build_minimmu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", nargs="+", type=int, default=[7, 3, 0])
    p.add_argument("--methods", nargs="+", default=list(CONCEPT_METHODS), choices=CONCEPT_METHODS)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.9, help="SIU's CE weight")
    p.add_argument("--beta", type=float, default=0.75, help="SIU's DMK weight")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--train", default="all", help="parameters to train: all, or a substring (decoder: the LM)")
    p.add_argument("--held-out", type=int, default=20, help="held-out test images of the digit (generality)")
    p.add_argument("--others", type=int, default=3, help="test images per other digit (specificity)")
    p.add_argument("--image-retain", type=int, default=1, help="training images per other digit in SIU's type-4 data")
    p.add_argument("--out", default="siu_minimmu")
    p.add_argument("--no-hf", action="store_true", help="skip the tiny random HF LLaVA integration check")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    spec = MMUSpec(
        digits=tuple(args.digits), methods=tuple(args.methods), steps=args.steps, lr=args.lr, alpha=args.alpha,
        beta=args.beta, lora_rank=args.lora_rank or None, train=args.train, held_out=args.held_out, others=args.others,
        image_retain=args.image_retain,
    )  # fmt: skip
    built = build_minimmu(progress=not args.no_progress)
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
