"""`nekomata generate` and `nekomata chat`: streaming text generation from the command line.

Under `torchrun --nproc-per-node N -m nekomata_core generate|chat ...` (WORLD_SIZE > 1, or with
`--tensor-parallel`) every process loads its shard of the model (nekomata_core.accelerate.tensor_parallel)
and runs the same generation: all ranks compute the same logits and start from the same seed (rank 0's,
broadcast), so they choose the same tokens. Only rank 0 reads stdin (chat lines are broadcast) and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from ..backends import ATTENTION_CHOICES, QUANTIZE_CHOICES, STEP_MODES
from ..chat import CHAT_FORMATS

DEFAULT_MODEL = "rinna/nekomata-7b"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: auto)")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    group.add_argument("--revision", default=None, help="Hub branch, tag or commit (repo ids only)")
    group.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_CHOICES))
    group.add_argument(
        "--step",
        "--decode",  # its old name
        dest="step",
        default="auto",
        choices=list(STEP_MODES),
        help="how each new token's step runs: auto (native where it applies, else static), plain forward (eager), fixed-shape "
        "step (static), static under torch.compile (compiled), or the whole step in C (native, CPU, up to 8 rows, 16 quantized)",
    )
    group.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES), help="weight-only quantization")
    group.add_argument(
        "--tensor-parallel",
        action="store_true",
        help="split the model over the processes torchrun starts (the default when WORLD_SIZE > 1)",
    )


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling",
        "An option left unset takes the checkpoint's generation_config.json value (nekomata-7b's: "
        "sampling with top-p 0.8, top-k 0, max 512 new tokens, stop at <|endoftext|>); without that "
        "file or key, the default shown. Generation also stops where prompt + new tokens reach the "
        "model's max_position_embeddings.",
    )
    mode = group.add_mutually_exclusive_group()
    mode.add_argument(
        "--do-sample", dest="do_sample", action="store_true", default=None, help="sample (default: greedy)"
    )
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="always take the argmax")
    group.add_argument(
        "--temperature", type=float, default=None, metavar="T", help="sampling only; ≥ 1e-4 (default 1.0)"
    )
    group.add_argument("--top-k", type=int, default=None, metavar="K", help="0 disables (default 0)")
    group.add_argument(
        "--top-p", type=float, default=None, metavar="P", help="in (0, 1]; 1.0 disables (default 1.0)"
    )
    group.add_argument(
        "--repetition-penalty", type=float, default=None, metavar="R", help="> 0; 1.0 disables (default 1.0)"
    )
    group.add_argument(
        "--max-new-tokens", type=int, default=None, metavar="N", help="new tokens at most (default 512)"
    )
    group.add_argument(
        "--min-new-tokens", type=int, default=None, metavar="N", help="eos is blocked until N (default 0)"
    )
    group.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)"
    )
    group.add_argument("--seed", type=int, default=None, help="seed the torch RNG (HF-identical samples)")


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text as it is generated",
        description=(
            f"Continue PROMPT with MODEL (default {DEFAULT_MODEL}), printing text as it is generated, "
            "then prefill and decode speed on stderr."
        ),
    )
    # Two positionals, the first optional: the usage line reads "[MODEL] PROMPT" (one `nargs="+"`
    # positional printed as "[MODEL] PROMPT [[MODEL] PROMPT ...]").
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help=f"local checkpoint directory or Hub repo id (default {DEFAULT_MODEL})",
    )
    parser.add_argument("prompt", metavar="PROMPT", help="the text to continue (quote it)")
    _add_model_options(parser)
    _add_sampling_options(parser)
    parser.set_defaults(run=run_generate)


def add_chat_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="interactive chat with an instruction-tuned model",
        description=(
            "Chat on stdin/stdout. ChatML for Qwen-*-Chat, rinna's instruction template for "
            "nekomata-*-instruction (chosen from the checkpoint, or --format). /reset clears the "
            "history, /exit or Ctrl-D (end of input) quits. Ctrl-C during a reply stops it and returns "
            "to the prompt (the unfinished exchange is left out of the history); Ctrl-C at the prompt "
            "quits (exit status 130). A reply that fails (e.g. the history no longer fits the context) "
            "says why and returns to the prompt with the history kept."
        ),
    )
    parser.add_argument("model", help="local checkpoint directory or Hub repo id")
    parser.add_argument("--format", default="auto", choices=["auto", *CHAT_FORMATS])
    parser.add_argument("--system", default=None, help="ChatML system message")
    _add_model_options(parser)
    _add_sampling_options(parser)
    parser.set_defaults(run=run_chat)


# ---------------------------------------------------------------------------------------------- helpers
def _load(args: argparse.Namespace, model_name: str):
    """Model, tokenizer and generation defaults, or a CLIError with one clear line."""
    from ..hub import CheckpointNotFoundError, resolve_model_dir
    from .common import EXIT_USAGE, CLIError

    try:
        folder = resolve_model_dir(model_name, revision=args.revision)
    except (CheckpointNotFoundError, ValueError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    from ..pretrained import QwenForCausalLM
    from ..sampling import load_generation_config
    from ..tokenizer import QwenTokenizer

    try:
        tokenizer = QwenTokenizer.from_pretrained(folder)
        kwargs: dict[str, Any] = {}
        if args.quantize:
            kwargs["quantize"] = args.quantize
        if tensor_parallel_requested(args):
            kwargs["tensor_parallel"] = True
        model = QwenForCausalLM.from_pretrained(
            folder,
            dtype=args.dtype,
            device=args.device,
            attention_backend=args.attention_backend,
            progress=sys.stderr.isatty() and _rank() == 0,
            **kwargs,
        )
        defaults = load_generation_config(folder / "generation_config.json")
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    return folder, model, tokenizer, defaults


# ---------------------------------------------------------------------------------------------- ranks
def tensor_parallel_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "tensor_parallel", False)) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def _from_rank0(value: Any, model) -> Any:
    """Rank 0's `value` on every rank of a tensor-parallel model (the value itself otherwise)."""
    if getattr(model, "tensor_parallel", None) is None:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _seed_alike(args: argparse.Namespace, model) -> None:
    """Seed the torch RNG: with --seed, else (several ranks) with rank 0's initial seed, so that every
    rank draws the same samples."""
    import torch

    seed = args.seed
    if getattr(model, "tensor_parallel", None) is not None:
        seed = _from_rank0(torch.initial_seed() if seed is None else seed, model)
    if seed is not None:
        torch.manual_seed(seed)


def _outputs() -> tuple[TextIO, TextIO]:
    """(stdout, the speed report's stream): the real ones on rank 0, a sink on the others."""
    if _rank() == 0:
        return sys.stdout, sys.stderr
    sink = open(os.devnull, "w")  # noqa: SIM115 — lives as long as the command
    return sink, sink


def _params(args: argparse.Namespace, defaults, **extra: Any):
    from .common import EXIT_USAGE, CLIError

    try:
        return defaults.updated(
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            stop_strings=tuple(args.stop) if args.stop else None,
            **extra,
        )
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def _stream_to(out: TextIO, pieces: Iterator[str]) -> str:
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    return "".join(text)


def _report_speed(result, err: TextIO) -> None:
    err.write(
        f"\n[prefill {result.prompt_tokens} tokens: {result.prefill_tokens_per_second:.1f} tok/s | "
        f"decode {len(result.new_tokens[0])} tokens: {result.decode_tokens_per_second:.1f} tok/s | "
        f"stopped: {result.finish_reasons[0]}]\n"
    )


# ---------------------------------------------------------------------------------------------- commands
def run_generate(args: argparse.Namespace) -> int:
    import torch

    from ..accelerate import make_step
    from ..generation import GenerationOutput, stream
    from .common import EXIT_USAGE, CLIError

    prompt = args.prompt
    if not prompt:
        raise CLIError("the prompt is empty; give some text to continue", EXIT_USAGE)
    _, model, tokenizer, defaults = _load(args, args.model)
    params = _params(args, defaults)
    _seed_alike(args, model)
    out, err = _outputs()
    result = GenerationOutput(torch.empty(0), [], [])
    out.write(prompt)
    _stream_to(
        out,
        stream(model, tokenizer, prompt, params, output=result, step_fn=make_step(model, args.step)),
    )
    out.write("\n")
    _report_speed(result, err)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from .. import chat
    from ..accelerate import make_step
    from ..errors import NekomataError
    from ..generation import GenerationOutput, stream

    folder, model, tokenizer, defaults = _load(args, args.model)
    fmt = args.format
    if fmt == "auto":
        from ..sampling import read_generation_config

        # Bounded and type-checked like every JSON read (chat_format must be a string).
        hint = read_generation_config(folder / "generation_config.json").get("chat_format")
        fmt = chat.detect_format(str(args.model), hint)
    params = _params(args, defaults, eos_token_id=chat.stop_ids(tokenizer, fmt))
    _seed_alike(args, model)
    step_fn = make_step(model, args.step)
    history: list[chat.Turn] = []
    system = args.system or chat.DEFAULT_SYSTEM
    out, err = _outputs()
    print(
        f"[{folder.name}: {fmt} format; /reset clears the history, /exit or Ctrl-D quits, "
        "Ctrl-C stops a reply]",
        file=err,
    )
    while True:
        line = None
        if _rank() == 0:
            if sys.stdin.isatty():
                sys.stderr.write("> ")
                sys.stderr.flush()
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:  # Ctrl-C at the prompt (or a second one just after a reply stopped)
                sys.stderr.write("\n")
                line = 130
        line = _from_rank0(line, model)  # under tensor parallelism only rank 0 reads stdin
        if line == 130:
            return 130
        if not line or line.strip() == "/exit":
            return 0
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            history.clear()
            continue
        if not message.strip():
            continue
        if fmt == "chatml":
            ids = chat.chatml_prompt(tokenizer, history, message, system)
        elif fmt == "instruction":
            ids = chat.instruction_prompt(tokenizer, message)
        else:
            ids = chat.plain(tokenizer, message)
        result = GenerationOutput(torch.empty(0), [], [])
        pieces = stream(model, tokenizer, ids, params, output=result, step_fn=step_fn)
        try:
            reply = _stream_to(out, pieces)
        except NekomataError as exc:
            # An expected failure of this one reply (the history has outgrown the context, non-finite
            # logits) ends the reply, not the session: the history so far stays, and /reset is the fix
            # for the first. Every rank raises the same error for the same inputs, so all go on alike.
            out.write("\n")
            out.flush()
            print(f"[reply failed: {exc}; /reset clears the history]", file=err)
            continue
        except KeyboardInterrupt:
            # Ctrl-C during a reply stops only the reply. The unfinished exchange is dropped from the
            # history (the next prompt is built as if this message had not been sent), so that a cut-off
            # answer does not steer the next one; the earlier turns stay.
            pieces.close()
            out.write("\n")
            out.flush()
            print("[reply stopped; this exchange was not added to the history]", file=err)
            continue
        out.write("\n")
        out.flush()
        if fmt == "chatml":
            history += [chat.Turn("user", message), chat.Turn("assistant", reply)]
        _report_speed(result, err)
