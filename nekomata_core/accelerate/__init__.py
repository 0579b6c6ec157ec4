"""The one place that makes a model fast on its device — by swapping modules, never by flags inside it.

`accelerate(model, attention=..., ops=...)` replaces the model's modules by versions that compute the
same function faster where they can run (the Liger-Kernel `apply_…` / gpt-fast module-swap pattern):

    attention "auto" | "triton" | "sdpa" | "eager"   Triton flash attention on CUDA when it imports,
                                                     else PyTorch's fused SDPA; "eager" is the formula
    ops       "auto" | "triton" | "eager"            Triton RMSNorm/RoPE/SwiGLU with the Triton choice;
                                                     on CPUs, "auto" also sends one-row linears to the C
                                                     GEMVs, half-precision prefills to fp32 matmuls, and
                                                     a half-precision model's RMSNorm/RoPE/SwiGLU to C
                                                     (kernels/cpu/rows.c)

`make_step(model, mode)` gives the function `generate` calls for each new token:

    "auto"      "native" where it applies (a CPU, the model's own modules), else "static"
    "native"    the whole step in one C call (kernels/cpu/step.c)
    "static"    the model's fixed-shape step;  "compiled": the same under torch.compile
    "eager"     the plain forward, `model(tokens, cache=cache)`

The module classes keep their parameters, so state dicts and checkpoints do not change; the native
step refuses (or "auto" avoids) models with hooks or modules it does not know, so nothing is bypassed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backends import ATTENTION_CHOICES, OPS_CHOICES, STEP_MODES
from ..errors import NekomataError
from ..kernels.dispatch import resolve_backend
from ..model import MLP, EagerAttention, RMSNorm, Rotary, ScaledDotProductAttention
from ..quantize import Int4Linear, Int8Linear
from .modules import (
    PREFILL_UPCAST_ROWS,
    CpuInt4Linear,
    CpuInt8Linear,
    CpuLinear,
    CpuMLP,
    CpuRMSNorm,
    CpuRotary,
    TritonAttention,
    TritonInt4Linear,
    TritonMLP,
    TritonRMSNorm,
    TritonRotary,
    cpu_has_native_half_matmul,
)
from .steps import NativeStep, StaticStep, StepStateError, StepUnavailableError, native_step_problem

if TYPE_CHECKING:
    from ..cache import KVCache
    from ..model import QwenForCausalLM


StepFn = Callable[[torch.Tensor, "KVCache"], torch.Tensor]

__all__ = [
    "ATTENTION_CHOICES",
    "OPS_CHOICES",
    "STEP_MODES",
    "AccelerateError",
    "NativeStep",
    "StaticStep",
    "StepFn",
    "StepStateError",
    "StepUnavailableError",
    "accelerate",
    "check_choices",
    "describe",
    "make_step",
    "native_step_problem",
]


class AccelerateError(NekomataError):
    """An unknown choice of attention, ops or step mode."""


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise AccelerateError(f"{kind}={value!r} is unknown; choose one of {list(choices)}")


def check_choices(attention: str = "auto", ops: str = "auto") -> None:
    """Refuse unknown names before any work (from_pretrained checks them before reading weights)."""
    _check_choice("attention", attention, ATTENTION_CHOICES)
    _check_choice("ops", ops, OPS_CHOICES)


def accelerate(
    model: QwenForCausalLM, *, attention: str | None = None, ops: str | None = None
) -> QwenForCausalLM:
    """Swap in the fastest modules that run on the model's device (in place; returns the model).

    None keeps the choice of the previous call ("auto" the first time). Call it again after moving the
    model to another device or dtype. "triton" where Triton cannot run raises
    `nekomata_core.kernels.dispatch.KernelUnavailableError` saying why.
    """
    previous = getattr(model, "acceleration_request", {})
    attention = attention or previous.get("attention", "auto")
    ops = ops or previous.get("ops", "auto")
    check_choices(attention, ops)
    model.acceleration_request = {"attention": attention, "ops": ops}

    device = model.device
    attention = resolve_backend(attention, device)  # "triton" | "sdpa" | "eager"
    triton_ops = resolve_backend(ops, device) == "triton"
    cpu = device.type == "cpu"
    half_in_hardware = model.dtype == torch.float32 or cpu_has_native_half_matmul()
    upcast = PREFILL_UPCAST_ROWS if cpu and not half_in_hardware else 0
    # Quantized layers' wide calls (prefills) multiply in this dtype (see CpuInt8Linear).
    prefill_dtype = model.dtype if half_in_hardware else torch.float32
    # The C GEMVs serve bf16, int8 and int4 weights; probing them builds the C library, so ask only when
    # this model has such layers.
    has_int8 = any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
    gemv = ops == "auto" and cpu and (model.dtype == torch.bfloat16 or has_int8) and _cpu_gemv_available()
    attend = {"triton": lambda: TritonAttention(model.config.seq_length), "sdpa": ScaledDotProductAttention,
              "eager": EagerAttention}[attention]
    # Prefills of quantized layers through the C GEMVs' register tiles where those beat an fp32 expansion
    # (see CpuInt8Linear.wide_gemv); where the CPU multiplies bf16 in hardware the expansion stays.
    wide_gemv = gemv and not cpu_has_native_half_matmul() and _cpu_batch_tiles_available()
    # A half-precision model's norms, rotary and SwiGLU in C (kernels/cpu/rows.c) on CPUs with the library.
    cpu_rows = ops == "auto" and cpu and model.dtype in (torch.bfloat16, torch.float16) and _cpu_gemv_available()
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            module.__class__ = CpuInt8Linear if gemv else Int8Linear
            module.prefill_dtype = prefill_dtype
            module.wide_gemv = wide_gemv
        elif isinstance(module, Int4Linear):
            module.__class__ = CpuInt4Linear if gemv else TritonInt4Linear if triton_ops else Int4Linear
            module.prefill_dtype = prefill_dtype
            module.wide_gemv = wide_gemv
        elif isinstance(module, nn.Linear):
            if (gemv and module.weight.dtype == torch.bfloat16) or upcast:
                module.__class__ = CpuLinear
                module.use_gemv = gemv and module.weight.dtype == torch.bfloat16
                module.upcast_rows = upcast
            else:
                module.__class__ = nn.Linear
        elif isinstance(module, RMSNorm):
            module.__class__ = TritonRMSNorm if triton_ops else CpuRMSNorm if cpu_rows else RMSNorm
        elif isinstance(module, MLP):
            module.__class__ = TritonMLP if triton_ops else CpuMLP if cpu_rows else MLP
        elif isinstance(module, Rotary):
            _replace(model, name, TritonRotary() if triton_ops else CpuRotary() if cpu_rows else Rotary())
        elif isinstance(module, EagerAttention):  # ScaledDotProductAttention and TritonAttention too
            _replace(model, name, attend())
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def _cpu_gemv_available() -> bool:
    """Whether nekomata_core.kernels.cpu.gemv runs here (x86-64 with AVX2/FMA and a C compiler; built once)."""
    from nekomata_core.kernels.cpu import gemv

    return gemv.available()


def _cpu_batch_tiles_available() -> bool:
    """Whether the C GEMVs in use multiply many rows of int8/int4 weights in register tiles (AVX512-VNNI)."""
    from nekomata_core.kernels.cpu import gemv

    return gemv.batch_tiles_available()


def describe(model: QwenForCausalLM) -> dict[str, str]:
    """Which implementations the model runs now: {"attention": …, "ops": …, "linears": …}."""
    attend = type(model.transformer.h[0].attn.attend) if len(model.transformer.h) else ScaledDotProductAttention
    attention = {TritonAttention: "triton", ScaledDotProductAttention: "sdpa", EagerAttention: "eager"}[attend]
    norm = model.transformer.ln_f
    ops = "triton" if isinstance(norm, TritonRMSNorm) else "cpu rows (C)" if isinstance(norm, CpuRMSNorm) else "eager"
    linear_kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))}
    return {"attention": attention, "ops": ops, "linears": ", ".join(sorted(linear_kinds))}


def make_step(model: QwenForCausalLM, mode: str = "auto") -> StepFn:
    """The step function for a mode (see the module docstring)."""
    _check_choice("step mode", mode, STEP_MODES)
    if mode == "eager":
        return lambda tokens, cache: model(tokens, cache=cache)[:, -1]
    if mode == "native" or (mode == "auto" and native_step_problem(model) is None):
        return NativeStep(model)
    return StaticStep(model, compile=mode == "compiled")
