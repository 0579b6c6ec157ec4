"""Fused SwiGLU product of Qwen's MLP: `a * silu(b)` in one pass over memory.

Qwen quirk: in `c_proj(w1(x) * silu(w2(x)))` it is **w2** that is gated, so the caller passes
a = w1(x) (linear branch) and b = w2(x) (gate branch).

Rounding matches eager PyTorch in bf16/fp16: `silu(b)` is computed in fp32 and rounded to the dtype
(torch's silu kernel), then the product of the two dtype values is computed in fp32 and rounded (torch's
`*`). Rows may be strided, so `a` and `b` can be the two halves of one fused [..., 2F] projection.
Tested against the expression of `nekomata_core.model.MLP`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import require_triton
from .helpers import exp, to_dtype

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 elements (16 bytes of bf16)
NUM_WARPS = 4


@triton.jit
def swiglu_kernel(a_ptr, b_ptr, out_ptr, a_row_stride, b_row_stride, out_row_stride, n_cols,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(a_ptr + row * a_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * b_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    # silu(b) = b / (1 + exp(-b)) in fp32 with an accurate exp and an IEEE division, as torch's silu
    # kernel computes it, then rounded to the dtype.
    silu_b = to_dtype(tl.div_rn(b, 1.0 + exp(-b)), out_ptr.dtype.element_ty).to(tl.float32)
    out = to_dtype(a * silu_b, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, out, mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [M, F] with a unit stride along F (copies only when that is impossible)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return `a * silu(b)` (a = w1(x) linear branch, b = w2(x) gate branch), shape and dtype of `a`.

    a and b: same shape [..., F], same dtype (fp32/bf16/fp16), same device. The output is contiguous.
    """
    if a.shape != b.shape:
        raise ValueError(f"swiglu: a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"swiglu: a and b must share one dtype of float32/bfloat16/float16, got {a.dtype} "
                         f"and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"swiglu: a is on {a.device} but b is on {b.device}")
    if a.dim() == 0:
        raise ValueError("swiglu needs tensors with at least one dimension [..., F]")
    require_triton(a.device)

    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    a2d, b2d, out2d = _as_rows(a), _as_rows(b), out.view(-1, a.shape[-1])  # [M, F]
    n_rows, n_cols = out2d.shape
    grid = (n_rows, triton.cdiv(n_cols, BLOCK))
    swiglu_kernel[grid](
        a2d, b2d, out2d, a2d.stride(0), b2d.stride(0), out2d.stride(0), n_cols,
        BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,  # bit parity with eager torch
    )
    return out
