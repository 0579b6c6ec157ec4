"""Bandwidth-bound CPU matrix-vector products for one-row steps: bf16, int8 and int4 weight-only linears.

Decoding one token at batch 1 runs every linear layer on a single row, i.e. a chain of GEMVs that read
each weight once: their speed is bytes(W) / memory bandwidth. PyTorch's CPU kernels fall well short of
that on AVX2 machines without bf16 instructions (bf16 ``F.linear`` for one row is compute-bound, and
``_weight_int8pack_mm`` is slower per byte still, so int8 gains nothing over bf16). The C kernels in
``gemv.c`` (AVX2 + FMA + F16C, OpenMP over output rows) run at memory bandwidth instead:

- `linear_bf16(x, weight, bias)`: ``x @ weight.T + bias`` with a bf16 weight [N, K];
- `linear_int8(x, qweight, scales, bias)`: ``(x @ qweight.T) * scales + bias`` with an int8 weight and
  one scale per output row (the layout of `nekomata_core.quantize.Int8Linear`);
- `linear_int4(x, qweight, scales, mins, scale_units, min_units, bias)`: ``x @ W.T + bias`` with W the
  int4 weight of `nekomata_core.quantize.Int4Linear` (uint8 [N, K/2], two codes a byte; 8-bit scale and
  min codes [N, K/32] and their bf16 units per tile of 8 rows);
- `linear_bf16_op`, `linear_int8_op`, `linear_int4_op`: the same as torch custom ops, for compiled graphs.

Each takes x [..., K] of M = x.numel() / K rows (M = 1: a batch-1 decode step; a few rows: a batched
step, each weight row read once for all of them), accumulates in fp32 and rounds once to ``x.dtype``
after adding the bias (and applying the scale) in fp32. The int8 and int4 linears quantize each row of
x to int8 per block of 32 first (kernels/cpu/q8.c: x_i ~ dx * qx_i, dx = max|x| / 127 of the block) and
sum the integer products exactly; bf16 multiplies x as given. A row's result does not depend on M, the
thread count or the CPU's ISA variant (int8, int4) — only on the row.

The library is built on first use (not at import) by `nekomata_core.kernels.cpu.build`, which also decides where it
is cached and which cached library may be loaded. `available()` says whether that worked (x86-64 Linux,
a CPU with AVX2/FMA/F16C, a working ``cc``); `unavailable_reason()` says why not. Nothing here raises at
import.
"""

from __future__ import annotations

import torch

from . import build
from .abi import DTYPE_CODES, INT4_GROUP_SIZE, INT4_TILE_ROWS
from .build import available, library_path, unavailable_reason

__all__ = [
    "available",
    "batch_tiles_available",
    "dequantize_int4",
    "expand_int8",
    "library_path",
    "linear_bf16",
    "linear_bf16_op",
    "linear_int8",
    "linear_int8_op",
    "linear_int4",
    "linear_int4_op",
    "MAX_ROWS",
    "unavailable_reason",
]


def batch_tiles_available() -> bool:
    """True when the int8 and int4 GEMVs of this build multiply many rows in register tiles (the AVX512-VNNI
    variants, `build.TILED_VARIANTS`): then M rows (a prefill) cost less through `linear_int8` /
    `linear_int4` than a float expansion of the weight handed to PyTorch's matmul, on CPUs without bf16
    arithmetic (measured in tools/bench.py; see CpuInt8Linear)."""
    return build.isa() in build.TILED_VARIANTS


# ---------------------------------------------------------------------------------------------- calls
#
# The per-call path is kept lean (a few microseconds in all, most of it torch.empty and ctypes): cheap
# checks first, the error message built only on failure, dtype codes and thread count packed in one int.


def _library():
    lib = build.library()
    if lib is None:
        raise RuntimeError(f"the CPU GEMV kernels are unavailable: {build.unavailable_reason()}")
    return lib


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


# The most rows of x one call takes: the rows' prepared copies live in one buffer of the library (about
# 2 bytes per element for int8/int4 weights, 6 for bf16), and wide products belong to PyTorch's matmul.
MAX_ROWS = 256


def _check_x(x: torch.Tensor, k: int, name: str) -> tuple[torch.Tensor, int]:
    """x made contiguous, and its number of rows M."""
    if not (isinstance(x, torch.Tensor) and x.dtype in DTYPE_CODES and x.is_cpu):
        raise ValueError(f"{name}: x must be a CPU float32/bfloat16/float16 tensor, got {_describe(x)}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{name}: x must end with the {k} input features of the weight, got {_describe(x)}")
    m = x.shape[:-1].numel()
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(
            f"{name}: x must hold 1 to {MAX_ROWS} rows, got {_describe(x)}; "
            "use F.linear (or the module's own forward) for wider products"
        )
    # A few rows are at most a few MB: copying strided ones is cheaper than refusing them.
    return (x if x.is_contiguous() else x.contiguous()), m


def _vector_code(t: torch.Tensor | None, n: int, what: str, name: str) -> int:
    """The dtype code of a bias/scales vector, after checking it (None: no bias, code 0)."""
    if t is None:
        return 0
    code = DTYPE_CODES.get(t.dtype) if isinstance(t, torch.Tensor) else None
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
    """``F.linear(x, weight, bias)``: x [..., K] (fp32/bf16/fp16, 1 to MAX_ROWS rows), weight a
    contiguous bf16 [N, K], bias [N] (fp32/bf16/fp16) or None. Returns [..., N] in x.dtype, accumulated
    in fp32 and rounded once (bias added in fp32 first). Uses torch.get_num_threads() threads.

    Raises ValueError for other shapes, dtypes or layouts (and for inputs requiring grad while grad mode
    is on: there is no backward), RuntimeError when `available()` is False.
    """
    fn = _library().nekomata_gemv_bf16
    _check_weight(weight, torch.bfloat16, "linear_bf16")
    n, k = weight.shape
    x, m = _check_x(x, k, "linear_bf16")
    bias_code = _vector_code(bias, n, "bias", "linear_bf16")
    _check_grad("linear_bf16", x, weight, bias)
    y = _output(x, n)
    code = DTYPE_CODES[x.dtype]
    # the FLAG_* layout of common.h: x, bias, y dtype codes, then the thread count
    flags = code | bias_code << 4 | code << 8 | torch.get_num_threads() << 16
    if fn(
        weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), n, k, m, flags
    ):
        raise MemoryError(f"linear_bf16: cannot allocate the {k}-element activation buffer")
    return y


def linear_int8(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ qweight.T) * scales + bias``: x [..., K] (fp32/bf16/fp16, 1 to MAX_ROWS rows), qweight a
    contiguous int8 [N, K], scales [N] (fp32/bf16/fp16), bias [N] or None. Returns [..., N] in x.dtype:
    each row of x quantized to int8 per block of 32 (see the module docstring), the integer dot products
    summed exactly and scaled in fp32, multiplied by the row scale and the bias added in fp32, then
    rounded once. Uses torch.get_num_threads() threads.

    Raises ValueError for other shapes, dtypes or layouts (and for inputs requiring grad while grad mode
    is on: there is no backward), RuntimeError when `available()` is False.
    """
    fn = _library().nekomata_gemv_int8
    _check_weight(qweight, torch.int8, "linear_int8")
    n, k = qweight.shape
    x, m = _check_x(x, k, "linear_int8")
    if scales is None:
        raise ValueError("linear_int8: scales are required (one per output row)")
    scales_code = _vector_code(scales, n, "scales", "linear_int8")
    bias_code = _vector_code(bias, n, "bias", "linear_int8")
    _check_grad("linear_int8", x, scales, bias)
    y = _output(x, n)
    code = DTYPE_CODES[x.dtype]
    # the FLAG_* layout of common.h: x, bias, y, scales dtype codes, then the thread count
    flags = code | bias_code << 4 | code << 8 | scales_code << 12 | torch.get_num_threads() << 16
    bias_ptr = None if bias is None else bias.data_ptr()
    if fn(qweight.data_ptr(), scales.data_ptr(), x.data_ptr(), bias_ptr, y.data_ptr(), n, k, m, flags):
        raise MemoryError(f"linear_int8: cannot allocate the {k}-element activation buffer")
    return y


def _int4_shape(qweight: torch.Tensor, name: str) -> tuple[int, int]:
    """(N, K) of a packed int4 weight (uint8 [N, K/2], K a multiple of the group size), else ValueError."""
    _check_weight(qweight, torch.uint8, name)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k % INT4_GROUP_SIZE:
        raise ValueError(f"{name}: K = {k} inputs is not a multiple of the int4 group size {INT4_GROUP_SIZE}")
    return n, k


def _int4_scales(
    n: int, k: int, scales: torch.Tensor, mins: torch.Tensor, scale_units: torch.Tensor,
    min_units: torch.Tensor, name: str,
) -> tuple[int, int, int, int]:
    """The data pointers of an int4 weight's scale and min codes and their units, after checking them:
    uint8 and int8 [N, K/G], bf16 [ceil(N/T), K/G] (T = abi.INT4_TILE_ROWS), contiguous, on the CPU."""
    groups, tiles = k // INT4_GROUP_SIZE, -(-n // INT4_TILE_ROWS)
    wanted = (
        ("scales", scales, torch.uint8, (n, groups)),
        ("mins", mins, torch.int8, (n, groups)),
        ("scale_units", scale_units, torch.bfloat16, (tiles, groups)),
        ("min_units", min_units, torch.bfloat16, (tiles, groups)),
    )
    for what, t, dtype, shape in wanted:
        if not (isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == shape
                and t.is_cpu and t.is_contiguous()):  # fmt: skip
            raise ValueError(
                f"{name}: {what} must be a contiguous CPU {dtype} tensor of shape {shape} "
                f"(see nekomata_core.quantize.Int4Linear), got {_describe(t)}"
            )
    return scales.data_ptr(), mins.data_ptr(), scale_units.data_ptr(), min_units.data_ptr()


def linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    scale_units: torch.Tensor,
    min_units: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias``, W[n, k] = code[n, k] * scale[n, k // G] + min[n, k // G] (G =
    abi.INT4_GROUP_SIZE), the scale and min of a group its uint8 / int8 code times its tile's bf16 unit
    (`nekomata_core.quantize.int4_group_scales`): x [..., K] (fp32/bf16/fp16, 1 to MAX_ROWS rows, K a
    multiple of G), qweight a contiguous uint8 [N, K/2] packed as `nekomata_core.quantize.pack_int4`
    does, scales uint8 and mins int8 [N, K/G], scale_units and min_units bf16 [ceil(N/8), K/G], bias [N]
    or None. Returns [..., N] in x.dtype: per group, scale * (codes . qx) * dx with x quantized to int8
    (see the module docstring) plus min * sum(x) with x as given, accumulated in fp32 and rounded once.
    Uses torch.get_num_threads() threads.

    Raises ValueError for other shapes, dtypes or layouts (and for inputs requiring grad while grad mode
    is on), RuntimeError when `available()` is False.
    """
    fn = _library().nekomata_gemv_int4
    n, k = _int4_shape(qweight, "linear_int4")
    x, m = _check_x(x, k, "linear_int4")
    pointers = _int4_scales(n, k, scales, mins, scale_units, min_units, "linear_int4")
    bias_code = _vector_code(bias, n, "bias", "linear_int4")
    _check_grad("linear_int4", x, scale_units, min_units, bias)
    y = _output(x, n)
    code = DTYPE_CODES[x.dtype]
    flags = code | bias_code << 4 | code << 8 | torch.get_num_threads() << 16
    bias_ptr = None if bias is None else bias.data_ptr()
    if fn(qweight.data_ptr(), *pointers, x.data_ptr(), bias_ptr, y.data_ptr(), n, k, m, flags):
        raise MemoryError(f"linear_int4: cannot allocate the {k}-element activation buffer")
    return y


def _expanded_output(out: torch.Tensor | None, n: int, k: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """The [N, K] tensor an expansion writes (fp32 or bf16): `out` after checking it, or a new one."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{name}: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if out is None:
        return torch.empty(n, k, dtype=dtype)
    if not (isinstance(out, torch.Tensor) and out.dtype == dtype and tuple(out.shape) == (n, k) and out.is_contiguous() and out.is_cpu):
        raise ValueError(f"{name}: out must be a contiguous CPU {dtype} tensor of shape {(n, k)}, got {_describe(out)}")
    return out


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    scale_units: torch.Tensor,
    min_units: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight [N, K] in `dtype` (fp32 or bf16) that int4 (qweight, scales, mins, units) stands for:
    each value code * scale + min computed in fp32 and rounded once, i.e. exactly
    `nekomata_core.quantize.dequantize_int4(...).to(dtype)`, in one pass (for prefills, which multiply the
    weight by many rows). Same layouts as `linear_int4` (row 0 starts a tile); uses
    torch.get_num_threads() threads. `out`: a contiguous [N, K] tensor of `dtype` to write into (a reused
    buffer: no allocation per call)."""
    fn = _library().nekomata_dequantize_int4
    n, k = _int4_shape(qweight, "dequantize_int4")
    out = _expanded_output(out, n, k, dtype, "dequantize_int4")
    pointers = _int4_scales(n, k, scales, mins, scale_units, min_units, "dequantize_int4")
    status = fn(qweight.data_ptr(), *pointers, out.data_ptr(), DTYPE_CODES[dtype], n, k, torch.get_num_threads())
    if status:
        raise ValueError(f"dequantize_int4: the library refused the call (status {status})")
    return out


def expand_int8(qweight: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """``qweight.to(dtype)`` for a contiguous int8 [N, K] (fp32 or bf16, exact: int8 values are), in
    vectors over torch.get_num_threads() threads (a prefill converts every int8 weight once). `out`: a
    contiguous [N, K] tensor of `dtype` to write into."""
    fn = _library().nekomata_expand_int8
    _check_weight(qweight, torch.int8, "expand_int8")
    n, k = qweight.shape
    out = _expanded_output(out, n, k, dtype, "expand_int8")
    if fn(qweight.data_ptr(), out.data_ptr(), DTYPE_CODES[dtype], n, k, torch.get_num_threads()):
        raise ValueError(f"expand_int8: the library refused the call for dtype {dtype}")
    return out


# torch.compile sees a ctypes call as an opaque Python call it cannot trace; registered as custom ops,
# the GEMVs become graph nodes, so a compiled step keeps them and fuses everything around them.
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


@torch.library.custom_op("nekomata::linear_int4", mutates_args=())
def linear_int4_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    scale_units: torch.Tensor,
    min_units: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`linear_int4` as a torch custom op (for compiled graphs)."""
    return linear_int4(x, qweight, scales, mins, scale_units, min_units, bias)


@linear_int4_op.register_fake
def _(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    scale_units: torch.Tensor,
    min_units: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
