"""Greedy decoding on MiniMMU: batched with a key/value cache against recomputing every token.

    python benchmarks/bench_greedy_decoding.py [--images 100] [--out NAME]

The prompts are what a MiniMMU evaluation decodes: "Which digit is this?" on the first ``--images``
test images and every text question of ``unlearn_ext.siu.benchmark.TEXT_QUESTIONS``. *recompute*
runs the whole sequence through the model for every new token, one prompt at a time (the plain
loop); *greedy_answers* is :func:`unlearn_ext.siu.minimmu.greedy_answers`. Records both wall times
and how many answers differ (they must not). Writes ``benchmarks/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as H  # noqa: E402
import torch  # noqa: E402

from unlearn_ext.siu.benchmark import TEXT_QUESTIONS  # noqa: E402
from unlearn_ext.siu.data import SIUSample  # noqa: E402
from unlearn_ext.siu.masks import encode_sample  # noqa: E402
from unlearn_ext.siu.minimmu import build_minimmu, greedy_answers  # noqa: E402


@torch.no_grad()
def recompute_answer(model, tok, prompt: str, image, max_new_tokens: int = 16) -> str:
    """The plain loop: the whole sequence through the model for every new token."""
    sample = SIUSample(kind=0, prompt=prompt, answer="x", has_image=image is not None, target_phrase=None)
    n_img = model.num_image_tokens if image is not None else 0
    enc = encode_sample(sample, tok, image_token_id=model.image_token_id, num_image_tokens=n_img)
    ids = enc.input_ids[enc.labels == -100][None]
    pixels = image[None] if image is not None else None
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(ids, pixels)[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return tok.decode(new, skip_special_tokens=True).strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--out", default="greedy_decoding_cpu")
    args = p.parse_args()
    model, tok, ds, _ = build_minimmu(progress=False)
    model.eval()
    n = min(args.images, ds.x_test.shape[0])
    prompts = ["Which digit is this?"] * n + [q for q, _ in TEXT_QUESTIONS]
    images = [ds.x_test[i] for i in range(n)] + [None] * len(TEXT_QUESTIONS)
    t0 = time.perf_counter()
    fast = greedy_answers(model, tok, prompts, images)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = [recompute_answer(model, tok, q, x) for q, x in zip(prompts, images, strict=True)]
    t_slow = time.perf_counter() - t0
    differ = [{"prompt": q, "cached": a, "recompute": b} for q, a, b in zip(prompts, fast, slow, strict=True) if a != b]
    payload = {
        "prompts": len(prompts),
        "image_prompts": n,
        "max_new_tokens": 16,
        "seconds": {"recompute": t_slow, "greedy_answers": t_fast},
        "speedup": t_slow / t_fast,
        "answers_differ": len(differ),
        "differences": differ,
        "environment": H.environment_info("cpu"),
    }
    print(f"{len(prompts)} prompts: recompute {t_slow:.1f} s, greedy_answers {t_fast:.1f} s "
          f"({t_slow / t_fast:.1f}x); answers that differ: {len(differ)}")  # fmt: skip
    print(f"wrote {H.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
