"""Weight quantization: int8 (per output channel) and int4 (groups of 32 inputs). The modules here (the
reference, and what GPUs run) multiply in the activation dtype; on a CPU, decode steps go through the C
GEMVs of kernels/cpu, which quantize each activation row to int8 per block of 32 as well
(kernels/cpu/q8.c: the integer products are exact and 64 of them take one VNNI instruction) and
prefills expand the weights for PyTorch's matmul.

Decoding one token reads every weight once, so at batch 1 speed is set by the bytes of the weights:
int8 halves them against bf16, int4 nearly quarters them.

int8: per output channel `scale = max|w_row| / 127` and `q = round(w / scale)`, so `w ≈ q · scale` with
an error of at most scale / 2 per weight.

int4 (`Int4Linear`): each group of 32 consecutive inputs of a row has a scale and a min, and
`w ≈ q · scale + min`, q in 0..15. The scale and min of a group are not simply (max - min) / 15 and
the minimum: as llama.cpp's Q4_K does (make_qkx2_quants), 21 trial grids are rounded and for each the
(scale, min) solving the weighted least-squares fit to the rounded codes is computed; the best fit
wins (`_int4_fit`). The scales and mins are then stored in 8 bits each, as codes times a unit shared
by a tile of 8 rows (Q4_K's "superblock" idea, with 8-bit codes where Q4_K has 6):

    scale[n, g] = scales[n, g] (uint8, 0..255)   · scale_units[n // 8, g] (bf16)
    min[n, g]   = mins[n, g]   (int8, -127..127) · min_units[n // 8, g]   (bf16)

with the units max(scale) / 255 and max |min| / 127 of the tile's 8 groups g. A product of a bf16 and
an 8-bit integer is exact in fp32, so every kernel sees the very same fp32 scale and min. Codes are
then re-rounded against those. Bytes: 4 bits of code + 16 bits of scale and min per 32 weights + 32
bits of units per 8 × 32 = 4.625 bits a weight (bf16 scales and mins cost 5.0). Why tiles of rows
rather than Q4_K's 8 consecutive groups of a row: a tensor-parallel split of a row-parallel layer cuts
rows between ranks in whole groups, which may split a run of 8 groups (nekomata-14b's 13696-wide MLP
over 2 ranks), but never a tile of rows, since column-parallel layers split whole heads or multiples of
8 rows; so a rank's int4 weights are always exactly those of the same rows and groups in one process.
Two weights per byte: in each group's 16 bytes, byte j holds code j (low nibble) and code j + 16
(high), so a kernel unpacks a 16-byte load into two runs of 16 codes in x's natural order.
The fused q/k/v projection `c_attn` is split by rows (`Int4QkvLinear`): its q and k rows are int4
like the rest, its v rows stay int8 per output channel. Why v: an error in a value row reaches the
block's output directly, while q and k errors only nudge the attention scores before the softmax,
and the table below shows it (llama.cpp's Q4_K_M, likewise, spends its extra bits on attn_v and
attn_qkv). The output head is int4 like the rest (Q4_K_M: 6 bits).

How the format was chosen (bench-620m random weights, init as tools/make_tiny_checkpoint.py, one
48-token input, mean |Δlogit| vs the fp32 model of a prefill; llama.cpp Q4_K_M: 0.160, Q4_0: 0.208).
Relative RMS weight error on a N(0, 0.02) [1024, 4096] matrix, min/max rule → searched: group 32:
0.0783 → 0.0706, group 64: 0.0896 → 0.0831. Whole model (bits per int4 weight):

    all int4, bf16 scale and min per 32            0.177   (5.00)
    all int4, 8-bit codes in tiles of 8 rows       0.172   (4.625)
    c_attn int8, rest bf16 scale and min per 32    0.144   (5.00)
    c_attn int8, rest 8-bit codes, tiles of rows   0.142   (4.625)   (format version 2)
    c_attn int8, rest 8-bit codes, runs of 8 groups 0.142  (4.625)
    c_attn and lm_head int8, rest 8-bit codes      0.138
    all int8                                       0.019   (8.01)

and, the rest 8-bit codes in tiles of rows, which rows of c_attn need int8 (same input, 620M):

    q, k and v int8 (version 2)                    0.1424
    q and k int8, v int4                           0.1714
    q int4, k and v int8                           0.1431
    q and k int4, v int8                           0.1437    ← chosen (version 3): ≤ Q4_K_M's 0.160

so v alone carries what int8 bought; with q and k in int4, a nekomata-7b decode step reads 4.25 GB
instead of 4.70 (c_attn 36 MB a block instead of 50).

Group 64 (4.5 bits with bf16 scales) loses 18 % in weight rmse against group 32; 8-bit codes of the
scales and mins cost nothing measurable against bf16 ones.

Formats with fewer bytes, tried and not taken. At batch 1 a decode step's speed is its bytes, and this
format reads 4.33 GB a nekomata-7b token against Q4_K_M's ~4.56 (1.05x fewer). Each candidate below
was measured by fake quantization: every weight replaced by its dequantized value in a bf16 model,
then the same 48-token prefill as above (v3 gives 0.1432 that way). "NL4" is a non-uniform 4-bit code
(llama.cpp's IQ4_NL idea): w = scale · level[q] with 16 fixed levels, the Lloyd-Max levels of random
groups of 32 divided by their largest-magnitude weight, one signed 8-bit scale code per group, tiles
of 8 rows: 4.3125 bits. "affine5": this format's search with 5-bit codes, 5.625 bits.

    rest NL4, v int8                               0.1487   4.07 GB a 7B token
    rest NL4, v NL4                                0.1748   3.83 GB   (> Q4_K_M's 0.160)
    rest NL4, v affine5                            0.1550   3.91 GB
    rest NL4, v affine6                            0.1526   3.97 GB
    rest as v3, v affine5                          0.1483   4.17 GB
    rest uniform 4-bit, scale only, v int8         0.1686   4.07 GB   (> Q4_K_M's 0.160)

The best of them within Q4_K_M's error reads 3.91 GB (1.17x fewer bytes than Q4_K_M) for two new
kernel formats and 8 % more error than v3; where both programs stream at the memory's speed that
would not make a 1.2x lead, so v3 stays. The levels also come from Gaussian weights, the very
distribution these random checkpoints have: on real checkpoints their gain is unmeasured here.

A quantized model can be saved (`save_quantized`) as a normal checkpoint folder whose config.json
carries `"quantization": {"method": "int8_weight_only", ...}` (or "int4_weight_only" with its
"group_size"); `QwenForCausalLM.from_pretrained` then builds the quantized layers directly and loads
them without re-quantizing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import loader
from .backends import QUANTIZE_CHOICES
from .config import ConfigError
from .errors import NekomataError

QUANT_METHOD = "int8_weight_only"
INT4_METHOD = "int4_weight_only"
QUANTIZE_CHUNK_ROWS = 4096
# The int4 search (`_int4_fit`) runs ~300 elementwise passes per chunk: chunks of 256K weights keep its
# temporaries (1 MB each) in cache. On 2 cores of an Ice Lake Xeon, [2816, 4096]: 1.9 s against 3.0 s
# for chunks of 4M weights (64K: 2.2 s, the per-op overhead takes over). Each group is fitted alone, so
# the chunk changes no value.
INT4_FIT_CHUNK_WEIGHTS = 256 * 1024

# int4 format (see "int4" in the module docstring): groups of INT4_GROUP_SIZE consecutive weights along
# the input dimension. Mirrored as NK_INT4_GROUP in kernels/cpu/common.h (= abi.INT4_GROUP_SIZE).
INT4_GROUP_SIZE = 32
INT4_MAX = 15
# Scales and mins are 8-bit codes times a bf16 unit shared by a tile of INT4_TILE_ROWS rows (mirrored as
# NK_INT4_TILE in kernels/cpu/common.h = abi.INT4_TILE_ROWS): scale codes 0..255, min codes -127..127.
INT4_TILE_ROWS = 8
INT4_SCALE_CODES, INT4_MIN_CODES = 255, 127
INT4_UNIT_DTYPE = torch.bfloat16
# The format of save_quantized's int4 folders (config.json's quantization.version): 3 = 8-bit codes and
# tile units, c_attn's q and k rows int4 and its v rows int8. Not read any more: version 2 (the same
# codes, all of c_attn int8) and version 1 (bf16 scales and mins per group, c_attn and lm_head int8).
INT4_FORMAT_VERSION = 3
# The scale search of llama.cpp's make_qkx2_quants (as Q4_K calls it): trial inverse scales
# (15 + INT4_SEARCH_RMIN + INT4_SEARCH_DELTA * i) / (max - min) for i = 0..INT4_SEARCH_STEPS.
INT4_SEARCH_RMIN, INT4_SEARCH_DELTA, INT4_SEARCH_STEPS = -1.0, 0.1, 20


class QuantizeError(NekomataError):
    """A layer cannot be quantized in the format asked for (the message says which and what to do)."""


class Int8Linear(nn.Module):
    """y = (x @ q^T) · scale + bias, with q int8 [out, in] and scale [out] in the activation dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Parameters (frozen) rather than buffers, so the loader and state_dict treat them like weights.
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, row_absmax: torch.Tensor | None = None) -> Int8Linear:
        """The int8 form of a linear. `row_absmax` [out]: max |w| of each whole row when this linear
        holds only some of each row's columns (a row-parallel shard), so the scales are those of the
        whole layer; None = this weight's own rows."""
        weight = linear.weight.detach()
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        # A few thousand rows at a time: an fp32 copy of a whole lm_head would cost 2.5 GB for 7B.
        for rows in torch.arange(weight.shape[0], device=weight.device).split(QUANTIZE_CHUNK_ROWS):
            block = weight[rows[0] : rows[-1] + 1].float()
            absmax = block.abs().amax(dim=1) if row_absmax is None else row_absmax[rows[0] : rows[-1] + 1].float()
            block_scales = absmax.clamp(min=1e-12) / 127.0  # [rows] per output channel
            q[rows[0] : rows[-1] + 1] = (
                torch.round(block / block_scales[:, None]).clamp(-127, 127).to(torch.int8)
            )
            scales[rows[0] : rows[-1] + 1] = block_scales
        out_features, in_features = weight.shape  # a shard's own shape, not the layer's
        module = cls(in_features, out_features, linear.bias is not None, weight.dtype)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.scales = nn.Parameter(scales.to(weight.dtype), requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x.device.type == "cpu":
            # PyTorch's fused CPU kernel reads the int8 weight once and scales in registers.
            y = torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), self.weight, self.scales.to(x.dtype))
        else:
            y = F.linear(x2d, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


# ---------------------------------------------------------------------------------------------------- int4


def _int4_fit(x: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and min [R] of each group x [R, G] (fp32) minimising the weighted squared error
    sum_i w_i (scale * q_i + min - x_i)^2, with q_i = clamp(round((x_i - min) / scale), 0, 15).

    The search of llama.cpp's make_qkx2_quants: start from the min/max grid, then for each trial grid
    (inverse scale (15 + rmin + delta * i) / (max - min), anchored at the group minimum) round every
    weight and solve the 2x2 weighted least-squares problem for (scale, min) given those integers;
    keep whichever has the smallest error. The weights w_i = rms(x) + |x_i| favour large weights, which
    dominate the products (Q4_K's choice without an importance matrix).
    """
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    span = (hi - lo).clamp(min=1e-30)
    w = x.pow(2).mean(dim=1, keepdim=True).sqrt() + x.abs()  # [R, G]
    sum_w, sum_x = w.sum(dim=1), (w * x).sum(dim=1)
    best_scale, best_min = span / INT4_MAX, lo.clone()
    q = torch.round((x - lo[:, None]) / best_scale[:, None]).clamp_(0, INT4_MAX)
    best_err = (w * (q * best_scale[:, None] + lo[:, None] - x).pow(2)).sum(dim=1)
    for i in range(steps + 1):
        inverse = (INT4_MAX + INT4_SEARCH_RMIN + INT4_SEARCH_DELTA * i) / span
        q = torch.round((x - lo[:, None]) * inverse[:, None]).clamp_(0, INT4_MAX)
        wq = w * q
        sum_q, sum_q2, sum_xq = wq.sum(dim=1), (wq * q).sum(dim=1), (wq * x).sum(dim=1)
        det = sum_w * sum_q2 - sum_q * sum_q
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        scale = (sum_w * sum_xq - sum_x * sum_q) / det
        minimum = (sum_q2 * sum_x - sum_q * sum_xq) / det
        err = (w * (q * scale[:, None] + minimum[:, None] - x).pow(2)).sum(dim=1)
        better = ok & (err < best_err) & (scale > 0)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, minimum, best_min)
        best_err = torch.where(better, err, best_err)
    flat = hi == lo  # a constant group: every weight is its min
    return torch.where(flat, torch.zeros_like(best_scale), best_scale), torch.where(flat, lo, best_min)


def int4_codes(x: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The nearest 4-bit codes of groups x [R, G] for the given (already rounded) scales and mins [R]."""
    s, m = scales.float()[:, None], mins.float()[:, None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, torch.round((x - m) / safe), torch.zeros_like(x)).clamp_(0, INT4_MAX)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) → bytes [N, K // 2]: in each group of G, byte j holds code j in its low
    nibble and code j + G/2 in its high one (so a 16-byte load unpacks into two runs of 16 in order)."""
    n, k = q.shape
    g = q.to(torch.uint8).reshape(n, k // INT4_GROUP_SIZE, 2, INT4_GROUP_SIZE // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: bytes [N, K // 2] → codes [N, K] (uint8)."""
    n, half = packed.shape
    g = packed.reshape(n, half * 2 // INT4_GROUP_SIZE, 1, INT4_GROUP_SIZE // 2)
    return torch.cat((g & 15, g >> 4), dim=2).reshape(n, half * 2)


def int4_tiles(n: int) -> int:
    """The tiles of INT4_TILE_ROWS rows of an int4 weight with n rows (the last one may be short)."""
    return -(-n // INT4_TILE_ROWS)


def _tile_units(values: torch.Tensor, codes: int) -> torch.Tensor:
    """The unit [T, G] (bf16) of each tile's 8 rows of values [N, G] (fp32): max |value| / codes."""
    n, groups = values.shape
    padded = torch.zeros(int4_tiles(n) * INT4_TILE_ROWS, groups, dtype=values.dtype, device=values.device)
    padded[:n] = values.abs()
    return (padded.reshape(-1, INT4_TILE_ROWS, groups).amax(dim=1) / codes).to(INT4_UNIT_DTYPE)


def _per_row(units: torch.Tensor, n: int) -> torch.Tensor:
    """Units [T, G] → [n, G] fp32: row r takes its tile's (r // INT4_TILE_ROWS)."""
    return units.float().repeat_interleave(INT4_TILE_ROWS, dim=0)[:n]


def _to_codes(values: torch.Tensor, units: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """round(values / unit) clamped to [low, high] (0 where the unit is 0: the tile is all zeros)."""
    unit = _per_row(units, values.shape[0])
    safe = torch.where(unit > 0, unit, torch.ones_like(unit))
    return torch.where(unit > 0, torch.round(values / safe), torch.zeros_like(values)).clamp_(low, high)


def int4_group_scales(
    scales: torch.Tensor, mins: torch.Tensor, scale_units: torch.Tensor, min_units: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 scale and min [N, G] of every group: code × its tile's unit (exact in fp32)."""
    n = scales.shape[0]
    return scales.float() * _per_row(scale_units, n), mins.float() * _per_row(min_units, n)


def quantize_int4_weight(
    weight: torch.Tensor, steps: int = INT4_SEARCH_STEPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scales uint8 [N, K/G], mins int8 [N, K/G], scale_units and min_units bf16
    [ceil(N/8), K/G]) of a float weight [N, K] (see "int4" in the module docstring).

    Scale and min are searched in fp32 (`_int4_fit`), stored as 8-bit codes of their tile's units, and
    the 4-bit codes then re-rounded against the stored values, so the codes are the nearest ones for
    what the kernels will actually use. Rows are fitted a block of whole tiles at a time.
    """
    n, k = weight.shape
    if k % INT4_GROUP_SIZE:
        raise QuantizeError(
            f"int4 quantization groups {INT4_GROUP_SIZE} input features; a linear with {k} inputs is not a "
            f"multiple of {INT4_GROUP_SIZE}: quantize this model with quantize='int8' instead"
        )
    groups, device = k // INT4_GROUP_SIZE, weight.device
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(n, groups, dtype=torch.uint8, device=device)
    mins = torch.empty(n, groups, dtype=torch.int8, device=device)
    scale_units = torch.empty(int4_tiles(n), groups, dtype=INT4_UNIT_DTYPE, device=device)
    min_units = torch.empty(int4_tiles(n), groups, dtype=INT4_UNIT_DTYPE, device=device)
    rows = max(1, INT4_FIT_CHUNK_WEIGHTS // max(k, 1)) // INT4_TILE_ROWS * INT4_TILE_ROWS
    rows = max(rows, INT4_TILE_ROWS)
    for begin in range(0, n, rows):
        end = min(begin + rows, n)
        x = weight[begin:end].float().reshape(-1, INT4_GROUP_SIZE)  # [rows * groups, G]
        s, m = (t.reshape(end - begin, groups) for t in _int4_fit(x, steps))
        su, mu = _tile_units(s, INT4_SCALE_CODES), _tile_units(m, INT4_MIN_CODES)
        sc = _to_codes(s, su, 0, INT4_SCALE_CODES)
        mc = _to_codes(m, mu, -INT4_MIN_CODES, INT4_MIN_CODES)
        s_fp32, m_fp32 = int4_group_scales(sc, mc, su, mu)
        q = int4_codes(x, s_fp32.reshape(-1), m_fp32.reshape(-1)).reshape(end - begin, k)
        packed[begin:end] = pack_int4(q)
        scales[begin:end], mins[begin:end] = sc.to(torch.uint8), mc.to(torch.int8)
        tiles = slice(begin // INT4_TILE_ROWS, int4_tiles(end))
        scale_units[tiles], min_units[tiles] = su, mu
    return packed, scales, mins, scale_units, min_units


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    scale_units: torch.Tensor,
    min_units: torch.Tensor,
) -> torch.Tensor:
    """The fp32 weight [N, K] that int4 (packed, scales, mins, units) stands for: q * scale + min per
    group, scale and min as `int4_group_scales` gives them. The rows start at a tile's first row."""
    n = packed.shape[0]
    s, m = int4_group_scales(scales, mins, scale_units, min_units)
    q = unpack_int4(packed).float().reshape(n, s.shape[1], INT4_GROUP_SIZE)
    return (q * s[:, :, None] + m[:, :, None]).reshape(n, -1)


def blocked_matmul(
    x: torch.Tensor,
    out_features: int,
    dtype: torch.dtype,
    expand: Callable[[int, int], torch.Tensor],
    block_rows: int,
    row_scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W^T (times `row_scales` per output, then + bias) computed in `dtype` and rounded once to x.dtype,
    with W's rows [begin, end) expanded by `expand(begin, end)` (→ [end - begin, K] of `dtype`),
    `block_rows` rows at a time: the wide products of quantized layers, never a whole float copy of W."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).to(dtype)
    y = torch.empty(x2d.shape[0], out_features, dtype=dtype, device=x.device)
    for begin in range(0, out_features, block_rows):
        end = min(begin + block_rows, out_features)
        y[:, begin:end] = x2d @ expand(begin, end).T
    if row_scales is not None:
        y *= row_scales.to(dtype)
    if bias is not None:
        y += bias.to(dtype)
    return y.to(x.dtype).reshape(*shape[:-1], out_features)


class Int4Linear(nn.Module):
    """y = x @ W^T + bias with W = q * scale + min per group of INT4_GROUP_SIZE inputs (q 4-bit).

    weight: uint8 [out, in / 2] (two codes per byte, see pack_int4); scales uint8 and mins int8 [out, in / G],
    the codes of each group's scale and min; scale_units, min_units bf16 [ceil(out / 8), in / G], the
    units of each tile of 8 rows (`int4_group_scales`); bias [out] or None in the activation dtype. The
    forward is exact with respect to the dequantized weight: fp32 products and sums, one rounding to the
    activation dtype at the end.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if in_features % INT4_GROUP_SIZE:
            raise QuantizeError(
                f"int4 needs in_features divisible by {INT4_GROUP_SIZE}, got {in_features}; use int8 instead"
            )
        self.in_features, self.out_features = in_features, out_features
        groups, tiles = in_features // INT4_GROUP_SIZE, int4_tiles(out_features)

        def frozen(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            # Parameters (frozen) rather than buffers, so the loader and state_dict treat them like weights.
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.weight = frozen(out_features, in_features // 2, dtype=torch.uint8)
        self.scales = frozen(out_features, groups, dtype=torch.uint8)
        self.mins = frozen(out_features, groups, dtype=torch.int8)
        self.scale_units = frozen(tiles, groups, dtype=INT4_UNIT_DTYPE)
        self.min_units = frozen(tiles, groups, dtype=INT4_UNIT_DTYPE)
        self.bias = frozen(out_features, dtype=dtype) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        """The int4 form of a linear (or of a tensor-parallel shard of one: its groups and tiles are
        whole, and each is fitted from its own weights only, so a shard gets exactly the codes, scales,
        mins and units of the same groups in the whole layer)."""
        weight = linear.weight.detach()
        out_features, in_features = weight.shape  # a shard's own shape, not the layer's
        module = cls(in_features, out_features, linear.bias is not None, weight.dtype)
        for name, tensor in zip(module.INT4_TENSORS, quantize_int4_weight(weight), strict=True):
            setattr(module, name, nn.Parameter(tensor, requires_grad=False))
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    #: The tensors of the format, in the order of quantize_int4_weight, dequantize_int4 and the kernels.
    INT4_TENSORS = ("weight", "scales", "mins", "scale_units", "min_units")
    #: Floating-point tensors whose dtype is the format's, not the activations' (the loader keeps it).
    FORMAT_DTYPES = {"scale_units": INT4_UNIT_DTYPE, "min_units": INT4_UNIT_DTYPE}

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's own signature)
        # The units are bf16 by the format, whatever the activation dtype: model.float() or .half() convert
        # the floating-point parameters, so put the units back as they were (moved to the new device only).
        units = {name: getattr(self, name).data for name in self.FORMAT_DTYPES}  # (the old tensors:
        # nn.Module converts a parameter in place, by assigning its .data)
        super()._apply(fn, recurse)
        for name, before in units.items():
            device = getattr(self, name).device
            setattr(self, name, nn.Parameter(before.to(device), requires_grad=False))
        return self

    def int4_tensors(self, begin: int = 0, end: int | None = None) -> tuple[torch.Tensor, ...]:
        """(packed, scales, mins, scale_units, min_units) of rows [begin, end); begin starts a tile."""
        end = self.out_features if end is None else end
        if begin % INT4_TILE_ROWS:
            raise ValueError(f"int4 rows are taken from a tile's first row (a multiple of {INT4_TILE_ROWS})")
        tiles = slice(begin // INT4_TILE_ROWS, int4_tiles(end))
        return (self.weight[begin:end], self.scales[begin:end], self.mins[begin:end],
                self.scale_units[tiles], self.min_units[tiles])

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight [out, in] this layer computes with."""
        return dequantize_int4(*self.int4_tensors())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocked_matmul(x, torch.float32, dequantize_int4)

    def blocked_matmul(
        self,
        x: torch.Tensor,
        dtype: torch.dtype,
        dequantize: Callable[..., torch.Tensor],
        block_rows: int | None = None,
    ) -> torch.Tensor:
        """x @ W^T + bias computed in `dtype` and rounded once to x.dtype, with W expanded by
        `dequantize(packed, scales, mins, scale_units, min_units)` (→ `dtype`) `block_rows` rows at a
        time (default: ~4M weights; a multiple of the tile): never a whole copy."""
        step = block_rows or max(1, QUANTIZE_CHUNK_ROWS * 1024 // max(self.in_features, 1))
        step = max(INT4_TILE_ROWS, step // INT4_TILE_ROWS * INT4_TILE_ROWS)

        def expand(begin: int, end: int) -> torch.Tensor:
            return dequantize(*self.int4_tensors(begin, end))

        return blocked_matmul(x, self.out_features, dtype, expand, step, bias=self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of "
            f"{INT4_GROUP_SIZE}, 8-bit scales in tiles of {INT4_TILE_ROWS} rows"
        )


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


class Int4QkvLinear(nn.Module):
    """The fused q/k/v projection (c_attn) of an int4 model: y = cat(qk(x), v(x)), the q and k rows
    [2·out/3, in] in int4 (`qk`, an Int4Linear) and the v rows [out/3, in] in int8 per output channel
    (`v`, an Int8Linear), each with its part of the bias. The output is the same [q; k; v] layout an
    nn.Linear c_attn gives. Why v stays int8 and q and k do not: see "int4" in the module docstring.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if out_features % 3:
            raise QuantizeError(f"c_attn has {out_features} rows, not q, k and v of one size each (a multiple of 3)")
        self.in_features, self.out_features = in_features, out_features
        third = out_features // 3
        self.qk = Int4Linear(in_features, 2 * third, bias, dtype)
        self.v = Int8Linear(in_features, third, bias, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4QkvLinear:
        """The int4/int8 form of a c_attn (or of a tensor-parallel shard of one, whose rows are the q, k
        and v rows of its heads: the same split applies, and every int4 tile and int8 row is fitted from
        its own weights only, so a shard gets exactly those rows of the whole layer's form)."""
        weight, bias = linear.weight.detach(), linear.bias
        out_features, in_features = weight.shape
        third = out_features // 3
        module = cls(in_features, out_features, bias is not None, weight.dtype)

        def rows(begin: int, end: int) -> nn.Linear:  # a view of those rows, shaped like a linear
            part = nn.Linear(in_features, end - begin, bias=bias is not None, device="meta")
            part.weight = nn.Parameter(weight[begin:end], requires_grad=False)
            if bias is not None:
                part.bias = nn.Parameter(bias.detach()[begin:end], requires_grad=False)
            return part

        module.qk = Int4Linear.from_linear(rows(0, 2 * third))
        module.v = Int8Linear.from_linear(rows(2 * third, out_features))
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight [out, in] this layer computes with ([q; k] rows, then v rows)."""
        return torch.cat((self.qk.dequantized_weight(), self.v.dequantized_weight().float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.qk(x), self.v(x)), dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, q and k int4, v int8"


def _quantized_class(method: str, name: str) -> type[nn.Module]:
    if method == "int4":
        return Int4QkvLinear if name.rpartition(".")[2] == "c_attn" else Int4Linear
    return Int8Linear


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a loaded model by an Int8Linear, in place, one layer at a time."""
    for name in _linear_names(model):
        quantize_linear(model, name)
    return model


def quantize_int4(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a loaded model by an Int4Linear (c_attn: an Int4QkvLinear), in place,
    one layer at a time."""
    for name in _linear_names(model):
        quantize_linear(model, name, "int4")
    return model


def quantize_linear(
    model: nn.Module, name: str, method: str = "int8", row_absmax: torch.Tensor | None = None
) -> None:
    """Replace the nn.Linear called `name` by its quantized form (the float weight is then freed).

    `row_absmax`: for tensor parallelism, max |w| of each whole row when this process holds only some of
    its columns (int8 per-channel scales must be those of the whole row; see Int8Linear.from_linear).
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    cls = _quantized_class(method, name)
    linear = getattr(parent, leaf)
    setattr(parent, leaf, cls.from_linear(linear, row_absmax) if cls is Int8Linear else cls.from_linear(linear))


class QuantizeOnLoad:
    """`after_tensor` callback for `loader.load_weights`: each nn.Linear is quantized as soon as all of
    its tensors are loaded, so a float copy of the whole model never exists (peak memory: the int8
    model plus one float layer, instead of the whole float model; a bf16 nekomata-14b needs 28 GB,
    its int8 form 15 GB). `method` is "int8" or "int4"."""

    def __init__(
        self,
        model: nn.Module,
        method: str = "int8",
        row_absmax: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    ) -> None:
        if method not in QUANTIZE_CHOICES:
            raise ValueError(f"method={method!r}; choose one of {list(QUANTIZE_CHOICES)}")
        self.model = model
        self.method = method
        self.linears = set(_linear_names(model))
        # For tensor parallelism: (name, weight) → max |w| of each whole row when the rows are split
        # across processes, else None (see Int8Linear.from_linear).
        self.row_absmax = row_absmax
        if method == "int4":  # refuse before any tensor is read, not halfway through the load
            for name in self.linears:
                linear = model.get_submodule(name)
                if linear.in_features % INT4_GROUP_SIZE:
                    raise QuantizeError(
                        f"int4 quantization groups {INT4_GROUP_SIZE} inputs, but {name} has "
                        f"{linear.in_features}; load this model with quantize='int8' instead"
                    )

    def __call__(self, tensor_name: str) -> None:
        module_name = tensor_name.rpartition(".")[0]
        if module_name not in self.linears:
            return
        module = self.model.get_submodule(module_name)
        if any(p.is_meta for p in module.parameters()):
            return  # its other tensor (weight or bias) is still to come
        absmax = None  # only int8's per-row scales depend on columns another rank may hold
        if self.row_absmax is not None and _quantized_class(self.method, module_name) is Int8Linear:
            absmax = self.row_absmax(module_name, module.weight)
        quantize_linear(self.model, module_name, self.method, absmax)
        self.linears.discard(module_name)


def convert_to_quantized_structure(model: nn.Module, dtype: torch.dtype, method: str = "int8") -> nn.Module:
    """Swap every nn.Linear for an empty quantized layer (on the meta device): the shape of a saved
    int8 or int4 checkpoint, ready for the loader."""
    for name in _linear_names(model):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, leaf)
        with torch.device("meta"):
            setattr(
                parent,
                leaf,
                _quantized_class(method, name)(
                    linear.in_features, linear.out_features, linear.bias is not None, dtype
                ),
            )
    return model


def check_saved_int8_codes(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Refuse int8 weights that hold -128: our int8 codes are -127..127 (symmetric around 0, as
    `Int8Linear.from_linear` rounds them), and the CPU kernels rely on it (they move the activation's
    sign onto the weight, and -(-128) does not fit a byte). A file with -128 was not written by
    save_quantized."""
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear) and module.weight.device.type != "meta":
            if bool((module.weight == -128).any()):
                raise QuantizeError(
                    f"{folder}: the int8 weight of {name} holds -128, outside the -127..127 range of "
                    "nekomata_core's int8 format (save_quantized never writes it); quantize the float "
                    "checkpoint again (quantize='int8') instead of loading this file"
                )


# The config.json method names save_quantized writes, and the `quantize` choice each stands for.
_METHODS = {QUANT_METHOD: "int8", INT4_METHOD: "int4"}


def quantization_of(config_extra: dict) -> str | None:
    """The quantization recorded in a config.json ("int8", "int4", or None for a plain checkpoint)."""
    info = config_extra.get("quantization")
    if info is None:
        return None
    if not isinstance(info, dict) or info.get("method") not in _METHODS:
        raise ConfigError(
            f"config.json has quantization={info!r}; nekomata_core reads only "
            f"{{'method': '{QUANT_METHOD}'}} or {{'method': '{INT4_METHOD}', 'group_size': "
            f"{INT4_GROUP_SIZE}}} checkpoints written by save_quantized"
        )
    if info["method"] == INT4_METHOD and (
        info.get("group_size") != INT4_GROUP_SIZE or info.get("version") != INT4_FORMAT_VERSION
    ):
        raise ConfigError(
            f"config.json has an int4 checkpoint with group_size={info.get('group_size')!r} and format "
            f"version={info.get('version', 1)!r}; this version of nekomata_core reads group_size "
            f"{INT4_GROUP_SIZE}, version {INT4_FORMAT_VERSION} only (8-bit scale codes in tiles of "
            f"{INT4_TILE_ROWS} rows): quantize the float checkpoint again (quantize='int4') and save that"
        )
    return _METHODS[info["method"]]


class SaveError(NekomataError):
    """`save_quantized` cannot write where it was asked to (the message names the folder and the fix)."""


# What save_quantized writes, and the files it copies from the source checkpoint.
_SAVED_FILES = ("config.json", "model.safetensors")
_COPIED_FILES = ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json")
# Hidden siblings of the target: `.NAME.tmp-PID-XXXX` (a save being written) and `.NAME.old-PID-XXXX`
# (the previous checkpoint, moved aside for the instant of the swap).
_SIBLING_KINDS = ("tmp", "old")


def save_quantized(
    model: nn.Module, out_dir: str | os.PathLike[str], source_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Write an int8 or int4 model as a checkpoint folder (config.json, model.safetensors, and the tokenizer /
    generation_config.json copied from `source_dir` when given); returns the folder.

    The folder appears whole or not at all. Everything is written into a hidden sibling
    (``.NAME.tmp-…``, same parent, so the final rename stays on one file system), flushed to disk, then
    renamed to `out_dir`. An existing `out_dir` (an earlier checkpoint, or an empty folder) is renamed
    aside (``.NAME.old-…``), the new folder renamed in, then the old one deleted: at any instant
    `out_dir` is the old checkpoint, the new one, or — only between those two renames, if the process
    is killed right there — absent, with the old checkpoint intact in ``.NAME.old-…``. A failed save
    removes its sibling; one killed outright leaves only hidden siblings, which the next save into the
    same folder deletes (those whose process is gone).

    Refused before anything is written (SaveError): saving into the folder the model was loaded from
    (`model.checkpoint_dir` or `source_dir`: it holds the float weights) or into a folder that contains
    it, and replacing a folder that is not a checkpoint (it has no config.json, or holds sub-folders).
    """
    if not any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        raise SaveError(
            "the model has no quantized layers; quantize it first (quantize_int8 / quantize_int4, or "
            "quantize='int8' / 'int4')"
        )
    out = Path(os.path.abspath(out_dir))
    sources = [Path(d) for d in (getattr(model, "checkpoint_dir", None), source_dir) if d is not None]
    _check_target(out, sources)

    config = model.config.to_dict()
    if any(isinstance(m, Int4Linear) for m in model.modules()):
        config["quantization"] = {
            "method": INT4_METHOD,
            "version": INT4_FORMAT_VERSION,
            "bits": 4,
            "group_size": INT4_GROUP_SIZE,
            "granularity": "per_group_scale_and_min",
            "scale_codes": {"bits": 8, "unit_dtype": "bfloat16", "tile_rows": INT4_TILE_ROWS},
            "int8_per_output_channel": ["c_attn.v"],  # the v rows of c_attn (Int4QkvLinear)
        }
    else:
        config["quantization"] = {"method": QUANT_METHOD, "bits": 8, "granularity": "per_output_channel"}
    for flag, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        config[flag] = model.dtype == dt

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "tmp"), dir=out.parent))
    try:
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
        loader.save_safetensors(state, tmp / "model.safetensors")
        del state
        if source_dir is not None:
            for name in _COPIED_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copyfile(Path(source_dir) / name, tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700; a checkpoint folder is an ordinary folder
        _fsync_tree(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sibling_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def _check_target(out: Path, sources: list[Path]) -> None:
    """Refuse, before anything is written, a target that would destroy the source or a non-checkpoint."""
    real_out = Path(os.path.realpath(out))
    for source in sources:
        real_source = Path(os.path.realpath(source))
        same = real_out == real_source or (out.exists() and source.exists() and os.path.samefile(out, source))
        if same or real_out in real_source.parents:
            where = "is" if same else "contains"
            raise SaveError(
                f"save_quantized: {str(out)!r} {where} the folder the model was loaded from "
                f"({str(source)!r}); saving there would replace its float weights. Save into a new "
                "folder instead, e.g. a sibling named '<model>-int8'."
            )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise SaveError(
            f"save_quantized: {str(out)!r} exists and is not a folder; choose a new folder or remove it"
        )
    entries = list(out.iterdir())
    if not entries:
        return
    # The target is replaced as a whole, so it must be something save_quantized may replace.
    folders = sorted(e.name for e in entries if e.is_dir() and not e.is_symlink())
    if folders or not (out / "config.json").is_file():
        why = f"it holds the sub-folder(s) {folders[:3]}" if folders else "it has no config.json"
        raise SaveError(
            f"save_quantized: {str(out)!r} is not a checkpoint folder ({why}); the target is replaced as "
            "a whole, so choose a new or empty folder, or an earlier save_quantized checkpoint"
        )
    for source in sources:  # a folder of links into the source checkpoint (e.g. a Hub snapshot)
        for entry in entries:
            for name in (*_SAVED_FILES, *_COPIED_FILES):
                candidate = source / name
                if candidate.exists() and entry.exists() and os.path.samefile(entry, candidate):
                    raise SaveError(
                        f"save_quantized: {str(entry)!r} is the same file as {str(candidate)!r} of the "
                        "checkpoint the model was loaded from; save into a new folder instead"
                    )


def _remove_stale_siblings(out: Path) -> None:
    """Delete the hidden siblings left by saves into `out` that were killed (their process is gone)."""
    for kind in _SIBLING_KINDS:
        for sibling in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*-*"):
            pid_text = sibling.name[len(f".{out.name}.{kind}-") :].partition("-")[0]
            if pid_text.isdigit() and not _process_alive(int(pid_text)):
                shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    """Flush the files and the folder, so that after the rename a crash cannot leave empty files."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is renamed aside first and deleted last."""
    old: Path | None = None
    if out.exists():
        # mkdtemp reserves a unique name; rename (a directory over an empty directory) then takes it.
        old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "old"), dir=out.parent))
        os.rename(out, old)
    try:
        os.rename(new, out)  # the instant the new checkpoint appears
    except BaseException:
        if old is not None:
            os.rename(old, out)  # put the previous checkpoint back
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
