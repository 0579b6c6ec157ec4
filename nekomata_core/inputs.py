"""The checks every entry point applies to token ids and attention masks, so that `model()`, `generate`,
`stream` and the compat shim refuse the same inputs with the same words."""

from __future__ import annotations

import torch

from .errors import NekomataError


class InputError(NekomataError):
    """The inputs of a forward call are malformed (shape, dtype, token ids, attention mask)."""


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, device: torch.device | None = None) -> None:
    """The checks of `QwenForCausalLM.forward` on token ids [B, T], shared with `generate` so that both
    refuse the same inputs with the same words. `device=None` skips the device check."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch.LongTensor [B, T], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise InputError(
            f"input_ids must have shape [batch, length] with both > 0, got {tuple(input_ids.shape)}; "
            "for one sequence use input_ids[None]"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be integer token ids (torch.long), got {input_ids.dtype}")
    if device is not None and input_ids.device != device:
        raise InputError(
            f"input_ids are on {input_ids.device} but the model is on {device}; "
            f"move them with input_ids.to({str(device)!r})"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(
            f"token id {bad} in input_ids is outside the vocabulary [0, {vocab_size}); "
            "was the input made by this model's tokenizer?"
        )


def check_attention_mask(attention_mask: torch.Tensor, batch: int, lengths: tuple[int, ...]) -> None:
    """An attention mask must be a tensor [batch, one of `lengths`] holding only 0 and 1 (or bool).
    Lists and arrays are refused rather than converted, by `forward` and `generate` alike."""
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(
            f"attention_mask must be a torch.Tensor [batch, length] of 0/1, got {type(attention_mask).__name__}; "
            "convert it with torch.tensor(mask)"
        )
    expected = " or ".join(f"[{batch}, {n}]" for n in dict.fromkeys(lengths))
    if (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != batch
        or attention_mask.shape[1] not in lengths
    ):
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected {expected} "
            "(the shape of input_ids, or cached + new tokens)"
        )
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise InputError(
            "attention_mask must hold only 0 (padding) and 1 (real token); "
            f"it holds {_first_bad_mask_value(attention_mask)}"
        )


def _first_bad_mask_value(mask: torch.Tensor) -> str:
    bad = mask[(mask != 0) & (mask != 1)]
    return repr(bad[0].item())
