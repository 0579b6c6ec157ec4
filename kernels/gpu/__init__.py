"""The Triton half of `kernels/`: one module per fused op, each a module-level `@triton.jit` kernel and
its launcher. Every module here imports triton at its top, so import them only once the Triton backend
was chosen (`nekomata_core.kernels.dispatch.resolve_backend`); this package itself imports nothing.

- `rmsnorm.rms_norm(x, weight, eps)`: Qwen RMSNorm (cast to the dtype before the weight)
- `swiglu.swiglu(a, b)`: a * silu(b), b being the gate (Qwen's w2 branch)
- `rope.apply_rope(q, k, cos, sin, ...)`: rotate-half RoPE of q and k in one launch, optionally into the cache
- `attention.flash_attention(q, k, v, ...)`: causal prefill attention with left padding and logn scaling
- `step_attention.step_attention(q, k_cache, v_cache, ...)`: split-K flash-decoding, one token per row
- `int4_gemv.int4_gemv(x, qweight, scales, mins, scale_units, min_units, bias)`: one-row int4 weight-only linear
- `helpers`: small @triton.jit helpers shared by the kernels (rounding, dot, exp)

triton picks interpreter or compiler when a function is decorated, i.e. when these modules are imported:
set ``TRITON_INTERPRET=1`` before the first import (of triton and of these modules) to run them on CPU.
"""
