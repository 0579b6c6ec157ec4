"""Fused rotary position embedding for q and k in one launch (Qwen's "rotate half" layout).

For the first R = rotary_dim features of every head, split x[..., :R] into halves (x1, x2) and compute, in
float32 from the upcast input,

    out = x * cos + cat(-x2, x1) * sin          (then cast back to the input dtype)

while features R..D pass through unchanged. cos/sin are float32 [Bc, T, R] tables (Bc = 1, or B when each
row has its own dynamic-NTK alpha). One program handles one token and a block of heads of both q and k,
so every cos/sin row is read once. q and k may be strided views (e.g. slices of a fused qkv projection
[B, T, 3, N, D]); optionally the rotated k is written straight into a KV cache [B, N, T_max, D].

Tested against `nekomata_core.model.apply_rotary`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import require_triton
from .helpers import to_dtype

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, x_base, out_base, x_head_stride, out_head_stride, heads, dims,
                  partner, sign, cos, sin, n_heads, D: tl.constexpr, R: tl.constexpr):
    """Rotate a [BLOCK_N heads, BLOCK_D] tile of one token; features >= R are copied."""
    head_mask = (heads < n_heads)[:, None]
    in_rot = (dims < R)[None, :]
    x_ptrs = x_ptr + x_base + heads[:, None] * x_head_stride
    x = tl.load(x_ptrs + dims[None, :], mask=head_mask & (dims < D)[None, :], other=0.0).to(tl.float32)
    # The rotate-half partner of feature d (-x2 for the first half, x1 for the second), loaded directly.
    x_partner = tl.load(x_ptrs + partner[None, :], mask=head_mask & in_rot, other=0.0).to(tl.float32)
    # Two products and a sum, each rounded like the three eager torch ops (launched without FMA fusion).
    rotated = x * cos[None, :] + (sign[None, :] * x_partner) * sin[None, :]
    out = tl.where(in_rot, rotated, x)
    out_ptrs = out_ptr + out_base + heads[:, None] * out_head_stride + dims[None, :]
    tl.store(out_ptrs, to_dtype(out, out_ptr.dtype.element_ty), mask=head_mask & (dims < D)[None, :])

@triton.jit
def rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    T, n_heads,
    q_stride_b, q_stride_t, q_stride_n, k_stride_b, k_stride_t, k_stride_n,
    cos_stride_b, cos_stride_t, sin_stride_b, sin_stride_t,
    qo_stride_b, qo_stride_t, qo_stride_n, ko_stride_b, ko_stride_t, ko_stride_n, ko_t_offset,
    D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    half: tl.constexpr = R // 2
    partner = tl.where(dims < half, dims + half, dims - half)
    sign = tl.where(dims < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + b * cos_stride_b + t * cos_stride_t + dims, mask=dims < R, other=1.0)
    sin = tl.load(sin_ptr + b * sin_stride_b + t * sin_stride_t + dims, mask=dims < R, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, b * q_stride_b + t * q_stride_t, b * qo_stride_b + t * qo_stride_t,
                  q_stride_n, qo_stride_n, heads, dims, partner, sign, cos, sin, n_heads, D, R)
    # k goes to k_out [B, T, N, D], or into the cache [B, N, T_max, D] at time offset ko_t_offset.
    _rotate_heads(k_ptr, k_out_ptr, b * k_stride_b + t * k_stride_t,
                  b * ko_stride_b + (t + ko_t_offset) * ko_stride_t,
                  k_stride_n, ko_stride_n, heads, dims, partner, sign, cos, sin, n_heads, D, R)


def launch_config(n_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N heads per program, num_warps): ~4K elements per program per tensor, i.e. all 32
    heads of a 128-dim model in one program."""
    block_d = triton.next_power_of_2(head_dim)
    block_n = min(triton.next_power_of_2(n_heads), max(4096 // block_d, 1))
    return block_d, block_n, 4 if block_n * block_d <= 2048 else 8


def _check_qk(name: str, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"apply_rope: {name} must be [B, T, N, D], got shape {tuple(x.shape)}")
    if x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
        raise ValueError(f"apply_rope: q and k must share shape, dtype and device; got q {tuple(ref.shape)} "
                         f"{ref.dtype} {ref.device} and k {tuple(x.shape)} {x.dtype} {x.device}")
    return x if x.stride(-1) == 1 else x.contiguous()


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    rotary_dim: int | None = None,
    k_cache: torch.Tensor | None = None,
    cache_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k ([B, T, N, D], any strides with a unit stride along D) in one launch.

    cos, sin: float32 [Bc, T, R] with Bc in {1, B} and R = rotary_dim (even, <= D; default D).
    Returns (q_out, k_out) as new contiguous [B, T, N, D] tensors of the input dtype. When `k_cache`
    ([B, N, T_max, D], same dtype) and `cache_start` are given, the rotated k is written into
    k_cache[:, :, cache_start:cache_start + T, :] instead and k_out is None.
    """
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"apply_rope supports float32/bfloat16/float16 q and k, got {q.dtype}")
    q = _check_qk("q", q, q)
    k = _check_qk("k", k, q)
    batch, seq, n_heads, head_dim = q.shape
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"apply_rope: rotary_dim must be even and in 2..{head_dim} (the head dim), "
                         f"got {rotary_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32:
            raise ValueError(f"apply_rope: {name} must be float32 (RoPE is computed in fp32), "
                             f"got {table.dtype}")
        if table.device != q.device:
            raise ValueError(f"apply_rope: {name} is on {table.device} but q is on {q.device}")
        if table.dim() != 3 or table.shape[0] not in (1, batch) or table.shape[1:] != (seq, rotary_dim):
            raise ValueError(f"apply_rope: {name} must be [1 or B={batch}, T={seq}, R={rotary_dim}], "
                             f"got {tuple(table.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if (k_cache is None) != (cache_start is None):
        raise ValueError("apply_rope: pass both k_cache and cache_start, or neither")
    if k_cache is not None:
        if (k_cache.dim() != 4 or k_cache.shape[0] != batch or k_cache.shape[1] != n_heads
                or k_cache.shape[3] != head_dim):
            raise ValueError(f"apply_rope: k_cache must be [B={batch}, N={n_heads}, T_max, D={head_dim}], "
                             f"got {tuple(k_cache.shape)}")
        if k_cache.dtype != k.dtype or k_cache.device != k.device:
            raise ValueError(f"apply_rope: k_cache ({k_cache.dtype}, {k_cache.device}) must match k "
                             f"({k.dtype}, {k.device})")
        if k_cache.stride(-1) != 1:
            raise ValueError("apply_rope: k_cache needs a unit stride along its last (head) dim")
        if not 0 <= cache_start <= k_cache.shape[2] - seq:
            raise ValueError(f"apply_rope: cache_start={cache_start} with T={seq} does not fit the cache of "
                             f"length {k_cache.shape[2]}")
    require_triton(q.device)

    q_out = torch.empty((batch, seq, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if k_cache is None:
        k_out = torch.empty_like(q_out)
        # k_out viewed as [B, T, N, D] with strides (b, t, n); no time offset.
        ko_strides = (k_out.stride(0), k_out.stride(1), k_out.stride(2))
        ko_t_offset, k_target = 0, k_out
    else:
        k_out = None
        # The cache is [B, N, T_max, D]: its (b, t, n) strides are (stride 0, stride 2, stride 1).
        ko_strides = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
        ko_t_offset, k_target = cache_start, k_cache
    if q_out.numel() == 0:
        return q_out, k_out

    block_d, block_n, num_warps = launch_config(n_heads, head_dim)
    # Bc = 1: every row reads table row 0 (stride 0).
    cos_stride_b = cos.stride(0) if cos.shape[0] == batch else 0
    sin_stride_b = sin.stride(0) if sin.shape[0] == batch else 0
    grid = (batch * seq, triton.cdiv(n_heads, block_n))
    rope_kernel[grid](
        q, k, cos, sin, q_out, k_target,
        seq, n_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos_stride_b, cos.stride(1), sin_stride_b, sin.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), *ko_strides, ko_t_offset,
        D=head_dim, R=rotary_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=num_warps,
        enable_fp_fusion=False,  # keep x*cos + r*sin as two rounded products and a rounded sum, like torch
    )
    return q_out, k_out
