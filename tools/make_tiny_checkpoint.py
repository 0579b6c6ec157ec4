"""Write a random-weight Qwen (v1) checkpoint in the exact Hugging Face layout of the real repos.

    python tools/make_tiny_checkpoint.py OUT [--preset tiny] [--dtype float32|bfloat16|float16]
        [--shards N] [--seed S] [--tokenizer FILE] [--set key=value ...] [--overwrite]

The builder lives in the package (`nekomata_core.apps.checkpoint_builder`) so that `nekomata bench PRESET`
can use it from an installed wheel; this script and `make_checkpoint` are its entry points for tests
and demos.
"""

from nekomata_core.apps.checkpoint_builder import main, make_checkpoint, random_tensor

__all__ = ["main", "make_checkpoint", "random_tensor"]

if __name__ == "__main__":
    raise SystemExit(main())
