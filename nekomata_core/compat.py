"""Hugging Face call shapes, so that a model card snippet runs with only its import line changed:

    from nekomata_core import AutoTokenizer, AutoModelForCausalLM      # was: from transformers import …

    tokenizer = AutoTokenizer.from_pretrained("rinna/nekomata-7b", trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained("rinna/nekomata-7b", device_map="auto", trust_remote_code=True)
    token_ids = tokenizer.encode("西田幾多郎は、", add_special_tokens=False, return_tensors="pt")
    output_ids = model.generate(token_ids.to(model.device), max_new_tokens=200, do_sample=True, top_p=0.95,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(output_ids.tolist()[0]))

`trust_remote_code` is accepted and ignored: nekomata_core never runs code from a checkpoint.
Generation arguments left unset (or None) fall back to the checkpoint's generation_config.json, then to
Hugging Face's own defaults (top_k 50, max_length 20), exactly as `transformers` resolves them.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .accelerate import accelerate
from .errors import NekomataError
from .generation import GenerationOutput, generate_steps
from .inputs import check_input_ids
from .pretrained import QwenForCausalLM
from .sampling import GENERATION_CONFIG_KEYS, SamplingParams, load_generation_config, read_generation_config
from .tokenizer import QwenTokenizer

# What transformers' GenerationConfig uses for a key a generation_config.json does not set.
HF_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "max_length": 20,
}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.logits,)[index]


class BatchEncoding(dict):
    """A dict of tensors with `.to(device)` and attribute access, as transformers returns."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class CompatCausalLM(nn.Module):
    """A QwenForCausalLM behind transformers' `PreTrainedModel` call shapes."""

    def __init__(self, model: QwenForCausalLM, generation_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.generation_config = dict(generation_config or {})

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **unused: Any,
    ) -> CausalLMOutput:
        _reject_unknown(unused, {"use_cache", "return_dict", "past_key_values"})
        if output_hidden_states:
            logits, hidden = self.model(input_ids, attention_mask, output_hidden_states=True)
            return CausalLMOutput(logits, hidden)
        return CausalLMOutput(self.model(input_ids, attention_mask))

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """Like transformers' `generate`: returns [B, T + new] (prompt included, pad after eos).
        `stop_strings` need `tokenizer=` (this module's tokenizer or a QwenTokenizer), as in transformers."""
        _reject_unknown(unused, {"use_cache", "num_beams", "num_return_sequences"})
        if unused.get("num_beams", 1) != 1 or unused.get("num_return_sequences", 1) != 1:
            raise CompatArgumentError(
                "beam search and num_return_sequences > 1 are not supported; use num_beams=1"
            )
        if input_ids is None:
            raise CompatArgumentError("generate needs input_ids (a LongTensor [B, T] from the tokenizer)")
        # The ids are checked here only as far as max_length needs their length; everything else is
        # checked once, for every entry point alike, by generation.validate_generation_inputs.
        if not isinstance(input_ids, torch.Tensor):
            check_input_ids(input_ids, self.config.vocab_size)
        del bos_token_id  # Qwen has no bos token; accepted for call-shape compatibility
        given = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "repetition_penalty": repetition_penalty,
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
            "stop_strings": stop_strings,
        }
        resolved: dict[str, Any] = {}
        for key, value in given.items():
            if value is None:
                value = self.generation_config.get(key, HF_DEFAULTS.get(key))
            if value is not None:
                resolved[key] = value
        if "max_new_tokens" not in resolved:
            limit = next(  # `is not None`, not `or`: an explicit max_length=0 is refused, not replaced
                v for v in (max_length, self.generation_config.get("max_length"), HF_DEFAULTS["max_length"])
                if v is not None
            )
            if not isinstance(limit, numbers.Integral) or isinstance(limit, bool) or limit < 1:
                raise CompatArgumentError(f"max_length must be an integer ≥ 1, got {limit!r}")
            resolved["max_new_tokens"] = max(int(limit) - input_ids.shape[-1], 0)
        for key in ("eos_token_id", "stop_strings"):
            if isinstance(resolved.get(key), list):
                resolved[key] = tuple(resolved[key])
        params = SamplingParams(**resolved)
        out = GenerationOutput(input_ids, [], [])
        if streamer is not None:
            streamer.put(input_ids.cpu())  # HF streamers see the prompt first (skip_prompt drops it)
        for chosen in generate_steps(
            self.model,
            input_ids,
            attention_mask,
            params,
            tokenizer=getattr(tokenizer, "tokenizer", tokenizer),  # a CompatTokenizer wraps a QwenTokenizer
            generator=generator,
            output=out,
        ):
            if streamer is not None:
                streamer.put(chosen.cpu())
        if streamer is not None:
            streamer.end()
        return out.sequences.clone()

    # transformers' models are called with .eval()/.to(); .to is limited to what the model supports
    def to(self, *args: Any, **kwargs: Any) -> CompatCausalLM:
        self.model.to(*args, **kwargs)
        accelerate(self.model)  # the fast modules of the new device, with the same choices
        return self


class CompatArgumentError(NekomataError, TypeError):
    """An argument transformers would take that this shim does not support (a TypeError, as an
    unexpected keyword argument is in Python)."""


def _reject_unknown(unused: dict[str, Any], tolerated: set[str]) -> None:
    unknown = sorted(set(unused) - tolerated)
    if unknown:
        raise CompatArgumentError(
            f"unsupported argument(s) {unknown}; nekomata_core supports the arguments listed in its README"
        )


class AutoModelForCausalLM:
    """`AutoModelForCausalLM.from_pretrained` with the original Qwen remote code's options."""

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        device_map: str | torch.device | None = None,
        torch_dtype: str | torch.dtype | None = None,
        dtype: str | torch.dtype | None = None,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        trust_remote_code: bool | None = None,  # accepted, ignored: we never execute checkpoint code
        revision: str | None = None,
        **unused: Any,
    ) -> CompatCausalLM:
        _reject_unknown(unused, {"low_cpu_mem_usage", "use_flash_attn", "attn_implementation"})
        del trust_remote_code
        flags = [name for name, on in (("bf16", bf16), ("fp16", fp16), ("fp32", fp32)) if on]
        if len(flags) > 1:
            raise ValueError(f"{flags} were all set; choose at most one of bf16=, fp16=, fp32=")
        chosen = dtype if dtype is not None else torch_dtype
        if flags:
            if chosen is not None:
                raise ValueError(f"both {flags[0]}=True and a dtype were given; pass only one")
            chosen = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[flags[0]]
        device = "auto" if device_map in (None, "auto") else device_map
        if isinstance(device, dict):
            raise ValueError("device_map dictionaries are not supported; use 'auto', 'cpu' or 'cuda'")
        model = QwenForCausalLM.from_pretrained(
            pretrained_model_name_or_path,
            dtype="auto" if chosen in (None, "auto") else chosen,
            device=device,
            revision=revision,
        )
        folder = getattr(model, "checkpoint_dir", None)
        gen = {}
        if folder is not None and (folder / "generation_config.json").is_file():
            load_generation_config(folder / "generation_config.json")  # validates the file's values
            raw = read_generation_config(folder / "generation_config.json")  # bounded, types checked
            gen = {k: v for k, v in raw.items() if k in GENERATION_CONFIG_KEYS | {"max_length"}}
        return CompatCausalLM(model, gen)


class CompatTokenizer:
    """The original QWenTokenizer's call shapes on top of `QwenTokenizer`.

    Like the original, `pad_token_id`, `bos_token_id` and `eos_token_id` are None (generation takes
    them from generation_config.json). Padding with `__call__(…, padding=True)` uses `<|endoftext|>`
    and pads on the left (what generation needs) unless `padding_side="right"` is given.
    """

    pad_token_id = None
    bos_token_id = None
    eos_token_id = None

    def __init__(self, tokenizer: Any, padding_side: str = "left") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.padding_side = padding_side

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def eod_id(self) -> int:
        return self.tokenizer.eod_id

    def encode(
        self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None, **kw: Any
    ):
        del add_special_tokens  # Qwen adds no special tokens either way
        ids = self.tokenizer.encode(text, **kw)
        if return_tensors is None:
            return ids
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}; only 'pt' (PyTorch) is supported")
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kw: Any) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kw)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool | str = False,
        return_tensors: str | None = None,
        **kw: Any,
    ) -> BatchEncoding:
        single = isinstance(texts, str)
        batch = [self.tokenizer.encode(t) for t in ([texts] if single else texts)]
        if return_tensors is None:
            if single:
                return BatchEncoding({"input_ids": batch[0], "attention_mask": [1] * len(batch[0])})
            return BatchEncoding({"input_ids": batch, "attention_mask": [[1] * len(b) for b in batch]})
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}; only 'pt' (PyTorch) is supported")
        if not padding and len({len(b) for b in batch}) > 1:
            raise ValueError("texts of different lengths need padding=True to become one tensor")
        side = kw.pop("padding_side", self.padding_side)
        padded = self.tokenizer.pad(batch, padding_side=side, return_tensors="pt")
        return BatchEncoding(padded)


class AutoTokenizer:
    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        trust_remote_code: bool | None = None,
        revision: str | None = None,
        padding_side: str = "left",
        **unused: Any,
    ) -> CompatTokenizer:
        _reject_unknown(unused, {"use_fast", "pad_token"})
        del trust_remote_code
        return CompatTokenizer(
            QwenTokenizer.from_pretrained(pretrained_model_name_or_path, revision=revision), padding_side
        )
