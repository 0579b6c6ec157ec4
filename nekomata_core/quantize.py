"""int8 weight-only quantization: every linear layer (and lm_head) stores int8 weights plus one scale per
output channel; activations stay in the model dtype.

Decoding one token reads every weight once, so at batch 1 speed is set by the bytes of the weights:
int8 halves them against bf16. Per output channel `scale = max|w_row| / 127` and
`q = round(w / scale)`, so `w ≈ q · scale` with an error of at most scale / 2 per weight.

A quantized model can be saved (`save_quantized`) as a normal checkpoint folder whose config.json
carries `"quantization": {"method": "int8_weight_only", ...}`; `QwenForCausalLM.from_pretrained`
then builds the int8 layers directly and loads them without re-quantizing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

QUANT_METHOD = "int8_weight_only"
QUANTIZE_CHOICES = ("int8",)
QUANTIZE_CHUNK_ROWS = 4096


class Int8Linear(nn.Module):
    """y = (x @ q^T) · scale + bias, with q int8 [out, in] and scale [out] in the activation dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Parameters (frozen) rather than buffers, so the loader and state_dict treat them like weights.
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach()
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        # A few thousand rows at a time: an fp32 copy of a whole lm_head would cost 2.5 GB for 7B.
        for rows in torch.arange(weight.shape[0], device=weight.device).split(QUANTIZE_CHUNK_ROWS):
            block = weight[rows[0] : rows[-1] + 1].float()
            block_scales = block.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [rows] per output channel
            q[rows[0] : rows[-1] + 1] = (
                torch.round(block / block_scales[:, None]).clamp(-127, 127).to(torch.int8)
            )
            scales[rows[0] : rows[-1] + 1] = block_scales
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.scales = nn.Parameter(scales.to(weight.dtype), requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    native_gemv = False  # one-row calls on CPU go to kernels.cpu_gemv (set by set_backends)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_gemv and x.numel() == x.shape[-1]:
            from kernels import cpu_gemv

            if torch.compiler.is_compiling():  # a graph node instead of an opaque ctypes call
                return cpu_gemv.linear_int8_op(x, self.weight, self.scales, self.bias)
            return cpu_gemv.linear_int8(x, self.weight, self.scales, self.bias)
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x.device.type == "cpu":
            # PyTorch's fused CPU kernel reads the int8 weight once and scales in registers.
            y = torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), self.weight, self.scales.to(x.dtype))
        else:
            y = F.linear(x2d, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a loaded model by an Int8Linear, in place, one layer at a time."""
    for name in _linear_names(model):
        quantize_linear(model, name)
    return model


def quantize_linear(model: nn.Module, name: str) -> None:
    """Replace the nn.Linear called `name` by its Int8Linear (the float weight is then freed)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, Int8Linear.from_linear(getattr(parent, leaf)))


class QuantizeOnLoad:
    """`after_tensor` callback for `loader.load_weights`: each nn.Linear is quantized as soon as all of
    its tensors are loaded, so a float copy of the whole model never exists (peak memory: the int8
    model plus one float layer, instead of the whole float model; a bf16 nekomata-14b needs 28 GB,
    its int8 form 15 GB)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.linears = set(_linear_names(model))

    def __call__(self, tensor_name: str) -> None:
        module_name = tensor_name.rpartition(".")[0]
        if module_name not in self.linears:
            return
        module = self.model.get_submodule(module_name)
        if any(p.is_meta for p in module.parameters()):
            return  # its other tensor (weight or bias) is still to come
        quantize_linear(self.model, module_name)
        self.linears.discard(module_name)


def convert_to_int8_structure(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Swap every nn.Linear for an empty Int8Linear (on the meta device): the shape of a saved int8
    checkpoint, ready for the loader."""
    for name in _linear_names(model):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, leaf)
        with torch.device("meta"):
            setattr(
                parent,
                leaf,
                Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype),
            )
    return model


def quantization_of(config_extra: dict) -> str | None:
    """The quantization recorded in a config.json (None for a plain checkpoint)."""
    info = config_extra.get("quantization")
    if info is None:
        return None
    if not isinstance(info, dict) or info.get("method") != QUANT_METHOD:
        raise ValueError(
            f"config.json has quantization={info!r}; nekomata_core reads only "
            f"{{'method': '{QUANT_METHOD}'}} checkpoints written by save_quantized"
        )
    return "int8"


def save_quantized(
    model: nn.Module, out_dir: str | os.PathLike[str], source_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Write an int8 model as a checkpoint folder (config.json, model.safetensors, and the tokenizer /
    generation_config.json copied from `source_dir` when given)."""
    from .loader import save_safetensors

    if not any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("the model has no int8 layers; quantize it first (quantize_int8 or quantize='int8')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["quantization"] = {"method": QUANT_METHOD, "bits": 8, "granularity": "per_output_channel"}
    scale_dtype = next(m.scales.dtype for m in model.modules() if isinstance(m, Int8Linear))
    for flag, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        config[flag] = scale_dtype == dt
    (out / "config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    save_safetensors(state, out / "model.safetensors")
    if source_dir is not None:
        for name in ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, out / name)
    return out
