"""Build of ``unlearn_ext._C``: the C++ CPU kernels always, the CUDA kernels where torch has CUDA.

Knobs (environment variables):
  UNLEARN_EXT_USE_CUDA  auto (default) | 0 | 1. ``auto`` builds CUDA iff torch was built with CUDA
                        and a CUDA toolkit is found; ``1`` makes that a hard requirement.
  UNLEARN_EXT_DEBUG     1 compiles with -O0 -g.
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0+PTX").
  MAX_JOBS              parallel compile jobs (default: half the cores, bounded by free memory).
Build with ``pip install --no-build-isolation -e .`` after torch is installed.
"""

from __future__ import annotations

import glob
import json
import os

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise SystemExit(
        "unlearn_ext builds against an installed torch: run `pip install torch==<version>` first, "
        "then `pip install --no-build-isolation -e .` (build isolation would fetch a CUDA torch)."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _use_cuda() -> bool:
    choice = os.environ.get("UNLEARN_EXT_USE_CUDA", "auto").strip().lower()
    if choice not in {"auto", "0", "1"}:
        raise SystemExit(f"UNLEARN_EXT_USE_CUDA must be auto, 0 or 1, got {choice!r}")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice == "1" and not possible:
        why = (
            f"the installed torch {torch.__version__} has no CUDA"
            if torch.version.cuda is None
            else "no CUDA toolkit was found (set CUDA_HOME)"
        )
        raise SystemExit(f"UNLEARN_EXT_USE_CUDA=1 but CUDA kernels cannot be built: {why}.")
    return possible if choice == "auto" else choice == "1"


def _default_max_jobs() -> None:
    """flash-attention's heuristic: half the cores, at most one job per ~3 GiB of free memory."""
    if "MAX_JOBS" in os.environ:
        return
    jobs = max(1, (os.cpu_count() or 2) // 2)
    try:
        with open("/proc/meminfo") as fh:
            free_kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable"))
        jobs = max(1, min(jobs, free_kib // (3 * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        pass
    os.environ["MAX_JOBS"] = str(max(jobs, 2))


def _extension():
    use_cuda = _use_cuda()
    debug = os.environ.get("UNLEARN_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    std = "-std=c++20" if torch.__version__ >= "2.10" else "-std=c++17"
    cxx = [*opt, std, "-ffp-contract=fast", "-fopenmp", "-Wno-unused-parameter"]
    # csrc/*.cpp: schemas and device-generic code; csrc/cpu/*.cpp: CPU kernels.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(extra_compile_args={"cxx": cxx}, include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        cxx.append("-DUNLEARN_EXT_WITH_CUDA")
        nvcc = [*opt, std, "-DUNLEARN_EXT_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += ["--threads", os.environ.get("NVCC_THREADS", "4")]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        ext = cpp_extension.CUDAExtension("unlearn_ext._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("unlearn_ext._C", sources, **kwargs)
    kinds = "CPU + CUDA kernels" if use_cuda else "CPU kernels"
    print(f"unlearn_ext: building {kinds} against torch {torch.__version__}")
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": use_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
        "debug": debug,
    }
    with open(os.path.join(ROOT, "unlearn_ext", "_build_info.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    return ext


_default_max_jobs()
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
