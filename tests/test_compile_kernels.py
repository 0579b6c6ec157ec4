"""Every Triton kernel compiles for sm_80 and sm_90 at the launch configs the dispatcher picks, within the
shared-memory and register limits and without register spills (tools/compile_kernels.py --reduced; no GPU
needed, only triton's bundled ptxas)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ptxas_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton (with its NVIDIA backend) is not importable: {exc}"
    for arch in (80, 90):
        try:
            path = get_ptxas(arch).path
        except Exception as exc:  # triton raises RuntimeError when it finds no ptxas
            return f"no ptxas for sm_{arch}: {exc}"
        if not os.access(path, os.X_OK):
            return f"ptxas for sm_{arch} is not executable: {path}"
    return None


def test_reduced_compile_set_has_no_failures_and_no_spills():
    pytest.importorskip("triton")
    missing = _ptxas_missing()
    if missing:
        pytest.skip(missing)
    # A fresh process without TRITON_INTERPRET: the kernels must be built for the compiler.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compile_kernels.py"), "--reduced", "--arch", "80,90", "--json", "-"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    rows = json.loads(proc.stdout) if proc.stdout.strip() else []
    report = proc.stderr[-4000:]
    assert rows, report
    assert {row["arch"] for row in rows} == {80, 90}
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"rms_norm_kernel", "swiglu_kernel", "rope_kernel", "flash_attention_kernel",
                       "step_split_kernel", "step_merge_kernel", "int4_gemv_kernel"}, kernels
    failed = [row for row in rows if row["error"]]
    assert not failed, failed
    spilled = [(row["arch"], row["kernel"], row["dtype"], row["config"], row["spill_stores"])
               for row in rows if row["spill_stores"] or row["spill_loads"]]
    assert not spilled, spilled
    over = [row for row in rows if row["problems"]]
    assert not over, over
    assert proc.returncode == 0, report
