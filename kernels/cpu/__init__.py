"""The CPU half of the kernels: C sources sharing one header, built into one library on first use.

- `common.h`: what the C files share (the ABI: dtype codes, weight kinds, flag layout, version; the
  bf16/fp16 conversions; the GEMV row entry points the step builds on);
- `gemv.c` / `gemv.py`: bandwidth-bound bf16 and int8 GEMVs for one row (`linear_bf16`, `linear_int8`,
  and torch custom ops of both);
- `q8.c`: the int8 and int4 dot products over activations quantized to int8 per block of 32 (VNNI or
  AVX2 byte multiplies), called by the GEMVs and the step;
- `step.c` / `step.py`: a whole step of a Qwen v1 model for B rows in one call (`FusedStep`), each weight
  read once per step whatever B;
- `abi.py`: the Python side of common.h's contract (one definition of each value);
- `build.py`: the one build/cache module: compiles the C files into one library in a per-user cache
  that only the user can write, and loads it (`library()`, `available()`, `unavailable_reason()`).

Importing these modules compiles nothing; the first call does (x86-64 Linux, AVX2/FMA/F16C, a C compiler).
"""
