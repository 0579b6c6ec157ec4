"""Backend selection: may the Triton kernels run on this device, and which attention backend to use.

Nothing here imports triton at module import time; `triton_unavailable_reason` imports it on demand.
The Triton kernels (`kernels/gpu/`, imported only once this module said yes) run on CUDA GPUs, or on
CPU tensors inside the Triton interpreter (``TRITON_INTERPRET=1``), which is exact but slow and is what
the CPU test-suite uses.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import torch

from ..backends import ATTENTION_CHOICES as BACKENDS  # the names accepted by `resolve_backend`

# Triton's own README: NVIDIA GPUs of compute capability 8.0+ (bf16 tensor cores are needed too).
_MIN_CUDA_CAPABILITY = (8, 0)


class KernelUnavailableError(ValueError):
    """The Triton kernels were requested where they cannot run (no triton, CPU without interpreter, ...)."""


def triton_interpret_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value (same spellings triton itself accepts)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # also covers a broken install (e.g. missing libtriton)
        return f"{type(exc).__name__}: {exc}"
    return None


def _triton_imported_for_interpreter() -> bool:
    """Whether triton's @jit library functions, and our kernels if imported, were built for the interpreter.

    triton decides that when it is imported, by reading TRITON_INTERPRET (and for our kernels when
    `kernels/gpu/` is imported), so setting the variable later yields kernels that fail with "Cannot call
    @triton.jit'd outside of the scope of a kernel".
    """
    ours = sys.modules.get(f"{__package__}.gpu.helpers")
    if ours is not None and not ours.INTERPRETED:
        return False
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a triton without these internals: assume it is fine
        return True
    return isinstance(getattr(tl, "sum", None), InterpretedFunction)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Return None when the Triton kernels can run on `device`, else a one-sentence reason and remedy.

    They can run on a CUDA device (compute capability 8.0+, or a ROCm GPU) with triton importable, and on
    a CPU device when ``TRITON_INTERPRET=1`` is set (the slow, exact interpreter used by the tests).
    """
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return (
            f"the Triton kernels of nekomata_core support CUDA devices only (got {device.type!r}); "
            "use the 'sdpa' or 'eager' backend on this device."
        )
    error = _triton_import_error()
    if error is not None:
        return (
            f"triton cannot be imported ({error}); install it with `pip install triton` "
            "(or `pip install nekomata-core[kernels]`), or use the 'sdpa' or 'eager' backend."
        )
    if device.type == "cpu":
        if triton_interpret_enabled():
            if not _triton_imported_for_interpreter():
                return (
                    "TRITON_INTERPRET=1 was set after triton was imported, so triton built its own functions "
                    "for the compiler; set TRITON_INTERPRET=1 before triton and nekomata_core.kernels.gpu are first "
                    "imported (e.g. in the environment of the process)."
                )
            return None
        return (
            "the Triton kernels do not run on CPU; use the 'sdpa' or 'eager' backend, or set "
            "TRITON_INTERPRET=1 to run them in the (very slow, test-only) Triton interpreter."
        )
    if not torch.cuda.is_available():
        return (
            "a CUDA device was requested but torch.cuda.is_available() is False; "
            "check the NVIDIA driver and that torch was built with CUDA."
        )
    if torch.version.hip is None:  # NVIDIA: check the architecture; ROCm GPUs are all supported by triton
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = _cuda_capability(index)
        if capability < _MIN_CUDA_CAPABILITY:
            return (
                f"the Triton kernels need an NVIDIA GPU of compute capability 8.0+ (Ampere or newer), found "
                f"{capability[0]}.{capability[1]}; use the 'sdpa' backend."
            )
    return None


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Map a user's backend request to the backend to run: "triton", "sdpa" or "eager".

    "auto" picks "triton" on a CUDA device where the kernels can run and "sdpa" otherwise (never the
    interpreter on CPU: it is for tests only). "triton" where the kernels cannot run raises
    `KernelUnavailableError` with the reason; an unknown name raises ValueError listing the choices.
    """
    if not isinstance(requested, str) or requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return "triton"
        return "sdpa"
    if requested == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise KernelUnavailableError(f"backend 'triton' is unavailable on {device}: {reason}")
    return requested


@functools.cache
def _cached_unavailable_reason(device_type: str, index: int | None, interpret: bool) -> str | None:
    # `interpret` is part of the key only: the answer for a CPU device depends on it.
    return triton_unavailable_reason(torch.device(device_type, index))


def require_triton(device: torch.device) -> None:
    """Raise `KernelUnavailableError` unless the Triton kernels can run on `device` (used by the launchers).

    Cached per device so that a generation step does not pay for the checks on every launch.
    """
    reason = _cached_unavailable_reason(device.type, device.index, triton_interpret_enabled())
    if reason is not None:
        raise KernelUnavailableError(f"cannot run the Triton kernel on {device}: {reason}")
