"""Prompt formats of the instruction-tuned siblings, built as token ids (never as one big string).

- Qwen-*-Chat use ChatML: `<|im_start|>role\\n…<|im_end|>\\n`; the reply ends at `<|im_end|>`.
- rinna's nekomata-*-instruction use an Alpaca-style Japanese template; the reply ends at eos.

Control tokens are inserted as their special ids. User text is encoded with special tokens treated as
plain text, so typing `<|im_end|>` in a message cannot close a turn or forge another speaker's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .tokenizer import QwenTokenizer

ChatFormatName = Literal["chatml", "instruction", "raw"]
CHAT_FORMATS: tuple[str, ...] = ("chatml", "instruction", "raw")

DEFAULT_SYSTEM = "You are a helpful assistant."
INSTRUCTION_PREAMBLE = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
)


@dataclass
class Turn:
    role: str  # "user" or "assistant" (or "system")
    content: str


def plain(tokenizer: QwenTokenizer, text: str) -> list[int]:
    """Encode untrusted text: special-token surface forms stay ordinary characters."""
    return tokenizer.encode(text, allowed_special=set(), disallowed_special=())


def chatml_prompt(
    tokenizer: QwenTokenizer, history: Sequence[Turn], message: str, system: str = DEFAULT_SYSTEM
) -> list[int]:
    """`<|im_start|>system\\n{system}<|im_end|>\\n` + past turns + the new user turn + the assistant
    header, as Qwen-Chat was trained."""
    start, end = tokenizer.im_start_id, tokenizer.im_end_id
    newline = plain(tokenizer, "\n")

    def turn(role: str, content: str) -> list[int]:
        return [start, *plain(tokenizer, role), *newline, *plain(tokenizer, content), end, *newline]

    ids = turn("system", system)
    for past in history:
        ids += turn(past.role, past.content)
    ids += turn("user", message)
    return ids + [start, *plain(tokenizer, "assistant"), *newline]


def instruction_prompt(
    tokenizer: QwenTokenizer, instruction: str, input_text: str | None = None
) -> list[int]:
    """rinna's nekomata-instruction template (the `### 入力:` section only when there is an input)."""
    if input_text:
        text = f"{INSTRUCTION_PREAMBLE}\n\n### 指示:\n{instruction}\n\n### 入力:\n{input_text}\n\n### 応答:\n"
    else:
        text = f"{INSTRUCTION_PREAMBLE}\n\n### 指示:\n{instruction}\n\n### 応答:\n"
    return plain(tokenizer, text)


def stop_ids(tokenizer: QwenTokenizer, fmt: str) -> tuple[int, ...]:
    """Which ids end a reply: ChatML stops at <|im_end|> (and eos); the others at eos."""
    if fmt == "chatml":
        return (tokenizer.im_end_id, tokenizer.eod_id)
    return (tokenizer.eod_id,)


def detect_format(name: str, chat_format_hint: str | None = None) -> str:
    """Guess the prompt format from generation_config.json's `chat_format` and the model's name."""
    if chat_format_hint == "chatml":
        return "chatml"
    lowered = name.lower()
    if "instruction" in lowered:
        return "instruction"
    if "chat" in lowered:
        return "chatml"
    return "raw"
