"""The contract between the Python bindings and the C library: the one Python definition of each value.

Each is mirrored in ``common.h`` (named in the comment beside it); ``tests/test_cpu_gemv.py`` parses the
header and checks that the two agree. Change both, and bump the ABI version, whenever one changes.
"""

from __future__ import annotations

import torch

__all__ = ["ABI_VERSION", "DTYPE_CODES", "INT4_GROUP_SIZE", "INT4_TILE_ROWS", "MAX_HEAD_DIM", "WEIGHT_KINDS"]

#: NK_ABI_VERSION: a library reporting another version is a stale build and is not used.
ABI_VERSION = 7

#: DT_F32, DT_BF16, DT_F16: the dtypes of activations, biases, scales and outputs.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: KIND_BF16, KIND_INT8, KIND_F32, KIND_INT4: the weight dtypes of a GEMV (int8 comes with per-row
#: scales; int4 is stored as uint8, two codes a byte, with per-group 8-bit scale and min codes and
#: bf16 units per tile of rows).
WEIGHT_KINDS: dict[torch.dtype, int] = {torch.bfloat16: 0, torch.int8: 1, torch.float32: 2, torch.uint8: 3}

#: NK_INT4_GROUP: inputs per int4 group (nekomata_core.quantize.INT4_GROUP_SIZE is this value).
INT4_GROUP_SIZE = 32

#: NK_INT4_TILE: rows per int4 tile, which share the units of their scale and min codes
#: (nekomata_core.quantize.INT4_TILE_ROWS is this value).
INT4_TILE_ROWS = 8

#: NK_MAX_HEAD_DIM: the widest attention head the fused step supports.
MAX_HEAD_DIM = 512
