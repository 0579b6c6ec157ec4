"""The whole tiny model with the Triton backends (attention, RMSNorm, RoPE, SwiGLU) equals the eager
model, prefill and decode, in fp32 (max abs error ≤ 1e-5 × max |logit|).

On CPU the kernels run in the Triton interpreter, which triton only enables when TRITON_INTERPRET=1 is
set before its first import in a process, so the comparison runs in a fresh interpreter process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys, torch
from nekomata_core import QwenForCausalLM, generate
from nekomata_core.decode import make_decoder

folder = sys.argv[1]
eager = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False,
                                        attention_backend="eager", ops_backend="eager")
fused = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False,
                                        attention_backend="triton", ops_backend="triton")
from nekomata_core.accelerate import describe
assert describe(fused)["attention"] == "triton" and describe(fused)["ops"] == "triton"
ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[1, :6] = 0  # left padding
errors = {}

def rel(a, b, valid=None):
    if valid is not None:
        a, b = a[valid], b[valid]
    return ((a - b).abs().max() / b.abs().max()).item()

with torch.no_grad():
    errors["prefill_padded"] = rel(fused(ids, mask), eager(ids, mask), mask.bool())
    caches = [m.allocate_cache(2, 26) for m in (eager, fused)]
    outs = [m(ids, mask, cache=c) for m, c in zip((eager, fused), caches)]  # 19 > S=16: NTK + logn
    token = outs[0][:, -1:].argmax(-1)
    worst = 0.0
    for _ in range(5):
        a, b = eager(token, cache=caches[0]), fused(token, cache=caches[1])
        worst = max(worst, rel(b, a))
        token = a[:, -1:].argmax(-1)
    errors["decode"] = worst
plain = generate(eager, ids, mask, max_new_tokens=6, eos_token_id=())
static = generate(fused, ids, mask, max_new_tokens=6, eos_token_id=(), step_fn=make_decoder(fused, "static"))
errors["static_tokens_equal"] = bool(torch.equal(plain.sequences, static.sequences))
print(json.dumps(errors))
"""


def test_triton_backends_match_eager_prefill_and_decode(checkpoint_factory):
    folder = checkpoint_factory("tiny", seed=13, init_std=0.15, vocab_size=300, seq_length=16)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors["prefill_padded"] <= 1e-5, errors
    assert errors["decode"] <= 1e-5, errors
    assert errors["static_tokens_equal"], errors
