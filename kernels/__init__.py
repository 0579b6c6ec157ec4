"""Kernels for nekomata_core, in two halves that know nothing of the model:

- `gpu/`: Triton, one module per op, each importing triton at its top and imported only when chosen;
  `dispatch` decides whether they may run (it imports neither triton nor them).
- `cpu/`: C for x86-64 (AVX2 and up), `gemv.c` (bf16/int8/int4 GEMVs for a few rows), `q8.c` (the int8 and
  int4 products over int8-quantized activations) and `step.c` (a whole step of B rows in one call)
  sharing `common.h`, compiled into one library on first use by `cpu/build.py`, the one build/cache
  module; `cpu/gemv.py` and `cpu/step.py` are their Python bindings.

The Triton launchers:

- `rms_norm(x, weight, eps)`: Qwen RMSNorm (cast to the dtype before the weight)
- `swiglu(a, b)`: a * silu(b), b being the gate (Qwen's w2 branch)
- `apply_rope(q, k, cos, sin, ...)`: rotate-half RoPE of q and k in one launch, optionally into the cache
- `flash_attention(q, k, v, ...)`: causal prefill attention with left padding and logn scaling
- `step_attention(q, k_cache, v_cache, ...)`: split-K flash-decoding for one token per row
- `int4_gemv(x, qweight, scales, mins, scale_units, min_units, bias)`: one-row int4 weight-only linear
  (`gpu/int4_gemv.py`)
- `resolve_backend(requested, device)`: pick "triton", "sdpa" or "eager"

The names below are re-exported lazily (module `__getattr__`), so `import nekomata_core.kernels` stays cheap and works
without triton installed; asking for a launcher where triton cannot be imported raises
`KernelUnavailableError` with the reason.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any


def _hand_the_name_kernels_back() -> None:
    """Make a top-level ``import kernels`` mean Hugging Face's package, not this folder.

    This folder installs as ``nekomata_core.kernels``; it is importable as plain ``kernels`` only when a
    checkout's root is on sys.path (pytest run from the checkout, the tools/ scripts, ``python`` started
    there). ``kernels`` is also the name of Hugging Face's PyPI package, which transformers 5.25 and later
    depend on and import (``from kernels import CUDAProperties, ...``): finding this folder first would
    break them. So, imported under that name, this module puts the first other ``kernels`` on sys.path in
    its place (what the import would have found without the checkout). Where there is none it stays, as it
    always was: transformers before 5.25 probe ``kernels`` by importing it and take a module without a
    version for "not installed", while a ModuleNotFoundError there would escape their probe.
    """
    checkout = Path(__file__).resolve().parent.parent
    for entry in list(sys.path):
        try:
            if Path(entry or ".").resolve() == checkout:
                continue
        except OSError:
            continue
        spec = importlib.machinery.PathFinder.find_spec("kernels", [entry])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
            spec.loader.exec_module(module)
            return


if __name__ == "kernels":
    _hand_the_name_kernels_back()

_EXPORTS = {
    "rms_norm": "gpu.rmsnorm",
    "swiglu": "gpu.swiglu",
    "apply_rope": "gpu.rope",
    "flash_attention": "gpu.attention",
    "step_attention": "gpu.step_attention",
    "int4_gemv": "gpu.int4_gemv",
    "BACKENDS": "dispatch",
    "KernelUnavailableError": "dispatch",
    "resolve_backend": "dispatch",
    "triton_unavailable_reason": "dispatch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    if module.startswith("gpu."):
        dispatch = importlib.import_module(".dispatch", __name__)
        error = dispatch._triton_import_error()
        if error is not None:
            raise dispatch.KernelUnavailableError(
                f"{name} needs triton, which cannot be imported ({error}); install it with "
                "`pip install triton`, or use the 'sdpa' or 'eager' backend.")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
