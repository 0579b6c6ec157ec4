#!/usr/bin/env python
"""How far a quantized model's logits are from the fp32 model's: mean |Δlogit| on one input.

    python tools/quant_error.py CHECKPOINT                       # int8 and int4, 48 seeded random tokens
    python tools/quant_error.py CHECKPOINT --tokens 64 --seed 1
    python tools/quant_error.py CHECKPOINT --gguf Q4_K_M.gguf    # ... and a llama.cpp GGUF of it

For each of bf16, int8 and int4 (loaded with `quantize=`, i.e. quantized from the checkpoint's weights)
it prints two numbers against the fp32 model on the same token ids:

- prefill: the logits of one forward over all tokens (32 rows and more: the CPU multiplies unquantized
  activations by the expanded weights);
- decode: the same positions teacher-forced one token at a time through the decode step, as generation
  runs (on a CPU the int8 and int4 GEMVs quantize each activation row to int8 per block of 32,
  kernels/cpu/q8.c).

`--gguf FILE` (repeatable) adds llama.cpp's logits for the same ids, through its Python bindings
(`llama_cpp`, importable, or a source tree named by --llama-cpp-python with LLAMA_CPP_LIB_PATH set to
its built libraries); how to build both on a machine without the Hub is in the README's Performance
section. Random weights have no meaning to preserve; what this compares is how much each format
perturbs the same function.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from nekomata_core import QwenForCausalLM

FORMATS = (("bf16", "bfloat16", None), ("int8", "bfloat16", "int8"), ("int4", "bfloat16", "int4"))


def token_ids(vocab_size: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))


def teacher_forced(model: QwenForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] of every position, each token fed alone through the model's decode path."""
    from nekomata_core.accelerate import make_step

    cache = model.allocate_cache(1, ids.shape[1])
    step = make_step(model, "auto")
    rows = []
    with torch.no_grad():
        rows.append(model(ids[:, :1], cache=cache)[0, -1].float())
        for t in range(1, ids.shape[1]):
            rows.append(step(ids[:, t : t + 1], cache).float().reshape(-1))
    return torch.stack(rows)


def gguf_logits(path: Path, ids: torch.Tensor, source: str | None) -> torch.Tensor:
    if source:
        sys.path.insert(0, source)
    try:
        import llama_cpp
    except ImportError as exc:
        raise SystemExit(f"--gguf needs llama.cpp's Python bindings (llama_cpp): {exc}") from None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ids.shape[1] + 8, logits_all=True, verbose=False,
                          n_threads=torch.get_num_threads())  # fmt: skip
    llm.eval(ids[0].tolist())
    return torch.tensor(llm.scores[: ids.shape[1]]).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a local checkpoint folder")
    parser.add_argument("--tokens", type=int, default=48, help="input length (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    parser.add_argument("--formats", default="bf16,int8,int4", help="comma-separated subset of bf16,int8,int4")
    parser.add_argument("--gguf", action="append", default=[], type=Path, help="a GGUF of the same checkpoint")
    parser.add_argument("--llama-cpp-python", help="a llama-cpp-python source tree to import llama_cpp from")
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error("--tokens must be at least 2")
    wanted = set(args.formats.split(","))
    unknown = wanted - {name for name, _, _ in FORMATS}
    if unknown:
        parser.error(f"--formats: unknown {', '.join(sorted(unknown))}; choose from bf16, int8, int4")

    reference = QwenForCausalLM.from_pretrained(args.checkpoint, dtype="float32", progress=False)
    ids = token_ids(reference.config.vocab_size, args.tokens, args.seed)
    with torch.no_grad():
        ref_prefill = reference(ids)[0].float()
    ref_decode = teacher_forced(reference, ids)
    scale = ref_prefill.abs().max().item()
    del reference
    print(f"{args.tokens} tokens (seed {args.seed}); max |logit| of the fp32 model {scale:.3f}")
    print(f"{'format':<28}{'prefill':>10}{'decode':>10}   (mean |Δlogit| vs fp32)")
    for name, dtype, quantize in FORMATS:
        if name not in wanted:
            continue
        model = QwenForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, progress=False, quantize=quantize)
        with torch.no_grad():
            prefill = (model(ids)[0].float() - ref_prefill).abs().mean().item()
        decode = (teacher_forced(model, ids) - ref_decode).abs().mean().item()
        print(f"{'nekomata_core ' + name:<28}{prefill:>10.4f}{decode:>10.4f}", flush=True)
        del model
    for path in args.gguf:
        error = (gguf_logits(path, ids, args.llama_cpp_python) - ref_prefill).abs().mean().item()
        print(f"{'llama.cpp ' + path.stem:<28}{error:>10.4f}{'':>10}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
