"""The static KV cache: preallocated key/value buffers plus the per-sequence state generation needs.

One `KVCache` belongs to one batch of sequences being generated, not to the model, so a single
model can serve several independent generations. Buffers are allocated once, at their final size
(`[B, N, T_max, D]` per layer); each forward call writes its new keys/values into the next free
positions. Nothing grows with `torch.cat`, so steps have fixed memory and no reallocation.

The cache owns the writes and the record of which positions hold real tokens (`update`,
`record_keys`); the model only asks it for the keys and values to attend to (mlx-lm's
`update_and_fetch`, gpt-fast's `KVCache.update`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import QwenConfig
from .errors import NekomataError


class CacheError(NekomataError):
    """A forward call does not fit the cache it was given (batch size, capacity)."""


class KVCache:
    """Keys/values of every layer for `batch_size` sequences of up to `max_length` positions.

    Besides the tensors it remembers what the sequences have fixed so far:
    - `length`: positions 0 … length-1 are filled (the same for every row: rows are left-padded);
    - `key_mask` [B, T_max]: True where the position holds a real token (False for padding);
    - `ntk_alpha` [B]: the dynamic-NTK alpha chosen at prefill, reused by every later step.
    """

    def __init__(
        self,
        config: QwenConfig,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        num_heads: int | None = None,
    ) -> None:
        # num_heads: the heads this process computes — all of them, or a tensor-parallel rank's share.
        num_heads = config.num_attention_heads if num_heads is None else num_heads
        if batch_size <= 0 or max_length <= 0:
            raise CacheError(
                f"a KV cache needs batch_size > 0 and max_length > 0, got {batch_size} and {max_length}"
            )
        shape = (
            config.num_hidden_layers,
            batch_size,
            num_heads,
            max_length,
            config.head_dim,
        )
        self.config = config
        device = torch.device(device)
        # Refuse before allocating: a cache too large for the machine would otherwise end in an
        # allocator traceback, or on Linux in the OOM killer once torch.zeros touches the pages.
        needed = cache_nbytes(config, batch_size, max_length, dtype, num_heads)
        available = available_memory_bytes(device)
        too_large = (config, batch_size, num_heads, max_length, dtype, device, needed, available)
        if available is not None and needed > available:
            raise CacheError(_too_large(*too_large))
        try:
            # One allocation for all layers; layer i uses the view keys[i]   # [L, B, N, T_max, D]
            self.keys = torch.zeros(shape, dtype=dtype, device=device)
            self.values = torch.zeros(shape, dtype=dtype, device=device)
            self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        except RuntimeError as exc:  # torch.OutOfMemoryError and CPU allocator failures alike
            raise CacheError(
                _too_large(*too_large)
                + f" (the allocator said: {str(exc).splitlines()[0]})"
            ) from None
        self.ntk_alpha: torch.Tensor | None = None
        self.inv_freq: torch.Tensor | None = None  # [Bα, R/2] rotary frequencies for that alpha
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def reset(self) -> None:
        """Forget every sequence so the buffers can serve a new batch (no reallocation)."""
        self.length = 0
        self.ntk_alpha = None
        self.inv_freq = None
        self.key_mask.zero_()

    def check_fits(self, batch_size: int, new_tokens: int) -> None:
        if batch_size != self.batch_size:
            raise CacheError(
                f"the input has batch size {batch_size} but the KV cache was allocated for "
                f"{self.batch_size}; allocate a cache per batch (model.allocate_cache(batch_size, ...))."
            )
        if self.length + new_tokens > self.max_length:
            raise CacheError(
                f"the KV cache holds {self.max_length} positions; {self.length} are used and "
                f"{new_tokens} more were given. Allocate a larger cache (max_length ≥ "
                f"{self.length + new_tokens})."
            )

    def record_keys(self, attention_mask: torch.Tensor | None, new_tokens: int) -> torch.Tensor | None:
        """Note which of the next `new_tokens` positions hold real tokens (mask 1) or padding (0).

        `attention_mask` [B, T_new] covers the new tokens, or [B, length + T_new] the whole sequence as
        in Hugging Face (then earlier positions are rewritten too); None marks every new token real.
        Returns the key mask [B, length + T_new] of every position a query may attend to, or None
        when all of them are real (plain causal attention suffices).
        """
        start, total = self.length, self.length + new_tokens
        if attention_mask is None:
            self.key_mask[:, start:total] = True
        else:
            mask = attention_mask.to(device=self.device, dtype=torch.bool)
            if mask.shape[1] == total and start > 0:
                self.key_mask[:, :start] = mask[:, :start]
            self.key_mask[:, start:total] = mask[:, -new_tokens:]
        full = self.key_mask[:, :total]
        return None if bool(full.all()) else full

    def next_position(self, batch_size: int) -> int:
        """For a fixed-shape step of one token for each of `batch_size` rows: check it fits, mark it real,
        return its position. The caller runs the step and then advances `length` by one.
        """
        self.check_fits(batch_size, 1)
        self.key_mask[:, self.length] = True
        return self.length

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, at: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys/values [B, N, T_new, D] and return what attention reads.

        `at` an int: the positions at … at+T_new-1; returns positions 0 … at+T_new-1 (2 × [B, N, T, D]).
        `at` a tensor of positions (a fixed-shape step): written with `index_copy_`, and the whole
        buffer is returned (2 × [B, N, T_max, D]) so that no shape depends on the step; the step's
        mask hides the positions not yet written.
        """
        if isinstance(at, torch.Tensor):
            self.keys[layer].index_copy_(2, at, keys)
            self.values[layer].index_copy_(2, at, values)
            return self.keys[layer], self.values[layer]
        end = at + keys.shape[2]
        self.keys[layer, :, :, at:end] = keys
        self.values[layer, :, :, at:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def cache_nbytes(
    config: QwenConfig, batch_size: int, max_length: int, dtype: torch.dtype, num_heads: int | None = None
) -> int:
    """Bytes of a KVCache: keys and values (L × 2 × B × N × T × D × itemsize) plus the key mask."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    heads = config.num_attention_heads if num_heads is None else num_heads
    per_position = config.num_hidden_layers * 2 * heads * config.head_dim * itemsize
    return batch_size * max_length * (per_position + 1)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on `device` can take now, or None where it cannot be told.

    CUDA: the free memory the driver reports. CPU: MemAvailable from /proc/meminfo (else the free
    physical pages), lowered to what the cgroup (container) limit leaves.
    """
    if device.type == "cuda":
        try:
            free = int(torch.cuda.mem_get_info(device)[0])
            # torch's caching allocator reuses blocks it holds but no tensor uses; the driver counts
            # those as taken.
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    available = _meminfo_available()
    limit = _cgroup_headroom()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom() -> int | None:
    """cgroup v2 memory.max − memory.current of this process's cgroup, or None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()), 0)
    except (OSError, ValueError):
        return None


def _too_large(config, batch_size, num_heads, max_length, dtype, device, needed, available) -> str:
    have = "an unknown amount" if available is None else f"{available / 2**30:.2f} GiB"
    return (
        f"the KV cache for {batch_size} sequence(s) of {max_length} positions needs "
        f"{needed / 2**30:.2f} GiB ({config.num_hidden_layers} layers × 2 × {batch_size} × "
        f"{num_heads} heads × {max_length} × {config.head_dim} × "
        f"{str(dtype).removeprefix('torch.')}) but {have} is available on {device}; "
        "lower max_new_tokens, the prompt length or the batch size"
    )
