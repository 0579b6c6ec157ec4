"""Every ```python block of the README runs as written, with a local checkpoint in place of the repo id."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_as_written(index, checkpoint_factory, tmp_path):
    # The Hub is unreachable here: the only change to the block is the repo id → a local tiny checkpoint
    # (random weights, the real qwen.tiktoken), exactly what the README tells offline users to do.
    folder = checkpoint_factory("tiny", with_tokenizer=True)
    code = PYTHON_BLOCKS[index].replace('"rinna/nekomata-7b"', repr(str(folder)))
    assert str(folder) in code, "the block loads no model: the test would prove nothing"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
