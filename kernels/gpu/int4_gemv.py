"""One-row matrix-vector product with int4 weights: y = x @ W^T + bias, W[n, k] = code * scale + min.

The layout is that of `nekomata_core.quantize.Int4Linear`: codes two to a byte, uint8 [N, K/2]; in each
group of G = 32 inputs, byte j holds code j in its low nibble and code j + 16 in its high one. A group's
scale and min are 8-bit codes (scales uint8 0..255, mins int8 -127..127, [N, K/G]) times a bf16 unit
shared by a tile of 8 rows (scale_units, min_units [ceil(N/8), K/G]; row n uses tile n // 8):
scale = scales[n, g] * scale_units[n // 8, g], min = mins[n, g] * min_units[n // 8, g], both formed in
fp32, where the product of an 8-bit integer and a bf16 is exact, so every kernel and the PyTorch
reference see the same values. As in gpt-fast's int4 path, a decode step at batch 1 reads each weight
once, so the kernel streams the packed bytes and unpacks them in registers (`& 15`, `>> 4`) instead of
dequantizing a whole matrix: per group, the dot product of the codes with x is scaled once and the min
multiplies the group's sum of x. Products and sums are fp32; the result is rounded once to x's dtype
after the bias.

Each program computes BLOCK_N output rows, walking K in chunks of GROUPS groups ([BLOCK_N, GROUPS, 16]
bytes: 64 bytes per row per chunk with GROUPS = 4, one 128-byte sector pair per two rows). The units
are gathered per row from its tile (rows of one tile read the same address): half a byte per row and
group, against 16 bytes of codes and 2 of scale and min codes.
Tested against the PyTorch dequantized matmul (tests/test_kernels.py), compiled for sm_80/sm_90 by
tools/compile_kernels.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import require_triton
from .helpers import to_dtype

GROUP = 32  # = nekomata_core.quantize.INT4_GROUP_SIZE
TILE_ROWS = 8  # = nekomata_core.quantize.INT4_TILE_ROWS: rows sharing one scale unit and one min unit
BLOCK_N = 32
GROUPS = 4
NUM_WARPS = 4
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def int4_gemv_kernel(x_ptr, w_ptr, scales_ptr, mins_ptr, scale_units_ptr, min_units_ptr, bias_ptr, y_ptr,
                     N, n_groups, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                     TILE_ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    tiles = rows // TILE_ROWS  # [BLOCK_N]: the tile whose units each row uses
    g_in = tl.arange(0, GROUPS)
    j = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(0, n_groups, GROUPS):
        g = g0 + g_in  # [GROUPS]
        g_ok = g < n_groups
        # x of these groups: the first 16 inputs of each pair with the low nibbles, the next 16 the high
        x_off = g[:, None] * 32 + j[None, :]  # [GROUPS, 16]
        x_lo = tl.load(x_ptr + x_off, mask=g_ok[:, None], other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + x_off + 16, mask=g_ok[:, None], other=0.0).to(tl.float32)
        mask = row_ok[:, None, None] & g_ok[None, :, None]
        b_off = rows[:, None, None] * (n_groups * 16) + g[None, :, None] * 16 + j[None, None, :]
        b = tl.load(w_ptr + b_off, mask=mask, other=0).to(tl.int32)  # [BLOCK_N, GROUPS, 16]
        lo = (b & 15).to(tl.float32)
        hi = (b >> 4).to(tl.float32)
        dots = tl.sum(lo * x_lo[None, :, :] + hi * x_hi[None, :, :], axis=2)  # [BLOCK_N, GROUPS]
        sums = tl.sum(x_lo + x_hi, axis=1)  # [GROUPS]
        sm_mask = row_ok[:, None] & g_ok[None, :]
        code_off = rows[:, None] * n_groups + g[None, :]  # [BLOCK_N, GROUPS]
        unit_off = tiles[:, None] * n_groups + g[None, :]  # [BLOCK_N, GROUPS]
        # code (uint8 / int8) x unit (bf16): exact in fp32, the very scale and min of dequantize_int4
        scale = (tl.load(scales_ptr + code_off, mask=sm_mask, other=0).to(tl.float32)
                 * tl.load(scale_units_ptr + unit_off, mask=sm_mask, other=0.0).to(tl.float32))
        minimum = (tl.load(mins_ptr + code_off, mask=sm_mask, other=0).to(tl.float32)
                   * tl.load(min_units_ptr + unit_off, mask=sm_mask, other=0.0).to(tl.float32))
        acc += tl.sum(dots * scale + minimum * sums[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, to_dtype(acc, y_ptr.dtype.element_ty), mask=row_ok)


def int4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    scale_units: torch.Tensor,
    min_units: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for one row x [..., K] (x.numel() == K, fp32/bf16/fp16), W the int4 weight of
    `Int4Linear.int4_tensors()`: qweight uint8 [N, K/2], scales uint8 and mins int8 [N, K/32],
    scale_units and min_units bf16 [ceil(N/8), K/32] (see the module docstring); bias [N] or None.
    Returns [..., N] in x.dtype."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or not qweight.is_contiguous():
        raise ValueError(f"int4_gemv: qweight must be a contiguous 2-D uint8 tensor, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k % GROUP:
        raise ValueError(f"int4_gemv: K = {k} is not a multiple of the group size {GROUP}")
    if x.dtype not in _SUPPORTED_DTYPES or x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"int4_gemv: x must be one row of {k} float32/bfloat16/float16 values, got {x.dtype} "
                         f"{tuple(x.shape)}")
    groups, tiles = (n, k // GROUP), (triton.cdiv(n, TILE_ROWS), k // GROUP)
    # (name, tensor, expected shape, expected dtype, what it is): the layout of Int4Linear.int4_tensors()
    expected = (("scales", scales, groups, torch.uint8, "the scale codes, one per row and group"),
                ("mins", mins, groups, torch.int8, "the min codes, one per row and group"),
                ("scale_units", scale_units, tiles, torch.bfloat16, f"one per tile of {TILE_ROWS} rows and group"),
                ("min_units", min_units, tiles, torch.bfloat16, f"one per tile of {TILE_ROWS} rows and group"))
    for name, t, shape, dtype, what in expected:
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"int4_gemv: {name} must be a contiguous {str(dtype).removeprefix('torch.')} "
                             f"tensor {shape} ({what}), got {t.dtype} {tuple(t.shape)}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}; pass the tensors of "
                             "Int4Linear.int4_tensors() / quantize_int4_weight()")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"int4_gemv: bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    for t in (qweight, scales, mins, scale_units, min_units, bias):
        if t is not None and t.device != x.device:
            raise ValueError(f"int4_gemv: every tensor must be on {x.device}, one is on {t.device}")
    require_triton(x.device)
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    xc = x.reshape(k).contiguous()
    grid = (triton.cdiv(n, BLOCK_N),)
    int4_gemv_kernel[grid](
        xc, qweight, scales, mins, scale_units, min_units, bias if bias is not None else y, y, n, k // GROUP,
        HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, GROUPS=GROUPS, TILE_ROWS=TILE_ROWS, num_warps=NUM_WARPS,
    )
    return y
