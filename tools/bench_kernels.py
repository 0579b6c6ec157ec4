#!/usr/bin/env python
"""Benchmark the Triton kernels of `kernels/` against their PyTorch counterparts at nekomata-7b shapes.

    python tools/bench_kernels.py                 # GPU: table of ours vs torch (median of do_bench)
    python tools/bench_kernels.py --json out.json # ... and the rows as JSON
    python tools/bench_kernels.py --sweep         # instead: time alternative attention launch configs
    python tools/bench_kernels.py --smoke         # tiny shapes; runs on CPU in the Triton interpreter
    python tools/bench_kernels.py --compile-only  # no GPU needed: compile every launch for sm_80 / sm_90

Counterparts: prefill attention vs `F.scaled_dot_product_attention(is_causal=True)` on the flash backend;
decode attention vs SDPA on the cache sliced to its valid length; rmsnorm, rope and swiglu vs the eager
PyTorch formulas (the `*_reference` functions). Bandwidth is counted as the bytes each op must move at
least once; the roofline is the GPU's HBM bandwidth, detected from its name.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
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

# Shared memory per block (bytes) by compute capability, for --compile-only.
_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


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
    from kernels.attention import flash_attention
    from kernels.decode_attention import decode_attention
    from kernels.rmsnorm import rms_norm, rms_norm_reference
    from kernels.rope import apply_rope, apply_rope_reference
    from kernels.swiglu import swiglu, swiglu_reference

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
                ours=lambda q=q, kc=k_cache, vc=v_cache, n=kv_len: decode_attention(q, kc, vc, kv_len=n),
                torch=lambda q=q, kc=k_cache, vc=v_cache, n=length: F.scaled_dot_product_attention(
                    q, kc[:, :, :n], vc[:, :, :n]),
                bytes=2 * batch * heads * length * head_dim * k_cache.element_size(),
                flops=4 * batch * heads * length * head_dim,
            ))

    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    weight = torch.randn(hidden, device=device, dtype=dtype)
    cases.append(dict(
        op="rmsnorm", shape=f"[{tokens}, {hidden}]",
        ours=lambda: rms_norm(x, weight, 1e-6), torch=lambda: rms_norm_reference(x, weight, 1e-6),
        bytes=2 * x.numel() * x.element_size(), flops=None,
    ))

    qkv = torch.randn(1, tokens, 3, heads, head_dim, device=device, dtype=dtype)  # fused c_attn output
    q_view, k_view = qkv[:, :, 0], qkv[:, :, 1]
    angles = torch.rand(1, tokens, head_dim, device=device) * 100
    cos, sin = angles.cos(), angles.sin()
    cases.append(dict(
        op="rope (q+k)", shape=f"[1, {tokens}, {heads}, {head_dim}] x2",
        ours=lambda: apply_rope(q_view, k_view, cos, sin),
        torch=lambda: apply_rope_reference(q_view, k_view, cos, sin),
        bytes=4 * q_view.numel() * q_view.element_size() + 2 * cos.numel() * 4, flops=None,
    ))

    for width in (hidden,) if smoke else (hidden, 11008):
        a, b = (torch.randn(tokens, width, device=device, dtype=dtype) for _ in range(2))
        cases.append(dict(
            op="swiglu", shape=f"[{tokens}, {width}]",
            ours=lambda a=a, b=b: swiglu(a, b), torch=lambda a=a, b=b: swiglu_reference(a, b),
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
    from kernels.attention import _flash_attention, gpu_capability, prefill_config
    from kernels.decode_attention import _decode_attention, decode_config, default_num_splits

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
        default = (*decode_config(head_dim, dtype, capability), splits)
        configs = [(32, 4, 1, 2)] if smoke else [
            (b, w, 2, default[3]) for b in (32, 64, 128) for w in (2, 4, 8)
        ] + [(default[0], default[1], default[2], n) for n in (4, 8, 16, 32, 64)]
        gbytes = 2 * k_cache.numel() * k_cache.element_size() / 1e9
        print(f"\ndecode sweep, B={batch} N={heads} cache={cache} D={head_dim}; default "
              f"(BLOCK_N, warps, stages, splits)={default}")
        for config in dict.fromkeys([default, *configs]):
            def run(c=config, q1=q1, k_cache=k_cache, v_cache=v_cache, kv_len=kv_len):
                return _decode_attention(q1, k_cache, v_cache, kv_len=kv_len, num_splits=c[3], config=c[:3])

            try:
                ms = time_ms(run, device, rep=50)
            except Exception as exc:
                print(f"  {config}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                continue
            print(f"  {config}: {ms:.4f} ms, {gbytes / ms * 1e3:.0f} GB/s", flush=True)
            rows.append(dict(op=f"decode sweep B={batch}", config=list(config), ms=ms))
    return rows


# --- Offline compilation (no GPU) ----------------------------------------------------------------------


def compile_offline(archs: list[int]) -> bool:
    """Compile every kernel launch the GPU runs would make, for each arch, without a GPU.

    The launchers run on small CPU tensors with the GPU launch configs, their kernel launches are
    recorded instead of executed, and each is compiled the way JITFunction.run would (same argument
    specialisation), then `ptxas -v` reports registers and spills. Uses private triton APIs (3.x).
    Returns False when a kernel fails to compile or needs more shared memory than the arch has; register
    spills are reported ("note") but only cost speed.
    """
    if os.environ.pop("TRITON_INTERPRET", None):
        print("note: TRITON_INTERPRET ignored for --compile-only")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from kernels import attention, decode_attention, rmsnorm, rope, swiglu

    recorded: list[tuple[str, object, tuple, dict]] = []

    class Recorder:
        def __init__(self, name: str, fn: object) -> None:
            self.name, self.fn = name, fn

        def __getitem__(self, grid: tuple) -> Callable:
            return lambda *args, **kwargs: recorded.append((self.name, self.fn, args, kwargs))

    modules = (attention, decode_attention, rmsnorm, rope, swiglu)
    for module in modules:
        namespace = module._build()
        for name, fn in list(vars(namespace).items()):
            setattr(namespace, name, Recorder(name, fn))
        module.require_triton = lambda device: None  # CPU tensors stand in for GPU ones

    ok = True
    for arch in archs:
        recorded.clear()
        capability = divmod(arch, 10)
        _record_launches(capability)
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        print(f"\n== sm_{arch}: {len(recorded)} launches ==")
        for name, fn, args, kwargs in recorded:
            kwargs = dict(kwargs, debug=False)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound_args, specialization, _ = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization,
                                                                  None)
            consts = {k: v for k, v in kwargs.items() if k.isupper()}
            label = f"{name} {consts} warps={options.num_warps} stages={options.num_stages}"
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
            except Exception as exc:
                print(f"FAIL {label}: {type(exc).__name__}: {exc}")
                ok = False
                continue
            regs, spills = _ptxas_usage(get_ptxas(arch).path, compiled.asm["ptx"], arch)
            shared = compiled.metadata.shared
            too_big = shared > _SHARED_LIMIT.get(arch, 101376)  # the launch would fail: out of resources
            ok = ok and not too_big
            status = "FAIL" if too_big else "note" if spills else "ok  "  # spills cost speed, not correctness
            print(f"{status} {label}: shared={shared} B (limit {_SHARED_LIMIT.get(arch, 101376)}) "
                  f"regs={regs} spill stores={spills} B")
    return ok


def _record_launches(capability: tuple[int, int]) -> None:
    """Call every launcher with the launch configs it would use on a GPU of `capability`."""
    from kernels.attention import _flash_attention, prefill_config
    from kernels.decode_attention import _decode_attention, decode_config
    from kernels.rmsnorm import rms_norm
    from kernels.rope import apply_rope
    from kernels.swiglu import swiglu

    for dtype, head_dims in ((torch.bfloat16, (64, 128)), (torch.float32, (128,))):
        for head_dim in head_dims:
            seq = 256
            q, k, v = (torch.randn(1, 2, seq, head_dim, dtype=dtype) for _ in range(3))
            for key_start, logn in ((None, None), (torch.zeros(1, dtype=torch.int32), 8)):
                _flash_attention(q, k, v, key_start=key_start, logn_seq_length=logn,
                                 config=prefill_config(head_dim, dtype, seq, capability))
            _flash_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1],  # Tq = 1: the smallest tile
                             config=prefill_config(head_dim, dtype, 1, capability))
            q1 = torch.randn(2, 2, 1, head_dim, dtype=dtype)
            kv_len = torch.tensor([seq, 3], dtype=torch.int32)
            for splits in (1, 16):
                _decode_attention(q1, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), kv_len=kv_len,
                                  key_start=kv_len * 0, logn_seq_length=8, num_splits=splits,
                                  config=decode_config(head_dim, dtype, capability))
            _decode_attention(q1, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), kv_len=seq,
                              config=decode_config(head_dim, dtype, capability))
        x = torch.randn(4, 4096, dtype=dtype)
        rms_norm(x, x[0], 1e-6)
        swiglu(x, x)
        qkv = torch.randn(1, 4, 3, 32, 128, dtype=dtype)
        angles = torch.randn(1, 4, 128)
        apply_rope(qkv[:, :, 0], qkv[:, :, 1], angles.cos(), angles.sin())


def _ptxas_usage(ptxas: str, ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill-store bytes) reported by `ptxas -v` for the kernel in `ptx`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", path + ".o"],
                                capture_output=True, text=True)
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    return (int(registers.group(1)) if registers else None, int(spills.group(1)) if spills else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write the result rows to this JSON file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; on CPU it runs in the Triton interpreter")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the comparison, time alternative attention launch configs")
    parser.add_argument("--compile-only", nargs="?", const="90", metavar="ARCHS",
                        help="compile all kernels for these compute capabilities, e.g. 80,90 (default 90); "
                        "no GPU needed, a few minutes per arch")
    args = parser.parse_args(argv)

    if args.compile_only:
        with contextlib.redirect_stderr(io.StringIO()):  # triton's deprecation chatter
            ok = compile_offline([int(a) for a in args.compile_only.split(",")])
        print("\ncompile-only:", "all kernels compiled cleanly" if ok else "PROBLEMS (see above)")
        return 0 if ok else 1

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel build
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
