"""Prefill flash attention: causal, left-padding aware, with Qwen's logn query scaling.

Queries are the last Tq positions of a key sequence of length Tk = q_start + Tq (the KV-cache prefix
followed by the new tokens): query i sits at absolute position p = q_start + i and attends to key j iff
key_start[b] <= j <= p (causal, and not a left-padding slot of row b). A query with no such key (a pad
query, p < key_start[b]) gets a zero output, never NaN.

Qwen's use_logn_attn: when the total length can exceed S = seq_length, the query at position p is first
multiplied by log(p + 1) / log(S) if p + 1 > S (else by 1), with the factor and the product rounded to
the model dtype as the original does (`query * logn_tensor.type_as(query)`).

Algorithm (FlashAttention-2 forward): one program owns BLOCK_M queries of one (row, head) and streams
BLOCK_N keys at a time with an online softmax in fp32, in base 2 (exp2, log2(e) folded into the scale).
Key blocks that every query of the program may see skip the mask; key blocks no query may see (after
the diagonal, before key_start) are never loaded.

Tested against a plain fp32 softmax attention with `nekomata_core.model`'s logn factors and masks.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..dispatch import require_triton, triton_interpret_enabled
from .helpers import dot, to_dtype

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256  # tl.dot needs >= 16; beyond 256 the tiles leave registers


def logn_scale_factors(positions: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Qwen's logn factor for each absolute query position, as float32 values of `dtype`.

    log(p + 1) / log(S) in float64 when p + 1 > S, else 1 (the original's `math.log(i, S)` table), rounded
    to float32 like its torch.tensor and then to the model dtype like its `.type_as(query)`.
    """
    next_pos = positions.to(torch.float64) + 1
    factors = torch.where(next_pos > seq_length, torch.log(next_pos) / math.log(seq_length), 1.0)
    return factors.to(torch.float32).to(dtype).to(torch.float32)


@triton.jit
def _attend_key_range(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, key_start, seq_k, lo, hi, qk_scale,
    MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with the key blocks in [lo, hi), base-2 logits."""
    offs_d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            in_bounds = (offs_n < seq_k)[:, None]
            k = tl.load(k_ptrs, mask=in_bounds, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        if MASKED:
            # Causal and left padding (keys past seq_k are only visible to the padding queries of the
            # last block, which are never stored, and read as zeros).
            visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] >= key_start)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so that its
            # exp2(-inf - m) is 0 rather than NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new  # every row sees at least one key of an unmasked block
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=in_bounds, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = dot(to_dtype(p, v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i

# Lengths change with every prompt: do not compile a variant per length class.
@triton.jit(do_not_specialize=["seq_q", "seq_k", "q_start"])
def flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, key_start_ptr, logn_ptr,
    stride_qb, stride_qn, stride_qt, stride_kb, stride_kn, stride_kt,
    stride_vb, stride_vn, stride_vt, stride_ob, stride_on, stride_ot,
    n_heads, seq_q, seq_k, q_start, qk_scale,
    HAS_KEY_START: tl.constexpr, HAS_LOGN: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Causal work grows with the query block: launch the last (heaviest) blocks first.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < seq_q
    q_pos = q_start + offs_m  # absolute positions

    q_ptrs = q_ptr + b * stride_qb + h * stride_qn + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if HAS_LOGN:
        # Qwen's logn scaling; the factor is already rounded to q's dtype, the product is rounded too.
        logn = tl.load(logn_ptr + offs_m, mask=row_ok, other=1.0)
        q = to_dtype(q.to(tl.float32) * logn[:, None], q.dtype)
    key_start = 0
    if HAS_KEY_START:
        key_start = tl.maximum(tl.load(key_start_ptr + b).to(tl.int32), 0)

    # Key blocks: [first, full_lo) holds key_start (masked), [full_lo, diag_lo) is visible to every
    # query of the block (no mask), [diag_lo, end) crosses the diagonal (masked); later keys are unseen.
    # When key_start reaches past diag_lo there is no mask-free part: one masked loop over all.
    first_pos = q_start + m_block * BLOCK_M
    end = tl.minimum(first_pos + BLOCK_M, seq_k)
    first = (key_start // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(key_start, BLOCK_N) * BLOCK_N
    diag_lo = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    has_free = full_lo < diag_lo
    lead_hi = tl.where(has_free, full_lo, end)
    free_hi = tl.where(has_free, diag_lo, full_lo)
    tail_lo = tl.where(has_free, diag_lo, end)

    k_base = k_ptr + b * stride_kb + h * stride_kn
    v_base = v_ptr + b * stride_vb + h * stride_vn
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc, l_i, m_i = _attend_key_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos,
                                      key_start, seq_k, first, lead_hi, qk_scale,
                                      True, D, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _attend_key_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos,
                                      key_start, seq_k, full_lo, free_hi, qk_scale,
                                      False, D, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _attend_key_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos,
                                      key_start, seq_k, tail_lo, end, qk_scale,
                                      True, D, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l = 0: a query with no key -> zeros
    o_ptrs = o_ptr + b * stride_ob + h * stride_on + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, to_dtype(out, o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _check_head_dim(head_dim: int, op: str) -> None:
    if not (_MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0):
        raise ValueError(f"{op}: head dim must be a power of two between {_MIN_HEAD_DIM} and {_MAX_HEAD_DIM} "
                         f"(Qwen uses 128), got {head_dim}")


def _check_row_vector(
    name: str, value: torch.Tensor, batch: int, device: torch.device, op: str
) -> torch.Tensor:
    if value.shape != (batch,) or value.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: {name} must be an int32/int64 tensor of shape [B={batch}], got "
                         f"{value.dtype} {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{op}: {name} is on {value.device} but q is on {device}")
    return value.contiguous()


def gpu_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, or None where the kernels run in the Triton interpreter."""
    if device.type != "cuda" or triton_interpret_enabled():
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def prefill_config(
    head_dim: int, dtype: torch.dtype, seq_q: int, capability: tuple[int, int] | None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU of compute `capability` (None: the interpreter)."""
    small_m = max(16, triton.next_power_of_2(seq_q))  # tl.dot needs 16 rows; Tq = 1 is common
    if capability is None:
        return min(32, small_m), 32, 4, 1  # interpreter: small tiles keep numpy quick
    # GPU configs are chosen so that every launch compiles without register spills and within shared
    # memory, checked for D = 128 (the Qwen models) on sm_80 and sm_90 with tools/compile_kernels.py; they
    # are not tuned for speed (not timed on a GPU yet). Per thread, the fp32 accumulator [BLOCK_M, D] and
    # the scores [BLOCK_M, BLOCK_N] must share 255 registers.
    if dtype == torch.float32:
        # Exact fp32 dots run on FMA units, not tensor cores, and need small tiles to fit in registers
        # (32 x 32 tiles spilled ~700 B on sm_90). fp32 on a GPU is a correctness path; the model runs
        # bf16/fp16 there.
        if head_dim <= 64:
            return min(64, small_m), 32, 4, 2
        return min(32 if head_dim <= 128 else 16, small_m), 16, 8, 2
    block_m = min(128 if head_dim <= 128 else 64, small_m)
    wide = head_dim >= 128
    if capability[0] >= 9:  # Hopper: wgmma; one K and one V tile per stage out of 227 KB
        # 64 keys per block spilled 32-104 B from 64 queries up at D = 128.
        block_n = 32 if head_dim > 128 or (wide and block_m >= 64) else 64
        num_warps = 8 if wide and block_m >= 128 else 4
        num_stages = 3 if block_m >= 64 else 2
    else:  # Ampere/Ada: 100-164 KB of shared memory
        # At D = 128, 64 queries need 8 warps (4 spilled 12-36 B) and 128 queries 32-key blocks (64 spilled).
        block_n = 32 if head_dim > 128 or (wide and block_m >= 128) else 64
        num_warps = 8 if block_m >= 128 or (wide and block_m >= 64) else 4
        num_stages = 3 if head_dim <= 64 and block_m >= 64 else 2
    return block_m, block_n, num_warps, num_stages


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int = 0,
    key_start: torch.Tensor | None = None,
    logn_seq_length: int | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of q [B, N, Tq, D] over k, v [B, N, Tk, D] with Tk = q_start + Tq.

    q_start: absolute position of the first query (the number of cached keys before these queries).
    key_start: int32/int64 [B], first real (non left-padding) key of each row; None means 0.
    logn_seq_length: Qwen's seq_length S to apply logn scaling past it; None disables it.
    sm_scale: softmax scale, default 1/sqrt(D).
    Any strides with a unit stride along D are accepted. Returns [B, N, Tq, D] in q's dtype; its memory is
    [B, Tq, N, D]-contiguous so that `out.transpose(1, 2).reshape(B, Tq, N * D)` needs no copy.
    """
    return _flash_attention(q, k, v, q_start=q_start, key_start=key_start, logn_seq_length=logn_seq_length,
                            sm_scale=sm_scale)


def _flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int = 0,
    key_start: torch.Tensor | None = None,
    logn_seq_length: int | None = None,
    sm_scale: float | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """`flash_attention` with an optional (BLOCK_M, BLOCK_N, num_warps, num_stages) for tests and sweeps."""
    op = "flash_attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be [B, N, T, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    batch, n_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != head_dim:
        raise ValueError(f"{op}: k and v must be [B, N, Tk, D] matching q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q_start < 0 or seq_k != q_start + seq_q:
        raise ValueError(f"{op}: expected Tk = q_start + Tq, got Tk={seq_k}, q_start={q_start}, Tq={seq_q}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share one dtype of float32/bfloat16/float16, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    _check_head_dim(head_dim, op)
    if key_start is not None:
        key_start = _check_row_vector("key_start", key_start, batch, q.device, op)
    if logn_seq_length is not None and logn_seq_length < 2:
        raise ValueError(f"{op}: logn_seq_length must be >= 2 (it is a log base), got {logn_seq_length}")
    if batch * n_heads > 65535:
        raise ValueError(f"{op}: B * N = {batch * n_heads} exceeds the grid limit of 65535")
    require_triton(q.device)

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty((batch, seq_q, n_heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    logn = None
    if logn_seq_length is not None and seq_k > logn_seq_length:  # some query lies past S
        positions = torch.arange(q_start, seq_k, device=q.device)
        logn = logn_scale_factors(positions, logn_seq_length, q.dtype)
    block_m, block_n, num_warps, num_stages = config or prefill_config(head_dim, q.dtype, seq_q,
                                                                         gpu_capability(q.device))
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    grid = (triton.cdiv(seq_q, block_m), batch * n_heads)
    flash_attention_kernel[grid](
        q, k, v, out, key_start if key_start is not None else q, logn if logn is not None else q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n_heads, seq_q, seq_k, q_start, scale * _LOG2E,
        HAS_KEY_START=key_start is not None, HAS_LOGN=logn is not None, D=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
    )
    return out
