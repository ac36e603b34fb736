"""Shared helpers of the ``bench_<op>.py`` scripts (DESIGN.md section 6).

* :func:`time_fn`: median and IQR of many runs after warm-up. CPU: ``torch.utils.benchmark.Timer``
  with ``num_threads=torch.get_num_threads()`` (the Timer defaults to ONE thread);
  CUDA: ``triton.testing.do_bench`` when Triton imports, else CUDA events. Calls slower than
  ``slow_s`` are timed with a few plain repetitions instead.
* :func:`peak_memory`: extra memory a call needs beyond what exists before it. CUDA:
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call. CPU: the call runs
  in a fresh child process (see :func:`peak_rss_in_subprocess`) that builds its own inputs, resets
  the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS_before``.
* :func:`environment_info`: device, versions, threads, git commit, build info of ``unlearn_ext._C``.
* :func:`check_close`: a provider's result against a float64 reference (max relative error).
* :func:`print_table` (rich) and :func:`write_json` (``benchmarks/results/<name>.json``, atomic).
* :func:`make_parser` / :func:`resolve_device`: the ``--quick``/``--out``/``--device`` CLI.

The scripts import this module as ``_harness`` (they run as ``python benchmarks/bench_<op>.py``,
which puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MIB = float(1 << 20)

__all__ = [
    "MIB",
    "RESULTS_DIR",
    "check_against_reference",
    "check_close",
    "configure_memory_subprocess",
    "cpu_snapshot",
    "environment_info",
    "format_float",
    "is_oom",
    "make_parser",
    "median_iqr",
    "other_cpu_load",
    "peak_memory",
    "peak_memory_cuda",
    "peak_rss_in_subprocess",
    "print_provider_table",
    "print_table",
    "resolve_device",
    "rss_probe_status",
    "run_providers",
    "synchronize",
    "time_fn",
    "wait_for_idle",
    "write_json",
]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def make_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the options every benchmark script shares.

    ``--quick``: tiny shapes for a smoke run; ``--out NAME``: write ``benchmarks/results/NAME.json``
    (the script picks a default from the mode and device); ``--device cpu|cuda``;
    ``--min-run-time``: seconds of measurement per timing; ``--no-memory``: skip peak-memory runs.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run of well under a minute")
    p.add_argument("--out", default=None, help="result name: writes benchmarks/results/NAME.json")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark on")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of measurement per timed call (default: 1.0, or 0.05 with --quick)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    return p


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; exits with a clear message when CUDA is asked for but absent."""
    if name == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) was built without CUDA"
                if torch.version.cuda is None
                else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)"
            )
            raise SystemExit(f"error: --device cuda was requested but CUDA is not available: {why}.")
        return torch.device("cuda", torch.cuda.current_device())
    if name != "cpu":
        raise SystemExit(f"error: unknown device {name!r} (use cpu or cuda)")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_iqr(times_s: Sequence[float]) -> tuple[float, float]:
    """(median, interquartile range) of ``times_s``."""
    if len(times_s) == 1:
        return times_s[0], 0.0
    q = statistics.quantiles(times_s, n=4, method="inclusive")
    return statistics.median(times_s), q[2] - q[0]


def _wall_loop(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def time_fn(
    fn: Callable[[], Any],
    device: torch.device | str,
    min_run_time: float = 1.0,
    *,
    warmup: int = 1,
    estimate_s: float | None = None,
    slow_s: float = 1.0,
    slow_budget_s: float = 60.0,
    slow_max_reps: int = 5,
) -> dict[str, Any]:
    """Median time of ``fn()`` in milliseconds, after ``warmup`` calls.

    Returns ``dict(median_ms, iqr_ms, runs, method, times_ms)`` (``times_ms``: the measured
    per-call times; per block of calls for the CPU Timer). On CPU it uses
    ``torch.utils.benchmark.Timer(..., num_threads=torch.get_num_threads()).blocked_autorange``; on
    CUDA ``triton.testing.do_bench`` (L2 flushed between runs) or, without Triton, CUDA events.
    A call slower than ``slow_s`` (judged from the warm-up, or ``estimate_s`` when the caller
    already ran it) is instead repeated ``min(slow_max_reps, slow_budget_s / t)`` times (at least
    once) with a wall clock; ``method`` says which path ran.
    """
    device = torch.device(device)
    est = estimate_s
    for _ in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        est = time.perf_counter() - t0
    if est is None:  # no warm-up and no estimate: one untimed call gives the estimate
        est = _wall_loop(fn, device, 1)[0]

    if est >= slow_s:
        reps = max(1, min(slow_max_reps, int(slow_budget_s // est)))
        times = _wall_loop(fn, device, reps)
        med, iqr = median_iqr(times)
        return {
            "median_ms": med * 1e3,
            "iqr_ms": iqr * 1e3,
            "runs": reps,
            "method": f"wall clock x{reps} (slow call)",
            "times_ms": [t * 1e3 for t in times],
        }

    if device.type == "cpu":
        from torch.utils.benchmark import Timer

        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min_run_time)
        return {
            "median_ms": m.median * 1e3,
            "iqr_ms": m.iqr * 1e3,
            "runs": len(m.times) * m.number_per_run,
            "method": f"torch.utils.benchmark (num_threads={torch.get_num_threads()})",
            "times_ms": [t * 1e3 for t in m.times],
        }

    try:
        import triton.testing as tt
    except ImportError:
        tt = None
    rep_ms = max(25.0, min_run_time * 1e3)
    if tt is not None:
        times_ms = list(tt.do_bench(fn, warmup=25, rep=rep_ms, return_mode="all"))
        med, iqr = median_iqr(times_ms)
        return {
            "median_ms": med,
            "iqr_ms": iqr,
            "runs": len(times_ms),
            "method": "triton.testing.do_bench (L2 flushed)",
            "times_ms": times_ms,
        }
    reps = max(5, int(min_run_time / max(est, 1e-6)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    med, iqr = median_iqr(times_ms)
    return {"median_ms": med, "iqr_ms": iqr, "runs": reps, "method": "cuda events", "times_ms": times_ms}


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA or a failed CPU allocation)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg
    )


def peak_memory_cuda(fn: Callable[[], Any], device: torch.device | str, *, warmup: bool = True) -> dict:
    """Peak CUDA memory of one ``fn()`` call beyond what was allocated before it, in MiB."""
    device = torch.device(device)
    if warmup:
        fn()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return {
        "peak_extra_mib": (peak - before) / MIB,
        "method": "torch.cuda.max_memory_allocated - memory_allocated before the call",
    }


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current RSS


def rss_probe_status() -> tuple[bool, str]:
    """(usable, note): whether peak RSS can be reset and read in this environment."""
    if not sys.platform.startswith("linux"):
        return False, f"peak RSS needs Linux /proc (this is {sys.platform})"
    try:
        _reset_peak_rss()
        _read_status_kib("VmHWM")
        _read_status_kib("VmRSS")
    except OSError as exc:
        return False, f"/proc/self/clear_refs is not writable ({exc}); CPU peak memory not measured"
    return True, ""


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_MEM_CONTEXT: Any = None


def configure_memory_subprocess(method: str = "forkserver", preload: Iterable[str] = ()) -> None:
    """Choose how CPU peak-memory children start; call before the first measurement.

    ``forkserver`` (default): children fork from a server process that has only imported
    ``preload`` (torch, the op library, peers) and never ran a tensor op or held benchmark data,
    so each child is a fresh process that starts in milliseconds instead of seconds of imports.
    ``spawn``: a new interpreter per measurement (slowest, no shared state at all).
    """
    global _MEM_CONTEXT
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"method must be 'forkserver' or 'spawn', got {method!r}")
    if method == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        method = "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch", *preload])
    _MEM_CONTEXT = ctx


def _rss_child(conn, factory, spec, warmup: bool, num_threads: int) -> None:
    """Child body of :func:`peak_rss_in_subprocess`: sends a dict back through ``conn``."""
    try:
        gc.freeze()  # objects inherited from the server are not garbage: keep gc.collect() fast
        torch.set_num_threads(num_threads)
        fn = factory(spec)  # builds the inputs from the spec's seed, outside the measurement
        if warmup:
            out = fn()
            del out
        _trim_heap()
        _reset_peak_rss()
        before = _read_status_kib("VmRSS")
        out = fn()
        hwm = _read_status_kib("VmHWM")
        del out
        conn.send({"ok": True, "rss_before_kib": before, "hwm_kib": hwm})
    except BaseException as exc:  # noqa: BLE001 - report anything, including OOM
        conn.send(
            {
                "ok": False,
                "oom": is_oom(exc),
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=4),
            }
        )
    finally:
        conn.close()


def peak_rss_in_subprocess(
    factory: Callable[[Any], Callable[[], Any]],
    spec: Any,
    *,
    warmup: bool = True,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Peak extra RSS (MiB) of one call, measured in a fresh child process.

    ``factory`` must be a module-level function (picklable by name) and ``spec`` picklable:
    the child calls ``fn = factory(spec)`` (which builds inputs from a seed), runs ``fn()`` once
    when ``warmup`` (so one-time costs such as faulting in library code are not counted), then
    ``gc.collect()``, ``malloc_trim(0)``, resets VmHWM through ``/proc/self/clear_refs``, reads
    VmRSS, calls ``fn()`` once and reads VmHWM: ``peak_extra = VmHWM - VmRSS_before``. The call's
    output counts as part of its peak.

    Returns ``dict(peak_extra_mib, method)``, with ``peak_extra_mib=None`` and a ``note`` when it
    cannot be measured (no writable clear_refs), and ``oom=True`` when the child ran out of memory.
    """
    usable, note = rss_probe_status()
    if not usable:
        return {"peak_extra_mib": None, "note": note}
    if _MEM_CONTEXT is None:
        configure_memory_subprocess()
    ctx = _MEM_CONTEXT
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_rss_child, args=(send, factory, spec, warmup, torch.get_num_threads()), daemon=True)
    proc.start()
    send.close()
    msg = None
    timed_out = False
    try:
        if recv.poll(timeout_s):
            msg = recv.recv()
        else:
            timed_out = True
    except EOFError:  # the child died without sending anything
        msg = None
    if msg is not None and proc.is_alive():
        proc.kill()  # it has reported; skip its interpreter teardown (a few hundred ms)
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
        proc.join()
    recv.close()
    method = f"VmHWM - VmRSS before the call, fresh {ctx.get_start_method()} child process"
    if msg is None:
        code = proc.exitcode
        if timed_out:
            why = f"timed out after {timeout_s:.0f} s"
        elif code is not None and code < 0:
            why = f"killed by signal {-code}" + (" (probably out of memory)" if code == -9 else "")
        else:
            why = f"exit code {code}"
        oom = code == -9 and not timed_out
        return {"peak_extra_mib": None, "oom": oom, "note": f"memory child failed: {why}"}
    if not msg["ok"]:
        return {"peak_extra_mib": None, "oom": msg["oom"], "note": f"memory child raised {msg['error']}"}
    return {
        "peak_extra_mib": (msg["hwm_kib"] - msg["rss_before_kib"]) / 1024.0,
        "rss_before_mib": msg["rss_before_kib"] / 1024.0,
        "warmup": warmup,
        "method": method,
    }


def peak_memory(
    device: torch.device | str,
    *,
    fn: Callable[[], Any] | None = None,
    factory: Callable[[Any], Callable[[], Any]] | None = None,
    spec: Any = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Peak extra memory of one call: in-process on CUDA (``fn``), in a child on CPU (``factory(spec)``)."""
    device = torch.device(device)
    if device.type == "cuda":
        if fn is None:
            if factory is None:
                raise ValueError("peak_memory on CUDA needs fn or factory")
            fn = factory(spec)
        return peak_memory_cuda(fn, device, warmup=warmup)
    if factory is None:
        raise ValueError("CPU peak memory runs in a child process: pass factory= and spec=")
    return peak_rss_in_subprocess(factory, spec, warmup=warmup)


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------


def check_close(result: torch.Tensor, reference: torch.Tensor, tol: float) -> dict[str, Any]:
    """Compare ``result`` with a (float64) ``reference``.

    ``max_rel_err = max|result - reference| / max|reference|`` (the normwise relative error, which
    stays meaningful where single entries are near zero). ``ok`` when it is finite and <= ``tol``.
    """
    if not isinstance(result, torch.Tensor):
        return {"ok": False, "max_rel_err": None, "note": f"result is a {type(result).__name__}"}
    if result.numel() == reference.numel() and result.shape != reference.shape:
        result = result.reshape(reference.shape)
    if result.shape != reference.shape:
        return {
            "ok": False,
            "max_rel_err": None,
            "note": f"shape {list(result.shape)} != reference {list(reference.shape)}",
        }
    r = result.detach().to(device=reference.device, dtype=torch.float64)
    ref = reference.to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        return {"ok": False, "max_rel_err": math.inf, "note": "result has NaN or inf"}
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((r - ref).abs().max()) if ref.numel() else 0.0
    rel = err / scale if scale > 0 else err
    return {"ok": rel <= tol, "max_rel_err": rel, "max_abs_err": err, "tol": tol}


# --------------------------------------------------------------------------------------------
# Environment metadata
# --------------------------------------------------------------------------------------------


def cpu_snapshot() -> dict[str, float] | None:
    """Busy CPU seconds of the whole machine and of this process (with its reaped children)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    t = os.times()
    return {
        "wall": time.perf_counter(),
        "machine_busy_s": (sum(fields[:8]) - idle) / tick,
        "own_s": t.user + t.system + t.children_user + t.children_system,
    }


def other_cpu_load(
    start: dict[str, float] | None, end: dict[str, float] | None, min_window_s: float = 0.25
) -> float | None:
    """Fraction of all CPUs that OTHER processes kept busy between two :func:`cpu_snapshot` calls.

    Benchmarks on a shared machine are only meaningful when this is small (say below 0.1). None
    for windows shorter than ``min_window_s`` (the counters tick every 10 ms, too coarse there).
    """
    if not start or not end:
        return None
    wall = end["wall"] - start["wall"]
    if wall < min_window_s:
        return None
    others = (end["machine_busy_s"] - start["machine_busy_s"]) - (end["own_s"] - start["own_s"])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def wait_for_idle(max_wait_s: float, threshold: float = 0.1, window_s: float = 3.0) -> float | None:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` of the CPUs
    over a ``window_s`` window; returns the last measured fraction (None where unmeasurable)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        start = cpu_snapshot()
        time.sleep(window_s)
        load = other_cpu_load(start, cpu_snapshot())
        if load is None or load < threshold or time.monotonic() >= deadline:
            return load


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_info(device: torch.device | str, packages: Iterable[str] = ()) -> dict[str, Any]:
    """Device, versions, threads, git commit, timestamp and ``unlearn_ext._C.build_info()``."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["device_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        info["device_capability"] = f"{props.major}.{props.minor}"
    else:
        info["device"] = info["cpu"]
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    for pkg in packages:
        info[pkg] = _dist_version(pkg)
    commit = _git("rev-parse", "HEAD")
    if commit:
        info["git_commit"] = commit
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        info["git_dirty"] = bool(dirty)
    try:
        import unlearn_ext
        from unlearn_ext import _loader

        info["unlearn_ext"] = unlearn_ext.__version__
        info["unlearn_ext_C_loaded"] = _loader.extension_loaded()
        if _loader.extension_loaded():
            info["unlearn_ext_build_info"] = _loader.compiled_build_info()
            so = Path(_loader._C.__file__)
            mtime = _dt.datetime.fromtimestamp(so.stat().st_mtime, _dt.timezone.utc)
            info["unlearn_ext_C_file"] = {"name": so.name, "mtime": mtime.isoformat(timespec="seconds")}
        else:
            info["unlearn_ext_C_error"] = str(_loader.LOAD_ERROR)
    except Exception as exc:  # noqa: BLE001 - metadata must never stop a benchmark
        info["unlearn_ext_error"] = f"{type(exc).__name__}: {exc}"
    return info


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_float(value: float | None, digits: int = 3, *, suffix: str = "") -> str:
    """Compact number for a table cell; '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    a = abs(value)
    if a != 0 and (a < 10 ** -(digits - 1) or a >= 10 ** (digits + 3)):
        return f"{value:.{max(1, digits - 1)}e}{suffix}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(a)))) if a else 0
    return f"{value:.{min(decimals, 6)}f}{suffix}"


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _plain_table(title, columns, rows, caption, section_by) -> None:
    """Fallback of :func:`print_table` where rich is not installed (e.g. a bare GPU machine)."""
    names = [c if isinstance(c, str) else c[0] for c in columns]
    right = [isinstance(c, str) or c[1] == "right" for c in columns]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]

    def line(cells):
        return "  ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(cells, widths, right, strict=True))

    print(title)
    print(line(names))
    print("  ".join("-" * w for w in widths))
    prev = None
    for r in rows:
        if section_by is not None and prev is not None and r[section_by] != prev:
            print()
        prev = r[section_by] if section_by is not None else None
        print(line(r))
    if caption:
        print(caption)


def print_table(
    title: str,
    columns: Sequence[str | tuple[str, str]],
    rows: Iterable[Sequence[Any]],
    *,
    caption: str | None = None,
    section_by: int | None = None,
) -> None:
    """Print a table (rich, or plain text without it); a column may be ``(name, justify)``;
    ``section_by`` draws a line whenever the value of that column changes."""
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    try:
        from rich.table import Table
    except ImportError:
        _plain_table(title, columns, cells, caption, section_by)
        return
    table = Table(title=title, caption=caption, caption_justify="left", header_style="bold")
    for col in columns:
        name, justify = (col, "right") if isinstance(col, str) else col
        table.add_column(name, justify=justify, overflow="fold")
    prev = None
    for row in cells:
        if section_by is not None:
            if prev is not None and row[section_by] != prev:
                table.add_section()
            prev = row[section_by]
        table.add_row(*row)
    _console().print(table)


def mean_and_std(rows: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, float]:
    """``{key: mean, key + "_std": population std}`` over the rows that have ``key`` (not None)."""
    rows = list(rows)
    out: dict[str, float] = {}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            out[key] = statistics.fmean(values)
            out[key + "_std"] = statistics.pstdev(values)
    return out


def summarise_methods(runs: Sequence[Mapping[str, Any]], metrics: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per method over ``runs`` (each ``{"methods": {name: row}}``): the run count, the failed-run count
    (rows with ``"error"``) and :func:`mean_and_std` of ``metrics`` over the successful rows."""
    metrics = tuple(metrics)
    names = list(dict.fromkeys(name for r in runs for name in r["methods"]))
    out = {}
    for name in names:
        rows = [r["methods"][name] for r in runs if name in r["methods"]]
        ok = [row for row in rows if "error" not in row]
        out[name] = {"runs": len(ok), "failed_runs": len(rows) - len(ok), **mean_and_std(ok, metrics)}
    return out


def mean_std_cell(entry: Mapping[str, Any], key: str, scale: float) -> str:
    """``"mean ± std"`` of ``key`` in a :func:`summarise_methods` entry, times ``scale`` ("-" if absent)."""
    if key not in entry:
        return "-"
    digits = 3 if key == "seconds" else (2 if scale == 1 else 1)
    return f"{scale * entry[key]:.{digits}f} ± {scale * entry[key + '_std']:.{digits}f}"


def print_targets(targets: Mapping[str, tuple[float, bool]], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Print ``PASS``/``FAIL`` for each ``{label: (value, passed)}``; returns them keyed
    ``"<prefix> <label>"`` as ``{"value", "pass"}`` for the JSON payload."""
    out = {}
    for label, (value, ok) in targets.items():
        name = f"{prefix} {label}" if prefix else label
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.4g}")
        out[name] = {"value": value, "pass": bool(ok)}
    return out


def write_json(name: str, payload: Mapping[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``payload`` to ``benchmarks/results/<name>.json`` atomically; returns the path."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name[:-5] if name.endswith(".json") else name
    if not stem or os.sep in stem or (os.altsep and os.altsep in stem):
        raise ValueError(f"--out must be a plain file name, got {name!r}")
    path = out_dir / f"{stem}.json"
    tmp = out_dir / f".{stem}.json.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=_json_default, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype | torch.device | Path):
        return str(obj)
    if isinstance(obj, torch.Size | tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# The provider loop of the fused-loss benchmarks (bench_masked_kl.py, bench_ce_norm.py)
# --------------------------------------------------------------------------------------------


def run_providers(
    providers: Sequence[str],
    device: torch.device,
    *,
    make_run: Callable[[str], Callable[[], Any]],
    check: Callable[[str], dict[str, Any]],
    skip_reason: Callable[[str], str | None],
    memory_factory: Callable[[Any], Callable[[], Any]],
    memory_spec: Callable[[str], Any],
    min_run_time: float,
    memory: bool = True,
) -> list[dict[str, Any]]:
    """For each provider: skip it (``skip_reason``), check it against the reference (``check``; a
    failing provider is not timed), time ``make_run(provider)()`` and measure its peak memory (CUDA
    in process; CPU in a child built by ``memory_factory(memory_spec(provider))``). Returns one row
    per provider with ``speedup_vs_torch`` / ``memory_vs_torch`` against the ``torch`` row."""
    rows: list[dict[str, Any]] = []
    for provider in providers:
        row: dict[str, Any] = {"provider": provider}
        rows.append(row)
        reason = skip_reason(provider)
        if reason:
            row.update(status="skipped", reason=reason)
            continue
        chk = check(provider)
        row["check"] = chk
        if not chk["ok"]:
            row.update(status="FAILED", reason=chk["note"])
            continue
        fn = make_run(provider)
        try:
            row.update(status="ok", **{k: v for k, v in time_fn(fn, device, min_run_time).items() if k != "times_ms"})
        except Exception as exc:  # noqa: BLE001 - an OOM or a peer's failure is a result
            row.update(status="OOM" if is_oom(exc) else "error", reason=f"{type(exc).__name__}: {exc}")
            continue
        if memory:
            if device.type == "cuda":
                row["memory"] = peak_memory(device, fn=fn)
            else:
                row["memory"] = peak_memory(device, factory=memory_factory, spec=memory_spec(provider))
        del fn
        gc.collect()
    base = {r["provider"]: r for r in rows if r.get("status") == "ok"}
    t_torch = base.get("torch", {}).get("median_ms")
    m_torch = (base.get("torch", {}).get("memory") or {}).get("peak_extra_mib")
    for r in rows:
        mem = (r.get("memory") or {}).get("peak_extra_mib")
        if r.get("status") == "ok":
            r["speedup_vs_torch"] = t_torch / r["median_ms"] if t_torch else None
            r["memory_vs_torch"] = mem / m_torch if mem is not None and m_torch else None
    return rows


def print_provider_table(title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """The table of :func:`run_providers` rows."""
    table = [
        [
            r["provider"],
            r.get("status"),
            format_float(r.get("median_ms"), suffix=" ms"),
            format_float((r.get("memory") or {}).get("peak_extra_mib"), suffix=" MiB"),
            format_float(r.get("speedup_vs_torch"), suffix="x"),
            format_float(r.get("memory_vs_torch")),
            format_float((r.get("check") or {}).get("max_rel_err")),
            r.get("reason", ""),
        ]
        for r in rows
    ]
    print_table(
        title,
        ["provider", "status", "time", "peak extra", "x faster than torch", "memory / torch", "rel. err", "note"],
        table,
    )


def check_against_reference(
    got: Sequence[torch.Tensor | None], want: Sequence[torch.Tensor | None], names: Sequence[str], tol: float
) -> dict[str, Any]:
    """:func:`check_close` over several outputs (loss and gradients): the worst relative error, or
    the first failing output's name."""
    worst = 0.0
    for name, a, b in zip(names, got, want, strict=True):
        c = check_close(a, b, tol)
        if not c["ok"]:
            return {"ok": False, "note": f"{name}: {c.get('note') or c['max_rel_err']}"}
        worst = max(worst, c["max_rel_err"])
    return {"ok": True, "max_rel_err": worst}
