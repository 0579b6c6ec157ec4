"""Fused Triton kernels for nekomata_core. Triton is imported lazily, only when a kernel is used.

One module per op, each with its Triton kernel, its launcher and a plain PyTorch `*_reference`:

- `rmsnorm.rms_norm(x, weight, eps)`: Qwen RMSNorm (cast to the dtype before the weight)
- `swiglu.swiglu(a, b)`: a * silu(b), b being the gate (Qwen's w2 branch)
- `rope.apply_rope(q, k, cos, sin, ...)`: rotate-half RoPE of q and k in one launch, optionally into the cache
- `attention.flash_attention(q, k, v, ...)`: causal prefill attention with left padding and logn scaling
- `decode_attention.decode_attention(q, k_cache, v_cache, ...)`: split-K flash-decoding for one token per row
- `dispatch.resolve_backend(requested, device)`: pick "triton", "sdpa" or "eager"

The names below are re-exported lazily (module `__getattr__`), so `import kernels` stays cheap and
works without triton installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "rms_norm": "rmsnorm",
    "rms_norm_reference": "rmsnorm",
    "swiglu": "swiglu",
    "swiglu_reference": "swiglu",
    "apply_rope": "rope",
    "apply_rope_reference": "rope",
    "flash_attention": "attention",
    "attention_reference": "attention",
    "decode_attention": "decode_attention",
    "decode_attention_reference": "decode_attention",
    "BACKENDS": "dispatch",
    "KernelUnavailableError": "dispatch",
    "resolve_backend": "dispatch",
    "triton_unavailable_reason": "dispatch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
