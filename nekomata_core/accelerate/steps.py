"""Step functions: what `generate` calls for every token after the prefill, `(tokens [B, 1], cache) →
next-token logits [B, V]`.

A step reads every weight once to produce one token per row, so at batch 1 it is bound by memory
bandwidth; what is left to win is overhead — Python dispatch, per-step allocation and shape changes.

- `StaticStep`: the model's fixed-shape form (`model(tokens, cache=cache, position=p)`): attention
  covers the whole preallocated cache under a mask, keys go in with `index_copy_`, so no shape changes
  from step to step and `torch.compile` (CUDA graphs on GPUs) can capture it once (`compile=True`).
- `NativeStep`: on x86-64 CPUs, the whole step in one C call (kernels/cpu/step.c): the same computation
  with the same rounding points and no per-operation overhead. Batches of up to `NativeStep.max_batch`
  rows go through it together, each weight read once for all of them; larger ones go to a StaticStep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as module_state

from ..errors import NekomataError
from ..model import (
    MLP,
    Attention,
    Block,
    EagerAttention,
    RMSNorm,
    Rotary,
    ScaledDotProductAttention,
    logn_scale,
    rotary_cos_sin,
)
from ..quantize import Int4Linear, Int4QkvLinear, Int8Linear
from .huge_pages import move_to_huge_pages
from .modules import (
    CpuInt4Linear,
    CpuInt8Linear,
    CpuLinear,
    CpuMLP,
    CpuRMSNorm,
    CpuRotary,
    TritonAttention,
    TritonMLP,
    TritonRMSNorm,
    TritonRotary,
)

if TYPE_CHECKING:
    from ..cache import KVCache
    from ..model import QwenForCausalLM


class StepUnavailableError(NekomataError):
    """The step mode asked for cannot run this model here (device, dtype, modules); the message says
    which mode to use instead."""


class StepStateError(NekomataError, RuntimeError):
    """A step was called with a cache it cannot continue (not prefilled)."""


def _require_prefilled(cache: KVCache, who: str) -> None:
    if cache.inv_freq is None:
        raise StepStateError(f"{who} needs a prefilled cache: run the prompt through the model first")


class StaticStep:
    """The fixed-shape step, optionally under torch.compile (mode "reduce-overhead" on CUDA)."""

    def __init__(self, model: QwenForCausalLM, *, compile: bool = False, mode: str | None = None) -> None:
        self.model = model
        self.compiled = compile
        forward = model.forward
        if compile:
            if mode is None:
                mode = "reduce-overhead" if model.device.type == "cuda" else None
            forward = torch.compile(forward, mode=mode, fullgraph=True, dynamic=False)
        self._forward = forward
        self._positions: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        _require_prefilled(cache, "StaticStep")
        if self._positions is None or self._positions.shape[0] < cache.max_length:
            self._positions = torch.arange(cache.max_length, device=cache.device)
        position = cache.next_position(tokens.shape[0])
        logits = self._forward(tokens, cache=cache, position=self._positions[position : position + 1])
        cache.length = position + 1
        return logits[:, -1]


# The most rows the C step takes in one call; larger batches go to a StaticStep. The C step's batched
# GEMV (AVX2 FMAs, 4 rows per pass over a weight row) reads the weights once, so it wins while a step is
# bound by memory; from about 8 rows on it is bound by arithmetic instead: with bf16 weights it ties
# PyTorch's oneDNN GEMM (bf16 dot-product instructions where the CPU has them) at 8 rows and loses past
# that, while PyTorch's batched int8/int4 path stays slower than the C step at 16 rows. Hence two limits.
NATIVE_MAX_BATCH_FLOAT = 8  # fp32 / bf16 weights
NATIVE_MAX_BATCH_QUANTIZED = 16  # int8 / int4 weights


class NativeStep:
    """Each step of up to `max_batch` rows as one C call (kernels/cpu/step), left-padded rows with their
    own key masks and NTK alphas; larger batches go to a StaticStep.

    The C step is bound to the model's weight tensors when it is made: make a new one after replacing
    parameters (in-place updates are seen). Making one moves the large weights onto huge pages
    (`huge_pages.move_to_huge_pages`: same parameters and values, other memory).
    """

    def __init__(self, model: QwenForCausalLM) -> None:
        problem = native_step_problem(model)
        if problem is not None:
            raise StepUnavailableError(
                f"step mode 'native' is unavailable: {problem}; use 'static' instead (--decode static, or auto)"
            )
        from nekomata_core.kernels.cpu.step import BlockWeights, FusedStep

        self.model = model
        # Every step streams all the weights: on 2 MiB pages that costs far fewer TLB misses (1.13× the
        # decode speed of nekomata-7b int4 here; see huge_pages). The values and parameters stay the same.
        move_to_huge_pages(model)
        config = model.config
        blocks = [
            BlockWeights(
                ln_1=block.ln_1.weight,
                **_c_attn_weights(block.attn.c_attn),
                attn_c_proj=_linear_weights(block.attn.c_proj),
                ln_2=block.ln_2.weight,
                w1=_linear_weights(block.mlp.w1),
                w2=_linear_weights(block.mlp.w2),
                mlp_c_proj=_linear_weights(block.mlp.c_proj),
            )
            for block in model.transformer.h
        ]
        self._step = FusedStep(
            embedding=model.transformer.wte.weight,
            blocks=blocks,
            ln_f=model.transformer.ln_f.weight,
            lm_head=_linear_weights(model.lm_head),
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            rotary_dim=config.rotary_dim,
            eps=config.layer_norm_epsilon,
        )
        quantized = any(p.dtype in (torch.int8, torch.uint8) for p in model.parameters())
        self.max_batch = NATIVE_MAX_BATCH_QUANTIZED if quantized else NATIVE_MAX_BATCH_FLOAT
        self._batched: StaticStep | None = None
        self._positions: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        batch = tokens.shape[0]
        if batch > self.max_batch:
            if self._batched is None:
                self._batched = StaticStep(self.model)
            return self._batched(tokens, cache)
        _require_prefilled(cache, "NativeStep")
        if self._positions is None or self._positions.shape[0] < cache.max_length:
            self._positions = torch.arange(cache.max_length)
        position = cache.next_position(batch)
        config, pos = self.model.config, self._positions[position : position + 1]
        # The model's own rotary and logn functions; the C step does the rest of the maths itself.
        cos, sin = rotary_cos_sin(pos, cache.inv_freq)  # [Bα, 1, R]; Qwen quirk 3: each row's prefill alpha
        logn = None
        if config.use_logn_attn and position + 1 > config.seq_length:  # Qwen quirk 4, rounded like q
            logn = float(logn_scale(pos, config.seq_length).to(cache.dtype))
        logits = self._step.step(
            tokens.reshape(batch).to(torch.int64),
            position,
            cos=cos.reshape(cos.shape[0], -1),  # [Bα, R]
            sin=sin.reshape(sin.shape[0], -1),
            logn=logn,
            keys=cache.keys,
            values=cache.values,
            key_mask=cache.key_mask,
        )
        cache.length = position + 1
        return logits  # [B, V]


def _linear_weights(module):
    from nekomata_core.kernels.cpu.step import LinearWeights

    def part(name: str):  # the int8 / int4 tensors a layer has (None for a float one)
        return getattr(module, name, None)

    return LinearWeights(module.weight, module.bias, part("scales"), part("mins"), part("scale_units"),
                         part("min_units"))


def _c_attn_weights(module) -> dict:
    """c_attn's tensors for BlockWeights: one linear, or (an int4 model's Int4QkvLinear) its int4 q and k
    rows as c_attn and its int8 v rows as c_attn_v."""
    if isinstance(module, Int4QkvLinear):
        return {"c_attn": _linear_weights(module.qk), "c_attn_v": _linear_weights(module.v)}
    return {"c_attn": _linear_weights(module)}


_LINEARS = (nn.Linear, CpuLinear, Int8Linear, CpuInt8Linear, Int4Linear, CpuInt4Linear)
_NORMS = (RMSNorm, TritonRMSNorm, CpuRMSNorm)
# The classes the C step may stand in for (it reads their weights and runs their maths itself), by the
# module's name in the model: the model's own and the `accelerate` versions computing the same function.
_NATIVE_STANDS_IN_FOR: dict[str, tuple[type, ...]] = {
    "wte": (nn.Embedding,),
    "ln_f": _NORMS,
    "ln_1": _NORMS,
    "ln_2": _NORMS,
    "lm_head": _LINEARS,
    "c_attn": (*_LINEARS, Int4QkvLinear),
    "qk": _LINEARS,  # an Int4QkvLinear's parts
    "v": _LINEARS,
    "c_proj": _LINEARS,
    "w1": _LINEARS,
    "w2": _LINEARS,
    "attn": (Attention,),
    "mlp": (MLP, TritonMLP, CpuMLP),
    "rotary": (Rotary, TritonRotary, CpuRotary),
    "attend": (ScaledDotProductAttention, EagerAttention, TritonAttention),
}


def native_step_problem(model: QwenForCausalLM) -> str | None:
    """None when the native (C) step can run this model, else why not."""
    tp = getattr(model, "tensor_parallel", None)
    if tp is not None:
        return (
            f"the model is split over {tp.world_size} processes (tensor parallelism) and the C step runs "
            "a whole model in one call, with no all-reduce between its halves"
        )
    if model.device.type != "cpu":
        return f"the model is on {model.device}, the native step runs on the CPU"
    weights = {p.dtype for p in model.parameters()}
    if not weights <= {torch.float32, torch.bfloat16, torch.int8, torch.uint8}:  # uint8: int4 codes
        return (
            "the native step reads float32, bfloat16, int8 or int4 weights, this model has "
            f"{sorted(map(str, weights))}"
        )
    from nekomata_core.kernels.cpu import step

    if model.config.head_dim > step.MAX_HEAD_DIM:
        return f"head_dim {model.config.head_dim} is above the native step's {step.MAX_HEAD_DIM}"
    unusual = _unusual_module(model)
    if unusual is not None:
        return unusual
    if not step.available():
        return str(step.unavailable_reason())
    return None


def _unusual_module(model: QwenForCausalLM) -> str | None:
    """The native step reads the weights of the standard modules and runs their maths itself: a module
    replaced by another class, or a forward hook, would be bypassed silently. Name the first one."""
    if module_state._global_forward_hooks or module_state._global_forward_pre_hooks:
        return "global module forward hooks are registered (the C step would skip them)"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or 'model'} has forward hooks (the C step would skip them)"
        leaf = name.rpartition(".")[2]
        allowed = (Block,) if leaf.isdigit() else _NATIVE_STANDS_IN_FOR.get(leaf, ())
        if allowed and type(module) not in allowed:
            return f"module {name} is a {type(module).__name__}, not one of the model's own classes"
    return None
