"""Small @triton.jit helpers shared by the kernels, in an interpreter and a GPU version.

`to_dtype(x, dtype)`: round an fp32 tensor to `dtype` to nearest even, the way torch's `.to()` does.
`dot(a, b, acc, input_precision)`: `tl.dot` with an fp32 accumulator (acc may be None).
`exp(x)`: fp32 exp as accurate as torch's (`tl.exp` is a fast approximation on NVIDIA GPUs).

Which version is defined is decided once, when this module is imported, from ``TRITON_INTERPRET`` (triton
decides the same for its own library when it is imported, and for each function when it is decorated).
The interpreter versions work around interpreter bugs; on the GPU they are plain triton/libdevice ops.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..dispatch import triton_interpret_enabled

#: Whether the kernels of this process were built for the Triton interpreter (checked by `dispatch`).
INTERPRETED: bool = triton_interpret_enabled()

if INTERPRETED:
    # The interpreter's fp32 -> bf16 cast truncates (and its "rtne" mode neither rounds ties to even nor
    # carries into the exponent), unlike the GPU's cvt.rn. Round to nearest even by hand so the
    # interpreter (the CPU tests) sees the bits the GPU produces.
    @triton.jit
    def to_dtype(x, dtype: tl.constexpr):
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(dtype)
        return y

    # The interpreter's dot multiplies the raw uint16 storage of bf16 operands: widen them first (exact),
    # which is what the tensor cores do before accumulating in fp32 anyway.
    @triton.jit
    def dot(a, b, acc, input_precision: tl.constexpr):
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=input_precision)

    @triton.jit
    def exp(x):
        return tl.exp(x)  # numpy's exp

else:
    import triton.language.extra.libdevice  # noqa: F401  (makes tl.extra.libdevice usable in kernels)

    @triton.jit
    def to_dtype(x, dtype: tl.constexpr):
        return x.to(dtype)  # cvt.rn: round to nearest even

    @triton.jit
    def dot(a, b, acc, input_precision: tl.constexpr):
        return tl.dot(a, b, acc, input_precision=input_precision)

    @triton.jit
    def exp(x):
        return tl.extra.libdevice.exp(x)  # __nv_expf, the expf torch's CUDA kernels call
