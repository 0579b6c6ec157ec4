"""Shared fixtures: tiny random checkpoints in the exact Hugging Face layout, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tools.make_tiny_checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(name, **kwargs) → a checkpoint folder; the same arguments reuse the same folder."""
    made: dict[tuple, Path] = {}

    def make(
        preset: str = "tiny",
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        shards: int = 1,
        init_std: float = 0.1,
        with_tokenizer: bool = False,
        **overrides,
    ) -> Path:
        key = (preset, dtype, seed, shards, init_std, with_tokenizer, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"ckpt-{preset}")
            tokenizer_file = qwen_tiktoken_path() if with_tokenizer else False
            make_checkpoint(
                folder,
                preset,
                dtype=dtype,
                seed=seed,
                shards=shards,
                init_std=init_std,
                overrides=overrides,
                tokenizer_file=tokenizer_file,
            )
            made[key] = folder
        return made[key]

    return make


def qwen_tiktoken_path() -> Path:
    """The real qwen.tiktoken, shipped inside the dashscope wheel (test extra)."""
    dashscope = pytest.importorskip("dashscope")
    path = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        pytest.skip("dashscope is installed but carries no resources/qwen.tiktoken")
    return path


@pytest.fixture(scope="session")
def qwen_tiktoken() -> Path:
    return qwen_tiktoken_path()
