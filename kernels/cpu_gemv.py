"""Bandwidth-bound CPU matrix-vector products for batch-1 decoding: bf16 and int8 weight-only linears.

Decoding one token at batch 1 runs every linear layer on a single row, i.e. a chain of GEMVs that read
each weight once: their speed is bytes(W) / memory bandwidth. PyTorch's CPU kernels fall well short of
that on AVX2 machines without bf16 instructions (bf16 ``F.linear`` for one row is compute-bound, and
``_weight_int8pack_mm`` is slower per byte still, so int8 gains nothing over bf16). The C kernels in
``cpu_gemv.c`` (AVX2 + FMA + F16C, OpenMP over output rows) run at memory bandwidth instead:

- `linear_bf16(x, weight, bias)`: ``x @ weight.T + bias`` with a bf16 weight [N, K];
- `linear_int8(x, qweight, scales, bias)`: ``(x @ qweight.T) * scales + bias`` with an int8 weight and
  one scale per output row (the layout of `nekomata_core.quantize.Int8Linear`).

Both take exactly one row (``x.numel() == K``; the caller routes only M=1 here), accumulate in fp32 and
round once to ``x.dtype`` after adding the bias (and applying the scale) in fp32.

The C file is compiled on first use (not at import) with the system C compiler into a per-user cache,
keyed by a hash of the source and the flags, so an edited kernel is rebuilt and an unchanged one is
reused by every later process. `native_build` decides where that cache is and which cached library may
be loaded (only one the user owns, in a folder nobody else can write; never one in a shared temp folder). `available()` says whether that worked (x86-64 Linux, a CPU with
AVX2/FMA/F16C, a working ``cc``); `unavailable_reason()` says why not. Nothing here raises at import.

Environment: ``NEKOMATA_CPU_GEMV=0`` disables the kernels; ``NEKOMATA_CC`` picks the compiler;
``XDG_CACHE_HOME`` moves the cache (``$XDG_CACHE_HOME/nekomata_core``, default ``~/.cache/nekomata_core``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from . import native_build

__all__ = ["available", "library_path", "linear_bf16", "linear_int8", "unavailable_reason"]

#: Must equal NEKOMATA_GEMV_ABI_VERSION in cpu_gemv.c; a library reporting another version is not used.
ABI_VERSION = 2

# One library from two files, compiled as one translation unit (concatenated, each under a #line marker so
# that compiler messages name the right file): the GEMVs, and the fused decode step (cpu_decode.c) that
# reuses their row kernels.
_SOURCES = (Path(__file__).with_name("cpu_gemv.c"), Path(__file__).with_name("cpu_decode.c"))
# Explicit ISA flags, not -march=native: the cached library may be loaded on another machine sharing the
# home directory, and the CPU flags are checked at run time instead.
# -ffp-contract=off: `a * b + c` stays two roundings, as in PyTorch's elementwise ops (fused multiply-adds
# are written out as intrinsics where they are wanted).
_CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared")
_CPU_FLAGS = ("avx2", "fma", "f16c")
_COMPILE_TIMEOUT_S = 120

# Dtype codes of cpu_gemv.c (DT_F32, DT_BF16, DT_F16) for activations, biases, scales and outputs.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_loaded = False  # the build/load below has been attempted (successfully or not)
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_path: Path | None = None
_gemv_bf16 = None  # the prototyped ctypes functions, set by _load
_gemv_int8 = None
_build_count = 0  # compilations done by this process (the tests check that a cached build is reused)


# ---------------------------------------------------------------------------------------------- build


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _platform_problem() -> str | None:
    if os.environ.get("NEKOMATA_CPU_GEMV", "").strip().lower() in ("0", "false", "off", "no"):
        return "disabled by NEKOMATA_CPU_GEMV=0"
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU GEMV kernels need x86-64 Linux (this is {sys.platform}/{platform.machine()})"
    missing = [flag for flag in _CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)} (the CPU GEMV kernels need AVX2, FMA and F16C)"
    return None


def _compiler() -> str | None:
    override = os.environ.get("NEKOMATA_CC")
    if override:
        return shutil.which(override)
    return shutil.which("cc") or shutil.which("gcc")


def _library_name(source: bytes) -> str:
    key = hashlib.sha256()
    for part in (source, " ".join(_CFLAGS).encode(), platform.machine().encode(), str(ABI_VERSION).encode()):
        key.update(part)
        key.update(b"\0")
    return f"cpu_gemv-{key.hexdigest()[:16]}.so"


def _source_names() -> str:
    return " + ".join(path.name for path in _SOURCES)


def _read_sources() -> bytes:
    parts = []
    for path in _SOURCES:
        parts.append(f'#line 1 "{path.name}"\n'.encode() + path.read_bytes())
    return b"\n".join(parts)


def _compile(cc: str, source: bytes, output: Path) -> str | None:
    """Compile `source` into `output` (a temporary name: native_build renames it into place); return
    None, or the reason it failed."""
    global _build_count
    try:
        # The source goes through stdin, so what is compiled is exactly the bytes that were hashed.
        proc = subprocess.run(
            [cc, *_CFLAGS, "-x", "c", "-", "-o", str(output), "-lm"],
            input=source,
            capture_output=True,
            timeout=_COMPILE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"compiling {_source_names()} with {cc} failed: {type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        return f"compiling {_source_names()} with {cc} failed (exit {proc.returncode}): {err[-2000:]}"
    _build_count += 1
    return None


def _build() -> tuple[Path | None, str | None]:
    """The path of an up-to-date library that is safe to load (building it if needed), or None and the
    reason. Where it may live and what may be loaded is decided by `native_build` alone."""
    try:
        source = _read_sources()
    except OSError as exc:
        return None, f"cannot read the kernel source: {exc}"
    cc = _compiler()

    def compile_to(output: Path) -> str | None:
        if cc is None:
            wanted = os.environ.get("NEKOMATA_CC") or "cc or gcc"
            return f"no C compiler found ({wanted} is not on PATH); install gcc to use the CPU GEMV kernels"
        return _compile(cc, source, output)

    return native_build.trusted_library(_library_name(source), compile_to)


def _load() -> None:
    global _loaded, _lib, _reason, _path, _gemv_bf16, _gemv_int8
    with _lock:
        if _loaded:
            return
        try:
            _reason = _platform_problem()
            if _reason is None:
                _path, _reason = _build()
            if _reason is None:
                # torch is imported (above), so the libgomp.so.1 this library needs resolves to the one
                # torch already loaded: one OpenMP runtime and one thread pool for both.
                lib = ctypes.CDLL(str(_path))
                lib.nekomata_gemv_abi_version.restype = ctypes.c_int
                version = lib.nekomata_gemv_abi_version()
                if version != ABI_VERSION:
                    _reason = f"{_path} has ABI version {version}, expected {ABI_VERSION} (a stale build)"
                else:
                    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
                    _gemv_bf16 = lib.nekomata_gemv_bf16
                    _gemv_bf16.argtypes = [p, p, p, p, i64, i64, i32]
                    _gemv_bf16.restype = i32
                    _gemv_int8 = lib.nekomata_gemv_int8
                    _gemv_int8.argtypes = [p, p, p, p, p, i64, i64, i32]
                    _gemv_int8.restype = i32
                    _lib = lib
        except Exception as exc:  # never let a broken toolchain or cache escape as an exception
            _reason = f"loading the CPU GEMV kernels failed: {type(exc).__name__}: {exc}"
        _loaded = True


def _reset_state() -> None:
    """Forget the loaded library so the next call builds/loads again (for tests; the old handle stays
    mapped, ctypes never unloads)."""
    global _loaded, _lib, _reason, _path, _gemv_bf16, _gemv_int8
    with _lock:
        _loaded, _lib, _reason, _path, _gemv_bf16, _gemv_int8 = False, None, None, None, None, None


def available() -> bool:
    """True when the kernels can run here (builds the library on the first call, then cached)."""
    if not _loaded:
        _load()
    return _lib is not None


def unavailable_reason() -> str | None:
    """None when `available()`, else one sentence saying why not (platform, CPU, compiler, build error)."""
    if not _loaded:
        _load()
    return _reason


def library_path() -> Path | None:
    """The shared library in use (None when unavailable)."""
    return _path if available() else None


# ---------------------------------------------------------------------------------------------- calls
#
# The per-call path is kept lean (a few microseconds in all, most of it torch.empty and ctypes): cheap
# checks first, the error message built only on failure, dtype codes and thread count packed in one int.


def _require_available() -> None:
    if not available():
        raise RuntimeError(f"the CPU GEMV kernels are unavailable: {_reason}")


def _describe(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    contiguous = "contiguous" if t.is_contiguous() else "non-contiguous"
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device} ({contiguous})"


def _check_weight(w: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if not (
        isinstance(w, torch.Tensor) and w.dtype == dtype and w.dim() == 2 and w.is_cpu and w.is_contiguous()
    ):
        raise ValueError(
            f"{name}: the weight must be a contiguous 2-D CPU {dtype} tensor, got {_describe(w)}"
        )


def _check_x(x: torch.Tensor, k: int, name: str) -> torch.Tensor:
    if not (isinstance(x, torch.Tensor) and x.dtype in _DTYPE_CODES and x.is_cpu):
        raise ValueError(f"{name}: x must be a CPU float32/bfloat16/float16 tensor, got {_describe(x)}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{name}: x must end with the {k} input features of the weight, got {_describe(x)}")
    if x.numel() != k or (k == 0 and x.shape[:-1].numel() != 1):
        raise ValueError(
            f"{name}: x must hold exactly one row (x.numel() == {k}), got {_describe(x)}; "
            "route only batch-1 decode steps (M == 1) here and use F.linear otherwise"
        )
    # A single row is at most a few hundred KB: copying a strided one is cheaper than refusing it.
    return x if x.is_contiguous() else x.contiguous()


def _vector_code(t: torch.Tensor | None, n: int, what: str, name: str) -> int:
    """The dtype code of a bias/scales vector, after checking it (None: no bias, code 0)."""
    if t is None:
        return 0
    code = _DTYPE_CODES.get(t.dtype) if isinstance(t, torch.Tensor) else None
    if code is None or t.dim() != 1 or t.shape[0] != n or not t.is_cpu or not t.is_contiguous():
        raise ValueError(
            f"{name}: {what} must be a contiguous CPU float32/bfloat16/float16 tensor of shape ({n},), "
            f"got {_describe(t)}"
        )
    return code


def _check_grad(name: str, *tensors: torch.Tensor | None) -> None:
    # The kernels have no backward: refuse rather than return a result silently cut from the graph.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"{name} is inference-only: call it under torch.no_grad() / torch.inference_mode()")


def _output(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty(n, dtype=x.dtype) if x.dim() == 1 else torch.empty(*x.shape[:-1], n, dtype=x.dtype)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row: x [..., K] (fp32/bf16/fp16, x.numel() == K), weight a
    contiguous bf16 [N, K], bias [N] (fp32/bf16/fp16) or None. Returns [..., N] in x.dtype, accumulated
    in fp32 and rounded once (bias added in fp32 first). Uses torch.get_num_threads() threads.

    Raises ValueError for other shapes, dtypes or layouts (and for inputs requiring grad while grad mode
    is on: there is no backward), RuntimeError when `available()` is False.
    """
    fn = _gemv_bf16
    if fn is None:
        _require_available()
        fn = _gemv_bf16
    _check_weight(weight, torch.bfloat16, "linear_bf16")
    n, k = weight.shape
    x = _check_x(x, k, "linear_bf16")
    bias_code = _vector_code(bias, n, "bias", "linear_bf16")
    _check_grad("linear_bf16", x, weight, bias)
    y = _output(x, n)
    code = _DTYPE_CODES[x.dtype]
    flags = code | bias_code << 4 | code << 8 | torch.get_num_threads() << 16
    if fn(
        weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), n, k, flags
    ):
        raise MemoryError(f"linear_bf16: cannot allocate the {k}-element activation buffer")
    return y


def linear_int8(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ qweight.T) * scales + bias`` for one row: x [..., K] (fp32/bf16/fp16, x.numel() == K),
    qweight a contiguous int8 [N, K], scales [N] (fp32/bf16/fp16), bias [N] or None. Returns [..., N] in
    x.dtype: the int8 dot product is accumulated in fp32, multiplied by the scale and the bias added, in
    fp32, then rounded once. Uses torch.get_num_threads() threads.

    Raises ValueError for other shapes, dtypes or layouts (and for inputs requiring grad while grad mode
    is on: there is no backward), RuntimeError when `available()` is False.
    """
    fn = _gemv_int8
    if fn is None:
        _require_available()
        fn = _gemv_int8
    _check_weight(qweight, torch.int8, "linear_int8")
    n, k = qweight.shape
    x = _check_x(x, k, "linear_int8")
    if scales is None:
        raise ValueError("linear_int8: scales are required (one per output row)")
    scales_code = _vector_code(scales, n, "scales", "linear_int8")
    bias_code = _vector_code(bias, n, "bias", "linear_int8")
    _check_grad("linear_int8", x, scales, bias)
    y = _output(x, n)
    code = _DTYPE_CODES[x.dtype]
    flags = code | bias_code << 4 | code << 8 | scales_code << 12 | torch.get_num_threads() << 16
    bias_ptr = None if bias is None else bias.data_ptr()
    if fn(qweight.data_ptr(), scales.data_ptr(), x.data_ptr(), bias_ptr, y.data_ptr(), n, k, flags):
        raise MemoryError(f"linear_int8: cannot allocate the {k}-element activation buffer")
    return y


# torch.compile sees a ctypes call as an opaque Python call it cannot trace; registered as custom ops,
# the GEMVs become graph nodes, so a compiled decode step keeps them and fuses everything around them.
@torch.library.custom_op("nekomata::linear_bf16", mutates_args=())
def linear_bf16_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear_bf16` as a torch custom op (for compiled graphs)."""
    return linear_bf16(x, weight, bias)


@linear_bf16_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("nekomata::linear_int8", mutates_args=())
def linear_int8_op(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`linear_int8` as a torch custom op (for compiled graphs)."""
    return linear_int8(x, qweight, scales, bias)


@linear_int8_op.register_fake
def _(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
