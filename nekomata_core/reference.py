"""The weight mapping from Qwen v1 to transformers' built-in `Qwen2ForCausalLM`.

Below `seq_length` (no dynamic NTK, no logn) Qwen2 computes exactly what Qwen v1 computes once the
weights are renamed and c_attn is split. The parity tool uses this to build a reference without the
original remote code; transformers is imported lazily and is never a runtime dependency.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import QwenConfig


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
        # transformers 5.x takes the RoPE base in rope_parameters (it used to be `rope_theta=`).
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_emb_base)},
        max_position_embeddings=max(config.max_position_embeddings, config.seq_length),
        tie_word_embeddings=False,
        # Qwen2 hard-codes bias=True on q/k/v_proj and bias=False on o_proj: exactly Qwen v1's c_attn
        # (biased) and attn.c_proj (unbiased), so no bias option is needed.
        attn_implementation=attn_implementation,
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
