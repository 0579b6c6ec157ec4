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

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .errors import NekomataError

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
    def from_linear(cls, linear: nn.Linear, row_absmax: torch.Tensor | None = None) -> Int8Linear:
        """The int8 form of a linear. `row_absmax` [out]: max |w| of each whole row when this linear
        holds only some of each row's columns (a row-parallel shard), so the scales are those of the
        whole layer; None = this weight's own rows."""
        weight = linear.weight.detach()
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        # A few thousand rows at a time: an fp32 copy of a whole lm_head would cost 2.5 GB for 7B.
        for rows in torch.arange(weight.shape[0], device=weight.device).split(QUANTIZE_CHUNK_ROWS):
            block = weight[rows[0] : rows[-1] + 1].float()
            absmax = block.abs().amax(dim=1) if row_absmax is None else row_absmax[rows[0] : rows[-1] + 1].float()
            block_scales = absmax.clamp(min=1e-12) / 127.0  # [rows] per output channel
            q[rows[0] : rows[-1] + 1] = (
                torch.round(block / block_scales[:, None]).clamp(-127, 127).to(torch.int8)
            )
            scales[rows[0] : rows[-1] + 1] = block_scales
        out_features, in_features = weight.shape  # a shard's own shape, not the layer's
        module = cls(in_features, out_features, linear.bias is not None, weight.dtype)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.scales = nn.Parameter(scales.to(weight.dtype), requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def quantize_linear(model: nn.Module, name: str, row_absmax: torch.Tensor | None = None) -> None:
    """Replace the nn.Linear called `name` by its Int8Linear (the float weight is then freed)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, Int8Linear.from_linear(getattr(parent, leaf), row_absmax))


class QuantizeOnLoad:
    """`after_tensor` callback for `loader.load_weights`: each nn.Linear is quantized as soon as all of
    its tensors are loaded, so a float copy of the whole model never exists (peak memory: the int8
    model plus one float layer, instead of the whole float model; a bf16 nekomata-14b needs 28 GB,
    its int8 form 15 GB)."""

    def __init__(
        self, model: nn.Module, row_absmax: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None
    ) -> None:
        self.model = model
        self.linears = set(_linear_names(model))
        # For tensor parallelism: (name, weight) → max |w| of each whole row when the rows are split
        # across processes, else None (see Int8Linear.from_linear).
        self.row_absmax = row_absmax

    def __call__(self, tensor_name: str) -> None:
        module_name = tensor_name.rpartition(".")[0]
        if module_name not in self.linears:
            return
        module = self.model.get_submodule(module_name)
        if any(p.is_meta for p in module.parameters()):
            return  # its other tensor (weight or bias) is still to come
        absmax = None if self.row_absmax is None else self.row_absmax(module_name, module.weight)
        quantize_linear(self.model, module_name, absmax)
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
        raise ConfigError(
            f"config.json has quantization={info!r}; nekomata_core reads only "
            f"{{'method': '{QUANT_METHOD}'}} checkpoints written by save_quantized"
        )
    return "int8"


class SaveError(NekomataError):
    """`save_quantized` cannot write where it was asked to (the message names the folder and the fix)."""


# What save_quantized writes, and the files it copies from the source checkpoint.
_SAVED_FILES = ("config.json", "model.safetensors")
_COPIED_FILES = ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json")
# Hidden siblings of the target: `.NAME.tmp-PID-XXXX` (a save being written) and `.NAME.old-PID-XXXX`
# (the previous checkpoint, moved aside for the instant of the swap).
_SIBLING_KINDS = ("tmp", "old")


def save_quantized(
    model: nn.Module, out_dir: str | os.PathLike[str], source_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Write an int8 model as a checkpoint folder (config.json, model.safetensors, and the tokenizer /
    generation_config.json copied from `source_dir` when given); returns the folder.

    The folder appears whole or not at all. Everything is written into a hidden sibling
    (``.NAME.tmp-…``, same parent, so the final rename stays on one file system), flushed to disk, then
    renamed to `out_dir`. An existing `out_dir` (an earlier checkpoint, or an empty folder) is renamed
    aside (``.NAME.old-…``), the new folder renamed in, then the old one deleted: at any instant
    `out_dir` is the old checkpoint, the new one, or — only between those two renames, if the process
    is killed right there — absent, with the old checkpoint intact in ``.NAME.old-…``. A failed save
    removes its sibling; one killed outright leaves only hidden siblings, which the next save into the
    same folder deletes (those whose process is gone).

    Refused before anything is written (SaveError): saving into the folder the model was loaded from
    (`model.checkpoint_dir` or `source_dir`: it holds the float weights) or into a folder that contains
    it, and replacing a folder that is not a checkpoint (it has no config.json, or holds sub-folders).
    """
    from .loader import save_safetensors

    if not any(isinstance(m, Int8Linear) for m in model.modules()):
        raise SaveError("the model has no int8 layers; quantize it first (quantize_int8 or quantize='int8')")
    out = Path(os.path.abspath(out_dir))
    sources = [Path(d) for d in (getattr(model, "checkpoint_dir", None), source_dir) if d is not None]
    _check_target(out, sources)

    config = model.config.to_dict()
    config["quantization"] = {"method": QUANT_METHOD, "bits": 8, "granularity": "per_output_channel"}
    scale_dtype = next(m.scales.dtype for m in model.modules() if isinstance(m, Int8Linear))
    for flag, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        config[flag] = scale_dtype == dt

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "tmp"), dir=out.parent))
    try:
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
        save_safetensors(state, tmp / "model.safetensors")
        del state
        if source_dir is not None:
            for name in _COPIED_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copyfile(Path(source_dir) / name, tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700; a checkpoint folder is an ordinary folder
        _fsync_tree(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sibling_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def _check_target(out: Path, sources: list[Path]) -> None:
    """Refuse, before anything is written, a target that would destroy the source or a non-checkpoint."""
    real_out = Path(os.path.realpath(out))
    for source in sources:
        real_source = Path(os.path.realpath(source))
        same = real_out == real_source or (out.exists() and source.exists() and os.path.samefile(out, source))
        if same or real_out in real_source.parents:
            where = "is" if same else "contains"
            raise SaveError(
                f"save_quantized: {str(out)!r} {where} the folder the model was loaded from "
                f"({str(source)!r}); saving there would replace its float weights. Save into a new "
                "folder instead, e.g. a sibling named '<model>-int8'."
            )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise SaveError(
            f"save_quantized: {str(out)!r} exists and is not a folder; choose a new folder or remove it"
        )
    entries = list(out.iterdir())
    if not entries:
        return
    # The target is replaced as a whole, so it must be something save_quantized may replace.
    folders = sorted(e.name for e in entries if e.is_dir() and not e.is_symlink())
    if folders or not (out / "config.json").is_file():
        why = f"it holds the sub-folder(s) {folders[:3]}" if folders else "it has no config.json"
        raise SaveError(
            f"save_quantized: {str(out)!r} is not a checkpoint folder ({why}); the target is replaced as "
            "a whole, so choose a new or empty folder, or an earlier save_quantized checkpoint"
        )
    for source in sources:  # a folder of links into the source checkpoint (e.g. a Hub snapshot)
        for entry in entries:
            for name in (*_SAVED_FILES, *_COPIED_FILES):
                candidate = source / name
                if candidate.exists() and entry.exists() and os.path.samefile(entry, candidate):
                    raise SaveError(
                        f"save_quantized: {str(entry)!r} is the same file as {str(candidate)!r} of the "
                        "checkpoint the model was loaded from; save into a new folder instead"
                    )


def _remove_stale_siblings(out: Path) -> None:
    """Delete the hidden siblings left by saves into `out` that were killed (their process is gone)."""
    for kind in _SIBLING_KINDS:
        for sibling in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*-*"):
            pid_text = sibling.name[len(f".{out.name}.{kind}-") :].partition("-")[0]
            if pid_text.isdigit() and not _process_alive(int(pid_text)):
                shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    """Flush the files and the folder, so that after the rename a crash cannot leave empty files."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is renamed aside first and deleted last."""
    old: Path | None = None
    if out.exists():
        # mkdtemp reserves a unique name; rename (a directory over an empty directory) then takes it.
        old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "old"), dir=out.parent))
        os.rename(out, old)
    try:
        os.rename(new, out)  # the instant the new checkpoint appears
    except BaseException:
        if old is not None:
            os.rename(old, out)  # put the previous checkpoint back
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
