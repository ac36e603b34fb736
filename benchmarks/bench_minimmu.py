"""Build MiniMMU (SmolLM2-135M + a digit-vision connector) and measure what it costs and can do.

    python benchmarks/bench_minimmu.py [--fresh] [--images 100] [--out NAME]

Records the connector's build time and training log (issue 4: at most 30 minutes on a 2-core CPU),
and the digit accuracy of the model's greedy answers to "Which digit is this?" on the first
``--images`` test images (an answer is right when it contains the digit's name). Writes
``benchmarks/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as H  # noqa: E402

from unlearn_ext.siu.minimmu import DIGIT_WORDS, build_minimmu, greedy_answers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh", action="store_true", help="rebuild the connector instead of loading the cache")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--out", default="minimmu_build")
    args = p.parse_args()
    t0 = time.perf_counter()
    model, tok, ds, info = build_minimmu(fresh=args.fresh, progress=False)
    wall = time.perf_counter() - t0
    n = min(args.images, ds.x_test.shape[0])
    t1 = time.perf_counter()
    answers = greedy_answers(model, tok, ["Which digit is this?"] * n, [ds.x_test[i] for i in range(n)])
    hits = sum(DIGIT_WORDS[int(ds.y_test[i])] in a.lower() for i, a in enumerate(answers))
    payload = {
        "build": info,
        "build_wall_seconds_this_run": wall,
        "digit_accuracy": hits / n,
        "test_images": n,
        "answer_seconds_each": (time.perf_counter() - t1) / n,
        "environment": H.environment_info("cpu"),
    }
    print(f"build {info}; this run {wall:.1f} s; digit accuracy {hits}/{n}")
    print(f"wrote {H.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
