"""Downtime of a live weight swap (``unlearn_ext.serving.swap_weights``) on the CPU.

Models (random init, float32, eval mode):

* ``resnet18``: ResNet-18 (11.7 M parameters, 122 state tensors with BatchNorm buffers), from timm or
  torchvision when installed, else the local definition below (torchvision's layout); input one
  3x224x224 image.
* ``llama135m``: a ``transformers`` ``LlamaForCausalLM`` with SmolLM2-135M's configuration (hidden 576,
  intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings; 134.5 M
  parameters, 272 tensors); input 16 token ids, ``use_cache=False``.

Phases, per model, alternating between two states A and B:

1. ``swap_weights`` with no inference running: the pause (time the write lock is held), staging
   (copying the new tensors, outside the lock), validation (structure, tied keys, finiteness) and the
   total, median and max over ``--repeats`` swaps.
2. The naive alternative, ``model.load_state_dict(state)`` under the same write lock: its pause.
3. Inference latency (one thread calling ``ServedModel`` in a loop, p50/p99/max), and the part of it
   spent waiting for the read lock, with no swaps, during back-to-back ``swap_weights`` calls, and
   during back-to-back naive swaps (the lock hands off to the queued reader after each swap, so
   swaps and inference calls alternate). Every output seen is checked to equal A's or B's output
   exactly (``torch.equal``); a torn model fails the run.

The read-lock wait is what a swap's pause costs a reader. Inference and the swapping thread share the
machine's cores, so the latency during swaps also includes the CPU and memory-bandwidth contention of
staging (a full copy of the model per swap, back to back here: far more often than in service).

    python benchmarks/bench_swap.py [--quick] [--repeats 10] [--duration 6] [--models resnet18 llama135m]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from unlearn_ext.serving import ServedModel, model_lock, swap_weights  # noqa: E402

# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 as torchvision defines it (same modules, names and parameter count, 11,689,512)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(_BasicBlock(cin, w, stride), _BasicBlock(w, w, 1)))
            cin = w
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _resnet18(seed: int) -> tuple[nn.Module, str]:
    torch.manual_seed(seed)
    try:
        import timm

        model, source = timm.create_model("resnet18", pretrained=False), f"timm {timm.__version__}"
    except ImportError:
        try:
            import torchvision

            model, source = torchvision.models.resnet18(weights=None), f"torchvision {torchvision.__version__}"
        except ImportError:
            model, source = ResNet18(), "local definition (torchvision layout; neither timm nor torchvision installed)"
    # random BatchNorm statistics, so that A and B differ in their buffers too
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval(), source


def _llama135m(seed: int) -> tuple[nn.Module, str]:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise SystemExit("llama135m: the LM head is not tied to the embeddings")
    return model, f"transformers {transformers.__version__} LlamaForCausalLM, SmolLM2-135M config, random init"


def _model_case(name: str) -> dict[str, Any]:
    if name == "resnet18":
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return {"build": _resnet18, "forward": lambda served: served(x), "input": "1x3x224x224 image"}
    if name == "llama135m":
        ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
        return {
            "build": _llama135m,
            "forward": lambda served: served(ids, use_cache=False).logits,
            "input": "1x16 token ids, use_cache=False",
        }
    raise SystemExit(f"unknown model {name!r}")


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def _summary_ms(values_s: list[float]) -> dict[str, float | int | None]:
    if not values_s:
        return {"n": 0, "median_ms": None, "max_ms": None}
    return {"n": len(values_s), "median_ms": 1e3 * statistics.median(values_s), "max_ms": 1e3 * max(values_s)}


def _during_swaps(lat: list[float], lock_wait: list[float], bad: int, swaps: list[dict], keys) -> dict:
    """One inference phase run while swapping: latency, lock wait, wrong outputs and the swaps' timings (ms)."""
    return {
        **_latency_ms(lat),
        "lock_wait": _latency_ms(lock_wait),
        "wrong_outputs": bad,
        "swaps": len(swaps),
        **{k: _summary_ms([sw[f"{k}_s"] for sw in swaps]) for k in keys},
    }


def _latency_ms(values_s: list[float]) -> dict[str, float | int | None]:
    if not values_s:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    v = sorted(values_s)

    def pct(q: float) -> float:  # nearest-rank percentile
        return 1e3 * v[min(len(v) - 1, max(0, round(q * len(v) + 0.5) - 1))]

    return {"n": len(v), "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": 1e3 * v[-1]}


def _naive_swap(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, float]:
    lock = model_lock(model)
    t0 = time.perf_counter()
    with lock.writing():
        t1 = time.perf_counter()
        model.load_state_dict(state)
        t2 = time.perf_counter()
    return {"pause_s": t2 - t1, "wait_s": t1 - t0, "total_s": time.perf_counter() - t0}


def _inference_under(
    served: ServedModel,
    forward: Callable[[ServedModel], torch.Tensor],
    expected: list[torch.Tensor],
    duration_s: float,
    swap: Callable[[int], Any] | None,
) -> tuple[list[float], list[float], int, list[Any]]:
    """One reader thread calls ``forward(served)`` in a loop while this thread swaps (``swap(i)``,
    back to back) or sleeps, for ``duration_s``. Returns, for the calls that started in the window,
    the latencies (s) and the part of them spent waiting for the read lock, then the number of outputs
    equal to none of ``expected`` and what each swap returned."""
    stop, started = threading.Event(), threading.Event()
    records: list[tuple[float, float, float]] = []
    bad = [0]
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                with served.reading():  # the call inside re-enters this read lock without waiting
                    t1 = time.perf_counter()
                    out = forward(served)
                t2 = time.perf_counter()
                records.append((t0, t2 - t0, t1 - t0))
                started.set()
                if not any(torch.equal(out, e) for e in expected):
                    bad[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    started.wait()
    results: list[Any] = []
    t_start = time.perf_counter()
    i = 0
    while time.perf_counter() - t_start < duration_s:
        if swap is None:
            time.sleep(0.01)
        else:
            results.append(swap(i))
            i += 1
    t_end = time.perf_counter()
    stop.set()
    thread.join()
    if errors:
        raise errors[0]
    window = [r for r in records if t_start <= r[0] <= t_end]
    return [r[1] for r in window], [r[2] for r in window], bad[0], results


def _bench_model(name: str, repeats: int, duration_s: float) -> dict[str, Any]:
    case = _model_case(name)
    t_build = time.perf_counter()
    live, source = case["build"](0)
    other, _ = case["build"](1)
    state_a = {k: v.detach().clone() for k, v in live.state_dict().items()}
    state_b = {k: v.detach().clone() for k, v in other.state_dict().items()}
    del other
    gc.collect()
    build_s = time.perf_counter() - t_build
    served = ServedModel(live)
    forward = case["forward"]
    states = (state_b, state_a)  # swap i installs states[i % 2]: B, A, B, ...

    # correctness first: a fresh model loaded with B gives exactly B's output after a swap
    for _ in range(2):
        out_a = forward(served)  # warm-up
    fresh, _ = case["build"](2)
    fresh.load_state_dict(state_b)
    out_b = forward(ServedModel(fresh))
    del fresh
    if torch.equal(out_a, out_b):
        raise SystemExit(f"{name}: A and B give the same output; the torn-model check would be blind")
    swap_weights(live, state_b)
    if not torch.equal(forward(served), out_b):
        raise SystemExit(f"{name}: after swap_weights the output differs from a fresh model loaded with B")
    swap_weights(live, state_a)
    if not torch.equal(forward(served), out_a):
        raise SystemExit(f"{name}: swapping back to A does not restore A's output")
    if not torch.equal(forward(served), out_a):
        raise SystemExit(f"{name}: inference is not deterministic; the exact A/B check cannot be used")
    expected = [out_a, out_b]

    n_params = sum(p.numel() for p in live.parameters())
    row: dict[str, Any] = {
        "model": name,
        "source": source,
        "input": case["input"],
        "parameters": n_params,
        "state_keys": len(state_a),
        "build_s": build_s,
    }

    # 1. swap_weights, idle
    stats = [swap_weights(live, states[i % 2]) for i in range(repeats)]
    if repeats % 2:
        swap_weights(live, state_a)
    row["tensors"], row["bytes"] = stats[0].tensors, stats[0].bytes
    row["swap"] = {
        key: _summary_ms([getattr(s, f"{key}_s") for s in stats])
        for key in ("pause", "wait", "validate", "staging", "release", "total")
    }
    row["swap"]["pause_us_per_tensor"] = 1e6 * statistics.median(s.pause_s for s in stats) / stats[0].tensors

    # 2. naive load_state_dict under the write lock, idle
    naive = [_naive_swap(live, states[i % 2]) for i in range(repeats)]
    if repeats % 2:
        _naive_swap(live, state_a)
    row["naive"] = {key: _summary_ms([n[f"{key}_s"] for n in naive]) for key in ("pause", "wait", "total")}
    if not torch.equal(forward(served), out_a):
        raise SystemExit(f"{name}: the naive swaps left the model in a wrong state")

    # 3. inference latency: no swaps, during swap_weights, during naive swaps
    lat, lock_wait, bad, _ = _inference_under(served, forward, expected, duration_s, None)
    row["inference_idle"] = {**_latency_ms(lat), "lock_wait": _latency_ms(lock_wait), "wrong_outputs": bad}
    lat, lock_wait, bad, during = _inference_under(
        served, forward, expected, duration_s, lambda i: swap_weights(live, states[i % 2])
    )
    row["inference_during_swap"] = _during_swaps(
        lat, lock_wait, bad, [vars(s) for s in during], ("pause", "wait", "total")
    )
    lat, lock_wait, bad, during_naive = _inference_under(
        served, forward, expected, duration_s, lambda i: _naive_swap(live, states[i % 2])
    )
    row["inference_during_naive"] = _during_swaps(lat, lock_wait, bad, during_naive, ("pause", "wait"))
    wrong = sum(row[k]["wrong_outputs"] for k in ("inference_idle", "inference_during_swap", "inference_during_naive"))
    if wrong:
        raise SystemExit(f"{name}: {wrong} inference outputs equal neither A's nor B's (a torn model?)")
    return row


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, suffix: str = " ms") -> str:
    return _harness.format_float(value, suffix=suffix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "llama135m"], choices=["resnet18", "llama135m"])
    ap.add_argument("--repeats", type=int, default=10, help="idle swaps per model (phases 1 and 2)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of each inference phase")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="intra-op thread counts to run (torch.set_num_threads; default: the current count)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: ResNet-18 only, 3 repeats, 1 s phases")
    ap.add_argument("--out", default=None, help="result name (default swap_cpu, or swap_cpu_quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.repeats, args.duration = ["resnet18"], 3, 1.0
    out_name = args.out or ("swap_cpu_quick" if args.quick else "swap_cpu")

    environment = _harness.environment_info("cpu", packages=("transformers", "timm", "torchvision"))
    cpu_start = _harness.cpu_snapshot()
    t0 = time.perf_counter()
    rows = []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for name in args.models:
            print(f"{name}, {threads} thread(s): running", flush=True)
            rows.append({"threads": threads, **_bench_model(name, args.repeats, args.duration)})
    other_load = _harness.other_cpu_load(cpu_start, _harness.cpu_snapshot())

    _harness.print_table(
        f"swap_weights on the CPU: idle swaps, median / max of {args.repeats}",
        ["model", "threads", "params", "tensors", "MiB", "pause (lock held)", "wait", "validate", "staging", "total",
         "naive load_state_dict pause"],
        [
            [r["model"], r["threads"], f"{r['parameters'] / 1e6:.1f} M", r["tensors"],
             f"{r['bytes'] / _harness.MIB:.0f}",
             f"{_fmt(r['swap']['pause']['median_ms'])} / {_fmt(r['swap']['pause']['max_ms'])}",
             _fmt(r["swap"]["wait"]["median_ms"]), _fmt(r["swap"]["validate"]["median_ms"]),
             _fmt(r["swap"]["staging"]["median_ms"]),
             f"{_fmt(r['swap']['total']['median_ms'])} / {_fmt(r['swap']['total']['max_ms'])}",
             f"{_fmt(r['naive']['pause']['median_ms'])} / {_fmt(r['naive']['pause']['max_ms'])}"]
            for r in rows
        ],
    )  # fmt: skip
    _harness.print_table(
        f"Inference latency, one reader thread, {args.duration:g} s per phase, swaps back to back (n calls)",
        ["model", "threads", "phase", "p50", "p99", "max", "n", "read-lock wait p50 / p99 / max", "swaps",
         "swap pause median / max", "wrong outputs"],
        [
            [r["model"], r["threads"], label, _fmt(p["p50_ms"]), _fmt(p["p99_ms"]), _fmt(p["max_ms"]), p["n"],
             " / ".join(_fmt(p["lock_wait"][k]) for k in ("p50_ms", "p99_ms", "max_ms")), p.get("swaps", "-"),
             f"{_fmt(p['pause']['median_ms'])} / {_fmt(p['pause']['max_ms'])}" if "pause" in p else "-",
             p["wrong_outputs"]]
            for r in rows
            for label, p in (("no swaps", r["inference_idle"]), ("during swap_weights", r["inference_during_swap"]),
                             ("during naive load_state_dict", r["inference_during_naive"]))
        ],
        section_by=0,
        caption=f"other processes kept {100 * (other_load or 0):.0f}% of the CPUs busy during the run"
        if other_load is not None else None,
    )  # fmt: skip
    payload = {
        "benchmark": "swap",
        "environment": environment,
        "threads": args.threads or [torch.get_num_threads()],
        "repeats": args.repeats,
        "duration_s": args.duration,
        "other_cpu_load": other_load,
        "runtime_s": time.perf_counter() - t0,
        "notes": (
            "pause: time the write lock is held (readers arriving meanwhile wait); wait: time the writer "
            "waited for in-flight readers; swap_weights stages (copies) outside the lock, the naive path "
            "runs load_state_dict (an O(bytes) copy) inside it. lock_wait: the reader's time to get the "
            "read lock (what the pauses cost inference). Latency during swaps also includes the CPU and "
            "memory-bandwidth contention of back-to-back staging. Percentiles are nearest-rank: with "
            "fewer than 100 calls p99 is the maximum. The machine was shared with other jobs (see "
            "other_cpu_load): timings are noisy."
        ),
        "rows": rows,
    }
    print(f"wrote {_harness.write_json(out_name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
