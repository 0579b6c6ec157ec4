"""Write a random-weight Qwen (v1) checkpoint in the exact Hugging Face layout of the real repos.

    python tools/make_tiny_checkpoint.py OUT        (or: python -m nekomata_core.checkpoint_builder OUT) [--preset tiny] [--dtype float32|bfloat16|float16]
        [--shards N] [--seed S] [--tokenizer FILE] [--set key=value ...] [--overwrite]

Writes config.json, generation_config.json, tokenizer_config.json, qwen.tiktoken and either
model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json. The weights are
random but chosen so that bugs show: c_attn biases are non-zero and RMSNorm weights are 1 + noise.
Each tensor depends only on (seed, name, shape), so a sharded and a single-file checkpoint hold
identical tensors. Tensors are generated one at a time and written shard by shard: a qwen-1.8b-shaped
bf16 checkpoint never holds an fp32 copy of the model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import torch

from ..config import PRESETS, QwenConfig
from ..loader import INDEX_FILE, SINGLE_FILE, save_safetensors

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_FLAGS: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Qwen-7B's generation_config.json, verbatim.
GENERATION_CONFIG: dict[str, Any] = {
    "chat_format": "raw",
    "do_sample": True,
    "eos_token_id": 151643,
    "max_new_tokens": 512,
    "pad_token_id": 151643,
    "stop_words_ids": [[151643]],
    "top_k": 0,
    "top_p": 0.8,
    "transformers_version": "4.32.0",
}
# Keys of Qwen-7B's config.json that QwenConfig does not model; kept so the file looks like the real one.
_CONFIG_EXTRAS: dict[str, Any] = {
    "attn_dropout_prob": 0.0,
    "emb_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "onnx_safe": None,
    "tokenizer_class": "QWenTokenizer",
    "transformers_version": "4.32.0",
    "use_cache": True,
}
TOKENIZER_CONFIG: dict[str, Any] = {
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
}
_WEIGHT_GLOBS = (SINGLE_FILE, INDEX_FILE, "model-*-of-*.safetensors")


def make_checkpoint(
    out_dir: str | Path,
    config_or_preset: QwenConfig | str = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shards: int = 1,
    tokenizer_file: str | Path | None | bool = None,
    init_std: float = 0.02,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random checkpoint to `out_dir` (created if needed) and return `out_dir` as a Path.

    `overrides` are config.json keys applied on top of the preset/config (e.g. `{"vocab_size": 512}`).
    Refuses to write into a folder that already holds weights unless `overwrite` is true, because a
    stale `model.safetensors` next to new shards would silently win when loading.
    """
    if dtype not in _DTYPE_FLAGS:
        raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype!r}")
    if isinstance(config_or_preset, str):
        config = QwenConfig.from_preset(config_or_preset, **(overrides or {}))
    else:
        config = QwenConfig.from_dict({**config_or_preset.to_dict(), **(overrides or {})})
    # The dtype flag says what the weights are stored in, as in the real repos (Qwen-7B has none set).
    for flag in _DTYPE_FLAGS.values():
        setattr(config, flag, flag == _DTYPE_FLAGS[dtype])
    config.validate()

    shapes = config.parameter_shapes()
    if not 1 <= shards <= len(shapes):
        raise ValueError(f"shards must be between 1 and {len(shapes)} (the number of tensors), got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted({p for pattern in _WEIGHT_GLOBS for p in out.glob(pattern)})
    if stale and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds weights ({', '.join(p.name for p in stale)}); choose an empty "
            "folder or pass overwrite=True (--overwrite)."
        )
    for path in stale:
        path.unlink()

    config_json = {**_CONFIG_EXTRAS, **config.to_dict()}
    _write_json(out / "config.json", dict(sorted(config_json.items())))
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    _copy_tokenizer(out, tokenizer_file)

    itemsize = dtype.itemsize
    groups = _split_evenly([(name, math.prod(shape) * itemsize) for name, shape in shapes.items()], shards)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups):
        filename = SINGLE_FILE if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        # One shard in the target dtype at a time; each tensor is made in fp32 and converted at once.
        tensors = {
            name: random_tensor(name, shapes[name], seed=seed, std=init_std).to(dtype) for name in names
        }
        save_safetensors(tensors, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    if shards > 1:
        total = sum(math.prod(shape) for shape in shapes.values()) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / INDEX_FILE, index)  # sorted like transformers' save_pretrained writes it
    return out


def random_tensor(name: str, shape: tuple[int, ...], *, seed: int, std: float) -> torch.Tensor:
    """The fp32 tensor `name` gets: normal(0, std), except RMSNorm weights = 1 + normal(0, std).

    Seeded by (seed, name) alone, so a tensor does not depend on which others are generated first.
    """
    generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    tensor = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std)
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        # Around 1 rather than exactly 1, so that a loader or norm that ignores the weight is caught.
        tensor.add_(1.0)
    return tensor


def _split_evenly(sizes: list[tuple[str, int]], count: int) -> list[list[str]]:
    """Cut the ordered tensors into `count` non-empty runs of roughly equal bytes; tensors stay whole."""
    target = sum(size for _, size in sizes) / count
    groups: list[list[str]] = [[]]
    done = 0
    for position, (name, size) in enumerate(sizes):
        still_to_open = count - len(groups)
        left = len(sizes) - position
        # Open the next shard when this tensor's midpoint lies past the current shard's share, or when
        # every remaining tensor is needed to fill the remaining shards.
        if (
            groups[-1]
            and still_to_open > 0
            and (done + size / 2 > len(groups) * target or left <= still_to_open)
        ):
            groups.append([])
        groups[-1].append(name)
        done += size
    return groups


def _copy_tokenizer(out: Path, tokenizer_file: str | Path | None | bool) -> None:
    if tokenizer_file is False:  # explicitly no tokenizer (benchmarks, weight-only tests)
        return
    source = Path(tokenizer_file) if tokenizer_file is not None else _dashscope_tiktoken()
    if source is None:
        print(
            "notice: no qwen.tiktoken written (pass tokenizer_file=/--tokenizer, or install dashscope, "
            "which ships it)",
            file=sys.stderr,
        )
        return
    if not source.is_file():
        raise FileNotFoundError(f"tokenizer file {str(source)!r} does not exist")
    shutil.copyfile(source, out / "qwen.tiktoken")


def _dashscope_tiktoken() -> Path | None:
    # find_spec instead of import: importing dashscope pulls in its HTTP stack for nothing.
    spec = importlib.util.find_spec("dashscope")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false, null, lists
    except json.JSONDecodeError:
        return key, value  # a bare string such as use_flash_attn=auto


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (created if needed)")
    parser.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="shape preset (default tiny)"
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="stored dtype")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors shards (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="qwen.tiktoken to copy (default: dashscope's)"
    )
    parser.add_argument("--init-std", type=float, default=0.02, help="std of the random weights")
    parser.add_argument(
        "--set", dest="overrides", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
        help="override a config.json key, e.g. --set vocab_size=512 (repeatable; values parsed as JSON)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in OUT")
    args = parser.parse_args(argv)
    try:
        out = make_checkpoint(
            args.out,
            args.preset,
            dtype=DTYPES[args.dtype],
            seed=args.seed,
            shards=args.shards,
            tokenizer_file=args.tokenizer,
            init_std=args.init_std,
            overrides=dict(args.overrides),
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as exc:
        print(f"make_tiny_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    config = QwenConfig.from_json_file(out / "config.json")
    summary = f"{args.preset}, {config.num_parameters():,} parameters, {args.dtype}, {args.shards} shard(s)"
    print(f"wrote {out} ({summary})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
