"""Reading checkpoint files that may be hostile: bounded JSON, and links that stay inside the checkpoint.

Every file the library reads from a checkpoint goes through here. A checkpoint is untrusted input
(anyone can upload one), so each read is bounded before it starts and each failure is one
`NekomataError` subclass (the caller's choice) whose message names the file:

- `read_json_file` refuses a file above a size bound before reading it, then `parse_json_bytes`
  decodes UTF-8 (naming the byte offset of a bad byte), parses (refusing duplicate keys), refuses
  nesting deeper than
  `MAX_JSON_DEPTH`, refuses non-finite numbers (Python's json accepts `NaN`, `Infinity` and `1e999`)
  naming the key, and checks that the top level is an object.
- `check_inside` refuses a file whose symlinks lead outside the checkpoint folder. The one exception
  is the Hugging Face cache layout, where `models--owner--name/snapshots/<rev>/<file>` links to
  `../../blobs/<hash>` of the same repo folder.

Torch-free, so the config and the CLI can use it before torch is imported.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import NekomataError

# config.json, generation_config.json, tokenizer_config.json: a few kB in every release.
SMALL_JSON_MAX_BYTES = 1 << 20  # 1 MiB
# model.safetensors.index.json: ~30 kB for Qwen-72B (80 layers × 8 tensors); 64 MiB is far beyond any model.
INDEX_JSON_MAX_BYTES = 64 << 20
# No file we read nests deeper than 4 levels; json's C parser would raise RecursionError near 1000.
MAX_JSON_DEPTH = 64
# The repo folders of the Hugging Face cache (huggingface_hub's `repo_folder_name`).
_HF_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


class JSONFileError(NekomataError):
    """A JSON file is too large, not UTF-8, not JSON, too deeply nested, or not of the expected shape."""


class UnsafeFileError(NekomataError):
    """A checkpoint file is a link that leads outside its checkpoint folder, or not a regular file."""


# ====================================================================== symlinks
def allowed_roots(folder: str | os.PathLike[str]) -> list[Path]:
    """The resolved folders a file of the checkpoint in `folder` may live in: the folder itself, plus
    the `blobs/` folder of the same repo when `folder` is a snapshot of the Hugging Face cache."""
    root = Path(folder).resolve()
    roots = [root]
    snapshots, repo = root.parent, root.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith(_HF_CACHE_REPO_PREFIXES):
        roots.append(repo / "blobs")
    return roots


def check_inside(
    path: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    error: type[NekomataError] = UnsafeFileError,
) -> Path:
    """Return `path` (unchanged) after checking that, with every symlink followed, it is a regular file
    inside `folder` or inside the Hugging Face cache's `blobs/` of the same repo.

    A missing file raises FileNotFoundError (the callers say which file is missing, in their words).
    The message of a refused link names the link and its target, never the target's content.
    """
    path = Path(path)
    target = path.resolve()
    roots = allowed_roots(folder)
    if not any(target == root or target.is_relative_to(root) for root in roots):
        raise error(
            f"{str(path)!r} is a symlink to {str(target)!r}, outside the checkpoint folder "
            f"{str(Path(folder))!r}; refusing to read it. Copy the file into the folder instead of linking "
            "it (links are followed only into the Hugging Face cache's own blobs/ folder)."
        )
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(
                f"{str(path)!r} is a symlink to {str(target)!r}, which does not exist (an incomplete "
                "download?)"
            ) from None
        raise
    if not stat.S_ISREG(mode):
        raise error(f"{str(path)!r} is not a regular file; a checkpoint file must be one.")
    return path


# ====================================================================== JSON
def read_json_file(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = SMALL_JSON_MAX_BYTES,
    error: type[NekomataError] = JSONFileError,
    folder: str | os.PathLike[str] | None = None,
    fix: str = "replace it with the file from the checkpoint's source",
) -> dict[str, Any]:
    """The JSON object in `path`, read only if the file is at most `max_bytes` and stays (links
    followed) inside `folder` (default: its own folder). Raises `error` naming the file, the problem
    and `fix`, also when the file is missing or unreadable (callers that treat a missing file as
    "use defaults" check that first)."""
    path = Path(path)
    try:
        check_inside(path, path.parent if folder is None else folder, error=error)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(
                    f"{str(path)!r} is {size:,} bytes, more than the {max_bytes:,} bytes such a file may "
                    f"have (refusing to read it); {fix}."
                )
            data = f.read(max_bytes + 1)  # +1: a file that grew after fstat is still caught
    except OSError as exc:  # a dangling link, no permission, ...: still one error naming the file
        raise error(f"cannot read {str(path)!r} ({exc.strerror or exc}); {fix}.") from None
    if len(data) > max_bytes:
        raise error(f"{str(path)!r} is more than {max_bytes:,} bytes (refusing to read it); {fix}.")
    return parse_json_bytes(data, path, error=error, fix=fix)


def parse_json_bytes(
    data: bytes,
    path: str | os.PathLike[str],
    *,
    error: type[NekomataError] = JSONFileError,
    fix: str = "replace it with the file from the checkpoint's source",
) -> dict[str, Any]:
    """Parse `data`, the content of `path`, as one JSON object; a problem raises `error` naming `path`."""
    try:
        # Duplicate keys are refused: json keeps the last, other readers the first; either may be a trap.
        return decode_json_object(data, reject_duplicate_keys=True)
    except JSONFileError as exc:
        raise error(f"{str(Path(path))!r}: {exc}; {fix}.") from None


def decode_json_object(
    data: bytes, *, base_offset: int = 0, reject_duplicate_keys: bool = False
) -> dict[str, Any]:
    """Decode UTF-8 JSON bytes that must hold one object, or raise `JSONFileError` saying what is wrong
    (without a file name: the caller adds it). `base_offset` is where `data` starts in its file, so
    that a bad UTF-8 byte is reported at its offset in the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONFileError(
            f"not valid UTF-8 (invalid byte at file offset {base_offset + exc.start})"
        ) from None
    hook = _reject_duplicates if reject_duplicate_keys else None
    try:
        value = json.loads(text, object_pairs_hook=hook)
    except RecursionError:
        raise JSONFileError(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise JSONFileError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # a duplicate key, or an integer of more than 4300 digits
        raise JSONFileError(f"not valid JSON ({exc})") from None
    problem = json_value_problem(value)
    if problem:
        raise JSONFileError(problem)
    if not isinstance(value, dict):
        raise JSONFileError(f"the top level is a JSON {_json_type(value)}, not an object")
    return value


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def json_value_problem(value: Any) -> str | None:
    """The first non-finite number, or nesting deeper than MAX_JSON_DEPTH, as a message naming the key
    (e.g. `key 'rope_scaling.factor' is Infinity`); None when every value is fine.

    Iterative on purpose: a recursive walk would itself hit the recursion limit on deep input."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, key, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep (at key {key!r})"
        if isinstance(item, float) and not math.isfinite(item):
            spelled = "NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")
            return f"key {key or '(top level)'!r} is {spelled}; every number must be finite"
        if isinstance(item, dict):
            # reversed: the stack pops the file's first key first, so the first problem is reported
            children = [(v, f"{key}.{k}" if key else str(k), depth + 1) for k, v in item.items()]
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([(v, f"{key}[{i}]", depth + 1) for i, v in enumerate(item)]))
    return None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
