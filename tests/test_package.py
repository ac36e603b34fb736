"""Packaging: import without the compiled kernels, `unlearn info`, build metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import unlearn_ext
from unlearn_ext import _loader
from unlearn_ext.info import collect_info


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_import_works_without_compiled_kernels_and_ops_say_what_to_rebuild():
    code = """
import sys, warnings, torch
import importlib.abc

class BlockC(importlib.abc.MetaPathFinder):  # simulate a missing/broken build of _C
    def find_spec(self, name, path, target=None):
        if name == "unlearn_ext._C":
            raise ImportError("simulated: _C.so is missing")
        return None

sys.meta_path.insert(0, BlockC())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import unlearn_ext
print("WARNED", any("could not be loaded" in str(x.message) for x in w))
x, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
ref = unlearn_ext.sq_grad_linear(x, g, backend="reference")
print("REF", tuple(ref.shape))
try:
    unlearn_ext.sq_grad_linear(x, g)
except unlearn_ext.ExtensionNotBuiltError as e:
    print("ERR", e)
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "WARNED True" in res.stdout
    assert "REF (1, 5, 4)" in res.stdout
    assert "ERR sq_grad_linear needs the compiled unlearn_ext._C kernels" in res.stdout
    assert "pip install --no-build-isolation -e ." in res.stdout
    assert "simulated: _C.so is missing" in res.stdout


def test_skip_env_var_disables_the_extension_quietly():
    res = _run("import unlearn_ext, unlearn_ext._loader as L; print(L.extension_loaded())", UNLEARN_EXT_SKIP_C="1")
    assert res.returncode == 0 and res.stdout.strip() == "False" and "could not be loaded" not in res.stderr


def test_info_reports_backends_per_op_and_device():
    info = collect_info()
    assert info["torch"] == torch.__version__
    assert info["extension_loaded"] is True
    for op in unlearn_ext.ops.OPS:
        status = info["ops"][op]["cpu"]
        assert status["cpp"] == "ok" and status["reference"] == "ok"
        assert status["cuda"].startswith("n/a")
    assert info["build"]["cpu_kernel_isa"] in ("avx512", "avx2", "baseline")
    assert info["build"]["torch"] == torch.__version__, "the extension was built against another torch"


def test_cli_info_json_and_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "unlearn_ext.cli", "info", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data["ops"]) == set(unlearn_ext.ops.OPS)
    res = subprocess.run([sys.executable, "-m", "unlearn_ext.info"], capture_output=True, text=True)
    assert res.returncode == 0 and "backends per op and device" in res.stdout
    res = subprocess.run([sys.executable, "-m", "unlearn_ext.cli", "frobnicate"], capture_output=True, text=True)
    assert res.returncode != 0 and "invalid choice" in res.stderr


def test_has_kernel_matches_dispatcher():
    assert _loader.has_kernel("sq_grad_linear", "cpu")
    assert not _loader.has_kernel("no_such_op", "cpu")
    assert not _loader.has_kernel("sq_grad_linear", "meta")
