"""Run a function on several CPU processes joined by a gloo process group on 127.0.0.1 (the
distributed tests); each rank's result comes back through a file."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[[int, int], Any], world: int, port: int, out: str) -> None:
    """Process entry point (module level, so it pickles): join the group, run ``fn``, save its result."""
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[[int, int], Any], world: int, tmp_path: Path) -> list[Any]:
    """``[fn(rank, world) for each rank]``, each computed in its own process of one gloo group."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, world, free_port(), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(Path(tmp_path) / f"rank{r}.pt", weights_only=False) for r in range(world)]
