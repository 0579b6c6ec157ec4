"""Per-collective latency of gloo (TCP loopback) against shared memory (nekomata_core.accelerate.
local_collectives), among N ranks of this host, for the sizes of a tensor-parallel decode step.

    PYTHONPATH=$PWD python3 tools/bench_collectives.py --ranks 2 --hidden 1024 --vocab 151936 --dtype bfloat16

Each rank runs 1 thread (as `torchrun ... bench --threads 1` does). Prints, per collective, the median
of --repeats timings of --iters back-to-back calls (µs per call), and the per-token cost of a decode
step's collectives: 2 all-reduces of [1, hidden] per layer + 1 for the embedding + 1 all-gather of the
[1, vocab / N] logits. The CPU may be shared: repeat and read the medians.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _time(call, iters: int, repeats: int) -> float:
    """Median µs per call, over `repeats` runs of `iters` calls (ranks start each run together)."""
    call()  # warm up (views, gloo buffers)
    runs = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            call()
        runs.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(runs)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    from nekomata_core.accelerate import local_collectives

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shm, problem = local_collectives.setup()
    if shm is None:
        raise SystemExit(f"no shared memory: {problem}")
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(1, 1, args.hidden).to(dtype)
    logits = torch.randn(1, 1, args.vocab // world).to(dtype)
    parts = [torch.empty_like(logits) for _ in range(world)]
    rows = {
        f"all-reduce [1, {args.hidden}]": (lambda: dist.all_reduce(hidden), lambda: shm.all_reduce(hidden)),
        f"all-gather [1, {args.vocab // world}]": (lambda: dist.all_gather(parts, logits),
                                                   lambda: shm.all_gather(logits)),  # fmt: skip
    }
    out = {name: tuple(_time(call, args.iters, args.repeats) for call in calls) for name, calls in rows.items()}
    results.put((rank, out))
    dist.barrier()
    shm.close()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024, help="bench-620m: 1024")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--layers", type=int, default=24, help="for the per-token total")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=_rank, args=(r, args.ranks, port, args, results)) for r in range(args.ranks)]
    for p in processes:
        p.start()
    outs = dict(results.get(timeout=600) for _ in processes)
    for p in processes:
        p.join()
    rows = outs[0]  # rank 0's timings (the ranks wait for each other, so theirs agree)
    print(f"{args.ranks} ranks, {args.dtype}, median of {args.repeats} x {args.iters} calls, µs per call")
    print(f"{'collective':<28} {'gloo':>9} {'shm':>9} {'speed-up':>9}")
    for name, (gloo, shm) in rows.items():
        print(f"{name:<28} {gloo:9.1f} {shm:9.1f} {gloo / shm:8.1f}x")
    (reduce_gloo, reduce_shm), (gather_gloo, gather_shm) = rows.values()
    per_token = [(2 * args.layers + 1) * reduce + gather for reduce, gather in ((reduce_gloo, gather_gloo),
                                                                                 (reduce_shm, gather_shm))]  # fmt: skip
    print(f"{'per token (' + str(2 * args.layers + 1) + ' + 1 calls)':<28} {per_token[0] / 1e3:7.2f}ms "
          f"{per_token[1] / 1e3:7.2f}ms {per_token[0] / per_token[1]:8.1f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
