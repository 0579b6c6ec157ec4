"""Checkpoint files → model weights: find the files, check them all, then stream them in.

The loader never trusts a checkpoint: it reads every shard header first and compares names and shapes
with the model before a single weight byte is read, so a wrong or incomplete checkpoint fails in a
second with one message that lists everything that is wrong.

Why we parse safetensors ourselves instead of using `safetensors.safe_open`: `safe_open` mmaps the
file, and every page it touches counts in the process's RSS until the mapping goes away. Reading
with `readinto` straight into a preallocated tensor keeps the peak at "final weights + one tensor"
(and, when the file already has the target dtype, at exactly the final weights: no copy at all).

The safetensors format: an 8-byte little-endian header length n, n bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data
region; offsets are relative to the start of the data region, and the tensors tile it exactly.

Nothing from a checkpoint is ever executed: `*.py` files and `auto_map` are ignored, and the
`pytorch_model*.bin` fallback uses `torch.load(weights_only=True)`, which refuses arbitrary pickles.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from .errors import NekomataError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
# safetensors itself refuses headers above 100 MB; a 7B checkpoint's header is ~30 kB.
MAX_HEADER_BYTES = 100_000_000
# Buffers some exports carry next to the weights. They are recomputed from the config, so they are
# skipped; anything else unexpected is an error.
IGNORED_KEY_SUFFIXES: tuple[str, ...] = (".inv_freq",)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_LISTED = 12  # how many names an error message spells out before saying "and N more"


class CheckpointError(NekomataError):
    """The checkpoint files are missing, corrupt, or do not match the model."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to check it against the model and to read it later."""

    name: str
    dtype: str  # safetensors dtype name ("BF16", "F32", ...)
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`; -1 for pytorch_model*.bin tensors
    nbytes: int


@dataclass(frozen=True)
class _Header:
    raw: dict[str, Any]  # the validated JSON header, as read_safetensors_header returns it
    tensors: list[TensorInfo]  # in file order (by offset)


# ====================================================================== locating the weight files
def checkpoint_weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a checkpoint directory, in loading order.

    `model.safetensors` if present; else the shards named by `model.safetensors.index.json`; else
    (with a one-line notice) `pytorch_model*.bin` files, which are read with `weights_only=True`.
    Raises `CheckpointError` naming the problem when none of these is usable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a directory; pass the checkpoint directory.")
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        return _files_from_index(folder, folder / INDEX_FILE, ".safetensors")
    if (folder / BIN_INDEX_FILE).is_file():
        files = _files_from_index(folder, folder / BIN_INDEX_FILE, ".bin")
    else:
        files = sorted(folder.glob("pytorch_model*.bin"))
    if files:
        logger.warning(
            "%s has no safetensors weights; reading %d pytorch_model*.bin file(s) with "
            "torch.load(weights_only=True) instead (slower, more memory).",
            folder,
            len(files),
        )
        return files
    names = sorted(p.name for p in folder.iterdir())
    stray = [name for name in names if name.endswith(".safetensors")]
    if stray:
        raise CheckpointError(
            f"{str(folder)!r} holds {_listing(stray)} but neither {SINGLE_FILE} nor {INDEX_FILE}; "
            f"rename a single-file checkpoint to {SINGLE_FILE}, or add the index that lists the shards."
        )
    raise CheckpointError(
        f"no model weights in {str(folder)!r}: expected {SINGLE_FILE}, or {INDEX_FILE} with its shards "
        f"(or pytorch_model*.bin). The folder holds: {_listing(names) if names else 'nothing'}. "
        "Download the weight files too (e.g. `huggingface-cli download REPO --include '*.safetensors*'`)."
    )


def _files_from_index(folder: Path, index: Path, suffix: str) -> list[Path]:
    """The distinct shard files an index names, each checked to be a file inside `folder`."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(index)!r} is not valid JSON ({exc}); download it again.") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{str(index)!r} has no 'weight_map' object (tensor name → shard file), so it is not a "
            "Hugging Face shard index; download it again."
        )
    shards: list[str] = []
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{str(index)!r}: weight_map[{key!r}] is {name!r}, not a shard file name.")
        if name not in shards:
            shards.append(name)
    for name in shards:
        # Lexical check on purpose: in the Hugging Face cache every file is a symlink into ../blobs,
        # so resolving links would put even honest shards "outside" the snapshot folder.
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not parts or parts[0] == "/" or ".." in parts or os.path.isabs(name) or ":" in parts[0]:
            raise CheckpointError(
                f"{str(index)!r} names the shard {name!r}, which lies outside the checkpoint folder; "
                "refusing to read it. Shards must be files inside the folder."
            )
        if not name.endswith(suffix):
            raise CheckpointError(
                f"{str(index)!r} names the shard {name!r}, but this index may only list *{suffix} files."
            )
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{str(index)!r} lists {len(missing)} shard(s) that are not in {str(folder)!r}: "
            f"{_listing(missing)}. The download is incomplete; fetch the missing file(s) again."
        )
    return [folder / name for name in sorted(shards)]  # as transformers does: shard 1 first


# ====================================================================== safetensors format
def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"corrupt safetensors file {str(path)!r}: {problem}. Download or convert this file again."
    )


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; two tensors with one name is corruption.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _read_header(path: Path) -> _Header:
    """Read and fully validate a safetensors header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(
                    path, f"it is only {size} bytes, too short for the 8-byte header length (truncated)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if not 2 <= header_len <= MAX_HEADER_BYTES:
                raise _corrupt(
                    path, f"the header length field says {header_len} bytes (not a safetensors file?)"
                )
            if 8 + header_len > size:
                raise _corrupt(
                    path,
                    f"its {header_len}-byte header runs past the end of the {size}-byte file (truncated)",
                )
            raw_bytes = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from None
    try:
        raw = json.loads(raw_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise _corrupt(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _corrupt(path, f"the header is a JSON {type(raw).__name__}, not an object")
    metadata = raw.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise _corrupt(path, "'__metadata__' is not a JSON object")

    data_start = 8 + header_len
    data_size = size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _corrupt(path, f"the entry for tensor {name!r} is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{str(path)!r}: tensor {name!r} has dtype {dtype!r}, which nekomata_core cannot read "
                f"(supported: {', '.join(SAFETENSORS_DTYPES)}). Convert the checkpoint to bf16/fp16/fp32."
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _corrupt(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        if end < begin:
            raise _corrupt(
                path, f"tensor {name!r} has data_offsets [{begin}, {end}], which end before they begin"
            )
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise _corrupt(
                path,
                f"tensor {name!r} is {dtype} of shape {shape}, which is {nbytes} bytes, but its "
                f"data_offsets [{begin}, {end}] span {end - begin} bytes",
            )
        if end > data_size:
            raise _corrupt(
                path,
                f"tensor {name!r} has data_offsets [{begin}, {end}] past the end of the data "
                f"({data_size} bytes after the header): the file is truncated or its header is wrong",
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), path, data_start + begin, nbytes))

    tensors.sort(key=lambda t: (t.offset, t.offset + t.nbytes))
    position = data_start
    for info in tensors:
        if info.offset != position:
            how = "overlaps the previous tensor" if info.offset < position else "leaves a gap before it"
            start = info.offset - data_start
            raise _corrupt(path, f"tensor {info.name!r} starts at data byte {start}, which {how}")
        position += info.nbytes
    if position != size:
        raise _corrupt(path, f"{size - position} unexpected bytes follow the last tensor (file {size} bytes)")
    return _Header(raw=raw, tensors=tensors)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated JSON header of a safetensors file: `{name: {"dtype", "shape", "data_offsets"}}`
    plus `"__metadata__"` when the file has one. Raises `CheckpointError` for corrupt files."""
    return _read_header(Path(path)).raw


def _read_into(f, info: TensorInfo, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `out` with the bytes of `info`, with no intermediate buffer."""
    if info.nbytes == 0:
        return
    # reshape(-1) first: a 0-dim tensor cannot be viewed as bytes. The numpy view aliases `out`.
    buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    f.seek(info.offset)
    done = 0
    while done < info.nbytes:
        # One read() returns at most ~2 GiB on Linux (a 7B fp32 lm_head is 2.5 GB): loop.
        count = f.readinto(buffer[done:])
        if not count:
            raise _corrupt(info.file, f"the file ended while reading tensor {info.name!r} (truncated)")
        done += count


def _read_tensor(f, info: TensorInfo, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    file_dtype = SAFETENSORS_DTYPES[info.dtype]
    if file_dtype == dtype and device.type == "cpu":
        out = torch.empty(info.shape, dtype=dtype)  # the final tensor: read straight into it
        _read_into(f, info, out)
        return out
    staging = torch.empty(info.shape, dtype=file_dtype)  # one tensor in the file's dtype, freed below
    _read_into(f, info, staging)
    return staging.to(device=device, dtype=dtype)


def iter_safetensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of a safetensors file, in file order, as CPU tensors of
    the file's dtype. Only one tensor is read at a time; the header is validated first."""
    path = Path(path)
    header = _read_header(path)
    with open(path, "rb", buffering=0) as f:
        for info in header.tensors:
            out = torch.empty(info.shape, dtype=SAFETENSORS_DTYPES[info.dtype])
            _read_into(f, info, out)
            yield info.name, out


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` as a safetensors file (`{"format": "pt"}` metadata unless given)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), os.fspath(path), metadata=metadata if metadata is not None else {"format": "pt"})


# ====================================================================== pytorch_model*.bin fallback
def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict, via the restricted unpickler only (never arbitrary code)."""
    try:
        try:
            state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files from torch < 1.6 (legacy format) cannot be mmapped; still weights_only.
            state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{str(path)!r} contains pickled Python objects other than tensors; refusing to load it, "
                "because unpickling them could run arbitrary code. Use the checkpoint's safetensors files, "
                "or convert this file to safetensors in an environment you trust."
            ) from None
        raise CheckpointError(f"{str(path)!r} is not a readable PyTorch weights file ({exc}).") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch weights file ({first_line}); it is corrupt or "
            "truncated. Download it again."
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{str(path)!r} is not a flat state dict (a dict of tensor name → tensor); it cannot be loaded."
        )
    return state


def _bin_entries(path: Path) -> list[TensorInfo]:
    entries = []
    for name, tensor in _torch_load(path).items():
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} has unsupported dtype {tensor.dtype}.")
        size = tensor.numel() * tensor.element_size()
        dtype = _SAFETENSORS_NAMES[tensor.dtype]
        entries.append(TensorInfo(name, dtype, tuple(tensor.shape), path, offset=-1, nbytes=size))
    return entries


# ====================================================================== checking
def _scan(files: list[Path]) -> tuple[dict[str, TensorInfo], list[str]]:
    """All tensors of all files by name, plus every file-level problem found (not just the first)."""
    entries: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for path in files:
        try:
            infos = _bin_entries(path) if path.suffix == ".bin" else _read_header(path).tensors
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for info in infos:
            if info.name in entries:
                problems.append(
                    f"tensor {info.name!r} is stored twice, in {entries[info.name].file.name!r} and "
                    f"{path.name!r}; the shards do not belong to one checkpoint."
                )
            else:
                entries[info.name] = info
    problems.extend(_index_problems(files, entries))
    return entries, problems


def _index_problems(files: list[Path], entries: Mapping[str, TensorInfo]) -> list[str]:
    """An index that places tensors in shards that do not hold them belongs to other files."""
    if not files or files[0].name == SINGLE_FILE:
        return []
    folder = files[0].parent
    index = folder / (INDEX_FILE if files[0].suffix == ".safetensors" else BIN_INDEX_FILE)
    if not index.is_file():  # a glob of pytorch_model*.bin without an index
        return []
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]  # validated already
    wrong = [
        f"{key} (index: {shard}, found: {entries[key].file.name if key in entries else 'nowhere'})"
        for key, shard in weight_map.items()
        if key not in entries or entries[key].file != folder / shard
    ]
    if not wrong:
        return []
    return [
        f"{str(index)!r} does not match its shards: {len(wrong)} tensor(s) are not where it says: "
        f"{_listing(wrong, sep='; ')}. Download the index and shards again from one revision."
    ]


def _is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_KEY_SUFFIXES)


def _compare(
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]], entries: Mapping[str, TensorInfo]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched, ignored) of the files against the expected name → (shape, dtype).

    An expected dtype of None (or any floating dtype) accepts any floating file dtype, which is then
    converted; a non-floating expected dtype (e.g. int8 weights) must match the file exactly.
    """
    missing = [name for name in expected if name not in entries]
    unexpected = [name for name in entries if name not in expected and not _is_ignored(name)]
    ignored = [name for name in entries if name not in expected and _is_ignored(name)]
    mismatched = []
    for name, (shape, want_dtype) in expected.items():
        info = entries.get(name)
        if info is None:
            continue
        file_dtype = SAFETENSORS_DTYPES[info.dtype]
        if info.shape != tuple(shape):
            mismatched.append(f"{name}: file has shape {list(info.shape)}, model expects {list(shape)}")
        elif want_dtype is None or want_dtype.is_floating_point:
            if not file_dtype.is_floating_point:
                mismatched.append(
                    f"{name}: file has dtype {info.dtype}, model expects floating-point weights "
                    "(a quantized checkpoint? load it with the matching quantized model)"
                )
        elif file_dtype != want_dtype:
            mismatched.append(f"{name}: file has dtype {info.dtype}, model expects {want_dtype}")
    return missing, unexpected, mismatched, ignored


def _mismatch_message(folder: Path, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    lines = [f"the checkpoint in {str(folder)!r} does not match the model:"]
    if missing:
        lines.append(f"  missing {len(missing)} tensor(s): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape/dtype mismatch(es): {_listing(mismatched, sep='; ')}")
    lines.append(
        "  Fix: make sure config.json belongs to these weights (vocab_size, hidden_size, layers, "
        "intermediate_size) and that every shard was downloaded completely."
    )
    return "\n".join(lines)


def _listing(items: list[str], sep: str = ", ") -> str:
    shown = sep.join(items[:_MAX_LISTED])
    return shown + (f"{sep}… and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ====================================================================== loading into a model
def load_weights(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool = True,
    after_tensor: Callable[[str], None] | None = None,
) -> None:
    """Replace every parameter of `model` (normally on the meta device) with the checkpoint's tensor.

    Each parameter becomes `nn.Parameter(tensor, requires_grad=False)` of `dtype` (non-floating
    parameters keep their own dtype) on `device`. All headers are checked against the model first:
    missing, unexpected (other than `*.inv_freq` buffers) and mis-shaped tensors are reported together
    in one `CheckpointError` before any weight is read. Then the files are streamed one tensor at a
    time, so peak memory is the final weights plus at most one tensor. `after_tensor(name)`, if given,
    is called after each parameter is set (quantize-on-load uses it to convert a layer as soon as its
    last tensor is in).
    """
    folder = Path(folder)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    device = torch.device(device)

    files = checkpoint_weight_files(folder)
    entries, problems = _scan(files)
    if problems:
        raise CheckpointError(f"cannot load the checkpoint in {str(folder)!r}:\n  " + "\n  ".join(problems))
    params = dict(model.named_parameters())
    expected = {name: (tuple(p.shape), p.dtype) for name, p in params.items()}
    missing, unexpected, mismatched, _ = _compare(expected, entries)
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(folder, missing, unexpected, mismatched))

    targets = {name: dtype if p.dtype.is_floating_point else p.dtype for name, p in params.items()}
    by_file: dict[Path, list[TensorInfo]] = {path: [] for path in files}
    for name in expected:
        by_file[entries[name].file].append(entries[name])
    for path, infos in by_file.items():
        if not infos:
            continue
        with _progress_bar(path, sum(i.nbytes for i in infos), progress) as bar:
            if path.suffix == ".bin":
                state = _torch_load(path)
                for info in infos:
                    # copy=True: never keep a parameter that aliases the file mapping.
                    tensor = state.pop(info.name).to(device=device, dtype=targets[info.name], copy=True)
                    _set_parameter(model, info.name, tensor)
                    if after_tensor is not None:
                        after_tensor(info.name)
                    bar.update(info.nbytes)
                del state
                continue
            with open(path, "rb", buffering=0) as f:  # unbuffered: readinto goes straight to the tensor
                for info in sorted(infos, key=lambda i: i.offset):  # sequential reads
                    _set_parameter(model, info.name, _read_tensor(f, info, targets[info.name], device))
                    if after_tensor is not None:
                        after_tensor(info.name)
                    bar.update(info.nbytes)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_bar(path: Path, total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub, but the loader must not depend on it
        return _NoBar()
    # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI).
    return tqdm(
        total=total, unit="B", unit_scale=True, desc=f"loading {path.name}", leave=False, disable=None
    )


# ====================================================================== verification report
@dataclass
class CheckpointReport:
    """What `verify_checkpoint` found, from the headers alone (no weight data is read)."""

    folder: Path
    files: list[tuple[str, int]] = field(default_factory=list)  # (file name, size in bytes)
    dtypes: list[str] = field(default_factory=list)  # safetensors dtype names found, e.g. ["BF16"]
    num_tensors: int = 0
    num_parameters: int = 0  # elements in the files, ignored buffers excluded
    total_bytes: int = 0  # tensor data bytes, ignored buffers included
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # known harmless extras (`*.inv_freq`)
    problems: list[str] = field(default_factory=list)  # unreadable/corrupt files, bad index, duplicates

    @property
    def ok(self) -> bool:
        return not (self.problems or self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["folder"] = str(self.folder)
        data["files"] = [{"name": name, "bytes": size} for name, size in self.files]
        data["ok"] = self.ok
        return data


def verify_checkpoint(folder: str | os.PathLike[str], config) -> CheckpointReport:
    """Check a checkpoint directory against `config.parameter_shapes()` without reading weights.

    Never raises for a bad checkpoint: every problem lands in the report (`report.ok` is False).
    """
    folder = Path(folder)
    report = CheckpointReport(folder=folder)
    try:
        files = checkpoint_weight_files(folder)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    report.files = [(str(path.relative_to(folder)), path.stat().st_size) for path in files]
    entries, report.problems = _scan(files)
    report.num_tensors = len(entries)
    report.dtypes = sorted({info.dtype for info in entries.values()})
    report.total_bytes = sum(info.nbytes for info in entries.values())
    report.num_parameters = sum(math.prod(i.shape) for i in entries.values() if not _is_ignored(i.name))
    expected = {name: (shape, None) for name, shape in config.parameter_shapes().items()}
    report.missing, report.unexpected, report.mismatched, report.ignored = _compare(expected, entries)
    return report
