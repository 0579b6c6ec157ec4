"""A block's elementwise pieces for many rows at once, in C (kernels/cpu/rows.c): for the prefills of
half-precision models on CPUs, where PyTorch runs each of them as several bf16/fp16 elementwise kernels.

- `rms_norm(x, weight, eps)`: Qwen's RMSNorm (quirk 1: rounded to x.dtype before the weight multiply);
- `rotary(x, cos, sin)`: the rotate-half rotary embedding of x [B, T, N, D] (any strides: a view of the
  fused qkv projection) by fp32 tables [1 or B, T, R], into a new contiguous tensor;
- `swiglu(h1, h2)`: ``h1 * silu(h2)`` (Qwen quirk 2: silu on the second argument, rounded first).

The same function as nekomata_core.model's modules, with the same rounding points; a sum of squares in
another order and exp by a polynomial (rows.c) may flip the last bit of an occasional half-precision
value. CPU tensors of fp32, bf16 or fp16, no autograd; torch.get_num_threads() threads. Bad arguments
raise ValueError; `gemv.available()` False raises RuntimeError (see `nekomata_core.kernels.cpu.gemv`).
"""

from __future__ import annotations

import torch

from .abi import DTYPE_CODES
from .gemv import _check_grad, _describe, _library

__all__ = ["rms_norm", "rotary", "swiglu"]

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_act(t: torch.Tensor, what: str, name: str, contiguous: bool = True) -> None:
    if not (
        isinstance(t, torch.Tensor) and t.dtype in _ACT_DTYPES and t.is_cpu and (t.is_contiguous() or not contiguous)
    ):
        need = "a contiguous " if contiguous else "a "
        raise ValueError(f"{name}: {what} must be {need}CPU float32/bfloat16/float16 tensor, got {_describe(t)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``round(round(x * rsqrt(mean(x**2, -1) + eps)) * weight)`` over x's last dim, in x.dtype: x [..., H]
    contiguous, weight [H] of x.dtype."""
    _check_act(x, "x", "rms_norm")
    _check_act(weight, "weight", "rms_norm")
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1] or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1] if x.dim() else '?'}] of x's dtype "
                         f"{x.dtype}, got {_describe(weight)} for x {_describe(x)}")
    _check_grad("rms_norm", x, weight)
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    if rows:
        _library().nekomata_rms_norm_rows(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, hidden, float(eps),
                                          DTYPE_CODES[x.dtype], torch.get_num_threads())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, N, D] (last dim contiguous, other strides any) rotated on its first R dims:
    ``round(x * cos + rotate_half(x) * sin)`` in fp32, dims R..D-1 passed through; cos and sin contiguous
    fp32 [1 or B, T, R], R even and at most D. Returns a new contiguous [B, T, N, D] of x.dtype."""
    _check_act(x, "x", "rotary", contiguous=False)
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"rotary: x must be [B, T, N, D] with a contiguous last dim, got {_describe(x)}")
    b, t, n, d = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        ok = (isinstance(table, torch.Tensor) and table.dtype == torch.float32 and table.is_cpu
              and table.is_contiguous() and table.dim() == 3 and table.shape[0] in (1, b) and table.shape[1] == t
              and table.shape[2] % 2 == 0 and 0 < table.shape[2] <= d)
        if not ok:
            raise ValueError(f"rotary: {name} must be a contiguous CPU float32 tensor [1 or {b}, {t}, R] with R even "
                             f"and at most {d}, got {_describe(table)}")
    if cos.shape != sin.shape:
        raise ValueError(f"rotary: cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    _check_grad("rotary", x)
    out = torch.empty(b, t, n, d, dtype=x.dtype)
    if out.numel():
        _library().nekomata_rotary_rows(
            x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            b, t, n, d, cos.shape[2], int(cos.shape[0] == b and b > 1), DTYPE_CODES[x.dtype], torch.get_num_threads(),
        )
    return out


def swiglu(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """``round(h1 * round(silu(h2)))``, silu(g) = g / (1 + exp(-g)) in fp32: h1 and h2 contiguous, one shape
    and dtype. Returns a new tensor of that shape and dtype."""
    _check_act(h1, "h1", "swiglu")
    _check_act(h2, "h2", "swiglu")
    if h1.shape != h2.shape or h1.dtype != h2.dtype:
        raise ValueError(f"swiglu: h1 and h2 must have one shape and dtype, got {_describe(h1)} and {_describe(h2)}")
    _check_grad("swiglu", h1, h2)
    out = torch.empty_like(h1)
    if out.numel():
        _library().nekomata_swiglu_rows(h1.data_ptr(), h2.data_ptr(), out.data_ptr(), out.numel(),
                                        DTYPE_CODES[h1.dtype], torch.get_num_threads())
    return out
