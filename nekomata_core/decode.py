"""The fast decode path: `QwenForCausalLM.decode_step` (fixed shapes), optionally under torch.compile.

A decode step reads every weight once to produce one token per row, so at batch 1 it is bound by
memory bandwidth; what is left to win is overhead — Python dispatch, per-step allocation and shape
changes. `StaticDecoder` keeps every shape constant from step to step (attention covers the whole
preallocated cache under a mask, new keys/values go in with `index_copy_`), which is what lets
`torch.compile` (inductor on the CPU; CUDA graphs via mode="reduce-overhead" on GPUs) capture it once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import QwenForCausalLM

DECODE_MODES = ("eager", "static", "compiled")


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
            raise RuntimeError(
                "StaticDecoder needs a prefilled cache: run the prompt through the model first"
            )
        cache.check_fits(tokens.shape[0], 1)
        cache.key_mask[:, position] = True
        logits = self._step(tokens, cache, self._positions[position : position + 1])
        cache.length = position + 1
        return logits


def make_decoder(model: QwenForCausalLM, mode: str = "static"):
    """The decode_fn for a mode: "eager" (plain forward), "static" (fixed shapes) or "compiled"."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}; choose one of {list(DECODE_MODES)}")
    if mode == "eager":
        return None  # generate's default: model(tokens, cache=cache)
    return StaticDecoder(model, compile=mode == "compiled")
