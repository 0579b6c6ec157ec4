"""The weight mapping from Qwen v1 to transformers' built-in `Qwen2ForCausalLM`.

Below `seq_length` (no dynamic NTK, no logn) Qwen2 computes exactly what Qwen v1 computes once the
weights are renamed and c_attn is split. Past it, Qwen2 still does once its RoPE frequencies are those
of the NTK alpha (`formula_inv_freq`, alpha from `formula_ntk_alpha` of the prefill length) and its
queries are scaled by `formula_logn` (scaling q before RoPE equals scaling it after: RoPE is linear).
These formulas are written here from their definitions, sharing no code with `nekomata_core.model`.
The parity tool uses this to build a reference without the original remote code; transformers is
imported lazily and is never a runtime dependency. Supported: transformers 4.45 and later (the
keyword differences are handled by `dtype_keyword` and `_rope_keywords`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch

from ..config import QwenConfig


def qwen2_config_from_qwen(config: QwenConfig, *, attn_implementation: str = "eager"):
    """The `transformers.Qwen2Config` with the same shapes as a Qwen v1 config."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.mlp_width,  # Qwen quirk: config.json stores twice the real width
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,  # Qwen v1 has no GQA
        rms_norm_eps=config.layer_norm_epsilon,
        **_rope_keywords(Qwen2Config, float(config.rotary_emb_base)),
        max_position_embeddings=max(config.max_position_embeddings, config.seq_length),
        tie_word_embeddings=False,
        # Qwen2 hard-codes bias=True on q/k/v_proj and bias=False on o_proj: exactly Qwen v1's c_attn
        # (biased) and attn.c_proj (unbiased), so no bias option is needed.
        attn_implementation=attn_implementation,
    )


def _rope_keywords(config_class: type, base: float) -> dict:
    """The RoPE base as this transformers' Qwen2Config takes it: `rope_theta=` up to 4.x, a
    `rope_parameters` dict in 5.x (where `rope_theta` is no longer a parameter of its own)."""
    if "rope_theta" in inspect.signature(config_class.__init__).parameters:
        return {"rope_theta": base}
    return {"rope_parameters": {"rope_type": "default", "rope_theta": base}}


def dtype_keyword() -> str:
    """The name of the dtype argument of `from_pretrained` / `_from_config`: `dtype` from transformers
    4.56 on, `torch_dtype` before (4.45–4.55 pass an unknown `dtype=` on to the model and crash)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def formula_ntk_alpha(length: int, seq_length: int) -> int:
    """Dynamic NTK's alpha for a prefill of `length` tokens, from its definition
    max(2^ceil(log2(length / S) + 1) − 1, 1), in integers: 1 up to S, 3 up to 2S, 7 up to 4S, …"""
    if length <= seq_length:
        return 1
    k = 1
    while length > 2 ** (k - 1) * seq_length:
        k += 1
    return 2**k - 1


def formula_inv_freq(base: float, dim: int, alpha: float) -> torch.Tensor:
    """RoPE frequencies [dim / 2] (fp32) with the NTK-scaled base' = base · alpha^(dim / (dim − 2))."""
    scaled = base * alpha ** (dim / (dim - 2))
    return (1.0 / scaled ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float()


def formula_logn(length: int, seq_length: int) -> torch.Tensor:
    """logn attention's query factors [length] for positions 0 … length−1: log(p + 1) / log(S) once
    p + 1 > S, else 1."""
    return torch.tensor(
        [math.log(p + 1) / math.log(seq_length) if p + 1 > seq_length else 1.0 for p in range(length)],
        dtype=torch.float64,
    )


def qwen_to_qwen2_state_dict(
    state: Mapping[str, torch.Tensor], config: QwenConfig
) -> dict[str, torch.Tensor]:
    """Rename (and split c_attn of) a Qwen v1 state dict into Qwen2ForCausalLM's keys."""
    h = config.hidden_size
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["transformer.wte.weight"],
        "model.norm.weight": state["transformer.ln_f.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        # c_attn stacks q, k, v along dim 0 (rows [0, H), [H, 2H), [2H, 3H)).
        weight, bias = state[src + "attn.c_attn.weight"], state[src + "attn.c_attn.bias"]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}self_attn.{proj}.weight"] = weight[j * h : (j + 1) * h]
            out[f"{dst}self_attn.{proj}.bias"] = bias[j * h : (j + 1) * h]
        out[dst + "self_attn.o_proj.weight"] = state[src + "attn.c_proj.weight"]
        out[dst + "mlp.gate_proj.weight"] = state[src + "mlp.w2.weight"]  # Qwen quirk: w2 is the silu gate
        out[dst + "mlp.up_proj.weight"] = state[src + "mlp.w1.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.c_proj.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ln_2.weight"]
    return out
