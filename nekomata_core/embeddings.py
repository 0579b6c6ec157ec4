"""Pooling hidden states into one vector per sequence, for `QwenForCausalLM.embed`."""

from __future__ import annotations

import torch

from .inputs import InputError

POOLINGS = ("mean", "last", "none")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise InputError(f"pooling={pooling!r}; choose 'mean', 'last' or 'none'")


def pool(states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """[B, T, H] → [B, H]: "mean" of the real tokens (attention_mask 1), the "last" real token (right-
    or left-padded rows alike), or "none" (every position, [B, T, H])."""
    check_pooling(pooling)
    if pooling == "none":
        return states
    mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
    if attention_mask is not None:
        mask = attention_mask.to(device=states.device).bool()
    if pooling == "mean":
        weights = mask.to(torch.float32)[..., None]  # [B, T, 1]
        summed = (states.float() * weights).sum(dim=1)
        return (summed / weights.sum(dim=1).clamp(min=1)).to(states.dtype)
    positions = torch.arange(mask.shape[1], device=states.device).expand_as(mask)
    last = torch.where(mask, positions, -1).argmax(dim=1)  # the rightmost real token per row
    return states[torch.arange(states.shape[0], device=states.device), last]
