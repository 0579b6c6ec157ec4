"""Next-token selection, step for step as Hugging Face's `generate` does it.

The pipeline (the order matters for parity with HF):

    logits (cast to fp32)
      → repetition penalty      over every id already in the row (prompt, padding and new tokens)
      → min_new_tokens          eos ids masked to −inf until enough tokens were generated
      → temperature             (sampling only; 1.0 skips it)
      → top-k                   (sampling only; 0 disables)
      → top-p                   (sampling only; 1.0 disables)
      → softmax (fp32) → torch.multinomial(probs, 1)      or argmax when greedy

Sampling draws from the caller's RNG: the global torch RNG by default (so `torch.manual_seed(s)`
before a call reproduces HF's samples), or an explicit `torch.Generator`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError
from .errors import NekomataError
from .safe_files import SMALL_JSON_MAX_BYTES, read_json_file

# The lowest temperature sampling accepts. Below it sampling is greedy decoding in all but name, and
# temperatures like 1e-40 are not even normal float32 numbers (1e-50 rounds to 0: a division by zero).
# Above it, `apply_temperature` still guards the division against overflow to +inf.
MIN_TEMPERATURE = 1e-4


class SamplingError(NekomataError):
    """A generation argument (SamplingParams field) is of the wrong type or out of range."""


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of next-token selection, validated on construction.

    The checks here need no model; `generation.validate_generation_inputs` adds the ones that do
    (ids inside the vocabulary, the context limit). Numbers are normalised to plain int/float, so numpy
    scalars are accepted.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise SamplingError(f"do_sample must be True or False, got {self.do_sample!r}")
        self._set("do_sample", bool(self.do_sample))
        # temperature is checked even when greedy ignores it: a negative or NaN value is a mistake.
        temperature = self._real("temperature", "a finite number ≥ 0 (1.0 leaves the scores as they are)")
        if temperature < 0:
            raise SamplingError(f"temperature must be ≥ 0, got {temperature!r}")
        if self.do_sample and temperature < MIN_TEMPERATURE:
            raise SamplingError(
                f"temperature must be ≥ {MIN_TEMPERATURE} when sampling, got {temperature!r}; "
                "for deterministic output use do_sample=False (greedy)"
            )
        self._int("top_k", "an integer ≥ 0 (0 disables it)")
        top_p = self._real("top_p", "a number in (0, 1] (1 disables it)")
        if not 0.0 < top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
        penalty = self._real("repetition_penalty", "a finite number > 0 (1.0 disables it)")
        if penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1.0 disables it), got {penalty!r}")
        self._int("max_new_tokens", "an integer ≥ 0")
        self._int("min_new_tokens", "an integer ≥ 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                f"({self.max_new_tokens}); lower min_new_tokens or raise max_new_tokens"
            )
        eos = self.eos_token_id
        if eos is None:
            eos = ()
        elif _is_int(eos):
            eos = (eos,)
        elif isinstance(eos, (str, bytes)) or not isinstance(eos, Iterable):
            eos = (eos,)  # refused below with the value named
        eos = tuple(eos)
        if not all(_is_int(e) and e >= 0 for e in eos):
            raise SamplingError(
                f"eos_token_id must be a non-negative token id or a list of them, got {self.eos_token_id!r}"
            )
        self._set("eos_token_id", tuple(int(e) for e in eos))
        if self.pad_token_id is not None:
            if not _is_int(self.pad_token_id) or self.pad_token_id < 0:
                raise SamplingError(
                    f"pad_token_id must be a non-negative token id or None, got {self.pad_token_id!r}"
                )
            self._set("pad_token_id", int(self.pad_token_id))
        stops = self.stop_strings
        if stops is None:
            stops = ()
        elif isinstance(stops, str) or not isinstance(stops, Iterable):
            stops = (stops,)
        stops = tuple(stops)
        if not all(isinstance(s, str) and s for s in stops):
            raise SamplingError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        self._set("stop_strings", stops)

    def updated(self, **changes: Any) -> SamplingParams:
        """A copy with the given fields replaced (None values are ignored: "not set")."""
        unknown = sorted(set(changes) - GENERATION_CONFIG_KEYS)
        if unknown:
            raise SamplingError(
                f"unknown generation argument(s) {unknown}; the known ones are {sorted(GENERATION_CONFIG_KEYS)}"
            )
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    # -------------------------------------------------------------- field checks
    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # the dataclass is frozen; this is construction

    def _real(self, name: str, expected: str) -> float:
        value = getattr(self, name)
        if not _is_number(value) or not math.isfinite(float(value)):
            raise SamplingError(f"{name} must be {expected}, got {value!r}")
        self._set(name, float(value))
        return float(value)

    def _int(self, name: str, expected: str) -> int:
        value = getattr(self, name)
        if not _is_int(value) or value < 0:
            raise SamplingError(f"{name} must be {expected}, got {value!r}")
        self._set(name, int(value))
        return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


GENERATION_CONFIG_KEYS = {f.name for f in fields(SamplingParams)}


# The JSON types of the generation_config.json keys we use (nekomata's CLI also reads chat_format). A
# wrong type is refused naming the file and the key, before SamplingParams sees the value.
_INT, _NUMBER = "an integer", "a number"
_GENERATION_KEY_TYPES: dict[str, str] = {
    "do_sample": "true or false",
    "temperature": _NUMBER,
    "top_k": _INT,
    "top_p": _NUMBER,
    "repetition_penalty": _NUMBER,
    "max_new_tokens": _INT,
    "min_new_tokens": _INT,
    "eos_token_id": "a token id or a list of token ids",
    "pad_token_id": _INT,
    "stop_strings": "a string or a list of strings",
    "chat_format": "a string",
    "max_length": _INT,
}


def _has_json_type(value: Any, kind: str) -> bool:
    if kind == "true or false":
        return isinstance(value, bool)
    if kind == _INT:
        return _is_int(value)
    if kind == _NUMBER:
        return _is_number(value)
    if kind == "a string":
        return isinstance(value, str)
    if kind == "a string or a list of strings":
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))
    return _is_int(value) or (isinstance(value, list) and all(_is_int(i) for i in value))  # token ids


def read_generation_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object of a generation_config.json, bounded in size, with the types of the keys we use
    checked; `{}` when the file does not exist. Raises `ConfigError` naming the file and the key."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    data = read_json_file(
        path,
        max_bytes=SMALL_JSON_MAX_BYTES,
        error=ConfigError,
        fix="fix or delete it (it only holds generation defaults)",
    )
    for key, kind in _GENERATION_KEY_TYPES.items():
        value = data.get(key)
        if value is not None and not _has_json_type(value, kind):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:59] + "…"
            raise ConfigError(
                f"{str(path)!r}: key {key!r} must be {kind}, got {shown}; fix or delete that key."
            )
    return data


def load_generation_config(path: str | os.PathLike[str]) -> SamplingParams:
    """SamplingParams from a checkpoint's generation_config.json (unknown keys ignored; defaults when
    there is no such file). A file that is too large, not JSON, not an object, or has a key of the
    wrong type or value raises `ConfigError` naming the file and the key.

    Qwen-7B's file says: do_sample true, top_p 0.8, top_k 0, max_new_tokens 512, eos = pad = 151643.
    """
    path = Path(path)
    data = read_generation_config(path)
    known = {k: v for k, v in data.items() if k in GENERATION_CONFIG_KEYS and v is not None}
    if isinstance(known.get("eos_token_id"), list):
        known["eos_token_id"] = tuple(known["eos_token_id"])
    if isinstance(known.get("stop_strings"), list):
        known["stop_strings"] = tuple(known["stop_strings"])
    try:
        return SamplingParams(**known)
    except ValueError as exc:  # SamplingParams names the key; a bad file is a config problem: add its name
        raise ConfigError(f"{str(path)!r}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# The processors, each a small pure function on fp32 scores [B, V]
# --------------------------------------------------------------------------------------------------
def apply_repetition_penalty(scores: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) scores of every id in `seen_ids` [B, T] by `penalty`."""
    if penalty == 1.0:
        return scores
    seen = torch.gather(scores, 1, seen_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, seen_ids, seen)


def mask_eos(scores: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """min_new_tokens: make eos impossible (−inf) for this step."""
    ids = [e for e in eos_ids if e < scores.shape[-1]]
    if not ids:
        return scores
    scores = scores.clone()
    scores[:, ids] = float("-inf")
    return scores


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """`scores / temperature`, as HF computes it. Where that overflows to +inf (a small temperature and
    large logits) softmax would give NaN and `torch.multinomial` would fail; the same distribution is
    then computed from `(scores - max) / temperature`, whose largest entry is 0."""
    if temperature == 1.0:
        return scores
    scaled = scores / temperature
    if temperature < 1.0 and bool(torch.isposinf(scaled).any()):
        scaled = (scores - scores.amax(dim=-1, keepdim=True)) / temperature
    return scaled


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th kept too, as HF does); 0 disables."""
    if top_k == 0:
        return scores
    k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is ≤ 1 − top_p,
    always keeping the most likely one."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor, seen_ids: torch.Tensor, new_tokens: int, params: SamplingParams
) -> torch.Tensor:
    """The whole HF pipeline on next-token logits [B, V] → fp32 scores ready for argmax/softmax."""
    scores = logits.float()
    scores = apply_repetition_penalty(scores, seen_ids, params.repetition_penalty)
    if new_tokens < params.min_new_tokens:
        scores = mask_eos(scores, params.eos_token_id)
    if params.do_sample:
        scores = apply_temperature(scores, params.temperature)
        scores = apply_top_k(scores, params.top_k)
        scores = apply_top_p(scores, params.top_p)
    return scores


def greedy_argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=-1)` for [B, V] scores: the first index of each row's maximum, NaN counting as
    the maximum. On the CPU it goes through numpy, whose argmax over one long row is much faster than
    torch's (a visible share of a small model's step) and has the same semantics."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2:
        return torch.from_numpy(scores.contiguous().numpy().argmax(axis=-1)).to(torch.long)
    return scores.argmax(dim=-1)


def select_next(
    scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids [B]: argmax when greedy, else one multinomial draw per row from softmax(scores)."""
    if not params.do_sample:
        return greedy_argmax(scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
