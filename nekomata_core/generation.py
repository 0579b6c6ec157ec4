"""Text generation: one prefill over the prompt, then one token at a time through the static cache.

    prefill(prompt)            → logits of the last position, cache filled, NTK alpha fixed
    loop:
        select_next(logits)    → next token per row (sampling.py: HF's pipeline and RNG use)
        stop checks            → eos ids, stop strings, max_new_tokens — per row
        non-finite logits      → NonFiniteLogitsError naming the step (broken weights, fp16 overflow)
        step(token)            → logits of the next position (the cache grows by one)

Batches are left-padded (the attention mask marks padding) so that every row's next token sits in the
same column. Rows finish independently; a finished row is fed `pad_token_id` until all are done, as
Hugging Face does, so that the random stream (one multinomial draw per step for the whole batch)
stays identical to HF's.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .accelerate import StepFn, make_step
from .config import QwenConfig
from .errors import NekomataError
from .inputs import check_attention_mask, check_input_ids
from .sampling import SamplingParams, process_logits, select_next

if TYPE_CHECKING:
    from .model import QwenForCausalLM
    from .tokenizer import QwenTokenizer

FINISH_EOS = "eos"
FINISH_STOP_STRING = "stop_string"
FINISH_LENGTH = "length"


class PromptTooLongError(NekomataError):
    """The prompt does not fit the model's context limit."""


class GenerationInputError(NekomataError):
    """A generation argument does not fit the model (an id outside the vocabulary, a missing tokenizer…)."""


class NonFiniteLogitsError(NekomataError):
    """The model produced NaN or infinite logits: there is no next token to choose."""


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, T_prompt + steps]: prompt, new tokens, pad after a row finished
    new_tokens: list[list[int]]  # per row, generated ids up to and including the one that stopped it
    finish_reasons: list[str]  # per row: "eos", "stop_string" or "length"
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> float:
        return (
            self.prompt_tokens * self.sequences.shape[0] / self.prefill_seconds
            if self.prefill_seconds
            else 0.0
        )

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second (one token per row per step), prefill excluded."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


def validate_generation_inputs(
    config: QwenConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: SamplingParams,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every check of a generation request against the model's config, made once before any work.

    `generate`, `stream`, the compat shim's `model.generate` and the CLI all come through here (via
    `generate_steps`), so a bad argument gets the same error whichever way it arrives. The checks of
    `SamplingParams` itself (ranges, types) ran when it was built; these are the ones that need the
    model: ids [B, T] (1-D is one row) inside the vocabulary, the attention mask as `model()` checks it
    (a tensor of 0/1 of the same shape; lists are refused there and here alike) and left-padded,
    pad/eos ids inside the vocabulary, and the prompt inside max_position_embeddings.
    Returns the ids as torch.long [B, T] and the mask, or None when it marks no padding.
    """
    _check_params_type(params)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    vocab = config.vocab_size
    check_input_ids(input_ids, vocab)
    batch, prompt_len = input_ids.shape
    limit = config.max_position_embeddings
    if prompt_len > limit or (prompt_len == limit and params.max_new_tokens > 0):
        raise PromptTooLongError(
            f"the prompt has {prompt_len} tokens but this model handles at most {limit} positions, "
            "prompt and new tokens together (max_position_embeddings in config.json); shorten the prompt"
        )
    if params.pad_token_id is not None and params.pad_token_id >= vocab:
        raise GenerationInputError(
            f"pad_token_id {params.pad_token_id} is outside the vocabulary [0, {vocab}); "
            "use the tokenizer's id, e.g. 151643 (<|endoftext|>) for Qwen"
        )
    outside = [e for e in params.eos_token_id if e >= vocab]
    if outside:
        raise GenerationInputError(
            f"eos_token_id {outside[0]} is outside the vocabulary [0, {vocab}); "
            "use the tokenizer's ids, e.g. 151643 (<|endoftext|>) for Qwen"
        )
    if attention_mask is None:
        return input_ids.long(), None
    check_attention_mask(attention_mask, batch, (prompt_len,))
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):  # a real token followed by padding
        raise GenerationInputError(
            "generation needs LEFT padding (padding before the prompt, so that every row's next token "
            "lands in the same column); this attention_mask has padding after real tokens. "
            "Pad with padding_side='left'."
        )
    if bool((mask.sum(dim=-1) == 0).any()):
        raise GenerationInputError(
            "a row of the attention_mask is all padding; every prompt needs at least one real token"
        )
    return input_ids.long(), (None if bool(mask.all()) else attention_mask)


def new_token_budget(config: QwenConfig, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens generation may add: max_new_tokens, cut so that prompt + new tokens stay within
    max_position_embeddings (the original's logn table, and its rotary positions, end there)."""
    return max(0, min(max_new_tokens, config.max_position_embeddings - prompt_len))


def check_finite_logits(logits: torch.Tensor, step: int) -> None:
    """Refuse NaN/inf logits [B, V] of `step` (0: the prefill, k: decode step k). Greedy decoding would
    take token 0 from a NaN row forever and sampling would fail inside torch.multinomial.

    The check that runs at every step is the logits' smallest and largest value (one pass; both NaN when
    any value is NaN, -inf or inf when one is): 28 µs for a [2, 151936] bf16 row pair against 370 µs for
    `isfinite(logits).all()`, which allocates a mask the size of the vocabulary (2 cores of a Zen 4 EPYC;
    a small model's int4 step takes 12 ms). The mask is built only to name the rows at fault."""
    if logits.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(logits))).all()):
        return
    finite = torch.isfinite(logits)
    rows = (~finite).any(dim=-1).nonzero().flatten().tolist()
    where = "the prefill (the prompt's last position)" if step == 0 else f"decode step {step}"
    raise NonFiniteLogitsError(
        f"the model produced non-finite logits (NaN or inf) at {where}, batch row(s) {rows[:8]}; "
        "the checkpoint probably holds non-finite weights (`nekomata inspect MODEL` reports them), "
        "or float16 overflowed (load it with dtype bfloat16 or float32)"
    )


def generate_steps(
    model: QwenForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    *,
    tokenizer: QwenTokenizer | None = None,
    generator: torch.Generator | None = None,
    step_fn: StepFn | None = None,
    output: GenerationOutput | None = None,
    decode_fn: StepFn | None = None,
) -> Iterator[torch.Tensor]:
    """The generation loop as an iterator: yields the tokens [B] chosen at each step.

    `output` (if given) is filled in as the loop runs; `generate` and `stream` are built on this.
    `step_fn(tokens [B, 1], cache) → logits` runs one step (default: `accelerate.make_step(model, "auto")`);
    `decode_fn` is its old name, still accepted.
    """
    step_fn = _step_argument(step_fn, decode_fn)
    params = SamplingParams() if params is None else params
    input_ids, mask = validate_generation_inputs(model.config, input_ids, attention_mask, params)
    if params.stop_strings and not hasattr(tokenizer, "incremental_decoder"):
        given = "" if tokenizer is None else f" (got {type(tokenizer).__name__}, not a QwenTokenizer)"
        raise GenerationInputError(
            f"stop_strings need the tokenizer: pass tokenizer=... to generate{given}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise GenerationInputError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    input_ids = input_ids.to(model.device)
    mask = None if mask is None else mask.to(model.device)
    pad_id = params.pad_token_id
    if pad_id is None:  # HF falls back to the (first) eos id
        pad_id = params.eos_token_id[0] if params.eos_token_id else 0
    batch, prompt_len = input_ids.shape
    steps = new_token_budget(model.config, prompt_len, params.max_new_tokens)
    total = prompt_len + steps
    with torch.inference_mode():
        # The cache before any buffer of ours: it refuses a size that cannot fit with one CacheError
        # (the [B, total] token buffer below, allocated first, made 10**12 new tokens an allocator traceback).
        started = _now(model)
        cache = model.allocate_cache(batch, total) if steps else None
        allocation_seconds = _now(model) - started  # part of the prefill's time
    out = output if output is not None else GenerationOutput(input_ids, [], [])
    out.prompt_tokens = prompt_len
    out.new_tokens = [[] for _ in range(batch)]
    out.finish_reasons = [FINISH_LENGTH] * batch
    sequences = torch.full((batch, total), pad_id, dtype=torch.long, device=model.device)
    sequences[:, :prompt_len] = input_ids
    out.sequences = sequences[:, :prompt_len]
    if steps == 0:
        return

    unfinished = torch.ones(batch, dtype=torch.bool, device=model.device)
    eos = torch.tensor(params.eos_token_id, dtype=torch.long, device=model.device)
    stop_watch = _StopStringWatcher(tokenizer, params.stop_strings, batch) if params.stop_strings else None
    step_fn = step_fn or _default_step(model)

    with torch.inference_mode():
        started = _now(model)
        logits = model(input_ids, mask, cache=cache, last_logits_only=True)[:, -1]
        check_finite_logits(logits, 0)
        out.prefill_seconds = allocation_seconds + _now(model) - started
        started = _now(model)
        for step in range(steps):
            cur = prompt_len + step
            scores = process_logits(logits, sequences[:, :cur], step, params)
            chosen = select_next(scores, params, generator)
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad_id))
            sequences[:, cur] = chosen
            out.sequences = sequences[:, : cur + 1]

            chosen_list = chosen.tolist()
            was_unfinished = unfinished.tolist()
            for row in range(batch):
                if was_unfinished[row]:
                    out.new_tokens[row].append(chosen_list[row])
            hit_eos = torch.isin(chosen, eos) & unfinished if eos.numel() else torch.zeros_like(unfinished)
            for row in hit_eos.nonzero().flatten().tolist():
                out.finish_reasons[row] = FINISH_EOS
            unfinished &= ~hit_eos
            if stop_watch is not None:
                for row in stop_watch.update(chosen_list, unfinished.tolist()):
                    out.finish_reasons[row] = FINISH_STOP_STRING
                    unfinished[row] = False
            yield chosen
            if not bool(unfinished.any()) or step + 1 == steps:
                break
            logits = step_fn(chosen[:, None], cache)
            out.decode_steps += 1
            check_finite_logits(logits, out.decode_steps)
        out.decode_seconds = _now(model) - started


def generate(
    model: QwenForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    *,
    tokenizer: QwenTokenizer | None = None,
    generator: torch.Generator | None = None,
    step_fn: StepFn | None = None,
    decode_fn: StepFn | None = None,
    **overrides: Any,
) -> GenerationOutput:
    """Generate for a (left-padded) batch. `overrides` are SamplingParams fields (e.g. max_new_tokens=…).

    Returns the full sequences, each row's new tokens and why each row stopped, plus timings.

    Length: prompt + new tokens never exceed `config.max_position_embeddings`. A prompt longer than that
    raises PromptTooLongError; when prompt + max_new_tokens is longer, generation stops at the limit
    with finish reason "length" (the KV cache is allocated only up to the limit). A cache that cannot
    fit in the device's available memory raises CacheError with its size, before anything is allocated.
    Errors: every bad argument raises a NekomataError naming it (see `validate_generation_inputs`);
    NaN/inf logits raise NonFiniteLogitsError naming the step.
    """
    params = _with_overrides(params, overrides)
    out = GenerationOutput(input_ids, [], [])
    for _ in generate_steps(
        model,
        input_ids,
        attention_mask,
        params,
        tokenizer=tokenizer,
        generator=generator,
        step_fn=step_fn,
        output=out,
        decode_fn=decode_fn,
    ):
        pass
    return out


def stream(
    model: QwenForCausalLM,
    tokenizer: QwenTokenizer,
    prompt: str | Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    generator: torch.Generator | None = None,
    skip_special_tokens: bool = True,
    output: GenerationOutput | None = None,
    step_fn: StepFn | None = None,
    decode_fn: StepFn | None = None,
    **overrides: Any,
) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece, as tokens are generated.

    Pieces never split a character: the tokenizer's incremental decoder holds back incomplete UTF-8
    (one Japanese character often spans two or three tokens). Their concatenation equals
    `tokenizer.decode(new_tokens)`.
    """
    step_fn = _step_argument(step_fn, decode_fn)
    params = _with_overrides(params, overrides)
    ids = _prompt_ids(tokenizer, prompt)
    decoder = tokenizer.incremental_decoder(skip_special_tokens=skip_special_tokens)
    out = output if output is not None else GenerationOutput(ids, [], [])
    emitted = 0
    for _ in generate_steps(
        model, ids, None, params, tokenizer=tokenizer, generator=generator, step_fn=step_fn, output=out
    ):
        for token in out.new_tokens[0][emitted:]:
            piece = decoder.push(token)
            if piece:
                yield piece
        emitted = len(out.new_tokens[0])
    tail = decoder.flush()
    if tail:
        yield tail


def _check_params_type(params: Any) -> None:
    if not isinstance(params, SamplingParams):
        raise GenerationInputError(
            f"params must be a SamplingParams, got {type(params).__name__}; "
            "pass SamplingParams(...) or the fields as keyword arguments"
        )


def _with_overrides(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    params = SamplingParams() if params is None else params
    _check_params_type(params)
    return params.updated(**overrides)


def _prompt_ids(tokenizer: QwenTokenizer, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """One prompt as ids [1, T]: text is encoded, a list of ints converted, a tensor passed on as it is
    (its dtype and range are checked by validate_generation_inputs, not silently cast)."""
    if isinstance(prompt, str):
        return torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] != 1:
            raise GenerationInputError(
                f"stream takes one prompt; got input_ids of shape {tuple(prompt.shape)} "
                "(use generate for a batch)"
            )
        return prompt.reshape(1, -1) if prompt.dim() <= 2 else prompt
    if not isinstance(prompt, Sequence) or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt
    ):
        raise GenerationInputError(
            f"the prompt must be a str, a list of token ids (int) or a LongTensor, got {_describe(prompt)}"
        )
    try:
        return torch.tensor([list(prompt)], dtype=torch.long)
    except (OverflowError, RuntimeError, ValueError):  # an id beyond int64 (torch's words vary)
        raise GenerationInputError(
            f"a token id of the prompt is outside the vocabulary (got {max(prompt, key=abs)})"
        ) from None


def _describe(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(value).__name__


def _step_argument(step_fn: StepFn | None, decode_fn: StepFn | None) -> StepFn | None:
    """`step_fn`, or `decode_fn` (its old name: "decode" now means tokens → text only)."""
    if decode_fn is None:
        return step_fn
    if step_fn is not None and step_fn is not decode_fn:
        raise GenerationInputError("pass step_fn only: decode_fn is its old name, and both were given")
    return decode_fn


def _default_step(model: QwenForCausalLM) -> StepFn:
    """The "auto" step of `nekomata_core.accelerate.make_step`: the native C step (batches of up to 8
    rows, 16 quantized) where it applies (CPU, float32/bfloat16/int8/int4 weights), else the model's
    fixed-shape step. Both compute the same function as the plain forward (tests/test_steps.py)."""
    return make_step(model, "auto")


def _now(model: QwenForCausalLM) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


class _StopStringWatcher:
    """Decodes each row's new tokens incrementally and reports rows whose text hit a stop string."""

    def __init__(self, tokenizer: QwenTokenizer, stops: Sequence[str], batch: int) -> None:
        self.stops = list(stops)
        self.window = max(len(s) for s in stops)
        self.decoders = [tokenizer.incremental_decoder() for _ in range(batch)]
        self.tails = [""] * batch

    def update(self, tokens: list[int], active: list[bool]) -> list[int]:
        hit = []
        for row, (token, alive) in enumerate(zip(tokens, active, strict=False)):
            if not alive:
                continue
            piece = self.decoders[row].push(token)
            if not piece:
                continue
            text = self.tails[row] + piece
            if any(stop in text for stop in self.stops):
                hit.append(row)
            self.tails[row] = text[-self.window :]
        return hit
