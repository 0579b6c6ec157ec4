"""`nekomata inspect`: a checkpoint's shape, size and integrity, from its headers (and a scan for NaN/inf)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, QwenConfig
from ..hub import CheckpointNotFoundError, resolve_model_dir
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError

if TYPE_CHECKING:
    from ..loader import CheckpointReport


def add_inspect_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarise a checkpoint and check its files (no model is built)",
        description=(
            "Print a checkpoint's shape, parameter count, file dtypes, memory needs and KV-cache size, "
            "and check every weight file: present, valid header, config.json agreeing with the tensors, "
            "consistent sizes, every expected tensor with the right shape, and (unless --headers-only) "
            "no NaN or inf value in any tensor, read one chunk at a time. Exit 0 when the check passes, "
            "1 when it fails."
        ),
    )
    parser.add_argument("path_or_id", help="local checkpoint directory or Hub repo id (owner/name)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (repo ids only)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--headers-only",
        action="store_true",
        help="check the headers only; skip reading every value to look for NaN/inf (fast on large models)",
    )
    parser.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    try:
        folder = resolve_model_dir(args.path_or_id, revision=args.revision)
    except (CheckpointNotFoundError, ValueError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    try:
        config = QwenConfig.from_json_file(folder / "config.json")
    except (FileNotFoundError, ConfigError) as exc:
        raise CLIError(f"{exc}", EXIT_FAILED) from None
    from ..loader import verify_checkpoint  # after the cheap checks: it imports torch

    # verify_checkpoint compares the config with the files' headers first, so a hostile config
    # (num_hidden_layers: 10**9) is one problem here, and nothing below is built per layer.
    report = verify_checkpoint(folder, config, check_values=not args.headers_only)
    generation_problem = _generation_config_problem(folder)
    if generation_problem:  # generate and chat would refuse the checkpoint for it: say so here too
        report.problems.append(generation_problem)
    summary = inspect_summary(folder, config, report)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(_format_inspect(summary, config, report))
    if not report.ok:
        first = (
            report.problems + report.missing + report.unexpected + report.mismatched + report.non_finite
        )[0]
        print(f"nekomata inspect: checkpoint check failed: {first.splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _generation_config_problem(folder: Path) -> str | None:
    """What is wrong with the checkpoint's generation_config.json (None when it is fine or absent)."""
    from ..sampling import load_generation_config

    try:
        load_generation_config(folder / "generation_config.json")
    except ConfigError as exc:
        return str(exc)
    return None


def inspect_summary(folder: Path, config: QwenConfig, report: CheckpointReport) -> dict[str, Any]:
    """Everything `nekomata inspect` reports, as plain JSON-able data."""
    params = config.num_parameters()

    # int8 weight-only: 1 byte per matrix element + one bf16 scale per output row; 1-D tensors
    # (norms, biases) stay bf16. An estimate of what the quantized loader will hold. One layer × the
    # layer count, never a per-layer list: the config may be hostile (its check is in `report`).
    def int8_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(s) + 2 * s[0] if len(s) == 2 else 2 * math.prod(s) for s in shapes.values())

    int8 = int8_bytes(config.outer_parameter_shapes()) + config.num_hidden_layers * int8_bytes(
        config.layer_parameter_shapes(0)
    )
    # K and V, every layer, N heads × D dims, 2 bytes each (bf16), for 1024 tokens of one sequence.
    kv_per_1k = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * 2 * 1024
    return {
        "checkpoint": str(folder),
        "architecture": "QWenLMHeadModel",
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "mlp_width": config.mlp_width,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "seq_length": config.seq_length,
        "max_position_embeddings": config.max_position_embeddings,
        "use_dynamic_ntk": config.use_dynamic_ntk,
        "use_logn_attn": config.use_logn_attn,
        "dtype_flag": config.torch_dtype_name,
        "parameters_config": params,
        "parameters_files": report.num_parameters,
        "file_dtypes": report.dtypes,
        "weight_bytes": {
            "float32": 4 * params,
            "bfloat16": 2 * params,
            "float16": 2 * params,
            "int8_weight_only": int8,
        },
        "kv_cache_bytes_per_1k_tokens_bf16": kv_per_1k,
        "check": report.to_dict(),
    }


def _format_inspect(summary: dict[str, Any], config: QwenConfig, report: CheckpointReport) -> str:
    s = summary
    memory = s["weight_bytes"]
    rows = [
        ("checkpoint", s["checkpoint"]),
        ("architecture", "QWenLMHeadModel (Qwen v1)"),
        ("layers", s["layers"]),
        ("hidden size", s["hidden_size"]),
        ("heads", f"{s['heads']} × head dim {s['head_dim']}"),
        (
            "MLP width",
            f"{s['mlp_width']} (= intermediate_size {s['intermediate_size']} // 2: Qwen stores twice it)",
        ),
        ("vocab", s["vocab_size"]),
        ("seq_length", f"{s['seq_length']} (trained context; NTK and logn act only beyond it)"),
        ("max_position_embeddings", s["max_position_embeddings"]),
        ("dynamic NTK / logn", f"{_on(s['use_dynamic_ntk'])} / {_on(s['use_logn_attn'])}"),
        ("dtype flag", s["dtype_flag"] or "none (auto: bf16/fp16 on GPU, fp32 on CPU)"),
        ("parameters", f"{s['parameters_config']:,} (config), {s['parameters_files']:,} (in the files)"),
        ("file dtypes", ", ".join(s["file_dtypes"]) or "-"),
        (
            "weight memory",
            f"fp32 {_size(memory['float32'])}, bf16/fp16 {_size(memory['bfloat16'])}, "
            f"int8 weight-only ≈ {_size(memory['int8_weight_only'])}",
        ),
        ("KV cache", f"{_size(s['kv_cache_bytes_per_1k_tokens_bf16'])} per 1k tokens per sequence (bf16)"),
        ("files", f"{len(report.files)}, {_size(sum(size for _, size in report.files))}"),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    lines += [f"{'':<{width}}  {name}  {_size(size)}" for name, size in report.files]
    if report.ok:
        ignored = f"; ignored {len(report.ignored)} known buffer(s)" if report.ignored else ""
        values = "; every value finite" if report.values_checked else "; values not read (--headers-only)"
        lines.append(
            f"{'check':<{width}}  OK: {len(report.files)} file(s) present, headers valid, sizes consistent, "
            f"all {config.num_tensors()} expected tensors present with the right shape{ignored}{values}"
        )
        return "\n".join(lines)
    lines.append(f"{'check':<{width}}  FAILED")
    for label, items in (
        ("problem", report.problems),
        ("missing", report.missing),
        ("unexpected", report.unexpected),
        ("mismatch", report.mismatched),
        ("non-finite", report.non_finite),
    ):
        shown = items[:20]
        lines += [f"  {label}: {item}" for item in shown]
        if len(items) > len(shown):
            lines.append(f"  {label}: … and {len(items) - len(shown)} more")
    return "\n".join(lines)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"
