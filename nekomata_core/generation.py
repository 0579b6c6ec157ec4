"""Text generation: one prefill over the prompt, then one token at a time through the static cache.

    prefill(prompt)            → logits of the last position, cache filled, NTK alpha fixed
    loop:
        select_next(logits)    → next token per row (sampling.py: HF's pipeline and RNG use)
        stop checks            → eos ids, stop strings, max_new_tokens — per row
        decode_one(token)      → logits of the next position (the cache grows by one)

Batches are left-padded (the attention mask marks padding) so that every row's next token sits in the
same column. Rows finish independently; a finished row is fed `pad_token_id` until all are done, as
Hugging Face does, so that the random stream (one multinomial draw per step for the whole batch)
stays identical to HF's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import NekomataError
from .sampling import SamplingParams, process_logits, select_next

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import QwenForCausalLM
    from .tokenizer import QwenTokenizer

FINISH_EOS = "eos"
FINISH_STOP_STRING = "stop_string"
FINISH_LENGTH = "length"


class PromptTooLongError(NekomataError):
    """The prompt does not fit the model's context limit."""


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


DecodeFn = Callable[[torch.Tensor, "KVCache"], torch.Tensor]


def prepare_inputs(
    model: QwenForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a generation batch: [B, T] ids, left padding only, fits the model's context."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.LongTensor [B, T], got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, length>0], got {tuple(input_ids.shape)}")
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] > limit:
        raise PromptTooLongError(
            f"the prompt has {input_ids.shape[1]} tokens but this model handles at most {limit} "
            "(max_position_embeddings in config.json); shorten the prompt"
        )
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        return input_ids, None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(model.device)
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "generation needs LEFT padding (padding before the prompt, so that every row's next token "
            "lands in the same column); this attention_mask has padding after real tokens. "
            "Pad with padding_side='left'."
        )
    if bool((mask.sum(dim=-1) == 0).any()):
        raise ValueError("a row of the batch is all padding; every prompt needs at least one real token")
    return input_ids, (None if bool(mask.all()) else mask)


def generate_steps(
    model: QwenForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    *,
    tokenizer: QwenTokenizer | None = None,
    generator: torch.Generator | None = None,
    decode_fn: DecodeFn | None = None,
    output: GenerationOutput | None = None,
) -> Iterator[torch.Tensor]:
    """The generation loop as an iterator: yields the tokens [B] chosen at each step.

    `output` (if given) is filled in as the loop runs; `generate` and `stream` are built on this.
    """
    params = params or SamplingParams()
    input_ids, mask = prepare_inputs(model, input_ids, attention_mask)
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer=... to generate")
    pad_id = params.pad_token_id
    if pad_id is None:  # HF falls back to the (first) eos id
        pad_id = params.eos_token_id[0] if params.eos_token_id else 0
    batch, prompt_len = input_ids.shape
    total = prompt_len + params.max_new_tokens
    out = output if output is not None else GenerationOutput(input_ids, [], [])
    out.prompt_tokens = prompt_len
    out.new_tokens = [[] for _ in range(batch)]
    out.finish_reasons = [FINISH_LENGTH] * batch
    sequences = torch.full((batch, total), pad_id, dtype=torch.long, device=model.device)
    sequences[:, :prompt_len] = input_ids
    out.sequences = sequences[:, :prompt_len]
    if params.max_new_tokens == 0:
        return

    unfinished = torch.ones(batch, dtype=torch.bool, device=model.device)
    eos = torch.tensor(params.eos_token_id, dtype=torch.long, device=model.device)
    stop_watch = _StopStringWatcher(tokenizer, params.stop_strings, batch) if params.stop_strings else None
    decode = decode_fn or _default_decode(model)

    with torch.inference_mode():
        started = _now(model)
        cache = model.allocate_cache(batch, total)
        logits = model(input_ids, mask, cache=cache, last_logits_only=True)[:, -1]
        out.prefill_seconds = _now(model) - started
        started = _now(model)
        for step in range(params.max_new_tokens):
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
            if not bool(unfinished.any()) or step + 1 == params.max_new_tokens:
                break
            logits = decode(chosen[:, None], cache)
            out.decode_steps += 1
        out.decode_seconds = _now(model) - started


def generate(
    model: QwenForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    *,
    tokenizer: QwenTokenizer | None = None,
    generator: torch.Generator | None = None,
    decode_fn: DecodeFn | None = None,
    **overrides: Any,
) -> GenerationOutput:
    """Generate for a (left-padded) batch. `overrides` are SamplingParams fields (e.g. max_new_tokens=…).

    Returns the full sequences, each row's new tokens and why each row stopped, plus timings.
    """
    params = (params or SamplingParams()).updated(**overrides)
    out = GenerationOutput(input_ids, [], [])
    for _ in generate_steps(
        model,
        input_ids,
        attention_mask,
        params,
        tokenizer=tokenizer,
        generator=generator,
        decode_fn=decode_fn,
        output=out,
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
    decode_fn: DecodeFn | None = None,
    **overrides: Any,
) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece, as tokens are generated.

    Pieces never split a character: the tokenizer's incremental decoder holds back incomplete UTF-8
    (one Japanese character often spans two or three tokens). Their concatenation equals
    `tokenizer.decode(new_tokens)`.
    """
    params = (params or SamplingParams()).updated(**overrides)
    if isinstance(prompt, str):
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    decoder = tokenizer.incremental_decoder(skip_special_tokens=skip_special_tokens)
    out = output if output is not None else GenerationOutput(ids, [], [])
    emitted = 0
    for _ in generate_steps(
        model, ids, None, params, tokenizer=tokenizer, generator=generator, decode_fn=decode_fn, output=out
    ):
        for token in out.new_tokens[0][emitted:]:
            piece = decoder.push(token)
            if piece:
                yield piece
        emitted = len(out.new_tokens[0])
    tail = decoder.flush()
    if tail:
        yield tail


def _default_decode(model: QwenForCausalLM) -> DecodeFn:
    """The native C step where it applies (CPU, float32/bfloat16/int8 weights; batch-1 steps), else the
    plain forward. Both compute the same function (tests/test_decode.py); the native one is faster."""
    from .decode import NativeDecoder, native_decode_problem

    if native_decode_problem(model) is None:
        native = NativeDecoder(model)
        plain = _plain_decode(model)

        def decode(tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
            return native(tokens, cache) if tokens.shape[0] == 1 else plain(tokens, cache)

        return decode
    return _plain_decode(model)


def _plain_decode(model: QwenForCausalLM) -> DecodeFn:
    def decode_one(tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return model(tokens, cache=cache)[:, -1]

    return decode_one


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
