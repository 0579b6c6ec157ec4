"""Drop-in fast versions of the model's modules. Each computes what the class it replaces computes, keeps
its parameters (so the state dict is unchanged) and is put in place by `nekomata_core.accelerate`
changing the module's class, never by a flag inside the architecture.

CPU: `CpuLinear` / `CpuInt8Linear` / `CpuInt4Linear` send one-row calls (a decode step at batch 1) to the AVX2 GEMVs of
kernels/cpu (bandwidth-bound; PyTorch's bf16 and int8 GEMVs are compute-bound on CPUs without bf16
instructions), and `CpuLinear` multiplies half-precision prefills in fp32 where the CPU has no bf16
arithmetic. GPU: the Triton kernels of kernels/gpu for RMSNorm, RoPE, SwiGLU, attention and the
one-row int4 GEMV (`TritonInt4Linear`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MLP, RMSNorm, Rotary, ScaledDotProductAttention, StepInputs
from ..quantize import Int4Linear, Int8Linear, blocked_matmul

# From this many rows on, a half-precision CPU matmul without bf16/fp16 arithmetic is done in fp32.
PREFILL_UPCAST_ROWS = 8
# From this many rows on, a quantized layer expands its weight for PyTorch's fast matmul (a prefill);
# below, the expansion would cost more than it saves (a batched step reads each weight once per row set).
QUANTIZED_WIDE_ROWS = 32


def cpu_has_native_half_matmul() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


class CpuLinear(nn.Linear):
    """nn.Linear on a CPU: the C GEMV for one-row bf16 calls; fp32 for wide half-precision calls.

    `upcast_rows` (0 = never): on CPUs without bf16/fp16 arithmetic, PyTorch's half-precision matmul is
    emulated and gets slower with every row (a 128-token prefill runs many times slower than in fp32). From
    that many rows on we multiply in fp32 and round once to the model dtype, which is what native bf16
    kernels do too (fp32 accumulation, one rounding), in another summation order. One-row calls keep
    the half-precision weights: they are memory-bound and read half the bytes.
    """

    use_gemv = False
    upcast_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_gemv and x.numel() == x.shape[-1]:
            from nekomata_core.kernels.cpu import (
                gemv,  # imported with the first call, after `accelerate` probed it
            )

            if torch.compiler.is_compiling():  # a graph node instead of an opaque ctypes call
                return gemv.linear_bf16_op(x, self.weight, self.bias)
            return gemv.linear_bf16(x, self.weight, self.bias)
        if self.upcast_rows and x.dtype != torch.float32 and x.numel() >= self.upcast_rows * x.shape[-1]:
            # A block of rows at a time into the reused workspace, as the quantized layers expand theirs:
            # a whole fp32 copy per call (622 MB for a 620M model's lm_head) costs its page faults and a
            # round trip through DRAM every prefill.
            def expand(begin: int, end: int) -> torch.Tensor:
                return _expansion_buffer(end - begin, self.in_features, torch.float32).copy_(self.weight[begin:end])

            block_rows = _block_rows(self.in_features, torch.float32)
            return blocked_matmul(x, self.out_features, torch.float32, expand, block_rows, bias=self.bias)
        return F.linear(x, self.weight, self.bias)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 1


# Wide (prefill) products expand a quantized weight a block of rows at a time into this much memory,
# reused from call to call: allocating a fresh block each time costs the kernel's page faults on every
# call (the allocator hands large blocks back to the OS), which measured as long as the expansion itself.
_WORKSPACE_BYTES = 8 << 20
_workspace = threading.local()


def _expansion_buffer(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] `dtype` view of this thread's workspace (grown when a block needs more)."""
    need = rows * cols * dtype.itemsize
    buf = getattr(_workspace, "buffer", None)
    if buf is None or buf.numel() < need:
        buf = _workspace.buffer = torch.empty(max(need, _WORKSPACE_BYTES), dtype=torch.uint8)
    return buf[:need].view(dtype).view(rows, cols)


def _block_rows(in_features: int, dtype: torch.dtype) -> int:
    return max(1, _WORKSPACE_BYTES // (max(in_features, 1) * dtype.itemsize))


def _gemv_rows(x: torch.Tensor, out_features: int, call: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`call` (a C GEMV) on x's rows, at most gemv.MAX_ROWS of them per call (a long prefill takes several)."""
    from nekomata_core.kernels.cpu import gemv

    rows = _rows(x)
    if rows <= gemv.MAX_ROWS:
        return call(x)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.cat([call(chunk) for chunk in flat.split(gemv.MAX_ROWS)])
    return out.reshape(*x.shape[:-1], out_features)


class CpuInt8Linear(Int8Linear):
    """Int8Linear whose decode calls (fewer than QUANTIZED_WIDE_ROWS rows: batch 1 or a batched step) go to
    the C int8 GEMV, and whose wide calls (a prefill) expand the weight a block of rows at a time and
    multiply in `prefill_dtype`.

    The C GEMV quantizes each row of x to int8 per block of 32 and sums the integer products exactly
    (kernels/cpu/q8.c: VNNI or AVX2 byte products, the bytes DRAM delivers need no conversion). PyTorch's
    int8 matmul (`_weight_int8pack_mm`) runs at about half the speed of its bf16 or fp32 matmul on these
    CPUs; converting the int8 weight costs far less than that (the values -127…127 are exact in bf16 and
    fp32, so nothing is rounded). `prefill_dtype` (set by `accelerate`): the activation dtype where the CPU
    multiplies it in hardware, else fp32; None keeps PyTorch's int8 matmul.

    `wide_gemv` (set by `accelerate`): wide calls go to the C GEMV too. Where the kernels have register
    tiles for many rows (AVX512-VNNI) and the CPU has no bf16 arithmetic, that is faster than expanding
    into an fp32 matmul (620M prefill int8 1.23x, int4 1.39x on an Ice Lake Xeon, the two alternated in
    one process); a prefill then computes exactly what decoding does, x quantized per block of 32, row by
    row bit-identical to a one-row call.
    """

    prefill_dtype: torch.dtype | None = None
    wide_gemv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (A compiled graph keeps wide calls on the expansion: its custom op takes at most gemv.MAX_ROWS rows.)
        if _rows(x) < QUANTIZED_WIDE_ROWS or (self.wide_gemv and not torch.compiler.is_compiling()):
            from nekomata_core.kernels.cpu import gemv

            if torch.compiler.is_compiling():
                return gemv.linear_int8_op(x, self.weight, self.scales, self.bias)
            return _gemv_rows(x, self.out_features, lambda v: gemv.linear_int8(v, self.weight, self.scales, self.bias))
        if self.prefill_dtype is None:
            return super().forward(x)
        from nekomata_core.kernels.cpu import gemv

        dtype = self.prefill_dtype

        def expand(begin: int, end: int) -> torch.Tensor:
            out = _expansion_buffer(end - begin, self.in_features, dtype)
            return gemv.expand_int8(self.weight[begin:end], dtype, out=out)

        block_rows = _block_rows(self.in_features, dtype)
        return blocked_matmul(x, self.out_features, dtype, expand, block_rows, self.scales, self.bias)


class CpuInt4Linear(Int4Linear):
    """Int4Linear whose decode calls (fewer than QUANTIZED_WIDE_ROWS rows) go to the C int4 GEMV (x quantized
    to int8 per block of 32, integer products of codes and x, the group scales and mins in fp32), and whose
    wide calls (a prefill) expand blocks of rows into `prefill_dtype` in C and hand them to PyTorch's
    matmul (the Int4Linear reference multiplies in fp32, about twice as slow where the CPU multiplies bf16
    in hardware; a bf16 weight is rounded by 2⁻⁹ at most, far below the 4-bit step). `wide_gemv`: as in
    CpuInt8Linear, wide calls through the C GEMV (its register tiles)."""

    prefill_dtype: torch.dtype | None = None
    wide_gemv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (A compiled graph keeps wide calls on the expansion: its custom op takes at most gemv.MAX_ROWS rows.)
        if _rows(x) < QUANTIZED_WIDE_ROWS or (self.wide_gemv and not torch.compiler.is_compiling()):
            from nekomata_core.kernels.cpu import gemv

            if torch.compiler.is_compiling():
                return gemv.linear_int4_op(x, *self.int4_tensors(), self.bias)
            return _gemv_rows(x, self.out_features, lambda v: gemv.linear_int4(v, *self.int4_tensors(), self.bias))
        if self.prefill_dtype is None:
            return super().forward(x)
        from nekomata_core.kernels.cpu import gemv

        dtype = self.prefill_dtype

        def expand(packed: torch.Tensor, *scales_and_mins: torch.Tensor) -> torch.Tensor:
            out = _expansion_buffer(packed.shape[0], self.in_features, dtype)
            return gemv.dequantize_int4(packed, *scales_and_mins, dtype, out=out)

        return self.blocked_matmul(x, dtype, expand, block_rows=_block_rows(self.in_features, dtype))


# ---- CPU: a half-precision prefill's elementwise pieces in C (kernels/cpu/rows.c) --------------------
# PyTorch runs each of them as several bf16/fp16 kernels (upcast, multiply, cast back, concatenate), each
# a pass over memory; on 2 cores of an Ice Lake Xeon they took ~45 ms of a 460 ms int4 prefill of 128
# tokens (bench-620m). The same rounding points as the model's modules (see kernels/cpu/rows.py).


class CpuRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _rows_kernel_applies(x, self.weight):
            return super().forward(x)
        from nekomata_core.kernels.cpu import rows

        return rows.rms_norm(x.contiguous(), self.weight, self.eps)


class CpuRotary(Rotary):
    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if not (_rows_kernel_applies(q, k) and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.dtype == torch.float32):
            return super().forward(q, k, cos, sin)
        from nekomata_core.kernels.cpu import rows

        cos, sin = cos.contiguous(), sin.contiguous()
        return rows.rotary(q, cos, sin), rows.rotary(k, cos, sin)


class CpuMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1, h2 = self.w1(x), self.w2(x)
        if not _rows_kernel_applies(h1, h2):
            return self.c_proj(h1 * F.silu(h2))
        from nekomata_core.kernels.cpu import rows

        return self.c_proj(rows.swiglu(h1.contiguous(), h2.contiguous()))  # w1(x) * silu(w2(x))


def _rows_kernel_applies(*tensors: torch.Tensor) -> bool:
    """rows.c serves CPU tensors of one dtype, bf16 or fp16, outside autograd and torch.compile (compiled
    graphs and fp32 keep PyTorch's ops, which are exact and fast there)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    dtype = tensors[0].dtype
    return dtype in (torch.bfloat16, torch.float16) and all(t.is_cpu and t.dtype == dtype for t in tensors)


class TritonInt4Linear(Int4Linear):
    """Int4Linear whose one-row calls go to the Triton int4 GEMV (kernels/gpu/int4_gemv.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:
            return super().forward(x)
        from nekomata_core.kernels.gpu.int4_gemv import int4_gemv

        return int4_gemv(x, *self.int4_tensors(), bias=self.bias)


class TritonRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from nekomata_core.kernels.gpu.rmsnorm import rms_norm

        return rms_norm(x, self.weight, self.eps)  # both Qwen roundings, in one kernel


class TritonMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from nekomata_core.kernels.gpu.swiglu import swiglu

        return self.c_proj(swiglu(self.w1(x), self.w2(x)))  # w1(x) * silu(w2(x)) fused


class TritonRotary(Rotary):
    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from nekomata_core.kernels.gpu.rope import apply_rope

        return apply_rope(q, k, cos, sin)


class TritonAttention(ScaledDotProductAttention):
    """Flash attention for prompts, split-K flash-decoding for one new token per row; logn is fused.

    The kernels describe padding by each row's first real key (left padding). Any other mask (right
    padding, holes) goes through PyTorch's attention for that call.
    """

    def __init__(self, seq_length: int) -> None:
        super().__init__()
        self.seq_length = seq_length

    def forward(self, q, k, v, inputs: StepInputs) -> torch.Tensor:
        key_start = None
        if inputs.key_mask is not None:
            key_start = (~inputs.key_mask).int().argmin(dim=-1).to(torch.int32)  # first real key per row
            slots = torch.arange(inputs.key_mask.shape[1], device=q.device)
            if not isinstance(inputs.write_at, torch.Tensor):  # a fixed step's mask also hides the future
                if not bool((inputs.key_mask == (slots[None, :] >= key_start[:, None])).all()):
                    return super().forward(q, k, v, inputs)
        logn_seq_length = self.seq_length if inputs.logn is not None else None
        if q.shape[2] == 1 and inputs.cache is not None:
            from nekomata_core.kernels.gpu.step_attention import step_attention

            # The query's own position + 1 keys are valid.
            kv_len = (inputs.positions[-1:] + 1).expand(q.shape[0])
            return step_attention(
                q, k, v, kv_len=kv_len, key_start=key_start, logn_seq_length=logn_seq_length
            )
        from nekomata_core.kernels.gpu.attention import flash_attention

        q_start = int(inputs.positions[0])
        return flash_attention(
            q, k, v, q_start=q_start, key_start=key_start, logn_seq_length=logn_seq_length
        )
