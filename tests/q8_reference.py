"""Plain-PyTorch reference of the CPU kernels' activation quantization (kernels/cpu/q8.c), written from
its documented formula, for the int8 and int4 GEMV tests.

Per block of 32 consecutive elements of x (the last one may be partial): amax = max |x_i|,
dx = amax / 127 and inv = 127 / amax (0 when amax is 0), both in fp32; qx_i = round-half-even(x_i * inv)
in fp32, saturated to int8. The kernels then sum the integer products exactly and scale by dx.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 32


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qx, dx) of a vector x: qx [K] as int64, dx [K] the fp32 scale of each element's block."""
    k = x.numel()
    f = F.pad(x.reshape(-1).float(), (0, (-k) % BLOCK)).reshape(-1, BLOCK)
    amax = f.abs().amax(dim=1)
    dx = amax / 127
    # a true fp32 division: `127 / amax` would be `amax.reciprocal() * 127` in PyTorch, two roundings
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(f * inv[:, None]).clamp(-128, 127)
    return q.reshape(-1)[:k].long(), dx.repeat_interleave(BLOCK)[:k]


def dequantized_activation(x: torch.Tensor) -> torch.Tensor:
    """qx * dx in float64 (exact: an integer below 2^8 times an fp32 value): the x the kernels multiply."""
    q, dx = quantize_activation(x)
    return q.double() * dx.double()
