"""Start `world` torch.distributed ranks as spawned processes on this machine and collect what each reports
(the tensor-parallel and shared-memory collective tests share this)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Callable, world: int, *args) -> dict[int, dict]:
    """Run target(rank, world, port, *args, results) in `world` spawned processes; each puts (rank, dict)
    on `results`, with a "crash" entry if it failed. Returns the dicts by rank; fails on any crash."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=target, args=(r, world, port, *args, results)) for r in range(world)]
    for process in processes:
        process.start()
    try:
        outs = dict(results.get(timeout=120) for _ in range(world))
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    for rank, out in outs.items():
        assert "crash" not in out, f"rank {rank}: {out['crash']}"
    return outs
