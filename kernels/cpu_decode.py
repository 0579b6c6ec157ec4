"""Temporary alias of `kernels.cpu.step` (the old module path), kept until its last importers move.

`FusedDecodeStep` is the old name of `FusedStep`.
"""

from .cpu.step import (
    MAX_HEAD_DIM,
    BlockWeights,
    FusedStep,
    LinearWeights,
    available,
    stream_read,
    unavailable_reason,
)

FusedDecodeStep = FusedStep

__all__ = [
    "MAX_HEAD_DIM",
    "BlockWeights",
    "FusedDecodeStep",
    "FusedStep",
    "LinearWeights",
    "available",
    "stream_read",
    "unavailable_reason",
]
