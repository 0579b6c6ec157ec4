"""The Triton kernels of `kernels/gpu/` agree with the ops of `nekomata_core.model`, and dispatch is sane.

References: `model.RMSNorm` for rms_norm, `model.apply_rotary` for apply_rope, MLP's `a * silu(b)` for
swiglu; attention has no standalone op in model.py, so a plain fp32 softmax attention here (with
`model.logn_scale` and the causal/padding mask) is the reference of both attention kernels.

On CPU (CI) the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set for this module only),
which is exact but slow, so shapes are small. With NEKOMATA_TEST_DEVICE=cuda the same tests run compiled
on the GPU, plus a few at realistic sizes.

Tolerances: fp32 within 1e-5 (abs and rel). rmsnorm, swiglu and rope in bf16/fp16: within 1 ulp of the
reference (bit-exact so far in the interpreter), except fp16 swiglu (2 ulp, see its test); on the GPU,
where torch's reductions sum in another order, rmsnorm/swiglu may differ by <= 2 ulp on < 0.1% of the
elements (rounding-tie flips). Attention: bf16 within 2e-2 and fp16 within 4e-3 (abs and rel: the
kernels round the softmax weights to the dtype before the PV product, as SDPA does).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = torch.device(os.environ.get("NEKOMATA_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"

# triton decides between interpreter and compiler for its own library functions when it is imported, and
# for each kernel when it is decorated (when nekomata_core.kernels.gpu.* is imported), so on CPU TRITON_INTERPRET=1 must
# be set before the first `import triton` of the process and around the kernel imports. Set it around
# those imports only (the `triton_interpreter` fixture sets it again while this module's tests run).
_saved_interpret = os.environ.get("TRITON_INTERPRET")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from nekomata_core.kernels import dispatch  # noqa: E402

    # False when another module imported triton before us without the variable: then the kernel tests
    # run in a fresh process instead (test_kernels_in_a_fresh_interpreter_process).
    KERNELS_RUN = ON_GPU or dispatch.triton_unavailable_reason(DEVICE) is None
    from nekomata_core.kernels.gpu.attention import _flash_attention, flash_attention
    from nekomata_core.kernels.gpu.int4_gemv import int4_gemv
    from nekomata_core.kernels.gpu.rmsnorm import rms_norm
    from nekomata_core.kernels.gpu.rope import apply_rope
    from nekomata_core.kernels.gpu.step_attention import step_attention
    from nekomata_core.kernels.gpu.swiglu import swiglu
finally:
    if _saved_interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret

from nekomata_core.kernels.dispatch import KernelUnavailableError, resolve_backend, triton_unavailable_reason  # noqa: E402

from nekomata_core.model import RMSNorm, apply_rotary, logn_scale  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOW_PRECISION = (torch.bfloat16, torch.float16)
ATTENTION_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN, reason="triton was imported before TRITON_INTERPRET=1 was set; covered by "
    "test_kernels_in_a_fresh_interpreter_process")


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """Run the kernels in the Triton interpreter on CPU; set before the first kernel is built."""
    if ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two bf16/fp16 tensors (sign-magnitude bits mapped to a line)."""
    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int16).int()
        magnitude = bits & 0x7FFF
        return torch.where(bits < 0, -magnitude, magnitude)

    return (ordered(actual) - ordered(expected)).abs()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, max_ulp: int = 1) -> None:
    """fp32: within 1e-5; bf16/fp16: within `max_ulp` units in the last place."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    else:
        worst = int(ulp_distance(actual, expected).max()) if actual.numel() else 0
        assert worst <= max_ulp, f"{worst} ulp apart (allowed {max_ulp})"


def assert_nearly_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Millions of elements: at most 1 in 1000 differ, by at most 2 ulp.

    A different fp32 summation order (the mean square) or exp can move an fp32 intermediate across a
    rounding tie, changing the rounded intermediate by 1 ulp; multiplying by a second operand and
    rounding again can turn that into 2 ulp of the result.
    """
    assert_matches(actual, expected, max_ulp=2)
    assert (actual != expected).float().mean().item() < 1e-3


def assert_reduced_op_matches(actual: torch.Tensor, expected: torch.Tensor, cpu_max_ulp: int = 1) -> None:
    """rmsnorm/swiglu: `assert_matches` in the interpreter; on the GPU torch's own kernels sum in another
    order, so allow the rare tie flips of `assert_nearly_bit_exact`."""
    if ON_GPU and actual.dtype != torch.float32:
        assert_nearly_bit_exact(actual, expected)
    else:
        assert_matches(actual, expected, max_ulp=cpu_max_ulp)


# --- References: the ops of nekomata_core.model, or plain fp32 formulas where it has none ----------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`model.RMSNorm` with `weight` (of x's dtype, as in a loaded model)."""
    norm = RMSNorm(x.shape[-1], eps).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.apply_rotary` on q and k; the rotary dim is the tables' last dim."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`model.MLP`'s product w1(x) * silu(w2(x)), with a = w1(x) and b = w2(x) (the gate)."""
    return a * torch.nn.functional.silu(b)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int = 0,
    key_start: torch.Tensor | None = None,
    logn_seq_length: int | None = None,
) -> torch.Tensor:
    """Plain fp32 matmul/softmax attention with an explicit boolean mask; pad query rows give zeros.

    The logn factors are `model.logn_scale`'s, rounded to the dtype and multiplied in as the model does.
    """
    batch, _, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    positions = torch.arange(q_start, q_start + seq_q, device=q.device)  # absolute query positions
    if logn_seq_length is not None:
        q = q * logn_scale(positions, logn_seq_length).to(q.dtype)[:, None]  # [B, N, Tq, D] * [Tq, 1]
    scores = (q.float() @ k.float().transpose(-1, -2)) * head_dim**-0.5  # [B, N, Tq, Tk]
    keys = torch.arange(seq_k, device=q.device)
    visible = keys[None, :] <= positions[:, None]  # [Tq, Tk] causal
    if key_start is not None:
        not_padding = keys[None, :] >= key_start.to(q.device).long()[:, None]  # [B, Tk]
        visible = visible[None, :, :] & not_padding[:, None, :]  # [B, Tq, Tk]
    visible = visible.expand(batch, seq_q, seq_k)[:, None]  # [B, 1, Tq, Tk]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # rows with no key: zeros, not NaN
    return (probs @ v.float()).to(q.dtype)


def step_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    kv_len: torch.Tensor | int,
    key_start: torch.Tensor | None = None,
    logn_seq_length: int | None = None,
) -> torch.Tensor:
    """Row by row, the query at position kv_len - 1 over cache entries [0, kv_len): `attention_reference`."""
    batch = q.shape[0]
    lengths = [kv_len] * batch if isinstance(kv_len, int) else [int(n) for n in kv_len.tolist()]
    rows = []
    for b, length in enumerate(lengths):
        start = None if key_start is None else key_start[b:b + 1]
        rows.append(attention_reference(q[b:b + 1], k_cache[b:b + 1, :, :length], v_cache[b:b + 1, :, :length],
                                        q_start=length - 1, key_start=start, logn_seq_length=logn_seq_length))
    return torch.cat(rows)


def assert_attention_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    tol = ATTENTION_TOL[actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


# --- RMSNorm --------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 16), (17, 64), (2, 3, 130), (3, 4096)])
def test_rms_norm_matches_reference_within_one_ulp(dtype, shape):
    torch.manual_seed(0)
    x, weight = randn(*shape, dtype=dtype, scale=3.0), randn(shape[-1], dtype=dtype)
    assert_reduced_op_matches(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


@needs_kernels
def test_rms_norm_reads_strided_rows():
    torch.manual_seed(0)
    wide = randn(5, 7, 96, dtype=torch.bfloat16)
    x = wide[:, :, :64]  # rows 96 apart
    weight = randn(64, dtype=torch.bfloat16)
    assert_reduced_op_matches(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))


@needs_kernels
def test_rms_norm_casts_before_the_weight_like_qwen():
    # Qwen rounds the normalised value to bf16 before multiplying by the weight; rounding once at the end
    # gives different bits somewhere in this tensor, and the kernel must not.
    torch.manual_seed(1)
    x, weight = randn(64, 256, dtype=torch.bfloat16), randn(256, dtype=torch.bfloat16, scale=3.0)
    x_float = x.float()
    single_rounding = (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + 1e-6)
                       * weight.float()).to(torch.bfloat16)
    ours = rms_norm(x, weight, 1e-6)
    assert not torch.equal(single_rounding, rms_norm_reference(x, weight, 1e-6))
    assert_reduced_op_matches(ours, rms_norm_reference(x, weight, 1e-6))


def test_rms_norm_rejects_bad_inputs():
    x = randn(4, 32)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, randn(16), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x, randn(32, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        rms_norm(x.double(), randn(32).double(), 1e-6)


# --- SwiGLU ---------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (17, 130), (2, 5, 64)])
def test_swiglu_matches_reference_within_one_ulp(dtype, shape):
    # The product step is exact; silu(b) is rounded from an fp32 value whose exp may differ from torch's
    # CPU exp by an fp32 ulp, which can flip a near-tie to the neighbouring fp16 value (1 ulp of silu,
    # up to 2 ulp of the product). bf16 stays within 1 ulp; on CUDA both use the same expf.
    torch.manual_seed(0)
    a, b = randn(*shape, dtype=dtype, scale=4.0), randn(*shape, dtype=dtype, scale=4.0)
    assert_reduced_op_matches(swiglu(a, b), swiglu_reference(a, b), 2 if dtype == torch.float16 else 1)


@needs_kernels
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter
def test_swiglu_gates_b_and_handles_extremes():
    # b is the gate (Qwen's w2): swiglu(a, b) = a * silu(b), not b * silu(a); exp(-b) may overflow.
    b = torch.tensor([[-100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 3.0]], device=DEVICE)
    a = torch.full_like(b, 2.0)
    assert_reduced_op_matches(swiglu(a, b), a * torch.nn.functional.silu(b))
    assert torch.isfinite(swiglu(a, b)).all()


@needs_kernels
def test_swiglu_reads_the_halves_of_a_fused_projection():
    torch.manual_seed(0)
    fused = randn(3, 9, 2 * 80, dtype=torch.bfloat16, scale=3.0)  # [B, T, 2F]: w1 | w2 outputs
    a, b = fused[..., :80], fused[..., 80:]
    assert_reduced_op_matches(swiglu(a, b), swiglu_reference(a, b))


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(randn(4, 8), randn(4, 9))
    with pytest.raises(ValueError, match="dtype"):
        swiglu(randn(4, 8), randn(4, 8, dtype=torch.bfloat16))


# --- RoPE -----------------------------------------------------------------------------------------------


def rope_tables(rows: int, seq: int, rotary_dim: int, base: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen's cos/sin [rows, T, R]; each row gets its own base (as per-row NTK alpha would)."""
    tables = []
    for row in range(rows):
        inv_freq = 1.0 / ((base * (1 + 2 * row)) ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim))
        freqs = torch.outer(torch.arange(seq).double() + 5 * row, inv_freq)
        tables.append(torch.cat((freqs, freqs), dim=-1))
    angles = torch.stack(tables).float().to(DEVICE)
    return angles.cos(), angles.sin()


ROPE_CASES = [  # (B, T, N, D, R, Bc)
    (2, 17, 3, 32, 32, 1),
    (2, 17, 3, 64, 32, 2),  # partial rotary, per-row tables
    (1, 1, 2, 16, 16, 1),  # T = 1
    (2, 5, 2, 128, 128, 2),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
def test_rope_matches_reference_within_one_ulp(dtype, case):
    batch, seq, heads, head_dim, rotary_dim, table_rows = case
    torch.manual_seed(0)
    qkv = randn(batch, seq, 3, heads, head_dim, dtype=dtype, scale=3.0)  # fused c_attn output
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # strided views
    cos, sin = rope_tables(table_rows, seq, rotary_dim)
    q_out, k_out = apply_rope(q, k, cos, sin, rotary_dim=rotary_dim)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    assert_matches(q_out, q_ref)
    assert_matches(k_out, k_ref)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])  # pass-through dims untouched


@needs_kernels
@pytest.mark.parametrize("table_rows", [1, 2])
def test_rope_writes_rotated_k_into_the_cache(table_rows):
    torch.manual_seed(0)
    batch, seq, heads, head_dim, cache_len, start = 2, 6, 3, 32, 16, 7
    q, k = randn(batch, seq, heads, head_dim, dtype=torch.bfloat16), randn(batch, seq, heads, head_dim,
                                                                           dtype=torch.bfloat16)
    cos, sin = rope_tables(table_rows, seq, 24)
    k_cache = torch.zeros(batch, heads, cache_len, head_dim, dtype=torch.bfloat16, device=DEVICE)
    q_out, k_out = apply_rope(q, k, cos, sin, rotary_dim=24, k_cache=k_cache, cache_start=start)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    assert k_out is None
    assert_matches(q_out, q_ref)
    assert_matches(k_cache[:, :, start:start + seq], k_ref.transpose(1, 2))
    untouched = torch.cat((k_cache[:, :, :start], k_cache[:, :, start + seq:]), dim=2)
    assert not untouched.any()


def test_rope_rejects_bad_inputs():
    q = randn(1, 4, 2, 16)
    cos, sin = rope_tables(1, 4, 16)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(q, q, cos, sin, rotary_dim=15)
    with pytest.raises(ValueError, match="float32"):
        apply_rope(q, q, cos.half(), sin.half())
    with pytest.raises(ValueError, match=r"\[1 or B=1, T=4, R=16\]"):
        apply_rope(q, q, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="does not fit"):
        apply_rope(q, q, cos, sin, k_cache=torch.zeros(1, 2, 5, 16, device=DEVICE), cache_start=2)
    with pytest.raises(ValueError, match="both"):
        apply_rope(q, q, cos, sin, k_cache=torch.zeros(1, 2, 5, 16, device=DEVICE))


# --- Prefill flash attention ----------------------------------------------------------------------------

ATTENTION_CASES = [  # (B, N, Tq, D, q_start, key_start, logn S, config or None)
    (2, 2, 17, 16, 0, None, None, None),
    (2, 2, 130, 16, 0, [0, 37], None, None),  # row 1: the first 37 queries are pads
    (2, 1, 130, 16, 0, [5, 70], None, (16, 16, 4, 1)),  # partial first key block + mask-free blocks
    (2, 1, 130, 16, 0, [5, 70], None, (64, 16, 4, 1)),
    (2, 2, 17, 16, 20, [3, 30], None, None),  # continuation of a cached prefix (q_start > 0)
    (1, 2, 1, 16, 40, None, None, None),  # Tq = 1
    (2, 2, 17, 32, 0, [0, 3], 8, None),  # logn switches on mid-sequence (p + 1 > 8)
    (1, 2, 33, 64, 0, [2], None, None),
    (1, 2, 33, 128, 4, [0], 16, None),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_flash_attention_matches_reference(dtype, case):
    batch, heads, seq_q, head_dim, q_start, key_start, logn, config = case
    torch.manual_seed(0)
    seq_k = q_start + seq_q
    q = randn(batch, heads, seq_q, head_dim, dtype=dtype)
    k, v = (randn(batch, heads, seq_k, head_dim, dtype=dtype) for _ in range(2))
    starts = None if key_start is None else torch.tensor(key_start, dtype=torch.int32, device=DEVICE)
    out = _flash_attention(q, k, v, q_start=q_start, key_start=starts, logn_seq_length=logn, config=config)
    expected = attention_reference(q, k, v, q_start=q_start, key_start=starts, logn_seq_length=logn)
    assert_attention_close(out, expected)
    if key_start is not None:  # pad queries (position < key_start) give exact zeros
        for row, first in enumerate(key_start):
            pads = max(0, min(seq_q, first - q_start))
            assert not out[row, :, :pads].any()


@needs_kernels
def test_flash_attention_fp16_and_int64_key_start():
    torch.manual_seed(0)
    q, k, v = (randn(2, 2, 21, 64, dtype=torch.float16) for _ in range(3))
    starts = torch.tensor([4, 0], dtype=torch.int64, device=DEVICE)
    assert_attention_close(flash_attention(q, k, v, key_start=starts),
                           attention_reference(q, k, v, key_start=starts))


@needs_kernels
def test_flash_attention_logn_rounds_factor_and_product_to_the_dtype():
    # Bit-level check of the logn emulation: the kernel with logn equals the kernel fed Qwen's scaled q.
    torch.manual_seed(0)
    seq, length = 40, 8
    q, k, v = (randn(1, 2, seq, 32, dtype=torch.bfloat16) for _ in range(3))
    factors = torch.tensor([math.log(p + 1, length) if p + 1 > length else 1.0 for p in range(seq)],
                           device=DEVICE).to(torch.bfloat16)  # Qwen: float32 table .type_as(query)
    q_scaled = q * factors[:, None]
    assert torch.equal(flash_attention(q, k, v, logn_seq_length=length), flash_attention(q_scaled, k, v))
    assert not torch.equal(flash_attention(q, k, v, logn_seq_length=length), flash_attention(q, k, v))


@needs_kernels
def test_flash_attention_accepts_strided_inputs_and_returns_a_free_transpose():
    torch.manual_seed(0)
    qkv = randn(2, 19, 3, 2, 32, dtype=torch.bfloat16)  # [B, T, 3, N, D] from c_attn
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, N, T, D] views
    out = flash_attention(q, k, v)
    assert_attention_close(out, attention_reference(q, k, v))
    assert out.transpose(1, 2).is_contiguous()  # [B, T, N, D] memory: reshape to [B, T, H] is free


def test_flash_attention_rejects_bad_inputs():
    q = randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(randn(1, 2, 4, 24), randn(1, 2, 4, 24), randn(1, 2, 4, 24))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(randn(1, 2, 4, 8), randn(1, 2, 4, 8), randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="Tk = q_start"):
        flash_attention(q, randn(1, 2, 6, 16), randn(1, 2, 6, 16))
    with pytest.raises(ValueError, match="key_start"):
        flash_attention(q, q, q, key_start=torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q.bfloat16(), q)
    with pytest.raises(ValueError, match="logn_seq_length"):
        flash_attention(q, q, q, logn_seq_length=1)


# --- Decode attention -----------------------------------------------------------------------------------

DECODE_CASES = [  # (B, N, T_max, D, kv_len, key_start, logn S, num_splits)
    (2, 2, 100, 16, [100, 37], None, None, None),
    (2, 2, 100, 16, [100, 37], None, None, 1),  # one split: no merge kernel
    (2, 2, 100, 16, [100, 37], [3, 40], None, 3),  # row 1 has no key (zeros)
    (3, 2, 130, 32, [130, 9, 64], [3, 0, 10], 50, 5),  # logn on for row 0 and 2 only
    (2, 1, 100, 16, [100, 2], [0, 1], None, 16),  # more splits than key blocks
    (2, 2, 130, 64, 77, None, 50, 2),  # int kv_len past S
    (2, 2, 130, 128, 30, [1, 0], 50, None),  # int kv_len below S
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_step_attention_matches_reference(dtype, case):
    batch, heads, t_max, head_dim, kv_len, key_start, logn, splits = case
    torch.manual_seed(0)
    q = randn(batch, heads, 1, head_dim, dtype=dtype)
    k_cache, v_cache = (randn(batch, heads, t_max, head_dim, dtype=dtype) for _ in range(2))
    lengths = kv_len if isinstance(kv_len, int) else torch.tensor(kv_len, device=DEVICE)
    starts = None if key_start is None else torch.tensor(key_start, dtype=torch.int32, device=DEVICE)
    out = step_attention(q, k_cache, v_cache, kv_len=lengths, key_start=starts, logn_seq_length=logn,
                           num_splits=splits)
    expected = step_attention_reference(q, k_cache, v_cache, kv_len=lengths, key_start=starts,
                                          logn_seq_length=logn)
    assert_attention_close(out, expected)


@needs_kernels
def test_step_attention_equals_the_last_row_of_prefill_attention():
    torch.manual_seed(0)
    length, t_max = 45, 64
    k_cache, v_cache = (randn(2, 2, t_max, 32, dtype=torch.bfloat16) for _ in range(2))
    q = randn(2, 2, 1, 32, dtype=torch.bfloat16)
    starts = torch.tensor([0, 6], device=DEVICE)
    decode = step_attention(q, k_cache, v_cache, kv_len=length, key_start=starts, logn_seq_length=20,
                              num_splits=3)
    prefill = flash_attention(q, k_cache[:, :, :length], v_cache[:, :, :length], q_start=length - 1,
                              key_start=starts, logn_seq_length=20)
    torch.testing.assert_close(decode.float(), prefill.float(), atol=1e-2, rtol=1e-2)


def test_step_attention_rejects_bad_inputs():
    q, cache = randn(1, 2, 1, 16), randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"\[B, N, 1, D\]"):
        step_attention(randn(1, 2, 2, 16), cache, cache, kv_len=4)
    with pytest.raises(ValueError, match="kv_len must be in"):
        step_attention(q, cache, cache, kv_len=9)
    with pytest.raises(ValueError, match="kv_len must be an int32/int64"):
        step_attention(q, cache, cache, kv_len=torch.tensor([4.0], device=DEVICE))
    with pytest.raises(ValueError, match="num_splits"):
        step_attention(q, cache, cache, kv_len=4, num_splits=0)
    with pytest.raises(ValueError, match="matching q"):
        step_attention(q, randn(1, 2, 8, 32), randn(1, 2, 8, 32), kv_len=4)


# --- Realistic sizes (GPU only) -------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="large shapes only on the GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_large_prefill_and_decode_on_gpu(head_dim):
    torch.manual_seed(0)
    batch, heads, seq = 2, 8, 1500
    q, k, v = (randn(batch, heads, seq, head_dim, dtype=torch.bfloat16) for _ in range(3))
    starts = torch.tensor([0, 333], device=DEVICE)
    assert_attention_close(flash_attention(q, k, v, key_start=starts, logn_seq_length=1024),
                           attention_reference(q, k, v, key_start=starts, logn_seq_length=1024))
    k_cache, v_cache = (randn(batch, heads, 9000, head_dim, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([9000, 4100], device=DEVICE)
    q1 = randn(batch, heads, 1, head_dim, dtype=torch.bfloat16)
    assert_attention_close(
        step_attention(q1, k_cache, v_cache, kv_len=lengths, key_start=starts, logn_seq_length=8192),
        step_attention_reference(q1, k_cache, v_cache, kv_len=lengths, key_start=starts,
                                   logn_seq_length=8192))


@pytest.mark.skipif(not ON_GPU, reason="large shapes only on the GPU")
def test_large_elementwise_ops_on_gpu():
    torch.manual_seed(0)
    x, weight = randn(4096, 4096, dtype=torch.bfloat16), randn(4096, dtype=torch.bfloat16)
    assert_nearly_bit_exact(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    a, b = (randn(512, 11008, dtype=torch.bfloat16, scale=3.0) for _ in range(2))
    assert_nearly_bit_exact(swiglu(a, b), swiglu_reference(a, b))
    qkv = randn(2, 512, 3, 32, 128, dtype=torch.bfloat16)
    cos, sin = rope_tables(2, 512, 128)
    for ours, ref in zip(apply_rope(qkv[:, :, 0], qkv[:, :, 1], cos, sin),
                         apply_rope_reference(qkv[:, :, 0], qkv[:, :, 1], cos, sin), strict=True):
        assert_matches(ours, ref)  # no reduction, no transcendental: 1 ulp at most


# --- Dispatch -------------------------------------------------------------------------------------------


def test_auto_backend_is_sdpa_on_cpu_even_with_the_interpreter():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    assert resolve_backend("eager", "cpu") == "eager"


@needs_kernels
@pytest.mark.skipif(ON_GPU, reason="the GPU run does not use the interpreter")
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    assert resolve_backend("triton", "cpu") == "triton"  # TRITON_INTERPRET=1 (fixture) on CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1") as error:
        resolve_backend("triton", "cpu")
    assert isinstance(error.value, ValueError) and "sdpa" in str(error.value)
    with pytest.raises(KernelUnavailableError, match="do not run on CPU"):
        rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)  # the launchers refuse with the same reason


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="auto, triton, sdpa, eager"):
        resolve_backend("flash", "cpu")


def test_unavailable_reasons_say_what_to_do(monkeypatch):
    assert "CUDA devices only" in triton_unavailable_reason(torch.device("meta"))
    monkeypatch.setattr(dispatch, "_triton_import_error", lambda: "ModuleNotFoundError: no module 'triton'")
    assert "pip install triton" in triton_unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_auto_backend_is_triton_on_a_supported_gpu():
    assert resolve_backend("auto", DEVICE) == "triton"


def test_importing_kernels_does_not_import_triton_and_the_launchers_say_so_without_it():
    script = """
import sys
import nekomata_core.kernels, nekomata_core.kernels.dispatch, nekomata_core.kernels.gpu
assert "triton" not in sys.modules, "importing kernels imported triton"
sys.modules["triton"] = None  # now behave as if triton were not installed
import torch
from nekomata_core.kernels import KernelUnavailableError, resolve_backend, triton_unavailable_reason
assert "pip install triton" in triton_unavailable_reason(torch.device("cpu"))
assert resolve_backend("auto", "cpu") == "sdpa"
try:
    from nekomata_core.kernels import rms_norm
except KernelUnavailableError as exc:
    assert "pip install triton" in str(exc)
else:
    raise AssertionError("kernels.rms_norm was importable without triton")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_kernels
def test_bench_script_smoke_runs_in_the_interpreter(capsys):
    if ON_GPU:
        pytest.skip("the GPU script runs the real benchmark")
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_kernels
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert bench_kernels.main(["--smoke"]) == 0
    output = capsys.readouterr().out
    for op in ("prefill attention", "decode attention", "rmsnorm", "rope", "swiglu"):
        assert op in output
    assert bench_kernels.main(["--smoke", "--sweep"]) == 0
    assert "decode sweep" in capsys.readouterr().out


@pytest.mark.skipif(ON_GPU or KERNELS_RUN, reason="the kernel tests ran in this process")
def test_kernels_in_a_fresh_interpreter_process():
    # Another test module imported triton before TRITON_INTERPRET=1 was set; run this file on its own.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


# --- int4 GEMV ------------------------------------------------------------------------------------------


def _int4_gemv_on_device(x, tensors, bias=None):
    """int4_gemv of x with the five int4 tensors (and bias) moved to DEVICE; the result back on CPU."""
    return int4_gemv(x.to(DEVICE), *(t.to(DEVICE) for t in tensors),
                     None if bias is None else bias.to(DEVICE)).cpu()


def _assert_int4_result(got, expected, dtype):
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:  # fp32 sums in another order, then one rounding: at most one ulp from the rounded reference
        assert_matches(got, expected.to(dtype), max_ulp=1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, with_bias", [(1, 32, False), (45, 224, True), (70, 160, False)])
def test_int4_gemv_matches_the_dequantized_matmul(dtype, n, k, with_bias):
    """Against F.linear with the weight dequantized in plain PyTorch (fp32), rounded once to the dtype."""
    from nekomata_core.quantize import dequantize_int4, quantize_int4_weight

    torch.manual_seed(0)
    tensors = quantize_int4_weight(torch.randn(n, k))
    x = torch.randn(1, 1, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    expected = torch.nn.functional.linear(
        x.float(), dequantize_int4(*tensors), None if bias is None else bias.float())
    got = _int4_gemv_on_device(x, tensors, bias)
    assert got.shape == (1, 1, n)
    _assert_int4_result(got, expected, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [33, 37, 64])
def test_int4_gemv_uses_each_rows_tile_units_including_a_partial_last_tile(dtype, n):
    """Random codes over their whole ranges (negative min codes too) and units that differ by orders of
    magnitude from tile to tile, so a row reading another tile's units (or its own row's) is caught; N = 33
    and 37 end in a tile of 1 and 5 rows, 33 with the second program's only row. K = 96: 3 groups, fewer
    than one chunk of the kernel."""
    from nekomata_core.quantize import dequantize_int4, int4_tiles

    k, groups, tiles = 96, 3, int4_tiles(n)
    generator = torch.Generator().manual_seed(n)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
    scales = torch.randint(0, 256, (n, groups), dtype=torch.uint8, generator=generator)
    mins = torch.randint(-127, 128, (n, groups), dtype=torch.int8, generator=generator)
    magnitude = 10.0 ** -(3 + torch.arange(tiles)[:, None] % 4)  # [tiles, 1]: 1e-3, 1e-4, 1e-5, 1e-6, 1e-3..
    scale_units = (torch.rand(tiles, groups, generator=generator) * magnitude).to(torch.bfloat16)
    min_units = (torch.rand(tiles, groups, generator=generator) * magnitude).to(torch.bfloat16)
    tensors = (packed, scales, mins, scale_units, min_units)
    x = torch.randn(k, generator=generator).to(dtype)
    expected = dequantize_int4(*tensors) @ x.float()  # [N]
    got = _int4_gemv_on_device(x, tensors)
    assert got.shape == (n,)
    _assert_int4_result(got, expected, dtype)


def test_int4_gemv_rejects_k_outside_the_groups():
    units = torch.zeros(1, 1, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the group size"):
        int4_gemv(randn(48), torch.zeros(4, 24, dtype=torch.uint8, device=DEVICE),
                  torch.zeros(4, 1, dtype=torch.uint8, device=DEVICE),
                  torch.zeros(4, 1, dtype=torch.int8, device=DEVICE), units, units)


def test_int4_gemv_groups_and_tiles_are_those_of_the_quantize_format():
    from nekomata_core.kernels.gpu import int4_gemv as module

    from nekomata_core.quantize import INT4_GROUP_SIZE, INT4_TILE_ROWS, INT4_UNIT_DTYPE

    assert (module.GROUP, module.TILE_ROWS, INT4_UNIT_DTYPE) == (INT4_GROUP_SIZE, INT4_TILE_ROWS, torch.bfloat16)


def _int4_tensors(n: int, k: int) -> dict[str, torch.Tensor]:
    """Zero int4 tensors of the right dtypes and shapes for an [n, k] weight."""
    from nekomata_core.quantize import int4_tiles

    tiles = int4_tiles(n)
    return dict(qweight=torch.zeros(n, k // 2, dtype=torch.uint8, device=DEVICE),
                scales=torch.zeros(n, k // 32, dtype=torch.uint8, device=DEVICE),
                mins=torch.zeros(n, k // 32, dtype=torch.int8, device=DEVICE),
                scale_units=torch.zeros(tiles, k // 32, dtype=torch.bfloat16, device=DEVICE),
                min_units=torch.zeros(tiles, k // 32, dtype=torch.bfloat16, device=DEVICE))


@pytest.mark.parametrize("name, wrong, message", [
    # the units of every row rather than of every tile of 8 rows
    ("scale_units", torch.zeros(12, 2, dtype=torch.bfloat16), r"scale_units must be a contiguous bfloat16 "
     r"tensor \(2, 2\) \(one per tile of 8 rows and group\), got torch.bfloat16 \(12, 2\)"),
    ("min_units", torch.zeros(2, 2, dtype=torch.float32), r"min_units must be a contiguous bfloat16 tensor "
     r"\(2, 2\).*got torch.float32 \(2, 2\)"),
    ("min_units", torch.zeros(2, 4, dtype=torch.bfloat16)[:, ::2], r"min_units .*\(not contiguous\)"),
    # the former format: scales and mins in the activation dtype
    ("scales", torch.zeros(12, 2, dtype=torch.bfloat16), r"scales must be a contiguous uint8 tensor \(12, 2\) "
     r"\(the scale codes, one per row and group\), got torch.bfloat16"),
    ("mins", torch.zeros(12, 2, dtype=torch.uint8), r"mins must be a contiguous int8 tensor .*got torch.uint8"),
])
def test_int4_gemv_rejects_scales_or_units_of_the_wrong_dtype_or_shape(name, wrong, message):
    tensors = _int4_tensors(12, 64)  # 12 rows: tiles of 8 and 4 rows
    tensors[name] = wrong.to(DEVICE)
    with pytest.raises(ValueError, match=message):
        int4_gemv(randn(64), **tensors)
