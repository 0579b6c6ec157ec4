"""Sliding-window perplexity, exactly as the Hugging Face perplexity guide computes it.

    nekomata perplexity MODEL FILE [--window 1024] [--stride 512] [--dtype auto] [--device auto]
        [--max-tokens N] [--json]

The text is tokenized once (N tokens) and read through windows of `window` tokens that start every
`stride` tokens (begin = 0, stride, 2·stride, …; the last window ends at N and the loop stops there).
Each window is one independent forward pass. Token t is scored by the logits at t − 1 of the window
that first covers it, i.e. with the window's earlier tokens as context; tokens an earlier window
already scored are context only (label −100 in the guide). So:

* stride < window: every token but the first is scored exactly once, each with at least
  `window − stride` tokens of context (except in the first window) — N − 1 scored tokens;
* stride == window: the windows do not overlap and the first token of each window has no context,
  so it is never scored — N − (number of windows) scored tokens (what the guide's code does too);
* stride > window would skip tokens and is refused.

The loss is the mean negative log-likelihood per scored token over the whole text:

    loss = (Σ over windows of Σ over the window's scored tokens of −log p(token)) / (number of scored tokens)

i.e. every token has the same weight whatever window scored it, and ppl = exp(loss). The guide's code
gets there by multiplying each window's mean loss by that window's number of scored tokens; note
that it counts them as `(labels != -100).sum() - batch_size`, which is exact only for a window whose
first token is labelled (the first window, or stride == window). When earlier tokens are context,
all `window - prev_end` labelled tokens are scored (the one dropped by the label shift is context), so
that count is one too small and the guide's weighting is slightly off. We use the exact count.

The NLL is computed from fp32 log-softmax of the logits (as transformers' loss upcasts them) and
summed in float64.

Window and context length: the CLI's default window is min(1024, seq_length) and the default stride
window // 2. A window longer than the model's `seq_length` (S) is allowed only when asked for with
--window explicitly: every window is a fresh prefill, so a window of W > S tokens gets dynamic NTK
(alpha from W, chosen per window) and logn attention, as the original model would compute it; the
perplexity then measures the model beyond its trained context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import NekomataError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it, so that registering this command in the CLI
# does not slow down `nekomata --help`.
DEFAULT_WINDOW = 1024


class PerplexityError(NekomataError):
    """The perplexity cannot be computed as asked (bad window or stride, too few tokens)."""


@dataclass
class PerplexityResult:
    loss: float  # mean NLL per scored token, in nats
    ppl: float  # exp(loss)
    tokens_scored: int
    windows: int
    window: int = 0
    stride: int = 0
    total_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_window(window: int, stride: int) -> None:
    """Raise PerplexityError unless 0 < stride ≤ window."""
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise PerplexityError(f"window must be a positive number of tokens, got {window!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
        raise PerplexityError(f"stride must be a positive number of tokens, got {stride!r}")
    if stride > window:
        raise PerplexityError(
            f"stride ({stride}) is larger than window ({window}): the tokens between windows would never be "
            "scored; use stride ≤ window"
        )


def perplexity(
    model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int], *, window: int, stride: int
) -> PerplexityResult:
    """Sliding-window perplexity of one token sequence; see the module docstring for the exact rule.

    `model` is a QwenForCausalLM (or any causal LM whose call returns logits [1, T, V] or an object
    with `.logits`, e.g. a transformers model). `input_ids`: [N] or [1, N] token ids, N ≥ 2.
    """
    import torch
    import torch.nn.functional as F

    check_window(window, stride)
    ids = torch.as_tensor(input_ids, dtype=torch.long).detach().cpu()
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise PerplexityError(f"input_ids must be one sequence, [N] or [1, N]; got shape {tuple(ids.shape)}")
    n = ids.numel()
    if n < 2:
        raise PerplexityError(f"the text has {n} token(s); perplexity needs at least 2 (one to predict from)")
    device = next(model.parameters()).device

    nll_sum = 0.0  # float64
    scored = windows = 0
    prev_end = 0
    with torch.inference_mode():
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            out = model(ids[None, begin:end].to(device))
            logits = out.logits if hasattr(out, "logits") else out  # [1, end - begin, V]
            # Token t is predicted by the logits at t - 1. Score the tokens no earlier window scored
            # (t ≥ prev_end) that have context inside this window (t ≥ begin + 1).
            first = max(prev_end, begin + 1)
            if first < end:
                predicting = logits[0, first - 1 - begin : end - 1 - begin].float()  # [end - first, V]
                targets = ids[first:end].to(predicting.device)
                nll_sum += float(F.cross_entropy(predicting, targets, reduction="sum").double())
                scored += end - first
            windows += 1
            prev_end = end
            if end == n:
                break
    loss = nll_sum / scored
    return PerplexityResult(loss, math.exp(loss), scored, windows, window, stride, n)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def add_perplexity_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "perplexity",
        help="sliding-window perplexity of a text file (as the Hugging Face perplexity guide computes it)",
        description=(
            "Tokenize FILE with the checkpoint's tokenizer and compute the sliding-window perplexity: "
            "windows of --window tokens every --stride tokens, each token scored once with the window's "
            "earlier tokens as context; loss = mean NLL per scored token, ppl = exp(loss)."
        ),
    )
    parser.add_argument("model", help="checkpoint directory or Hub repo id (needs qwen.tiktoken)")
    parser.add_argument("file", help="UTF-8 text file")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help=f"tokens per window (default min({DEFAULT_WINDOW}, seq_length); more than seq_length only when "
        "given explicitly: dynamic NTK and logn attention then apply)",
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="tokens between window starts (default window // 2)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model dtype (default auto: the checkpoint's flag, else bf16/fp16 on a GPU, fp32 on the CPU)",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--max-tokens", type=int, default=None, metavar="N", help="use only the first N tokens"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    from ..config import QwenConfig
    from ..hub import resolve_model_dir
    from .common import EXIT_USAGE, CLIError

    # Cheap checks first: a usage error should not wait for the model to load.
    for name in ("window", "stride", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive number of tokens, got {value}")
    if args.window is not None and args.stride is not None and args.stride > args.window:
        raise CLIError(f"--stride ({args.stride}) must not exceed --window ({args.window})")
    if not os.path.isfile(args.file):
        raise CLIError(f"text file {args.file!r} does not exist")
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"{args.file!r} is not valid UTF-8 (byte {exc.start})") from None

    try:
        folder = resolve_model_dir(args.model)
        config = QwenConfig.from_json_file(folder / "config.json")
    except FileNotFoundError as exc:  # includes CheckpointNotFoundError: an unresolvable MODEL
        raise CLIError(str(exc), EXIT_USAGE) from None
    window = args.window if args.window is not None else min(DEFAULT_WINDOW, config.seq_length)
    if window > config.max_position_embeddings:
        raise CLIError(
            f"--window {window} exceeds max_position_embeddings ({config.max_position_embeddings})"
        )
    stride = args.stride if args.stride is not None else max(window // 2, 1)
    if stride > window:
        raise CLIError(f"--stride ({stride}) must not exceed the window ({window})")

    from ..pretrained import QwenForCausalLM
    from ..tokenizer import QwenTokenizer

    if not (folder / "qwen.tiktoken").is_file():
        raise CLIError(f"{str(folder)!r} has no qwen.tiktoken to tokenize the text with")
    # Plain text: special-token surface forms in a corpus are text, not control tokens.
    ids = QwenTokenizer(folder / "qwen.tiktoken").encode(text, allowed_special=set())
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise CLIError(f"{args.file!r} holds {len(ids)} token(s); perplexity needs at least 2")
    if max(ids) >= config.vocab_size:
        raise CLIError(
            f"the text has token id {max(ids)}, outside this model's vocabulary ({config.vocab_size})"
        )
    try:
        model = QwenForCausalLM.from_pretrained(folder, dtype=args.dtype, device=args.device, progress=False)
    except ValueError as exc:
        if type(exc) is not ValueError:  # CheckpointError etc. are reported by the CLI itself
            raise
        raise CLIError(str(exc), EXIT_USAGE) from None
    result = perplexity(model, ids, window=window, stride=stride)

    # NTK and logn act only in windows that really are longer than S (a short text never fills one).
    beyond = min(window, result.total_tokens) > config.seq_length
    if args.json:
        data = {
            "model": str(folder),
            "file": args.file,
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(model.device),
            "seq_length": config.seq_length,
            "beyond_seq_length": beyond,
            **result.to_dict(),
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    context = (
        f"each scored token sees ≥ {window - stride} tokens of context after the first window"
        if stride < window
        else "non-overlapping windows: each window's first token is context only"
    )
    rows = [
        ("model", str(folder)),
        ("file", args.file),
        ("tokens", f"{result.total_tokens:,} ({result.tokens_scored:,} scored)"),
        ("window", f"{window} tokens, stride {stride}, {result.windows} window(s); {context}"),
        ("dtype", f"{str(model.dtype).removeprefix('torch.')} on {model.device}"),
        ("loss", f"{result.loss:.6f} nats/token (mean NLL over the scored tokens)"),
        ("perplexity", f"{result.ppl:.4f}"),
    ]
    if beyond:
        rows.append(
            (
                "note",
                f"window > seq_length {config.seq_length}: dynamic NTK and logn attention act in each window",
            )
        )
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in rows))
    return 0
