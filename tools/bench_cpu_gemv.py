#!/usr/bin/env python
"""Benchmark the CPU GEMV kernels (`kernels/cpu/gemv`) against PyTorch at batch-1 decode shapes.

    python tools/bench_cpu_gemv.py                  # 1 and 2 threads, the table below
    python tools/bench_cpu_gemv.py --threads 2 --runs 15
    python tools/bench_cpu_gemv.py --json out.json  # ... and the rows as JSON
    python tools/bench_cpu_gemv.py --smoke          # tiny shapes, a few seconds (checks the script runs)

Workloads, sized to stream from DRAM (far larger than the last-level cache) as decoding does:
``layers`` = 24 x [2816, 1024] + 24 x [1024, 2816] weights (the MLP projections of a 24-layer model,
about 277 MB in bf16), called one after the other like one decode step; ``lm_head`` = [151936, 1024].
Methods: ``torch bf16`` = F.linear with bf16 weight and activation; ``ours bf16`` = `linear_bf16`;
``torch int8`` = ``torch.ops.aten._weight_int8pack_mm`` (what `Int8Linear` uses on CPU); ``ours int8`` =
`linear_int8`. All take one bf16 activation row.

GB/s counts the weight bytes (plus int8 scales) read once per call, divided by the median time of
``--runs`` timed passes after warm-up; the methods are interleaved pass by pass so that a noisy
neighbour slows all of them alike. ``% stream`` compares with the streaming-read reference measured
in the same rounds (row ``stream``): ``torch.empty(2**28).uniform_().sum()``, 1 GiB of fp32. The
per-call overhead is timed on a tiny [4, 64] weight.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from nekomata_core.kernels.cpu import gemv  # noqa: E402

METHODS = ("torch bf16", "ours bf16", "torch int8", "ours int8")


def _make_weights(shapes: list[tuple[int, int]], seed: int) -> list[dict[str, torch.Tensor]]:
    """bf16 weights plus an int8 copy with per-row scales (random values: speed does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in shapes:
        out.append(
            {
                "bf16": (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16),
                "int8": torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                "scales": (torch.rand(n, generator=g) * 1e-3).to(torch.bfloat16),
                "x": torch.randn(1, k, generator=g).to(torch.bfloat16),
            }
        )
    return out


def _runner(method: str, mats: list[dict[str, torch.Tensor]]) -> Callable[[], None]:
    """One pass of `method` over every matrix of a workload."""
    int8pack = torch.ops.aten._weight_int8pack_mm
    one: Callable[[dict[str, torch.Tensor]], object] = {
        "torch bf16": lambda m: F.linear(m["x"], m["bf16"]),
        "ours bf16": lambda m: gemv.linear_bf16(m["x"], m["bf16"]),
        "torch int8": lambda m: int8pack(m["x"], m["int8"], m["scales"]),
        "ours int8": lambda m: gemv.linear_int8(m["x"], m["int8"], m["scales"]),
    }[method]

    def run() -> None:
        for m in mats:
            one(m)

    return run


def _bytes(method: str, mats: list[dict[str, torch.Tensor]]) -> int:
    if method.endswith("bf16"):
        return sum(m["bf16"].numel() * 2 for m in mats)
    return sum(m["int8"].numel() + m["scales"].numel() * 2 for m in mats)


def _time_interleaved(fns: dict[str, Callable[[], None]], runs: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _call_overhead_us(runs: int) -> dict[str, float]:
    """Microseconds per call on a tiny weight, where the time is all overhead."""
    w = torch.randn(4, 64).to(torch.bfloat16)
    q = torch.randint(-127, 128, (4, 64), dtype=torch.int8)
    s = torch.rand(4).to(torch.bfloat16)
    x = torch.randn(1, 64).to(torch.bfloat16)
    int8pack = torch.ops.aten._weight_int8pack_mm
    calls = 2000

    def repeat(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                fn()

        return run

    fns = {
        "torch bf16": repeat(lambda: F.linear(x, w)),
        "ours bf16": repeat(lambda: gemv.linear_bf16(x, w)),
        "torch int8": repeat(lambda: int8pack(x, q, s)),
        "ours int8": repeat(lambda: gemv.linear_int8(x, q, s)),
    }
    return {name: t / calls * 1e6 for name, t in _time_interleaved(fns, runs, warmup=1).items()}


def _check_agreement(mats: list[dict[str, torch.Tensor]]) -> None:
    """Refuse to time kernels that disagree with PyTorch (a broken build would look very fast)."""
    m = mats[0]
    ref = F.linear(m["x"].double(), m["bf16"].double())
    got = gemv.linear_bf16(m["x"], m["bf16"]).double()
    bound = F.linear(m["x"].double().abs(), m["bf16"].double().abs())
    if not torch.all((got - ref).abs() <= 1e-2 * bound + 1e-6):
        raise SystemExit("ours bf16 disagrees with F.linear; not benchmarking")
    ref8 = (m["x"].double() @ m["int8"].double().T) * m["scales"].double()
    got8 = gemv.linear_int8(m["x"], m["int8"], m["scales"]).double()
    if not torch.all((got8 - ref8).abs() <= 1e-2 * ref8.abs().max()):
        raise SystemExit("ours int8 disagrees with the float64 reference; not benchmarking")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument("--runs", type=int, default=9, help="timed passes per method (median; default 9)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=24, help="layers of the `layers` workload (default 24)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: only checks that everything runs")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    if not gemv.available():
        print(f"CPU GEMV kernels unavailable: {gemv.unavailable_reason()}", file=sys.stderr)
        return 1
    threads = [int(t) for t in args.threads.split(",")]
    if args.smoke:
        hidden, inter, vocab, layers, stream_numel = 64, 176, 1000, 2, 2**20
    else:
        hidden, inter, vocab, layers, stream_numel = 1024, 2816, 151936, args.layers, 2**28
    workloads = {
        "layers": _make_weights([(inter, hidden)] * layers + [(hidden, inter)] * layers, seed=0),
        "lm_head": _make_weights([(vocab, hidden)], seed=1),
    }
    _check_agreement(workloads["layers"])
    print(f"library: {gemv.library_path()}")
    print(
        f"torch {torch.__version__}; workloads: layers = {layers} x [{inter},{hidden}] + {layers} x "
        f"[{hidden},{inter}], lm_head = [{vocab},{hidden}]; median of {args.runs} runs"
    )

    stream_data = torch.empty(stream_numel).uniform_()
    stream_bytes = stream_numel * 4
    rows = []
    header = (
        f"{'threads':>7} {'workload':<8} {'method':<11} {'ms':>9} {'GB/s':>7} {'% stream':>8} {'vs torch':>8}"
    )
    for nt in threads:
        torch.set_num_threads(nt)
        overhead = _call_overhead_us(max(3, args.runs // 3))
        print(
            f"\n{nt} thread(s): per-call overhead "
            + ", ".join(f"{n} {us:.1f} us" for n, us in overhead.items())
        )
        print(header)
        for wname, mats in workloads.items():
            fns = {method: _runner(method, mats) for method in METHODS}
            # The reference is timed in the same rounds as the methods: this machine's bandwidth drifts.
            fns["stream"] = lambda: stream_data.sum()
            seconds = _time_interleaved(fns, args.runs, args.warmup)
            stream = stream_bytes / seconds["stream"] / 1e9
            print(f"{nt:>7} {wname:<8} {'stream':<11} {seconds['stream'] * 1e3:>9.2f} {stream:>7.1f}")
            for method in METHODS:
                gbps = _bytes(method, mats) / seconds[method] / 1e9
                baseline = seconds["torch " + method.split()[1]]
                row = {
                    "threads": nt,
                    "workload": wname,
                    "method": method,
                    "ms": seconds[method] * 1e3,
                    "gbps": gbps,
                    "pct_stream": 100 * gbps / stream,
                    "speedup_vs_torch": baseline / seconds[method],
                    "stream_gbps": stream,
                    "call_overhead_us": overhead[method],
                }
                rows.append(row)
                print(
                    f"{nt:>7} {wname:<8} {method:<11} {row['ms']:>9.2f} {gbps:>7.1f} "
                    f"{row['pct_stream']:>7.0f}% {row['speedup_vs_torch']:>7.2f}x"
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
