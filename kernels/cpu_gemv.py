"""Temporary alias of `kernels.cpu.gemv` (the old module path), kept until its last importers move."""

from .cpu.gemv import (
    available,
    library_path,
    linear_bf16,
    linear_bf16_op,
    linear_int8,
    linear_int8_op,
    unavailable_reason,
)

__all__ = [
    "available",
    "library_path",
    "linear_bf16",
    "linear_bf16_op",
    "linear_int8",
    "linear_int8_op",
    "unavailable_reason",
]
