"""``python -m unlearn_ext.info`` (also ``unlearn info``): versions, the build, and per op which
backends are built and usable on each visible device."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

import torch

from unlearn_ext import __version__, _loader
from unlearn_ext._triton import (
    TRITON_VERSION,
    interpreter_enabled,
    triton_available,
    triton_unavailable_reason,
)
from unlearn_ext.ops import OPS


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def backend_status(op: str, device: torch.device) -> dict[str, str]:
    """For each backend: "ok", or a short reason it cannot run ``op`` on ``device``."""
    status: dict[str, str] = {"reference": "ok"}
    if device.type == "cpu":
        status["cpp"] = "ok" if _loader.has_kernel(op, "cpu") else _missing()
        status["cuda"] = "n/a on cpu"
    else:
        status["cpp"] = "n/a on cuda"
        status["cuda"] = "ok" if _loader.has_kernel(op, device) else _missing(cuda=True)
    status["triton"] = "ok" if triton_available(device) else triton_unavailable_reason(device)
    return status


def _missing(cuda: bool = False) -> str:
    if not _loader.extension_loaded():
        return f"_C not loaded: {_loader.LOAD_ERROR}"
    if cuda and not _loader.BUILD_INFO.get("with_cuda"):
        return "built without CUDA"
    return "not registered"


def collect_info() -> dict[str, Any]:
    """Everything ``info`` prints, as a JSON-serialisable dict."""
    return {
        "unlearn_ext": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": TRITON_VERSION,
        "triton_interpreter": interpreter_enabled(),
        "extension_loaded": _loader.extension_loaded(),
        "extension_error": None if _loader.LOAD_ERROR is None else str(_loader.LOAD_ERROR),
        "build": {**_loader.BUILD_INFO, **_loader.compiled_build_info()},
        "devices": [_device_name(d) for d in _devices()],
        "ops": {op: {str(d): backend_status(op, d) for d in _devices()} for op in OPS},
    }


def print_info(info: dict[str, Any] | None = None) -> None:
    """Print :func:`collect_info` as tables."""
    from rich.console import Console
    from rich.table import Table

    info = info or collect_info()
    console = Console()
    versions = Table(title="unlearn_ext", show_header=False)
    for key in (
        "unlearn_ext",
        "python",
        "torch",
        "torch_cuda",
        "triton",
        "triton_interpreter",
        "extension_loaded",
    ):
        versions.add_row(key, str(info[key]))
    if info["extension_error"]:
        versions.add_row("extension_error", info["extension_error"])
    for key, value in info["build"].items():
        versions.add_row(f"build.{key}", str(value))
    versions.add_row("devices", ", ".join(info["devices"]))
    console.print(versions)
    table = Table(title="backends per op and device")
    for col in ("op", "device", "cpp", "cuda", "triton", "reference"):
        table.add_column(col)
    for op, per_device in info["ops"].items():
        for device, status in per_device.items():
            cells = [_cell(status[b]) for b in ("cpp", "cuda", "triton", "reference")]
            table.add_row(op, device, *cells)
    console.print(table)


def _cell(status: str) -> str:
    if status == "ok":
        return "[green]ok[/green]"
    if status.startswith("n/a"):
        return "[dim]-[/dim]"
    return f"[yellow]{status.split(';')[0]}[/yellow]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearn_ext.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_info(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
