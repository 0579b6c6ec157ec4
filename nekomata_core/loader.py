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

Nothing from a checkpoint is ever executed: `*.py` files and `auto_map` are ignored, and pickled
`pytorch_model*.bin` weights are refused unless the caller opts in with `allow_pickle=True` (then they
are read with `torch.load(weights_only=True)`, which refuses arbitrary objects); `convert_bin_checkpoint`
turns them into safetensors once. Every file is opened only after `safe_files.check_inside` has checked
that its links stay inside the checkpoint folder (or the Hugging Face cache's blobs/ of the same repo),
and every JSON read is bounded in size (`safe_files`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, QwenConfig
from .errors import NekomataError
from .hub import download_command
from .safe_files import INDEX_JSON_MAX_BYTES, JSONFileError, check_inside, decode_json_object, read_json_file

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
def checkpoint_weight_files(folder: str | os.PathLike[str], *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in loading order.

    `model.safetensors` if present; else the shards named by `model.safetensors.index.json`; else,
    only with `allow_pickle=True`, `pytorch_model*.bin` files (read with `weights_only=True`); without
    it such a checkpoint is refused with the command that converts it. Every file returned has passed
    `check_inside` (no links out of the folder). Raises `CheckpointError` naming the problem when
    none of these is usable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a directory; pass the checkpoint directory.")
    if (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    elif (folder / INDEX_FILE).is_file():
        files = _files_from_index(folder, folder / INDEX_FILE, ".safetensors")
    else:
        files = _pickle_files(folder, allow_pickle)
    for path in files:
        _checked(path, folder)
    return files


def _checked(path: Path, folder: Path) -> Path:
    """`check_inside` with the loader's error class; every file the loader opens goes through here."""
    try:
        return check_inside(path, folder, error=CheckpointError)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{exc}; download the checkpoint again.") from None


def _pickle_files(folder: Path, allow_pickle: bool) -> list[Path]:
    if (folder / BIN_INDEX_FILE).is_file():
        files = _files_from_index(folder, folder / BIN_INDEX_FILE, ".bin")
    else:
        files = sorted(folder.glob("pytorch_model*.bin"))
    if files and not allow_pickle:
        raise CheckpointError(
            f"{str(folder)!r} holds only pickled PyTorch weights ({_listing([p.name for p in files])}), and "
            "nekomata_core reads safetensors only unless you opt in. Convert them once, in an environment "
            'you trust: python -c "from nekomata_core.loader import convert_bin_checkpoint; '
            f'convert_bin_checkpoint({str(folder)!r})" (writes model*.safetensors next to them), or pass '
            "allow_pickle=True to from_pretrained to read them with torch.load(weights_only=True)."
        )
    if files:
        logger.warning(
            "%s has no safetensors weights; reading %d pytorch_model*.bin file(s) with "
            "torch.load(weights_only=True) instead (allow_pickle=True; slower, more memory).",
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
    command = download_command("REPO", include="'*.safetensors*'")
    raise CheckpointError(
        f"no model weights in {str(folder)!r}: expected {SINGLE_FILE}, or {INDEX_FILE} with its shards. "
        f"The folder holds: {_listing(names) if names else 'nothing'}. Download the weight files too "
        f"(e.g. `{command}`)."
    )


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map (tensor name → shard file) of a shard index, bounded in size and checked in type."""
    data = read_json_file(
        index, max_bytes=INDEX_JSON_MAX_BYTES, error=CheckpointError, fix="download it again"
    )
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{str(index)!r} has no 'weight_map' object (tensor name → shard file), so it is not a "
            "Hugging Face shard index; download it again."
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(
                f"{str(index)!r}: weight_map[{key!r}] is {_short(name)}, not a shard file name."
            )
    return weight_map


def _files_from_index(folder: Path, index: Path, suffix: str) -> list[Path]:
    """The distinct shard files an index names, each checked to be a file inside `folder`."""
    _checked(index, folder)
    shards = list(dict.fromkeys(_read_index(index).values()))  # distinct, in order
    for name in shards:
        # A lexical check first, for a clear message; `check_inside` then follows any links.
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


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: messages quote hostile values without printing them whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ====================================================================== safetensors format
def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"corrupt safetensors file {str(path)!r}: {problem}. Download or convert this file again."
    )


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
                # The value is not printed: for a file that is not safetensors it is 8 of its bytes.
                raise _corrupt(
                    path,
                    f"its first 8 bytes are not a header length between 2 and {MAX_HEADER_BYTES:,} "
                    "(not a safetensors file?)",
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
        # Duplicate keys are refused: json.loads would silently keep the last of two equal tensor names.
        raw = decode_json_object(raw_bytes, base_offset=8, reject_duplicate_keys=True)
    except JSONFileError as exc:
        raise _corrupt(path, f"its JSON header: {exc}") from None
    metadata = raw.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise _corrupt(path, "'__metadata__' is not a JSON object")

    data_start = 8 + header_len
    data_size = size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        tensor = _short(name)
        if not isinstance(entry, dict):
            raise _corrupt(
                path, f"the entry for tensor {tensor} is a JSON {type(entry).__name__}, not an object"
            )
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        # Each field's type first: a hostile header may put anything there (a list is unhashable).
        if not isinstance(dtype, str):
            raise _corrupt(
                path, f"tensor {tensor} has field 'dtype' = {_short(dtype)}, not a string such as \"BF16\""
            )
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{str(path)!r}: tensor {tensor} has dtype {_short(dtype)}, which nekomata_core cannot read "
                f"(supported: {', '.join(SAFETENSORS_DTYPES)}). Convert the checkpoint to bf16/fp16/fp32."
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _corrupt(
                path,
                f"tensor {tensor} has field 'shape' = {_short(shape)}, not a list of non-negative integers",
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _corrupt(
                path,
                f"tensor {tensor} has field 'data_offsets' = {_short(offsets)}, not [begin, end] "
                "(two non-negative integers)",
            )
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


# A part of a tensor to read: (dim, [(start, stop), ...]) — the given ranges along dim 0 (whole rows) or
# dim 1 (whole columns of a 2-D tensor), concatenated in that order. Tensor parallelism reads its shards so.
Selection = tuple[int, list[tuple[int, int]]]


def select(tensor: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The part of an in-memory tensor that `selection` names (a copy, contiguous)."""
    dim, ranges = selection
    return torch.cat([tensor.narrow(dim, start, stop - start) for start, stop in ranges], dim=dim).contiguous()


def _read_selected(f, info: TensorInfo, selection: Selection, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Read only the selected rows or columns of a tensor straight into the result: the bytes of the rest
    are never read, and nothing but the result is allocated. (Staging blocks of whole rows, allocated
    and freed per block, left a rank's heap fragmented: ~0.2 GB resident and unused at qwen-1.8b.)"""
    dim, ranges = selection
    file_dtype = SAFETENSORS_DTYPES[info.dtype]
    itemsize = torch.empty((), dtype=file_dtype).element_size()
    if dim == 0:
        row_bytes = math.prod(info.shape[1:]) * itemsize
        out = torch.empty((sum(b - a for a, b in ranges), *info.shape[1:]), dtype=file_dtype)
        row = 0
        for start, stop in ranges:  # each range is one contiguous run of bytes in the file
            part = TensorInfo(info.name, info.dtype, (), info.file, info.offset + start * row_bytes,
                              (stop - start) * row_bytes)
            _read_into(f, part, out[row : row + stop - start])
            row += stop - start
    else:  # columns of a 2-D tensor [R, C]: one positioned read per row and range, into that row of `out`
        rows, columns = info.shape
        width = sum(b - a for a, b in ranges)
        out = torch.empty((rows, width), dtype=file_dtype)
        flat = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # aliases `out`
        pieces = []  # (byte offset in a file row, byte offset in an out row, bytes)
        at = 0
        for start, stop in ranges:
            pieces.append((start * itemsize, at * itemsize, (stop - start) * itemsize))
            at += stop - start
        fd = f.fileno()
        for r in range(rows):
            file_row, out_row = info.offset + r * columns * itemsize, r * width * itemsize
            for source, target, count in pieces:
                _pread_into(fd, flat[out_row + target : out_row + target + count], file_row + source, info)
    return out.to(device=device, dtype=dtype)


def _pread_into(fd: int, buffer: memoryview, offset: int, info: TensorInfo) -> None:
    """Fill `buffer` with the file's bytes from `offset` (positioned reads: no seek, one call a piece)."""
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if not count:
            raise _corrupt(info.file, f"the file ended while reading tensor {info.name!r} (truncated)")
        done += count


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
@dataclass
class _Scan:
    """What the headers of a checkpoint's files say, and every file-level problem (not just the first)."""

    files: list[Path]
    entries: dict[str, TensorInfo]  # every tensor of every readable file, by name
    problems: list[str]
    broken: list[Path]  # files whose header (or pickle) could not be read
    weight_map: dict[str, str] | None  # the shard index (tensor name → file name), if the checkpoint has one


def _scan(files: list[Path]) -> _Scan:
    entries: dict[str, TensorInfo] = {}
    problems: list[str] = []
    broken: list[Path] = []
    for path in files:
        try:
            infos = _bin_entries(path) if path.suffix == ".bin" else _read_header(path).tensors
        except CheckpointError as exc:
            problems.append(str(exc))
            broken.append(path)
            continue
        for info in infos:
            if info.name in entries:
                problems.append(
                    f"tensor {info.name!r} is stored twice, in {entries[info.name].file.name!r} and "
                    f"{path.name!r}; the shards do not belong to one checkpoint."
                )
            else:
                entries[info.name] = info
    scan = _Scan(files, entries, problems, broken, _weight_map(files))
    problems.extend(_index_problems(scan))
    return scan


def _weight_map(files: list[Path]) -> dict[str, str] | None:
    if not files or files[0].name == SINGLE_FILE:
        return None
    index = files[0].parent / (INDEX_FILE if files[0].suffix == ".safetensors" else BIN_INDEX_FILE)
    return _read_index(index) if index.is_file() else None  # None: a glob of pytorch_model*.bin


def _index_problems(scan: _Scan) -> list[str]:
    """An index that places tensors in shards that do not hold them belongs to other files. Tensors of
    a broken shard are not counted here: that shard's own problem is already reported."""
    if scan.weight_map is None:
        return []
    folder = scan.files[0].parent
    index = folder / (INDEX_FILE if scan.files[0].suffix == ".safetensors" else BIN_INDEX_FILE)
    broken = {path.name for path in scan.broken}
    entries = scan.entries
    wrong = [
        f"{key} (index: {shard}, found: {entries[key].file.name if key in entries else 'nowhere'})"
        for key, shard in scan.weight_map.items()
        if shard not in broken and (key not in entries or entries[key].file != folder / shard)
    ]
    if not wrong:
        return []
    return [
        f"{str(index)!r} does not match its shards: {len(wrong)} tensor(s) are not where it says: "
        f"{_listing(wrong, sep='; ')}. Download the index and shards again from one revision."
    ]


_LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.")
# (config key, a tensor whose shape shows it, the dimension, config units per element of that dimension)
_SHAPE_KEYS: tuple[tuple[str, str, int, int], ...] = (
    ("vocab_size", "transformer.wte.weight", 0, 1),
    ("hidden_size", "transformer.wte.weight", 1, 1),
    ("vocab_size", "lm_head.weight", 0, 1),
    ("intermediate_size", "transformer.h.0.mlp.w1.weight", 0, 2),  # Qwen quirk: twice the MLP width
)


def _config_problems(config: QwenConfig, scan: _Scan) -> list[str]:
    """Where config.json disagrees with the tensors the files (or their index) declare, each naming the
    config key and what the files hold.

    Checked before anything is built from the config: `parameter_shapes()`, the model and the per-tensor
    comparison have one entry per layer, so `num_hidden_layers: 10**9` must fail here, cheaply. Nothing
    below is proportional to the config's sizes, only to the files' headers.
    """
    problems: list[str] = []
    # An absolute bound that holds even when headers are unreadable: every weight takes at least half a
    # byte (int4 checkpoints pack two to a byte; a saved nekomata-7b int4 holds 0.84 bytes per parameter).
    file_bytes = sum(path.stat().st_size for path in scan.files)
    params = config.num_parameters()
    if params > 2 * file_bytes:
        problems.append(
            f"config.json implies {params:,} parameters (num_hidden_layers {config.num_hidden_layers:,}, "
            f"hidden_size {config.hidden_size:,}, vocab_size {config.vocab_size:,}, intermediate_size "
            f"{config.intermediate_size:,}), but the weight files hold only {file_bytes:,} bytes"
        )
    # The tensor names: the index lists them even for a broken shard; otherwise only readable headers do.
    names = scan.weight_map if scan.weight_map is not None else (None if scan.broken else scan.entries)
    if names is not None:
        layers = {int(match.group(1)) for name in names if (match := _LAYER_KEY.match(name))}
        held = max(layers) + 1 if layers else 0
        if config.num_hidden_layers != held:
            where = f"transformer.h.0 … transformer.h.{held - 1}" if held else "no transformer.h.N tensors"
            problems.append(
                f"config key 'num_hidden_layers' is {config.num_hidden_layers:,}, but the checkpoint's files "
                f"hold {held} layer(s) ({where})"
            )
        elif config.num_tensors() > len(names):  # e.g. one stray "transformer.h.999999999." name
            problems.append(
                f"config.json implies {config.num_tensors():,} tensors ({config.num_hidden_layers:,} layers), "
                f"but the checkpoint's files declare only {len(names):,}"
            )
    for key, tensor, dim, units in _SHAPE_KEYS:
        info = scan.entries.get(tensor)
        if info is None or len(info.shape) <= dim:
            continue  # absent or of another rank: the per-tensor comparison names it
        held_value = info.shape[dim] * units
        if getattr(config, key) != held_value and not any(f"'{key}'" in p for p in problems):
            problems.append(
                f"config key {key!r} is {getattr(config, key):,}, but {tensor} in {info.file.name!r} has shape "
                f"{list(info.shape)}, which means {key} {held_value:,}"
            )
    if problems:
        problems.append(
            "Fix: use the config.json that came with these weights (or the weights of this config)."
        )
    return problems


def check_checkpoint(
    folder: str | os.PathLike[str], config: QwenConfig, *, allow_pickle: bool = False
) -> None:
    """Check every file of the checkpoint in `folder` and `config` against the tensors they declare,
    reading headers only, before anything is built: raises `CheckpointError` for broken files and
    `ConfigError` (naming the key and what the files hold) when config.json does not fit the files."""
    folder = Path(folder)
    scan = _scan(checkpoint_weight_files(folder, allow_pickle=allow_pickle))
    if scan.problems:
        raise CheckpointError(
            f"cannot load the checkpoint in {str(folder)!r}:\n  " + "\n  ".join(scan.problems)
        )
    problems = _config_problems(config, scan)
    if problems:
        raise ConfigError(
            f"{str(folder / 'config.json')!r} does not match the checkpoint's tensors:\n  "
            + "\n  ".join(problems)
        )


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
def _target_dtype(model: nn.Module, name: str, parameter: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter `name` is loaded in: `dtype` for floating-point ones, unless its module fixes
    that parameter's dtype as part of its format (`FORMAT_DTYPES`, e.g. an int4 layer's bf16 scale units);
    other parameters (integer codes) keep their own."""
    module_name, _, leaf = name.rpartition(".")
    fixed = getattr(model.get_submodule(module_name) if module_name else model, "FORMAT_DTYPES", {})
    if leaf in fixed:
        return fixed[leaf]
    return dtype if parameter.dtype.is_floating_point else parameter.dtype


def load_weights(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool = True,
    after_tensor: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
    selection: Callable[[str], Selection | None] | None = None,
) -> None:
    """Replace every parameter of `model` (normally on the meta device) with the checkpoint's tensor.

    Each parameter becomes `nn.Parameter(tensor, requires_grad=False)` of `dtype` (non-floating
    parameters, and those whose module fixes their dtype in `FORMAT_DTYPES`, keep their own) on
    `device`. All headers are checked against the model first:
    missing, unexpected (other than `*.inv_freq` buffers) and mis-shaped tensors are reported together
    in one `CheckpointError` before any weight is read. Then the files are streamed one tensor at a
    time, so peak memory is the final weights plus at most one tensor. `after_tensor(name)`, if given,
    is called after each parameter is set (quantize-on-load uses it to convert a layer as soon as its
    last tensor is in). `allow_pickle=True` also reads `pytorch_model*.bin` checkpoints
    (with `torch.load(weights_only=True)`); without it they are refused. `selection(name)`, if given,
    names the part of a tensor to load (see `Selection`; None = all of it): the headers are still
    checked against the model's full shapes, and only the selected bytes of safetensors files are read
    (a tensor-parallel rank reads its shard and nothing else).
    """
    folder = Path(folder)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    device = torch.device(device)

    files = checkpoint_weight_files(folder, allow_pickle=allow_pickle)
    scan = _scan(files)
    if scan.problems:
        raise CheckpointError(
            f"cannot load the checkpoint in {str(folder)!r}:\n  " + "\n  ".join(scan.problems)
        )
    entries = scan.entries
    params = dict(model.named_parameters())
    expected = {name: (tuple(p.shape), p.dtype) for name, p in params.items()}
    missing, unexpected, mismatched, _ = _compare(expected, entries)
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(folder, missing, unexpected, mismatched))

    targets = {name: _target_dtype(model, name, p, dtype) for name, p in params.items()}
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
                    tensor = state.pop(info.name)
                    part = selection(info.name) if selection is not None else None
                    if part is not None:
                        tensor = select(tensor, part)
                    tensor = tensor.to(device=device, dtype=targets[info.name], copy=True)
                    _set_parameter(model, info.name, tensor)
                    if after_tensor is not None:
                        after_tensor(info.name)
                    bar.update(info.nbytes)
                del state
                continue
            with open(path, "rb", buffering=0) as f:  # unbuffered: readinto goes straight to the tensor
                for info in sorted(infos, key=lambda i: i.offset):  # sequential reads
                    part = selection(info.name) if selection is not None else None
                    if part is None:
                        tensor = _read_tensor(f, info, targets[info.name], device)
                    else:
                        tensor = _read_selected(f, info, part, targets[info.name], device)
                    _set_parameter(model, info.name, tensor)
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
    """What `verify_checkpoint` found: from the headers, and (with `check_values`) from every value."""

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
    problems: list[str] = field(default_factory=list)  # unreadable/corrupt files, bad index, config ≠ files
    unreadable: int = 0  # expected tensors that live in a broken file (counted, not listed)
    non_finite: list[str] = field(default_factory=list)  # "name: N NaN, M inf" (check_values only)
    values_checked: bool = False

    @property
    def ok(self) -> bool:
        return not (self.problems or self.missing or self.unexpected or self.mismatched or self.non_finite)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["folder"] = str(self.folder)
        data["files"] = [{"name": name, "bytes": size} for name, size in self.files]
        data["ok"] = self.ok
        return data


def verify_checkpoint(
    folder: str | os.PathLike[str],
    config: QwenConfig,
    *,
    check_values: bool = False,
    allow_pickle: bool = False,
) -> CheckpointReport:
    """Check a checkpoint directory against `config.parameter_shapes()`.

    From the headers alone: every file readable, the config agrees with the tensors the files declare
    (checked first and cheaply, so a config with a billion layers is one problem, not a billion missing
    tensors), every expected tensor present with the right shape. Tensors that live in a broken file
    are counted in `unreadable`, not listed as missing. With `check_values`, every floating tensor of
    the readable files is then read once, in chunks, and those holding NaN or inf are listed in
    `non_finite`. Never raises for a bad checkpoint: every problem lands in the report.
    """
    folder = Path(folder)
    report = CheckpointReport(folder=folder)
    try:
        files = checkpoint_weight_files(folder, allow_pickle=allow_pickle)
        scan = _scan(files)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    entries = scan.entries
    report.files = [(str(path.relative_to(folder)), path.stat().st_size) for path in files]
    report.problems = list(scan.problems)
    report.num_tensors = len(entries)
    report.dtypes = sorted({info.dtype for info in entries.values()})
    report.total_bytes = sum(info.nbytes for info in entries.values())
    report.num_parameters = sum(math.prod(i.shape) for i in entries.values() if not _is_ignored(i.name))
    config_problems = _config_problems(config, scan)
    if config_problems:
        # Every per-tensor difference would follow from these (and listing them could be endless).
        report.problems.extend(config_problems)
        return report
    if scan.broken and scan.weight_map is None:
        # A broken file and no index: any expected tensor may be in it; nothing more is known.
        report.unreadable = config.num_tensors()
    else:
        expected = {name: (shape, None) for name, shape in config.parameter_shapes().items()}
        report.missing, report.unexpected, report.mismatched, report.ignored = _compare(expected, entries)
        if scan.broken:
            broken = {path.name for path in scan.broken}
            in_broken = {name for name, shard in (scan.weight_map or {}).items() if shard in broken}
            report.unreadable = sum(name in in_broken for name in report.missing)
            report.missing = [name for name in report.missing if name not in in_broken]
    if report.unreadable:
        names = ", ".join(repr(path.name) for path in scan.broken)
        report.problems.append(
            f"{report.unreadable} expected tensor(s) are unreadable because {names} "
            f"{'is' if len(scan.broken) == 1 else 'are'} broken (see above)"
        )
    if check_values:
        report.non_finite = _non_finite_tensors(
            [info for info in entries.values() if info.file not in scan.broken], allow_pickle
        )
        report.values_checked = True
    return report


_VALUE_CHUNK_BYTES = 64 << 20  # the NaN/inf scan reads at most this much of a tensor at a time


def _non_finite_tensors(infos: list[TensorInfo], allow_pickle: bool) -> list[str]:
    """Each floating tensor of `infos` that holds NaN or inf, as "name: N NaN, M inf (in FILE)"."""
    found: list[str] = []
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        if SAFETENSORS_DTYPES[info.dtype].is_floating_point:
            by_file.setdefault(info.file, []).append(info)
    for path, group in by_file.items():
        if path.suffix == ".bin":
            state = _torch_load(path)
            counts = [(info, _count_non_finite(state[info.name])) for info in group]
            del state
        else:
            with open(path, "rb", buffering=0) as f:
                counts = [
                    (info, _count_non_finite_in_file(f, info))
                    for info in sorted(group, key=lambda i: i.offset)
                ]
        for info, (nan, inf) in counts:
            if nan or inf:
                found.append(f"{info.name}: {nan:,} NaN, {inf:,} inf (in {path.name})")
    return found


def _count_non_finite(values: torch.Tensor) -> tuple[int, int]:
    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


def _count_non_finite_in_file(f, info: TensorInfo) -> tuple[int, int]:
    """(NaN count, inf count) of one tensor, read in chunks so that a 2.5 GB lm_head needs 64 MiB."""
    dtype = SAFETENSORS_DTYPES[info.dtype]
    chunk = _VALUE_CHUNK_BYTES - _VALUE_CHUNK_BYTES % dtype.itemsize  # whole elements per chunk
    buffer = torch.empty(min(chunk, info.nbytes), dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    nan = inf = 0
    f.seek(info.offset)
    done = 0
    while done < info.nbytes:
        want = min(chunk, info.nbytes - done)
        got = 0
        while got < want:
            count = f.readinto(view[got:want])
            if not count:
                raise _corrupt(info.file, f"the file ended while reading tensor {info.name!r} (truncated)")
            got += count
        counts = _count_non_finite(buffer[:want].view(dtype))
        nan, inf = nan + counts[0], inf + counts[1]
        done += want
    return nan, inf


# ====================================================================== converting pickled checkpoints
def convert_bin_checkpoint(folder: str | os.PathLike[str]) -> list[Path]:
    """Write safetensors files next to the `pytorch_model*.bin` weights of `folder` and return them.

    The pickles are read with `torch.load(weights_only=True)` (PyTorch's restricted unpickler, which
    refuses arbitrary objects), one file at a time: `pytorch_model.bin` becomes `model.safetensors`,
    `pytorch_model-0000i-of-0000n.bin` becomes `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. Afterwards the checkpoint loads without `allow_pickle`.
    """
    folder = Path(folder)
    sources = _pickle_files(folder, allow_pickle=True)
    for path in sources:
        _checked(path, folder)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    for path in sources:
        target = folder / (
            path.name.replace("pytorch_model", "model", 1).removesuffix(".bin") + ".safetensors"
        )
        # clone: a .bin may store tensors that share storage, which safetensors refuses to write.
        state = {name: tensor.contiguous().clone() for name, tensor in _torch_load(path).items()}
        save_safetensors(state, target)
        weight_map.update(dict.fromkeys(state, target.name))
        written.append(target)
        del state
    if written != [folder / SINGLE_FILE]:
        index = folder / INDEX_FILE
        index.write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
        )
        written.append(index)
    return written
