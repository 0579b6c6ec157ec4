"""Fused RMSNorm with Qwen's rounding: one program normalises one row of H features.

    y = (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype) * weight

Qwen quirk: the normalised value is cast back to the input dtype BEFORE it is multiplied by the weight,
and that product (of two x.dtype values) is rounded to x.dtype again. In bf16 this differs from the
usual "multiply in fp32, round once", so the kernel reproduces both roundings. Tested against
`nekomata_core.model.RMSNorm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import require_triton
from .helpers import to_dtype

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HIDDEN = 65536  # one row must fit in one program's registers


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, x_row_stride, y_row_stride, H, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    mean_square = tl.div_rn(tl.sum(x * x, axis=0), H * 1.0)  # IEEE division (`/` is approximate)
    rstd = tl.rsqrt(mean_square + eps)
    normed = to_dtype(x * rstd, y_ptr.dtype.element_ty)  # first rounding (Qwen casts before the weight)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # The product of two x.dtype numbers is exact in fp32, so rounding it once matches torch's `*`.
    y = to_dtype(normed.to(tl.float32) * w.to(tl.float32), y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * y_row_stride + cols, y, mask=mask)


def launch_config(hidden: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_H, num_warps) for rows of `hidden` features: one row per program, ~16 bytes per thread
    per load (vectorised), 1..16 warps."""
    block_h = triton.next_power_of_2(hidden)
    return block_h, min(max(block_h * dtype.itemsize // (16 * 32 * 2), 1), 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen RMSNorm over the last dim of `x` ([..., H], fp32/bf16/fp16) with `weight` [H] of x's dtype.

    Returns a new contiguous tensor of x's shape and dtype. Rows may be strided (e.g. a slice);
    the last dim is made contiguous if it is not.
    """
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm supports float32/bfloat16/float16 inputs, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("rms_norm needs x with at least one dimension [..., H]")
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight must have shape ({hidden},) to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} must equal x dtype {x.dtype} "
                         "(Qwen multiplies in the model dtype)")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    if not 0 < hidden <= _MAX_HIDDEN:
        raise ValueError(f"rms_norm supports 1 <= H <= {_MAX_HIDDEN}, got H={hidden}")
    require_triton(x.device)

    x2d = x.reshape(-1, hidden)  # [M, H]; a view when possible
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2d = out.view(-1, hidden)
    rows = x2d.shape[0]
    if rows == 0:
        return out
    block_h, num_warps = launch_config(hidden, x.dtype)
    rms_norm_kernel[(rows,)](
        x2d, weight, out2d, x2d.stride(0), out2d.stride(0), hidden, eps,
        BLOCK_H=block_h, num_warps=num_warps, enable_fp_fusion=False,  # bit parity with eager torch
    )
    return out
