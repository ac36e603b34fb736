"""MiniMMU: SIU against GA, GA+KL and PO on a real (small) multimodal model, on a CPU.

    python benchmarks/bench_siu.py [--digits 7 3 0] [--steps 12] [--out NAME]

The model is MiniMMU (``unlearn_ext.siu.minimmu.build_minimmu``: SmolLM2-135M-Instruct with a
vision connector trained on the bundled MNIST digits, cached after the first build). For each
forgotten digit, one training image of that digit is the forget image, and each method fine-tunes
a copy of the model for ``--steps`` steps:

* ``siu``: the four-target data (fictitious name, counterfactual description, the digit's facts,
  other digits' facts) with ``alpha * CE + beta * DMK``;
* ``ga`` / ``ga_kl``: the forget image with the identity questions and the original answers naming
  the digit, gradient ascent (plus the KL to the original for GA+KL);
* ``po``: the same questions answered with a refusal ("I cannot tell which digit this is.").

Metrics (METHODS.md 2.5, ``unlearn_ext.siu.metrics``), in %, except fluency (perplexity):
efficacy = 100 * (1 - hit rate) on the forget image; generality = the same on held-out test images
of the digit; specificity = accuracy on other digits' test images (and its drop against the
original); text = how many text-only answers are unchanged from the original model's; fluency =
perplexity on the original model's answers about the forget image, the digit's tokens excluded;
diversity; C-Dis on the original answers; Min-K% Prob (K = 40%) on the forget Q/A. Writes
``benchmarks/results/<out>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as H  # noqa: E402

from unlearn_ext.siu import SIUSample, build_siu_data, concept_token_ids, concept_vocab_mask, encode_sample  # noqa: E402
from unlearn_ext.siu.metrics import (  # noqa: E402
    answer_accuracy,
    c_dis,
    concept_hit_rate,
    diversity,
    fluency_ppl,
    min_k_prob,
)
from unlearn_ext.siu.minimmu import DIGIT_WORDS, IMAGE_QA, build_minimmu, greedy_answer  # noqa: E402
from unlearn_ext.siu.train import FinetuneConfig, finetune_llm  # noqa: E402

FICTITIOUS = "Zorblat"
COUNTERFACTUAL = "The picture shows a round closed loop with a small tail, like the letter q."
TEXT_PROMPTS = ("Is {w} an odd or an even number?", "What number comes after {w}?", "Spell the number {w}.")
REFUSAL = "I cannot tell which digit this is."
METHODS = ("siu", "ga", "ga_kl", "po")


def _probe_prompts() -> list[str]:
    return [q for q, _ in IMAGE_QA]


def _method_data(method, digit, image, tok, model, retain_images=()):
    word = DIGIT_WORDS[digit]
    enc = dict(image_token_id=model.image_token_id, num_image_tokens=model.num_image_tokens)
    if method == "siu":
        others = {TEXT_PROMPTS[0].format(w=w): f"{w.capitalize()} is {'odd' if i % 2 else 'even'}."
                  for i, w in enumerate(DIGIT_WORDS) if i != digit}  # fmt: skip
        data = build_siu_data(
            word, fictitious_name=FICTITIOUS, counterfactual_description=COUNTERFACTUAL,
            facts=[f"Yes, {word} is {'an odd' if digit % 2 else 'an even'} number."], other_concepts=others,
            kind="digit", identity_prompts=[q for q, _ in IMAGE_QA] + ["Which digit is in the picture?"],
        )  # fmt: skip
        # Non-targeted knowledge with images too: other digits' images with their normal answers
        # (type 4; the released SIU data has text-only type-4 samples, which a 135M model cannot
        # generalise from: it then names every image with the fictitious name).
        retain = [(SIUSample(4, IMAGE_QA[0][0], IMAGE_QA[0][1].format(word=DIGIT_WORDS[y]), True, None), x)
                  for x, y in retain_images]  # fmt: skip
        samples = [encode_sample(s, tok, **enc) for s in data] + [encode_sample(s, tok, **enc) for s, _ in retain]
        images = [image if s.has_image else None for s in data] + [x for _, x in retain]
        return samples, images
    elif method in ("ga", "ga_kl"):
        data = [SIUSample(1, q, a.format(word=word), True, None) for q, a in IMAGE_QA]
    else:
        data = [SIUSample(1, q, REFUSAL, True, None) for q, _ in IMAGE_QA]
    samples = [encode_sample(s, tok, **enc) for s in data]
    images = [image if s.has_image else None for s in data]
    return samples, images


def evaluate(model, original, tok, ds, digit, image, probe, held_out, others, text_prompts, orig_text, orig_probe):
    word = DIGIT_WORDS[digit]
    hit, _ = concept_hit_rate(model, tok, probe, [image] * len(probe), word)
    gen_hit, gen_answers = concept_hit_rate(model, tok, ["Which digit is this?"] * len(held_out), held_out, word)
    spec, _ = answer_accuracy(
        model, tok, ["Which digit is this?"] * len(others), [x for x, _ in others], [DIGIT_WORDS[y] for _, y in others]
    )
    text = [greedy_answer(model, tok, p, None) for p in text_prompts]
    enc = dict(image_token_id=model.image_token_id, num_image_tokens=model.num_image_tokens)
    ref_samples = [
        encode_sample(SIUSample(0, q, a or "-", True, None), tok, **enc) for q, a in zip(probe, orig_probe, strict=True)
    ]
    ids = concept_token_ids(tok, word)
    pad = tok.pad_token_id
    forget_qa = [encode_sample(SIUSample(0, q, a.format(word=word), True, None), tok, **enc) for q, a in IMAGE_QA]
    return {
        "efficacy": 100 * (1 - hit),
        "generality": 100 * (1 - gen_hit),
        "specificity": 100 * spec,
        "text_unchanged": 100 * sum(a == b for a, b in zip(text, orig_text, strict=True)) / len(text),
        "fluency_ppl": fluency_ppl(model, ref_samples, [image] * len(ref_samples), ids, pad),
        "diversity": diversity(gen_answers),
        "c_dis": c_dis(model, original, forget_qa, [image] * len(forget_qa), ids, pad),
        "min_k": statistics.fmean(min_k_prob(model, forget_qa, [image] * len(forget_qa), pad)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", nargs="+", type=int, default=[7, 3, 0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA adapters of this rank instead of full fine-tuning")
    p.add_argument("--held-out", type=int, default=20, help="held-out test images of the digit (generality)")
    p.add_argument("--others", type=int, default=3, help="test images per other digit (specificity)")
    p.add_argument("--image-retain", type=int, default=1, help="training images per other digit in SIU's type-4 data")
    p.add_argument("--out", default="siu_minimmu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    t_start = time.perf_counter()
    model, tok, ds, info = build_minimmu(progress=not args.no_progress)
    print(f"MiniMMU: {info}", flush=True)
    rows, per_digit = [], {}
    for digit in args.digits:
        # The forget image: the first training image of the digit that the original model names correctly
        # (forgetting what the model never recognised would measure nothing).
        image = None
        for i in (ds.y_train == digit).nonzero().flatten()[:50].tolist():
            if DIGIT_WORDS[digit] in greedy_answer(model, tok, "Which digit is this?", ds.x_train[i]).lower():
                image = ds.x_train[i]
                break
        if image is None:
            raise SystemExit(f"the original MiniMMU model names none of the first 50 training images of {digit}")
        test_idx = (ds.y_test == digit).nonzero().flatten()[: args.held_out]
        held_out = [ds.x_test[i] for i in test_idx]
        others = [(ds.x_test[i], int(ds.y_test[i])) for d in range(10) if d != digit
                  for i in (ds.y_test == d).nonzero().flatten()[: args.others]]  # fmt: skip
        probe = _probe_prompts()
        text_prompts = [t.format(w=w) for t in TEXT_PROMPTS[:2] for w in DIGIT_WORDS[:5]]
        orig_text = [greedy_answer(model, tok, q, None) for q in text_prompts]
        orig_probe = [greedy_answer(model, tok, q, image) for q in probe]
        ctx = (tok, ds, digit, image, probe, held_out, others, text_prompts, orig_text, orig_probe)
        base = evaluate(model, model, *ctx)
        per_digit[digit] = {"original": base, "original_answers": orig_probe}
        rows.append({"digit": digit, "method": "original", **base, "seconds": 0.0})
        print(f"digit {digit} original: {base}", flush=True)
        vocab_mask = concept_vocab_mask(tok, DIGIT_WORDS[digit], len(tok))
        for method in args.methods:
            retain_images = [(ds.x_train[i], d) for d in range(10) if d != digit
                             for i in (ds.y_train == d).nonzero().flatten()[: args.image_retain].tolist()]  # fmt: skip
            samples, images = _method_data(method, digit, image, tok, model, retain_images)
            res = finetune_llm(
                model, samples, images=images, vocab_mask=vocab_mask, pad_id=tok.pad_token_id,
                config=FinetuneConfig(
                    objective=method, steps=args.steps, lr=args.lr, batch_size=4, lora_rank=args.lora_rank
                ),
                progress=not args.no_progress,
            )  # fmt: skip
            m = evaluate(res.model, model, *ctx)
            m["specificity_drop"] = base["specificity"] - m["specificity"]
            rows.append({"digit": digit, "method": method, **m, "seconds": res.seconds})
            print(f"digit {digit} {method}: {m} ({res.seconds:.1f} s)", flush=True)
    keys = ["efficacy", "generality", "specificity", "text_unchanged", "fluency_ppl", "diversity", "c_dis", "min_k"]
    table, summary = [], {}
    for method in ["original", *args.methods]:
        sel = [r for r in rows if r["method"] == method]
        summary[method] = {k: statistics.fmean(r[k] for r in sel) for k in [*keys, "seconds"]}
        table.append(
            [method, *(H.format_float(summary[method][k]) for k in keys), H.format_float(summary[method]["seconds"])]
        )
    H.print_table(f"MiniMMU, mean over digits {args.digits}", ["method", *keys, "s"], table)
    payload = {
        "digits": args.digits,
        "steps": args.steps,
        "lr": args.lr,
        "lora_rank": args.lora_rank,
        "minimmu": info,
        "rows": rows,
        "summary": summary,
        "environment": H.environment_info("cpu"),
        "wall_seconds": time.perf_counter() - t_start,
    }
    path = H.write_json(args.out, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
