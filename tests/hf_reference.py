"""An independent reference for tests: a Qwen v1 checkpoint loaded into transformers' Qwen2ForCausalLM.

Qwen2 computes exactly what Qwen v1 computes while the total length stays ≤ seq_length (no dynamic
NTK, no logn scaling), once the weights are renamed (`nekomata_core.apps.qwen2_reference`). The files are read with the
`safetensors` library itself, not with nekomata_core's loader, so this reference shares no code with
the implementation under test.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nekomata_core.apps.qwen2_reference import dtype_keyword, qwen2_config_from_qwen, qwen_to_qwen2_state_dict
from nekomata_core.config import QwenConfig


def read_checkpoint_state_dict(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or sharded), via the safetensors library."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


def qwen2_reference_from_checkpoint(
    folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32, *, attn_implementation: str = "eager"
):
    """A `transformers.Qwen2ForCausalLM` (eval mode, CPU, `dtype`) holding the checkpoint's weights.

    The state dict is loaded with strict=True, so a missing or extra tensor raises.
    """
    from transformers import Qwen2ForCausalLM

    config = QwenConfig.from_json_file(Path(folder) / "config.json")
    hf_config = qwen2_config_from_qwen(config, attn_implementation=attn_implementation)
    # _from_config(dtype=...) builds the parameters in `dtype` but keeps the RoPE inv_freq buffer in
    # fp32, as transformers' from_pretrained does (model.to(dtype) would round it to bf16). The keyword
    # is `torch_dtype` before transformers 4.56.
    model = Qwen2ForCausalLM._from_config(hf_config, **{dtype_keyword(): dtype})
    state = qwen_to_qwen2_state_dict(read_checkpoint_state_dict(folder), config)
    model.load_state_dict(state, strict=True)
    return model.eval()
