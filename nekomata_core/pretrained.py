"""From a path or Hub id to a ready model: resolve files, read the config, check it against the tensors
the files declare (headers only), pick dtype and device, build the model on the meta device (no random
init), then stream the weights in."""

from __future__ import annotations

import os

import torch

from .accelerate import accelerate, check_choices
from .accelerate import tensor_parallel as tp_module
from .config import QwenConfig
from .hub import resolve_model_dir
from .loader import check_checkpoint, load_weights
from .model import QwenForCausalLM as Architecture
from .quantize import (
    QUANTIZE_CHOICES,
    QuantizeOnLoad,
    check_saved_int8_codes,
    convert_to_quantized_structure,
    quantization_of,
)

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" → the first CUDA GPU if there is one, else the CPU; anything else is checked."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for, but this PyTorch build sees no CUDA GPU; use 'cpu'"
        )
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: nekomata_core runs on 'cpu' or 'cuda'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, config: QwenConfig, device: torch.device) -> torch.dtype:
    """ "auto" → the dtype config.json asks for (bf16/fp16/fp32 flag) if any; otherwise bf16 on GPUs
    that support it, fp16 on older GPUs, fp32 on the CPU (where fp16 is slow and poorly supported)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"dtype={dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype != "auto":
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r}; choose 'auto' or one of {sorted(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    if config.torch_dtype_name is not None:
        return DTYPE_NAMES[config.torch_dtype_name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_pretrained(
    cls: type[Architecture],
    path_or_repo_id: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    revision: str | None = None,
    attention_backend: str = "auto",
    ops_backend: str = "auto",
    progress: bool = True,
    quantize: str | None = None,
    allow_pickle: bool = False,
    tensor_parallel: bool = False,
) -> Architecture:
    """`QwenForCausalLM.from_pretrained`. `allow_pickle=True` also reads checkpoints that only have
    pickled `pytorch_model*.bin` weights (with `torch.load(weights_only=True)`); they are refused
    otherwise, with the command that converts them to safetensors. `tensor_parallel=True` (in a
    process started by torchrun) loads only this rank's shard (`accelerate.tensor_parallel`)."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}; choose None or one of {list(QUANTIZE_CHOICES)}")
    check_choices(attention_backend, ops_backend)
    folder = resolve_model_dir(path_or_repo_id, revision=revision)
    config = QwenConfig.from_json_file(folder / "config.json")
    # Before anything is built from the config: a hostile num_hidden_layers would otherwise build
    # a billion blocks first, and a wrong config would only be noticed after the model exists.
    check_checkpoint(folder, config, allow_pickle=allow_pickle)
    target_device = resolve_device(device)
    tp = None
    if tensor_parallel:
        target_device = tp_module.rank_device(device, target_device)
        tp = tp_module.init_process_group(target_device)
        tp_module.check_divisible(config, tp.world_size)  # before any weight is read
    target_dtype = resolve_dtype(dtype, config, target_device)
    saved_quantization = quantization_of(config.extra)
    if tp is not None and "int4" in (quantize, saved_quantization):
        tp_module.check_int4_divisible(config, tp.world_size)  # whole int4 groups per rank
    # On the meta device parameters have shapes but no storage: building a 7B model costs nothing,
    # and the loader replaces every parameter with the checkpoint's tensor in the target dtype.
    with torch.device("meta"):
        model = cls(config)
    if saved_quantization is not None:  # int8/int4 weights on disk: load them as they are
        convert_to_quantized_structure(model, target_dtype, saved_quantization)
    # quantize="int8"/"int4" on a float checkpoint: each linear is quantized as soon as it is read.
    on_load = None
    if quantize is not None and saved_quantization is None:
        on_load = QuantizeOnLoad(model, quantize, tp_module.row_absmax(tp) if tp is not None else None)
    load_weights(
        model,
        folder,
        dtype=target_dtype,
        device=target_device,
        progress=progress,
        after_tensor=on_load,
        allow_pickle=allow_pickle,
        selection=tp_module.shard_selection(config, tp, saved_quantization) if tp is not None else None,
    )
    if saved_quantization is not None:
        check_saved_int8_codes(model, folder)
    if tp is not None:
        tp_module.apply(model, tp)  # local head counts, the all-reduces and the logits' all-gather
    # The architecture is plain PyTorch; the fast modules for this device are swapped in from outside.
    accelerate(model, attention=attention_backend, ops=ops_backend)
    model.checkpoint_dir = folder
    return model.eval().requires_grad_(False)


class QwenForCausalLM(Architecture):
    """The model of `nekomata_core.model` plus loading from checkpoint files or the Hub.

    The architecture itself knows nothing about files; this subclass adds only `from_pretrained`.
    """

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str],
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        revision: str | None = None,
        attention_backend: str = "auto",
        ops_backend: str = "auto",
        progress: bool = True,
        quantize: str | None = None,
        allow_pickle: bool = False,
        tensor_parallel: bool = False,
    ) -> QwenForCausalLM:
        """Load a checkpoint from a local directory or a Hub repo id (see `load_pretrained`).

        quantize="int8" stores every linear layer as int8 with per-channel scales, quantize="int4" as 4-bit
        groups with 8-bit scale and min codes (c_attn's v rows int8), quantized while loading (nekomata_core.quantize);
        the backends are `nekomata_core.accelerate` choices. tensor_parallel=True: in each process that
        torchrun starts, load and run this rank's shard (nekomata_core.accelerate.tensor_parallel).
        """
        return load_pretrained(
            cls,
            path_or_repo_id,
            dtype=dtype,
            device=device,
            revision=revision,
            attention_backend=attention_backend,
            ops_backend=ops_backend,
            progress=progress,
            quantize=quantize,
            allow_pickle=allow_pickle,
            tensor_parallel=tensor_parallel,
        )
