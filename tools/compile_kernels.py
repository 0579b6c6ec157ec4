#!/usr/bin/env python
"""Compile every Triton kernel of `kernels/gpu/` ahead of time for NVIDIA GPUs, with no GPU present.

    python tools/compile_kernels.py                  # sm_80 and sm_90, both models, all dtypes and lengths
    python tools/compile_kernels.py --arch 90        # one architecture
    python tools/compile_kernels.py --reduced        # the CI subset (a few minutes on 2 cores)
    python tools/compile_kernels.py --json out.json  # also write one row per compile ('-': stdout)

What is compiled: the launches the dispatcher really makes for the nekomata-7b and qwen-1.8b shapes in
bf16, fp16 and fp32, for query lengths 1..2048 (every bucket of `attention.prefill_config`), the padding
and logn variants, and decode over caches whose length changes the split count
(`step_attention.default_num_splits`). The launchers run on CPU tensors shaped like the model's, with
the config functions answering for the target GPU (its compute capability and SM count); their kernel
launches are recorded instead of executed, and every distinct one is compiled the way JITFunction.run
would (same argument specialisation) by `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`. `ptxas -v` then reports registers and spills. Uses private triton 3.x APIs.

Exit status 1 when a kernel fails to compile, needs more shared memory per block than the arch allows
(opt-in maximum), more than 255 registers per thread, or spills registers to local memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from nekomata_core.config import QwenConfig  # noqa: E402

MODELS = ("nekomata-7b", "qwen-1.8b")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Shared memory per block (opt-in maximum, bytes) and multiprocessors of the usual part of each arch.
ARCHS = {80: dict(shared=166912, sm_count=108, name="A100"), 90: dict(shared=232448, sm_count=132, name="H100")}
MAX_REGISTERS = 255
# One length per bucket of prefill_config (next power of two, at least 16, at most the largest BLOCK_M),
# both ends of each; the grid size is all that changes past 128.
QUERY_LENGTHS = (1, 2, 16, 17, 32, 33, 64, 65, 128, 129, 2048)
# Decode cache lengths: each changes the split count (BLOCK_S of the merge kernel); 2047 is a length
# that is not a multiple of 16 (triton specialises integer arguments on that).
CACHE_LENGTHS = (100, 1024, 2047, 4096, 8192, 16896)


@dataclass
class Launch:
    """One recorded kernel launch and the cases that made it."""

    kernel: str
    fn: object
    args: tuple
    kwargs: dict
    cases: list[str] = field(default_factory=list)


@dataclass
class Result:
    kernel: str
    arch: int
    dtype: str
    config: str
    cases: list[str]
    ok: bool = False
    error: str | None = None
    shared: int | None = None
    shared_limit: int = 0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        found = []
        if self.error:
            found.append("compile error")
        if self.shared is not None and self.shared > self.shared_limit:
            found.append("shared memory")
        if self.registers is not None and self.registers > MAX_REGISTERS:
            found.append("registers")
        if self.spill_stores or self.spill_loads:
            found.append("spills")
        if not self.error and self.registers is None:
            found.append("no ptxas report")
        return found


# --- Recording the launches the dispatcher makes --------------------------------------------------------


@contextlib.contextmanager
def recording(capability: tuple[int, int], sm_count: int) -> Iterator[list[tuple[str, object, tuple, dict]]]:
    """Within: the launchers of kernels/gpu accept CPU tensors, pick their configs for `capability`, and
    record their kernel launches (name, JITFunction, args, kwargs) in the yielded list instead."""
    from nekomata_core.kernels.gpu import attention, int4_gemv, rmsnorm, rope, step_attention, swiglu
    from triton.runtime.jit import JITFunction

    launches: list[tuple[str, object, tuple, dict]] = []
    saved: list[tuple[object, str, object]] = []

    def patch(module: object, name: str, value: object) -> None:
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    class Recorder:
        def __init__(self, name: str, fn: object) -> None:
            self.name, self.fn = name, fn

        def __getitem__(self, grid: tuple) -> Callable:
            return lambda *args, **kwargs: launches.append((self.name, self.fn, args, kwargs))

    for module in (attention, step_attention, rmsnorm, rope, swiglu, int4_gemv):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and name.endswith("_kernel"):  # launched from Python
                patch(module, name, Recorder(name, value))
        patch(module, "require_triton", lambda device: None)  # CPU tensors stand in for GPU ones
    for module in (attention, step_attention):
        patch(module, "gpu_capability", lambda device: capability)
    patch(step_attention, "default_num_splits",
          lambda batch, n_heads, t_max, device: step_attention.num_splits_for(batch, n_heads, t_max, sm_count))
    try:
        yield launches
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _cache(batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(batch, heads, length, head_dim, dtype=dtype)  # never read: pages stay untouched


def record_launches(arch: int, reduced: bool) -> dict[tuple, Launch]:
    """Every distinct launch for `arch`, keyed by kernel, dtype and arguments after specialisation."""
    from nekomata_core.kernels.gpu.attention import flash_attention
    from nekomata_core.kernels.gpu.int4_gemv import int4_gemv
    from nekomata_core.kernels.gpu.rmsnorm import rms_norm
    from nekomata_core.kernels.gpu.rope import apply_rope
    from nekomata_core.kernels.gpu.step_attention import step_attention
    from nekomata_core.kernels.gpu.swiglu import swiglu

    models = MODELS[:1] if reduced else MODELS
    dtypes = ("bf16", "fp32") if reduced else tuple(DTYPES)
    query_lengths = (16, 64, 129) if reduced else QUERY_LENGTHS
    cache_lengths = (2047, 8192) if reduced else CACHE_LENGTHS
    variants = ((True, True),) if reduced else ((False, False), (True, False), (False, True), (True, True))
    recorded: list[tuple[str, str, list]] = []  # (dtype, case, launches made by it)

    with recording(divmod(arch, 10), ARCHS[arch]["sm_count"]) as launches:
        def case(dtype_name: str, text: str, call: Callable[[], object]) -> None:
            launches.clear()
            call()
            recorded.append((dtype_name, text, list(launches)))

        for model in models:
            config = QwenConfig.from_preset(model)
            hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
            width, seq_length = config.mlp_width, config.seq_length
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                for tokens in (1, 7):
                    x = torch.empty(1, tokens, hidden, dtype=dtype)
                    case(dtype_name, f"{model} T={tokens}", lambda x=x: rms_norm(x, x[0, 0], 1e-6))
                    # w1(x) and w2(x): two separate [B, T, F] outputs
                    a, b = (torch.empty(1, tokens, width, dtype=dtype) for _ in range(2))
                    case(dtype_name, f"{model} T={tokens}", lambda a=a, b=b: swiglu(a, b))
                # int4 linears of a decode step (one row): attn c_proj, w1/w2, mlp c_proj, lm_head; and a
                # biased one (c_attn's q and k rows: [2H, H], with their bias)
                for n, k, bias in ((hidden, hidden, False), (width, hidden, False), (hidden, width, False),
                                   (config.vocab_size, hidden, False), (2 * hidden, hidden, True)):
                    x = torch.empty(1, 1, k, dtype=dtype)
                    w = torch.empty(n, k // 2, dtype=torch.uint8)
                    scales, mins = torch.empty(n, k // 32, dtype=torch.uint8), torch.empty(n, k // 32, dtype=torch.int8)
                    units = torch.empty(-(-n // 8), k // 32, dtype=torch.bfloat16)  # one per tile of 8 rows
                    b = torch.empty(n, dtype=dtype) if bias else None
                    case(dtype_name, f"{model} int4 N={n} K={k}",
                         lambda x=x, w=w, scales=scales, mins=mins, units=units, b=b: int4_gemv(
                             x, w, scales, mins, units, units, b))
                for tokens, table_rows in ((1, 1), (5, 1), (32, 2)):
                    qkv = torch.empty(2, tokens, 3 * hidden, dtype=dtype)  # c_attn output
                    q, k = (qkv[..., i * hidden:(i + 1) * hidden].view(2, tokens, heads, head_dim) for i in (0, 1))
                    cos = torch.empty(table_rows, tokens, head_dim)
                    case(dtype_name, f"{model} T={tokens}",
                         lambda q=q, k=k, cos=cos: apply_rope(q, k, cos, cos))

                for seq_q in query_lengths:
                    for padded, logn in variants:
                        # Prefill of a fresh prompt: q, k from RoPE ([B, T, N, D] memory), v a view of qkv.
                        q = torch.empty(1, seq_q, heads, head_dim, dtype=dtype).transpose(1, 2)
                        v = torch.empty(1, seq_q, 3, heads, head_dim, dtype=dtype)[:, :, 2].transpose(1, 2)
                        key_start = torch.zeros(1, dtype=torch.int64) if padded else None
                        s = 2 if logn else None  # S below Tk: the later queries get logn factors
                        flags = f"{'padded ' if padded else ''}{'logn ' if logn else ''}".strip()
                        case(dtype_name, f"{model} Tq={seq_q} {flags}".strip(),
                             lambda q=q, v=v, key_start=key_start, s=s: flash_attention(
                                 q, q, v, key_start=key_start, logn_seq_length=s))
                        # Continuation of a cached prefix: keys from the cache [B, N, T_max, D].
                        prefix = seq_q + 2
                        cache = _cache(1, heads, 2 * (seq_q + prefix), head_dim, dtype)[:, :, :seq_q + prefix]
                        case(dtype_name, f"{model} Tq={seq_q} cached {flags}".strip(),
                             lambda q=q, cache=cache, key_start=key_start, s=s, prefix=prefix: flash_attention(
                                 q, cache, cache, q_start=prefix, key_start=key_start, logn_seq_length=s))

                for t_max in cache_lengths:
                    for batch in (1, 8) if t_max <= 4096 else (1,):
                        cache = _cache(batch, heads, t_max, head_dim, dtype)
                        q = torch.empty(batch, 1, heads, head_dim, dtype=dtype).transpose(1, 2)
                        lengths = torch.full((batch,), t_max, dtype=torch.int64)
                        key_start = torch.zeros(batch, dtype=torch.int64)
                        base = f"{model} B={batch} T_max={t_max}"
                        # Plain decode passes kv_len as an int, the fixed-shape decode as a tensor.
                        for kv_len in (t_max, lengths):
                            kind = "kv_len tensor" if isinstance(kv_len, torch.Tensor) else "kv_len int"
                            for padded, logn in variants:
                                flags = f"{'padded ' if padded else ''}{'logn ' if logn else ''}".strip()
                                starts = key_start if padded else None
                                s = min(seq_length, t_max - 1) if logn else None  # the last query past S
                                case(dtype_name, f"{base} {kind} {flags}".strip(),
                                     lambda q=q, cache=cache, kv_len=kv_len, starts=starts, s=s: step_attention(
                                         q, cache, cache, kv_len=kv_len, key_start=starts, logn_seq_length=s))

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    distinct: dict[tuple, Launch] = {}
    for dtype_name, text, made in recorded:
        for kernel, fn, args, kwargs in made:
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            _, specialization, _ = binder(*args, **dict(kwargs, debug=False))
            options = tuple(sorted((k, v) for k, v in kwargs.items() if not k.isupper()))
            key = (kernel, dtype_name, repr(specialization), options)
            launch = distinct.setdefault(key, Launch(kernel, fn, args, kwargs))
            launch.cases.append(text)
    return distinct


# --- Compiling one launch -------------------------------------------------------------------------------


def _describe(launch: Launch, specialization: list) -> str:
    """Constexprs, warps and stages, and the integer arguments triton specialised (== 1, or not a
    multiple of 16, which otherwise it assumes)."""
    constants = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.kwargs.items()
                         if k.isupper())
    warps, stages = launch.kwargs.get("num_warps", 4), launch.kwargs.get("num_stages", 3)
    special = []
    for param, (kind, attr) in zip(launch.fn.params, specialization, strict=True):
        if param.is_constexpr or param.name.isupper():
            continue
        if kind == "constexpr":
            special.append(f"{param.name}={attr}")
        elif kind[0] == "i" and attr == "":
            special.append(f"{param.name}%16!=0")
    return f"{constants} warps={warps} stages={stages}" + (f" ({', '.join(special)})" if special else "")


def _ptxas_report(arch: int, ptx: str) -> tuple[int | None, int | None, int | None]:
    """(registers, spill-store bytes, spill-load bytes) from `ptxas -v` for the kernel in `ptx`."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", path, "-o", path + ".o"],
                                capture_output=True, text=True)
    report = result.stderr

    def number(pattern: str) -> int | None:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else None

    return number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads")


def compile_launch(arch: int, dtype_name: str, launch: Launch) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    started = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn, kwargs = launch.fn, dict(launch.kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, _ = binder(*launch.args, **kwargs)
    result = Result(launch.kernel, arch, dtype_name, _describe(launch, specialization), launch.cases,
                    shared_limit=ARCHS[arch]["shared"])
    try:
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, None)
        with contextlib.redirect_stderr(io.StringIO()):  # triton's deprecation chatter
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        result.shared = compiled.metadata.shared
        result.registers, result.spill_stores, result.spill_loads = _ptxas_report(arch, compiled.asm["ptx"])
    except Exception as exc:  # report every failing compile, then go on
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"
    result.ok = not result.problems
    result.seconds = time.perf_counter() - started
    return result


_JOBS: list[tuple[int, str, Launch]] = []  # inherited by the forked workers


def _compile_job(index: int) -> Result:
    return compile_launch(*_JOBS[index])


def _bucket_summary(cases: list[str]) -> str:
    """The cases of one compile, shortened: models, the distinct lengths, the kinds of call."""
    parts = [",".join(sorted({c.split()[0] for c in cases}))]
    for name in ("B", "T", "Tq", "T_max"):
        values = sorted({int(m) for c in cases for m in re.findall(rf"\b{name}=(\d+)", c)})
        if values:
            parts.append(f"{name}=" + ",".join(map(str, values)))
    kinds = sorted({" ".join(w for w in c.split()[1:] if "=" not in w) for c in cases} - {""})
    if kinds:
        parts.append("; ".join(kinds))
    return " | ".join(parts)


def format_result(result: Result) -> str:
    status = "ok  " if result.ok else "FAIL"
    head = f"{status} sm_{result.arch} {result.kernel} {result.dtype} {result.config}"
    if result.error:
        return f"{head}: {result.error} [{_bucket_summary(result.cases)}]"
    problems = f" ({', '.join(result.problems)})" if result.problems else ""
    return (f"{head}: shared {result.shared}/{result.shared_limit} B, regs {result.registers}/{MAX_REGISTERS}, "
            f"spill {result.spill_stores} B stored/{result.spill_loads} B loaded{problems} "
            f"[{_bucket_summary(result.cases)}]")


def run(archs: list[int], reduced: bool, jobs: int, only: tuple[str, ...] = (), out=sys.stdout) -> list[Result]:
    """Record and compile the launches for `archs` (only kernels named with a word of `only`, if given)."""
    if "nekomata_core.kernels.gpu.helpers" in sys.modules and sys.modules["nekomata_core.kernels.gpu.helpers"].INTERPRETED:
        raise RuntimeError("nekomata_core.kernels.gpu was imported for the Triton interpreter in this process; run "
                           "tools/compile_kernels.py in a fresh process without TRITON_INTERPRET")
    _JOBS.clear()
    for arch in archs:
        for (kernel, dtype_name, _, _), launch in record_launches(arch, reduced).items():
            if not only or any(word in kernel for word in only):
                _JOBS.append((arch, dtype_name, launch))
    print(f"{len(_JOBS)} distinct compiles for sm_{', sm_'.join(map(str, archs))} "
          f"({'reduced' if reduced else 'full'} set), {jobs} job(s)", file=out, flush=True)
    results: list[Result] = []
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for result in pool.imap(_compile_job, range(len(_JOBS))):
                print(format_result(result), file=out, flush=True)
                results.append(result)
    else:
        for index in range(len(_JOBS)):
            results.append(_compile_job(index))
            print(format_result(results[-1]), file=out, flush=True)
    return results


def summary(results: list[Result]) -> str:
    failed = [r for r in results if not r.ok]
    spilled = [r for r in results if r.spill_stores or r.spill_loads]
    errors = [r for r in results if r.error]
    over = [r for r in results if "shared memory" in r.problems or "registers" in r.problems]
    worst_regs = max((r.registers or 0 for r in results), default=0)
    worst_shared = max(((r.shared or 0) / r.shared_limit for r in results), default=0.0)
    return (f"summary: {len(results)} compiles, {len(results) - len(failed)} ok, {len(errors)} failed to compile, "
            f"{len(spilled)} spill, {len(over)} over a limit; max regs {worst_regs}/{MAX_REGISTERS}, "
            f"max shared {100 * worst_shared:.0f}% of the arch limit; "
            f"{sum(r.seconds for r in results):.0f} s of compiling")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90 (default)")
    parser.add_argument("--reduced", action="store_true",
                        help="the CI subset: nekomata-7b, bf16 and fp32, three query and two cache lengths")
    parser.add_argument("--json", metavar="PATH", help="write one row per compile as JSON ('-': stdout)")
    parser.add_argument("--kernel", metavar="NAMES", help="only kernels whose name contains one of these "
                        "comma-separated words, e.g. flash,decode")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="compiles in parallel (default: the CPU count, at most 8)")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        parser.error(f"--arch takes comma-separated compute capabilities like 80,90, got {args.arch!r}")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"--arch: no limits known for {unknown}; choose from {sorted(ARCHS)}")
    if os.environ.pop("TRITON_INTERPRET", None):
        print("note: TRITON_INTERPRET ignored (compiling for the GPU)", file=sys.stderr)
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        for arch in archs:
            if not os.access(get_ptxas(arch).path, os.X_OK):
                raise FileNotFoundError(get_ptxas(arch).path)
    except (ImportError, FileNotFoundError, RuntimeError) as exc:
        print(f"cannot compile for NVIDIA GPUs here: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    out = sys.stderr if args.json == "-" else sys.stdout
    only = tuple(args.kernel.split(",")) if args.kernel else ()
    results = run(archs, args.reduced, max(1, args.jobs), only=only, out=out)
    print(summary(results), file=out)
    if args.json:
        rows = [dict(vars(r), problems=r.problems) for r in results]
        text = json.dumps(rows, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
