#!/usr/bin/env python
"""Benchmark the Triton kernels of `kernels/gpu/` against their PyTorch counterparts at nekomata-7b shapes.

    python tools/bench_kernels.py                 # GPU: table of ours vs torch (median of do_bench)
    python tools/bench_kernels.py --json out.json # ... and the rows as JSON
    python tools/bench_kernels.py --sweep         # instead: time alternative attention launch configs
    python tools/bench_kernels.py --smoke         # tiny shapes; runs on CPU in the Triton interpreter
    python tools/bench_kernels.py --compile-only  # no GPU needed: tools/compile_kernels.py (sm_80, sm_90)

Counterparts: prefill attention vs `F.scaled_dot_product_attention(is_causal=True)` on the flash backend;
decode attention vs SDPA on the cache sliced to its valid length; rmsnorm, rope and swiglu vs the eager
ops of `nekomata_core.model` (`RMSNorm`, `apply_rotary`, MLP's `a * silu(b)`). Bandwidth is counted as the bytes each op must move at
least once; the roofline is the GPU's HBM bandwidth, detected from its name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# HBM bandwidth (TB/s) and dense bf16 tensor-core peak (TFLOP/s) by device-name fragment, first match wins.
_DEVICE_PEAKS = (
    ("H200", 4.8, 989.0),
    ("H100 PCIe", 2.0, 756.0),
    ("H100 NVL", 3.9, 835.0),
    ("H100", 3.35, 989.0),
    ("H800", 3.35, 989.0),
    ("A100-SXM4-80GB", 2.039, 312.0),
    ("A100", 1.555, 312.0),
)

def device_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return "cpu (Triton interpreter)", None, None
    name = torch.cuda.get_device_name(device)
    for fragment, bandwidth, flops in _DEVICE_PEAKS:
        if fragment in name:
            return name, bandwidth, flops
    return name, None, None


def time_ms(fn: Callable[[], object], device: torch.device, rep: int = 100) -> float:
    """Median runtime in ms: triton's do_bench on a GPU, a few wall-clock runs on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    runs = []
    for _ in range(1 if os.environ.get("TRITON_INTERPRET") else 3):  # the interpreter is slow; smoke only
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def _flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_cases(device: torch.device, smoke: bool) -> list[dict]:
    """The benchmark problems: name, shape text, our fn, torch fn, bytes moved, flops."""
    from nekomata_core.kernels.gpu.attention import flash_attention
    from nekomata_core.kernels.gpu.rmsnorm import rms_norm
    from nekomata_core.kernels.gpu.rope import apply_rope
    from nekomata_core.kernels.gpu.step_attention import step_attention
    from nekomata_core.kernels.gpu.swiglu import swiglu

    from nekomata_core.model import RMSNorm, apply_rotary

    dtype = torch.bfloat16
    heads, head_dim = (2, 16) if smoke else (32, 128)
    hidden = heads * head_dim
    tokens = 16 if smoke else 4096
    cases = []

    for seq in (17,) if smoke else (512, 2048, 8192):
        q, k, v = (torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
        cases.append(dict(
            op="prefill attention", shape=f"B=1 N={heads} T={seq} D={head_dim}",
            ours=lambda q=q, k=k, v=v: flash_attention(q, k, v),
            torch=lambda q=q, k=k, v=v: _flash_sdpa(q, k, v),
            bytes=4 * q.numel() * q.element_size(),
            flops=4 * heads * seq * seq * head_dim / 2,  # causal: half of QK^T and PV
        ))

    lengths = (40,) if smoke else (1024, 8192, 16384, 32768)
    for batch in (1, 8):
        # A static cache of the longest length, filled up to `length` (as during generation).
        k_cache, v_cache = (torch.randn(batch, heads, lengths[-1], head_dim, device=device, dtype=dtype)
                            for _ in range(2))
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        for length in lengths:
            kv_len = torch.full((batch,), length, device=device, dtype=torch.int32)
            cases.append(dict(
                op="decode attention", shape=f"B={batch} N={heads} len={length} D={head_dim}",
                ours=lambda q=q, kc=k_cache, vc=v_cache, n=kv_len: step_attention(q, kc, vc, kv_len=n),
                torch=lambda q=q, kc=k_cache, vc=v_cache, n=length: F.scaled_dot_product_attention(
                    q, kc[:, :, :n], vc[:, :, :n]),
                bytes=2 * batch * heads * length * head_dim * k_cache.element_size(),
                flops=4 * batch * heads * length * head_dim,
            ))

    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    norm = RMSNorm(hidden, 1e-6).to(device=device, dtype=dtype).requires_grad_(False)
    cases.append(dict(
        op="rmsnorm", shape=f"[{tokens}, {hidden}]",
        ours=lambda: rms_norm(x, norm.weight, 1e-6), torch=lambda: norm(x),
        bytes=2 * x.numel() * x.element_size(), flops=None,
    ))

    qkv = torch.randn(1, tokens, 3, heads, head_dim, device=device, dtype=dtype)  # fused c_attn output
    q_view, k_view = qkv[:, :, 0], qkv[:, :, 1]
    angles = torch.rand(1, tokens, head_dim, device=device) * 100
    cos, sin = angles.cos(), angles.sin()
    cases.append(dict(
        op="rope (q+k)", shape=f"[1, {tokens}, {heads}, {head_dim}] x2",
        ours=lambda: apply_rope(q_view, k_view, cos, sin),
        torch=lambda: (apply_rotary(q_view, cos, sin), apply_rotary(k_view, cos, sin)),
        bytes=4 * q_view.numel() * q_view.element_size() + 2 * cos.numel() * 4, flops=None,
    ))

    for width in (hidden,) if smoke else (hidden, 11008):
        a, b = (torch.randn(tokens, width, device=device, dtype=dtype) for _ in range(2))
        cases.append(dict(
            op="swiglu", shape=f"[{tokens}, {width}]",
            ours=lambda a=a, b=b: swiglu(a, b), torch=lambda a=a, b=b: a * F.silu(b),
            bytes=3 * a.numel() * a.element_size(), flops=None,
        ))
    return cases


def run_benchmarks(device: torch.device, smoke: bool) -> list[dict]:
    name, bandwidth, peak_flops = device_peaks(device)
    print(f"device: {name}; roofline: "
          f"{f'{bandwidth} TB/s, {peak_flops} bf16 TFLOP/s' if bandwidth else 'unknown'}")
    print_header()
    rows = []
    for case in bench_cases(device, smoke):
        ours_ms = time_ms(case["ours"], device)
        torch_ms = time_ms(case["torch"], device)
        gbps = case["bytes"] / ours_ms / 1e6
        row = dict(op=case["op"], shape=case["shape"], ours_ms=ours_ms, torch_ms=torch_ms,
                   speedup=torch_ms / ours_ms, gb_per_s=gbps,
                   roofline_pct=100 * gbps / (bandwidth * 1e3) if bandwidth else None,
                   tflop_per_s=case["flops"] / ours_ms / 1e9 if case["flops"] else None)
        if row["tflop_per_s"] is not None and peak_flops:
            row["peak_flops_pct"] = 100 * row["tflop_per_s"] / peak_flops
        rows.append(row)
        print_row(row)
    return rows


def print_header() -> None:
    print(f"{'op':<18} {'shape':<30} {'ours ms':>9} {'torch ms':>9} {'speedup':>8} {'GB/s':>8} "
          f"{'%roof':>6} {'TFLOP/s':>8}")


def print_row(row: dict) -> None:
    roof = f"{row['roofline_pct']:.0f}" if row.get("roofline_pct") is not None else "-"
    tflops = f"{row['tflop_per_s']:.1f}" if row.get("tflop_per_s") is not None else "-"
    print(f"{row['op']:<18} {row['shape']:<30} {row['ours_ms']:>9.4f} {row['torch_ms']:>9.4f} "
          f"{row['speedup']:>7.2f}x {row['gb_per_s']:>8.0f} {roof:>6} {tflops:>8}", flush=True)


def run_sweep(device: torch.device, smoke: bool) -> list[dict]:
    """Time alternative launch configs of the two attention kernels (to tune the heuristics)."""
    from nekomata_core.kernels.gpu.attention import _flash_attention, gpu_capability, prefill_config
    from nekomata_core.kernels.gpu.step_attention import (
        _step_attention,
        default_num_splits,
        step_config,
    )

    dtype = torch.bfloat16
    heads, head_dim, seq, cache = (2, 32, 64, 100) if smoke else (32, 128, 8192, 16384)
    capability = gpu_capability(device)
    rows = []
    print(f"device: {device_peaks(device)[0]}")
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
    default = prefill_config(head_dim, dtype, seq, capability)
    configs = [(32, 32, 4, 1)] if smoke else [
        (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 4),
        (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 8, 4)]
    print(f"prefill sweep, B=1 N={heads} T={seq} D={head_dim}; default {default}")
    for config in dict.fromkeys([default, *configs]):
        try:
            ms = time_ms(lambda config=config: _flash_attention(q, k, v, config=config), device, rep=50)
        except Exception as exc:  # a config may not fit the GPU (shared memory): report, go on
            print(f"  {config}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
            continue
        tflops = 4 * heads * seq * seq * head_dim / 2 / ms / 1e9
        print(f"  (BLOCK_M, BLOCK_N, warps, stages)={config}: {ms:.4f} ms, {tflops:.1f} TFLOP/s", flush=True)
        rows.append(dict(op="prefill sweep", config=list(config), ms=ms))

    for batch in (1,) if smoke else (1, 8):
        q1 = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        k_cache, v_cache = (torch.randn(batch, heads, cache, head_dim, device=device, dtype=dtype)
                            for _ in range(2))
        kv_len = torch.full((batch,), cache, device=device, dtype=torch.int32)
        splits = default_num_splits(batch, heads, cache, device)
        default = (*step_config(head_dim, dtype, capability), splits)
        configs = [(32, 4, 1, 2)] if smoke else [
            (b, w, 2, default[3]) for b in (32, 64, 128) for w in (2, 4, 8)
        ] + [(default[0], default[1], default[2], n) for n in (4, 8, 16, 32, 64)]
        gbytes = 2 * k_cache.numel() * k_cache.element_size() / 1e9
        print(f"\ndecode sweep, B={batch} N={heads} cache={cache} D={head_dim}; default "
              f"(BLOCK_N, warps, stages, splits)={default}")
        for config in dict.fromkeys([default, *configs]):
            def run(c=config, q1=q1, k_cache=k_cache, v_cache=v_cache, kv_len=kv_len):
                return _step_attention(q1, k_cache, v_cache, kv_len=kv_len, num_splits=c[3], config=c[:3])

            try:
                ms = time_ms(run, device, rep=50)
            except Exception as exc:
                print(f"  {config}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                continue
            print(f"  {config}: {ms:.4f} ms, {gbytes / ms * 1e3:.0f} GB/s", flush=True)
            rows.append(dict(op=f"decode sweep B={batch}", config=list(config), ms=ms))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write the result rows to this JSON file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; on CPU it runs in the Triton interpreter")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the comparison, time alternative attention launch configs")
    parser.add_argument("--compile-only", nargs="?", const="80,90", metavar="ARCHS",
                        help="instead: tools/compile_kernels.py --arch ARCHS (default 80,90); no GPU needed")
    args = parser.parse_args(argv)

    if args.compile_only:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import compile_kernels

        return compile_kernels.main(["--arch", args.compile_only])

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of nekomata_core.kernels.gpu
        device = torch.device("cpu")
    else:
        print("no CUDA GPU: use --smoke (CPU, Triton interpreter) or --compile-only", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = run_sweep(device, args.smoke) if args.sweep else run_benchmarks(device, args.smoke)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device_peaks(device)[0], rows=rows), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
