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

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MLP, RMSNorm, Rotary, ScaledDotProductAttention, StepInputs
from ..quantize import Int4Linear, Int8Linear

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
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class CpuInt8Linear(Int8Linear):
    """Int8Linear whose one-row calls go to the C int8 GEMV (same per-channel scales, fp32 sums), and whose
    wide calls (a prefill) convert the weight and multiply in `prefill_dtype`.

    PyTorch's int8 matmul (`_weight_int8pack_mm`) runs at about half the speed of its bf16 or fp32 matmul on
    these CPUs; converting the int8 weight costs far less than that (the values -127…127 are exact in
    bf16 and fp32, so nothing is rounded). `prefill_dtype` (set by `accelerate`): the activation dtype
    where the CPU multiplies it in hardware, else fp32; None keeps PyTorch's int8 matmul.
    """

    prefill_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            from nekomata_core.kernels.cpu import gemv

            if torch.compiler.is_compiling():
                return gemv.linear_int8_op(x, self.weight, self.scales, self.bias)
            return gemv.linear_int8(x, self.weight, self.scales, self.bias)
        if self.prefill_dtype is not None and x.numel() >= QUANTIZED_WIDE_ROWS * x.shape[-1]:
            dtype = self.prefill_dtype
            y = F.linear(x.to(dtype), self.weight.to(dtype)) * self.scales.to(dtype)
            if self.bias is not None:
                y = y + self.bias.to(dtype)
            return y.to(x.dtype)
        return super().forward(x)


class CpuInt4Linear(Int4Linear):
    """Int4Linear whose one-row calls go to the C int4 GEMV (the same group scales and mins, fp32 sums), and
    whose wide calls (a prefill) expand blocks of rows into `prefill_dtype` in C and hand them to PyTorch's
    matmul (the Int4Linear reference multiplies in fp32, about twice as slow where the CPU multiplies bf16
    in hardware; a bf16 weight is rounded by 2⁻⁹ at most, far below the 4-bit step)."""

    prefill_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            from nekomata_core.kernels.cpu import gemv

            if torch.compiler.is_compiling():
                return gemv.linear_int4_op(x, self.weight, self.scales, self.mins, self.bias)
            return gemv.linear_int4(x, self.weight, self.scales, self.mins, self.bias)
        if self.prefill_dtype is None or x.numel() < QUANTIZED_WIDE_ROWS * x.shape[-1]:
            return super().forward(x)
        from nekomata_core.kernels.cpu import gemv

        dtype = self.prefill_dtype
        return self.blocked_matmul(x, dtype, lambda packed, scales, mins: gemv.dequantize_int4(packed, scales, mins, dtype))


class TritonInt4Linear(Int4Linear):
    """Int4Linear whose one-row calls go to the Triton int4 GEMV (kernels/gpu/int4_gemv.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:
            return super().forward(x)
        from nekomata_core.kernels.gpu.int4_gemv import int4_gemv

        return int4_gemv(x, self.weight, self.scales, self.mins, self.bias)


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
