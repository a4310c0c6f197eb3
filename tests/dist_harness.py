"""Run a test worker in several local gloo processes, bounded in time; each rank writes rank<r>.json to out_dir."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: Callable[..., None], out_dir: str, world: int, timeout_s: float) -> list[dict[str, Any]]:
    """``worker(rank, port, out_dir)`` in ``world`` processes; fails the test past ``timeout_s``; rank results."""
    # fork starts in well under a second (spawn re-imports torch: ~15 s on a busy machine); CUDA is not fork-safe
    method = "spawn" if torch.cuda.is_initialized() or "fork" not in mp.get_all_start_methods() else "fork"
    ctx = mp.start_processes(worker, args=(free_port(), out_dir), nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout_s} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    out = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out
