"""The fast decode paths: what `generate` calls for every token after the prefill.

A decode step reads every weight once to produce one token per row, so at batch 1 it is bound by
memory bandwidth; what is left to win is overhead — Python dispatch, per-step allocation and shape
changes. Modes (`make_decoder`):

- "static": `QwenForCausalLM.decode_step`, which keeps every shape constant from step to step
  (attention covers the whole preallocated cache under a mask, new keys/values go in with
  `index_copy_`), so that `torch.compile` can capture it once;
- "compiled": the same step under `torch.compile` (inductor on the CPU; CUDA graphs via
  mode="reduce-overhead" on GPUs);
- "native": on x86-64 CPUs at batch 1, the whole step in one C call (kernels/cpu_decode.c), the same
  computation with the same rounding points and no per-operation overhead;
- "auto" (the default of the CLI and the benchmark): "native" where it applies, else "static".

`generate` without a `decode_fn` uses "native" where it applies and the plain forward otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import DECODE_MODES
from .errors import NekomataError
from .model import logn_scale

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import QwenForCausalLM


class DecodeUnavailableError(NekomataError):
    """The decode mode asked for cannot run this model here (device, dtype, modules); the message says
    which mode to use instead."""


class DecodeStateError(NekomataError, RuntimeError):
    """A decoder was called with a cache it cannot continue (not prefilled)."""


class StaticDecoder:
    """A `decode_fn` for `generate`: (tokens [B, 1], cache) → next-token logits [B, V]."""

    def __init__(self, model: QwenForCausalLM, *, compile: bool = False, mode: str | None = None) -> None:
        self.model = model
        self.compiled = compile
        step = model.decode_step
        if compile:
            if mode is None:
                mode = "reduce-overhead" if model.device.type == "cuda" else None
            step = torch.compile(step, mode=mode, fullgraph=True, dynamic=False)
        self._step = step
        self._positions: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        position = cache.length
        if self._positions is None or self._positions.shape[0] < cache.max_length:
            self._positions = torch.arange(cache.max_length, device=cache.device)
        if cache.inv_freq is None:
            raise DecodeStateError(
                "StaticDecoder needs a prefilled cache: run the prompt through the model first"
            )
        cache.check_fits(tokens.shape[0], 1)
        cache.key_mask[:, position] = True
        logits = self._step(tokens, cache, self._positions[position : position + 1])
        cache.length = position + 1
        return logits


class NativeDecoder:
    """A `decode_fn` running each batch-1 step as one C call (kernels/cpu_decode); batches of several
    rows go to a `StaticDecoder`.

    The C step is bound to the model's weight tensors when the decoder is made: make a new decoder
    after replacing parameters (in-place updates are seen).
    """

    def __init__(self, model: QwenForCausalLM) -> None:
        problem = native_decode_problem(model)
        if problem is not None:
            raise DecodeUnavailableError(
                f"decode mode 'native' is unavailable: {problem}; use 'static' instead (--decode static, or auto)"
            )
        from kernels.cpu_decode import BlockWeights, FusedDecodeStep

        self.model = model
        config = model.config
        blocks = [
            BlockWeights(
                ln_1=block.ln_1.weight,
                c_attn=_linear_weights(block.attn.c_attn),
                attn_c_proj=_linear_weights(block.attn.c_proj),
                ln_2=block.ln_2.weight,
                w1=_linear_weights(block.mlp.w1),
                w2=_linear_weights(block.mlp.w2),
                mlp_c_proj=_linear_weights(block.mlp.c_proj),
            )
            for block in model.transformer.h
        ]
        self._step = FusedDecodeStep(
            embedding=model.transformer.wte.weight,
            blocks=blocks,
            ln_f=model.transformer.ln_f.weight,
            lm_head=_linear_weights(model.lm_head),
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            rotary_dim=config.rotary_dim,
            eps=config.layer_norm_epsilon,
        )
        self._batched: StaticDecoder | None = None
        self._positions: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if tokens.shape[0] != 1:
            if self._batched is None:
                self._batched = StaticDecoder(self.model)
            return self._batched(tokens, cache)
        if cache.inv_freq is None:
            raise DecodeStateError(
                "NativeDecoder needs a prefilled cache: run the prompt through the model first"
            )
        cache.check_fits(1, 1)
        position = cache.length
        if self._positions is None or self._positions.shape[0] < cache.max_length:
            self._positions = torch.arange(cache.max_length)
        config = self.model.config
        # The same rotary and logn inputs as QwenForCausalLM.decode_step computes (Qwen quirks 3 and 4).
        pos = self._positions[position : position + 1]
        freqs = pos.float()[None, :, None] * cache.inv_freq[:, None, :]  # [1, 1, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        logn = None
        if config.use_logn_attn and position + 1 > config.seq_length:
            logn = float(logn_scale(pos, config.seq_length).to(cache.dtype))
        cache.key_mask[:, position] = True
        logits = self._step.step(
            int(tokens[0, 0]),
            position,
            cos=emb.cos().reshape(-1),
            sin=emb.sin().reshape(-1),
            logn=logn,
            keys=cache.keys,
            values=cache.values,
            key_mask=cache.key_mask,
        )
        cache.length = position + 1
        return logits[None]


def _linear_weights(module):
    from kernels.cpu_decode import LinearWeights

    return LinearWeights(module.weight, module.bias, getattr(module, "scales", None))


def native_decode_problem(model: QwenForCausalLM) -> str | None:
    """None when the native (C) decode step can run this model, else why not."""
    if model.device.type != "cpu":
        return f"the model is on {model.device}, the native step runs on the CPU"
    weights = {p.dtype for p in model.parameters()}
    if not weights <= {torch.float32, torch.bfloat16, torch.int8}:
        return f"the native step reads float32, bfloat16 or int8 weights, this model has {sorted(map(str, weights))}"
    from kernels import cpu_decode

    if model.config.head_dim > cpu_decode.MAX_HEAD_DIM:
        return f"head_dim {model.config.head_dim} is above the native step's {cpu_decode.MAX_HEAD_DIM}"
    unusual = _unusual_module(model)
    if unusual is not None:
        return unusual
    if not cpu_decode.available():
        return str(cpu_decode.unavailable_reason())
    return None


def _unusual_module(model: QwenForCausalLM) -> str | None:
    """The native step reads the weights of the standard modules and runs their maths itself: a module
    replaced by another class, or a forward hook, would be bypassed silently. Name the first one."""
    from torch import nn
    from torch.nn.modules import module as module_state

    from .model import MLP, Attention, Block, Linear, RMSNorm
    from .quantize import Int8Linear

    if module_state._global_forward_hooks or module_state._global_forward_pre_hooks:
        return "global module forward hooks are registered (the C step would skip them)"
    expected = {"wte": (nn.Embedding,), "ln_f": (RMSNorm,), "lm_head": (Linear, Int8Linear)}
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or 'model'} has forward hooks (the C step would skip them)"
        leaf = name.rpartition(".")[2]
        if leaf.isdigit():
            allowed: tuple[type, ...] = (Block,)
        else:
            allowed = expected.get(leaf) or {
                "attn": (Attention,),
                "mlp": (MLP,),
                "ln_1": (RMSNorm,),
                "ln_2": (RMSNorm,),
                "c_attn": (Linear, Int8Linear),
                "c_proj": (Linear, Int8Linear),
                "w1": (Linear, Int8Linear),
                "w2": (Linear, Int8Linear),
            }.get(leaf, ())
        if allowed and type(module) not in allowed:
            return f"module {name} is a {type(module).__name__}, not one of the model's own classes"
    return None


def make_decoder(model: QwenForCausalLM, mode: str = "auto"):
    """The decode_fn for a mode (see the module docstring): "auto", "eager" (plain forward), "static",
    "compiled" or "native"."""
    if mode not in DECODE_MODES:
        raise DecodeUnavailableError(f"decode mode {mode!r} is unknown; choose one of {list(DECODE_MODES)}")
    if mode == "eager":
        return None  # generate's default: model(tokens, cache=cache)
    if mode == "native" or (mode == "auto" and native_decode_problem(model) is None):
        return NativeDecoder(model)
    return StaticDecoder(model, compile=mode == "compiled")
