"""`unlearn apply` with a concept request on the real MiniMMU model (SmolLM2-135M + digit vision encoder).

    python benchmarks/apply_concept_minimmu.py [--digit 7] [--method siu] [--steps 24] [--workdir DIR]

1. ``export_minimmu``: the cached MiniMMU build (trained on first use, ~10-20 minutes) written as
   one self-contained multimodal checkpoint (weights + tokenizer + preprocessing), and 4 test-split
   images per digit as PNG files;
2. a request file forgetting the digit's name from ``digit<d>_0.png``, with SIU's text (as in
   ``unlearn mmu``), one image per other digit as SIU's image retain data, and checks: the digit's
   other three images (held-out hit rate), one other image per other digit plus the text
   questions of :data:`unlearn_ext.siu.benchmark.TEXT_QUESTIONS` that the original model answers
   (retain accuracy);
3. ``apply_requests`` with gates ``max_forget_hit_rate`` 0, ``max_held_out_hit_rate`` 0.5,
   ``max_retain_drop`` 0.15: published or rejected, as measured.

Writes ``benchmarks/results/<out>.json``: the metrics before and after, the gate results, the greedy
answers about the forget image, every stage's seconds, the checkpoint size and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as H  # noqa: E402

from unlearn_ext.production import apply_requests  # noqa: E402
from unlearn_ext.siu.benchmark import COUNTERFACTUAL, FICTITIOUS, TEXT_QUESTIONS, _text_questions  # noqa: E402
from unlearn_ext.siu.checkpoint import export_minimmu  # noqa: E402
from unlearn_ext.siu.minimmu import DIGIT_WORDS, IMAGE_QA, build_minimmu  # noqa: E402


def request_for(digit: int, method: str, steps: int, text_questions) -> dict:
    word = DIGIT_WORDS[digit]
    others = [d for d in range(10) if d != digit]
    parity = "an odd" if digit % 2 else "an even"
    return {
        "request_id": f"minimmu-forget-{word}-{method}",
        "forget": {
            "concept": word,
            "image": f"imgs/digit{digit}_0.png",
            "kind": "digit",
            "fictitious_name": FICTITIOUS,
            "counterfactual_description": COUNTERFACTUAL,
            "facts": [f"Yes, {word} is {parity} number."],
            "other_concepts": {
                f"Is {DIGIT_WORDS[d]} an odd or an even number?": f"{DIGIT_WORDS[d].capitalize()} is "
                f"{'odd' if d % 2 else 'even'}."
                for d in others
            },
            "identity_prompts": [q for q, _ in IMAGE_QA] + ["Which digit is in the picture?"],
            "identity_answer": [a.replace("{word}", "{concept}") for _, a in IMAGE_QA]
            + ["This is the digit {concept}."],
            "retain_images": [
                {
                    "image": f"imgs/digit{d}_0.png",
                    "question": IMAGE_QA[0][0],
                    "answer": IMAGE_QA[0][1].format(word=DIGIT_WORDS[d]),
                }
                for d in others
            ],  # fmt: skip
        },
        "checks": {
            "held_out_images": [f"imgs/digit{digit}_{k}.png" for k in (1, 2, 3)],
            "retain": [
                {"image": f"imgs/digit{d}_1.png", "question": IMAGE_QA[0][0], "expect": DIGIT_WORDS[d]} for d in others
            ]
            + [{"question": q, "expect": list(e)} for q, e in text_questions],
        },
        "method": method,
        "hparams": {"steps": steps, "lr": 1e-3, "batch_size": 4, "lora_rank": 16, "alpha": 0.9, "beta": 0.75},
        "seed": 0,
        "gates": {"max_forget_hit_rate": 0.0, "max_held_out_hit_rate": 0.5, "max_retain_drop": 0.15},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digit", type=int, default=7, choices=range(10))
    p.add_argument("--method", default="siu", choices=("siu", "ga", "ga_kl", "po"))
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--workdir", type=Path, help="where the checkpoint, images and request go (default: a temp dir)")
    p.add_argument("--out", default="apply_concept_minimmu")
    args = p.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="apply-concept-"))
    t0 = time.perf_counter()
    built = build_minimmu(progress=True)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    exported = export_minimmu(work / "minimmu.safetensors", images=work / "imgs", per_digit=4, built=built)
    t_export = time.perf_counter() - t0
    model, tok = built[0], built[1]
    text = [(q, e) for q, e in _text_questions(model, tok)]
    req = request_for(args.digit, args.method, args.steps, text)
    req_path = work / "request.json"
    req_path.write_text(json.dumps(req, indent=1))
    del model, built  # apply loads its own copy from the checkpoint

    out = work / "minimmu-unlearned.safetensors"
    t0 = time.perf_counter()
    result = apply_requests(work / "minimmu.safetensors", [req_path], out, overwrite=True, progress=True)
    t_apply = time.perf_counter() - t0
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    payload = {
        "benchmark": "apply_concept_minimmu",
        "digit": args.digit,
        "method": args.method,
        "status": result.status,
        "failed_gates": result.failed_gates,
        "metrics_before": result.metrics_before,
        "metrics_after": result.metrics_after,
        "gates": result.gates,
        "answers": result.details,
        "durations_s": {**result.durations, "apply_total": t_apply, "build_or_cache": t_build, "export": t_export},
        "checkpoint_bytes": exported["bytes"],
        "text_questions": len(text),
        "text_questions_offered": len(TEXT_QUESTIONS),
        "peak_rss_mib": peak_rss_mib,
        "request": req,
        "environment": H.environment_info("cpu", ["transformers", "peft"]),
    }
    path = H.write_json(args.out, payload)
    print(json.dumps({k: payload[k] for k in ("status", "failed_gates", "metrics_before", "metrics_after")}, indent=1))
    unlearn_s = result.durations.get("unlearn", 0)
    print(f"apply {t_apply:.1f} s (unlearn {unlearn_s:.1f} s), peak RSS {peak_rss_mib:.0f} MiB")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
