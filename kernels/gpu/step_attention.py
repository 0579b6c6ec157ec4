"""Attention of one new query token per row over a long KV cache, split over the keys.

Row b's query is the token at cache index p = kv_len[b] - 1 (it was just written there), and it attends
to the cache entries j in [key_start[b], kv_len[b]) (key_start skips left padding). Qwen's logn scaling
multiplies the query by log(p + 1) / log(S) when p + 1 > S, rounded like the original (see
kernels/gpu/attention.py).

One query per (row, head) is far too little work for a GPU, so the key range of each row is cut into
`num_splits` chunks handled by separate programs (split-K), each writing a normalised partial output and
its log-sum-exp; a second small kernel merges the partials with the usual LSE weights. With one split
the first kernel writes the output directly. Scores and the softmax are computed in fp32 (base 2).

The algorithm is known as flash-decoding (split-K over the keys). Tested against a plain fp32 softmax over the cache rows, with `nekomata_core.model`'s logn factors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dispatch import require_triton
from .attention import _check_head_dim, _check_row_vector, gpu_capability, logn_scale_factors
from .helpers import to_dtype

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 256
_MIN_KEYS_PER_SPLIT = 512  # below this a split's fixed cost (q load, partial write, merge) dominates


# kv_len changes every step: one compiled variant for all values.
@triton.jit(do_not_specialize=["kv_len_value"])
def step_split_kernel(
    q_ptr, k_ptr, v_ptr, kv_len_ptr, key_start_ptr, logn_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_kt, stride_vb, stride_vn, stride_vt,
    stride_ob, stride_on,
    n_heads, t_max, kv_len_value, logn_value, qk_scale, num_splits,
    KV_LEN_PER_ROW: tl.constexpr, HAS_KEY_START: tl.constexpr, LOGN_MODE: tl.constexpr,
    DIRECT: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, D)

    kv_len = kv_len_value
    if KV_LEN_PER_ROW:
        kv_len = tl.minimum(tl.load(kv_len_ptr + b).to(tl.int32), t_max)  # never read past the cache
    key_start = 0
    if HAS_KEY_START:
        key_start = tl.maximum(tl.load(key_start_ptr + b).to(tl.int32), 0)

    q = tl.load(q_ptr + b * stride_qb + h * stride_qn + offs_d)
    # Qwen's logn scaling: factor rounded to q's dtype (done by the launcher), product rounded too.
    if LOGN_MODE == 1:  # one factor for all rows
        q = to_dtype(q.to(tl.float32) * logn_value, q.dtype)
    if LOGN_MODE == 2:  # one factor per row
        q = to_dtype(q.to(tl.float32) * tl.load(logn_ptr + b), q.dtype)
    q = q.to(tl.float32) * qk_scale  # scale and log2(e) folded into q: base-2 logits

    # This split's share of [key_start, kv_len), in whole blocks.
    span = tl.maximum(kv_len - key_start, 0)
    per_split = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    lo = key_start + split * per_split
    hi = tl.minimum(lo + per_split, kv_len)

    k_base = k_ptr + b * stride_kb + h * stride_kn
    v_base = v_ptr + b * stride_vb + h * stride_vn
    # Each of the BLOCK_N key slots keeps its own online softmax (max, sum, weighted values) over the
    # keys start + slot, start + slot + BLOCK_N, ...: the loop needs no reduction across warps (no
    # barrier between loads); the slots are merged once after it.
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < hi
        # Both loads first, so that V streams in while the scores are computed.
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=valid[:, None], other=0.)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=valid[:, None], other=0.)
        scores = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, scores)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slot without keys yet: avoid NaN
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(scores - m_sub)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new

    # Merge the slots: weights 2^(m_slot - m) put them on the common max m.
    m = tl.max(m_i, 0)
    slot_weight = tl.math.exp2(m_i - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(l_i * slot_weight, 0)
    out = tl.sum(acc * slot_weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)  # no key: zeros
    if DIRECT:
        out_ptrs = out_ptr + b * stride_ob + h * stride_on + offs_d
        tl.store(out_ptrs, to_dtype(out, out_ptr.dtype.element_ty))
    else:
        part = bh.to(tl.int64) * num_splits + split
        tl.store(part_o_ptr + part * D + offs_d, out)
        lse = tl.where(total > 0.0, m + tl.math.log2(tl.where(total > 0.0, total, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse)

@triton.jit
def step_merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_on, n_heads, num_splits,
                        D: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    in_range = offs_s < num_splits
    part = bh.to(tl.int64) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=in_range, other=float("-inf"))
    m = tl.max(lse, 0)
    weights = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
    parts = tl.load(part_o_ptr + part[:, None] * D + offs_d[None, :], mask=in_range[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_on + offs_d, to_dtype(out, out_ptr.dtype.element_ty))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(batch: int, n_heads: int, t_max: int, device: torch.device) -> int:
    """Enough splits for ~4 programs per SM, but >= 512 keys each; from static shapes (CUDA-graph safe)."""
    if gpu_capability(device) is None:
        sm_count = 4  # interpreter: a few splits exercise the merge without slowing the tests
    else:
        sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return num_splits_for(batch, n_heads, t_max, sm_count)


def num_splits_for(batch: int, n_heads: int, t_max: int, sm_count: int) -> int:
    """`default_num_splits` on a GPU of `sm_count` multiprocessors."""
    wanted = -(-4 * sm_count // (batch * n_heads))
    return max(1, min(wanted, t_max // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


def step_config(
    head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None
) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel on a GPU of `capability` (None: interpreter)."""
    if capability is None:
        return 32, 4, 1
    # 16 KB K and V tiles per iteration (64 keys at D = 128 in bf16) spread over 8 warps: ~80 registers
    # per thread on sm_90 (tools/compile_kernels.py), so many programs per SM keep loads in flight. The loads
    # do not feed a tl.dot, so triton does not software-pipeline them: num_stages does not matter.
    block_n = max(16, min(128, 16384 // (head_dim * dtype.itemsize)))
    return block_n, 8 if block_n * head_dim >= 4096 else 4, 2


def step_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    kv_len: torch.Tensor | int,
    key_start: torch.Tensor | None = None,
    logn_seq_length: int | None = None,
    sm_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of q [B, N, 1, D] over the caches [B, N, T_max, D] (entries [key_start[b], kv_len[b])).

    kv_len: int or int32/int64 [B] tensor of valid cache entries per row, the current token included
    (values above T_max are clamped in the kernel). key_start: int32/int64 [B] first non-padding entry,
    None means 0. logn_seq_length: Qwen's S for logn scaling at position kv_len - 1; None disables it.
    num_splits: key-range splits per (row, head); None picks one from the static shapes.
    Returns [B, N, 1, D] in q's dtype.
    """
    return _step_attention(q, k_cache, v_cache, kv_len=kv_len, key_start=key_start,
                             logn_seq_length=logn_seq_length, sm_scale=sm_scale, num_splits=num_splits)


def _step_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    kv_len: torch.Tensor | int,
    key_start: torch.Tensor | None = None,
    logn_seq_length: int | None = None,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """`step_attention` with an optional (BLOCK_N, num_warps, num_stages) for tests and sweeps."""
    op = "step_attention"
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"{op}: q must be [B, N, 1, D] (one token per row), got {tuple(q.shape)}")
    batch, n_heads, _, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[:2] != q.shape[:2] \
            or k_cache.shape[3] != head_dim:
        raise ValueError(f"{op}: k_cache and v_cache must both be [B, N, T_max, D] matching q "
                         f"{tuple(q.shape)}, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    t_max = k_cache.shape[2]
    if q.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"{op}: q and the caches must share one dtype of float32/bfloat16/float16, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"{op}: q and the caches must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    _check_head_dim(head_dim, op)
    per_row = isinstance(kv_len, torch.Tensor)
    if per_row:
        kv_len = _check_row_vector("kv_len", kv_len, batch, q.device, op)
    elif not 1 <= kv_len <= t_max:
        raise ValueError(f"{op}: kv_len must be in 1..T_max={t_max}, got {kv_len}")
    if key_start is not None:
        key_start = _check_row_vector("key_start", key_start, batch, q.device, op)
    if logn_seq_length is not None and logn_seq_length < 2:
        raise ValueError(f"{op}: logn_seq_length must be >= 2 (it is a log base), got {logn_seq_length}")
    if num_splits is not None and not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"{op}: num_splits must be in 1..{_MAX_SPLITS}, got {num_splits}")
    if batch * n_heads > 2**31 - 1:
        raise ValueError(f"{op}: B * N = {batch * n_heads} is too large")
    require_triton(q.device)

    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{op}: the caches need a unit stride along their last (head) dim")
    out = torch.empty((batch, n_heads, 1, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    # logn factors: LOGN_MODE 0 none, 1 one scalar (int kv_len), 2 one per row (tensor kv_len).
    logn_mode, logn_value, logn = 0, 1.0, None
    if logn_seq_length is not None:
        if not per_row and kv_len > logn_seq_length:
            logn_mode = 1
            logn_value = float(logn_scale_factors(torch.tensor([kv_len - 1]), logn_seq_length, q.dtype))
        elif per_row and t_max > logn_seq_length:  # some row may lie past S
            logn_mode, logn = 2, logn_scale_factors(kv_len - 1, logn_seq_length, q.dtype)

    if num_splits is None:
        num_splits = default_num_splits(batch, n_heads, t_max, q.device)
    block_n, num_warps, num_stages = config or step_config(head_dim, q.dtype, gpu_capability(q.device))
    direct = num_splits == 1
    if direct:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty((batch * n_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch * n_heads, num_splits), dtype=torch.float32, device=q.device)
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    step_split_kernel[(batch * n_heads, num_splits)](
        q, k_cache, v_cache, kv_len if per_row else q, key_start if key_start is not None else q,
        logn if logn is not None else q, out, part_o, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        n_heads, t_max, 0 if per_row else kv_len, logn_value, scale * _LOG2E, num_splits,
        KV_LEN_PER_ROW=per_row, HAS_KEY_START=key_start is not None, LOGN_MODE=logn_mode,
        DIRECT=direct, D=head_dim, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
        enable_fp_fusion=True,
    )
    if not direct:
        step_merge_kernel[(batch * n_heads,)](
            part_o, part_lse, out, out.stride(0), out.stride(1), n_heads, num_splits,
            D=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4, enable_fp_fusion=True,
        )
    return out
