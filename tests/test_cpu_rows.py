"""kernels/cpu/rows (RMSNorm, rotary, SwiGLU in C for half-precision prefills) against the model's own
PyTorch modules and float64.

What is asserted:
- rotary: identical to nekomata_core.model.apply_rotary in every dtype (the same fp32 operations in the
  same order), for strided views of a fused qkv, shared and per-row tables, and R < D (passthrough).
- rms_norm: every row is exactly round(round(x * r) * w) for an fp32 r within 2 ulp of the float64
  rsqrt(mean(x^2) + eps) (the sum of squares is added in another order than PyTorch's).
- swiglu, bf16/fp16: equal to the PyTorch module's result except for at most 0.1% of values, each of
  those 1 ulp away (exp is a polynomial); fp32: within 1e-6 relative of it.
- exp (through swiglu in fp32): within 1e-6 relative of float64 silu over [-87, 88], with inf, -inf,
  NaN and overflowing inputs handled as PyTorch does.
- results do not depend on the thread count; bad arguments raise ValueError naming the problem.
- `accelerate` puts them into half-precision CPU models (and not fp32 ones), logits stay within bf16
  noise of the eager ops, and the native step still accepts the model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nekomata_core.kernels.cpu import gemv, rows

from nekomata_core.model import apply_rotary

pytestmark = pytest.mark.skipif(not gemv.available(), reason=f"CPU kernels unavailable: {gemv.unavailable_reason()}")

HALF = (torch.bfloat16, torch.float16)
MAX_FLIP_FRACTION = 1e-3


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of a.dtype lie between a and b (same sign assumed where they differ)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return (a.view(bits).int() - b.view(bits).int()).abs()


def _assert_half_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    differ = out != ref
    assert differ.float().mean().item() <= MAX_FLIP_FRACTION, differ.float().mean().item()
    if differ.any():
        assert int(_ulps_apart(out[differ], ref[differ]).max()) <= 1


def _rms_norm_with(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Qwen's RMSNorm with the row factors r [rows, 1] (fp32) given: round(round(x * r) * w)."""
    return (x.float() * r).to(x.dtype) * w


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("hidden", [1, 7, 64, 1000, 4096])
def test_rms_norm_is_the_formula_with_a_factor_within_2_ulp(dtype, hidden):
    """Every row equals round(round(x * r) * w) exactly, for an fp32 r within 2 ulp of the float64
    rsqrt(mean(x^2) + eps): what may differ from PyTorch is only the sum of squares' order."""
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(123, hidden, generator=g) * 3).to(dtype)
    w = torch.randn(hidden, generator=g).to(dtype)
    out = rows.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    r = (1 / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)).float()
    candidates = [r]
    for direction in (torch.inf, -torch.inf):
        c = r
        for _ in range(2):
            c = torch.nextafter(c, torch.tensor(direction))
            candidates.append(c)
    matched = torch.stack([(_rms_norm_with(x, w, c) == out).all(-1) for c in candidates]).any(0)
    assert matched.all(), f"{int((~matched).sum())} rows match no factor within 2 ulp"
    model_norm = F.rms_norm(x.float(), (hidden,), eps=1e-6).to(dtype) * w  # model.RMSNorm, for scale
    assert (out.float() - model_norm.float()).abs().max() <= 1e-2 * model_norm.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("rotary_dim", [64, 32, 6])
@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_is_identical_to_apply_rotary(dtype, rotary_dim, per_row):
    g = torch.Generator().manual_seed(rotary_dim)
    qkv = (torch.randn(2, 17, 3, 5, 64, generator=g) * 2).to(dtype)  # [B, T, 3, N, D] as Attention views it
    q, k, _ = qkv.unbind(dim=2)
    tables = torch.randn(2 if per_row else 1, 17, rotary_dim, generator=g), torch.randn(2 if per_row else 1, 17, rotary_dim, generator=g)
    for x in (q, k):
        out = rows.rotary(x, *tables)
        assert out.is_contiguous() and torch.equal(out, apply_rotary(x, *tables))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_swiglu_matches_the_model(dtype):
    g = torch.Generator().manual_seed(1)
    h1 = (torch.randn(7, 3001, generator=g) * 4).to(dtype)
    h2 = (torch.randn(7, 3001, generator=g) * 6).to(dtype)
    specials = [100.0, -100.0, 89.0, -89.0, 60000.0, -60000.0, float("nan"), float("inf"), float("-inf"), 0.0]
    h2.view(-1)[: len(specials)] = torch.tensor(specials).to(dtype)
    out, ref = rows.swiglu(h1, h2), h1 * F.silu(h2)
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ~ref.isnan()
    if dtype == torch.float32:
        assert torch.allclose(out[finite], ref[finite], rtol=1e-6, atol=1e-30)
    else:
        _assert_half_close(out[finite], ref[finite])


def test_exp_polynomial_is_accurate_over_the_float_range():
    g = torch.linspace(-87.0, 88.0, 200_001)
    ones = torch.ones_like(g)
    out = rows.swiglu(ones, g).double()
    ref = g.double() / (1 + torch.exp(-g.double()))
    assert ((out - ref).abs() <= 1e-6 * ref.abs() + 1e-37).all()


def test_results_do_not_depend_on_the_thread_count():
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 4, 128, generator=g).bfloat16()
    w = torch.randn(128, generator=g).bfloat16()
    cos, sin = torch.randn(1, 33, 128, generator=g), torch.randn(1, 33, 128, generator=g)
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((rows.rms_norm(x, w, 1e-6), rows.rotary(x, cos, sin), rows.swiglu(x, x)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_bad_arguments_are_named():
    x = torch.randn(4, 8).bfloat16()
    with pytest.raises(ValueError, match="rms_norm: weight must be"):
        rows.rms_norm(x, torch.ones(9).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="rms_norm: x must be a contiguous"):
        rows.rms_norm(x.t(), torch.ones(4).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="rms_norm: x must be"):
        rows.rms_norm(x.to(torch.int32), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="rotary: x must be"):
        rows.rotary(x, torch.ones(1, 4, 8), torch.ones(1, 4, 8))
    q = torch.randn(1, 4, 2, 8).bfloat16()
    with pytest.raises(ValueError, match="rotary: cos must be"):
        rows.rotary(q, torch.ones(1, 5, 8), torch.ones(1, 5, 8))
    with pytest.raises(ValueError, match="rotary: sin must be"):
        rows.rotary(q, torch.ones(1, 4, 8), torch.ones(1, 4, 8).double())
    with pytest.raises(ValueError, match="rotary: cos must be"):
        rows.rotary(q, torch.ones(1, 4, 10), torch.ones(1, 4, 10))
    with pytest.raises(ValueError, match="swiglu: h1 and h2 must have one shape"):
        rows.swiglu(x, x[:2].contiguous())
    with pytest.raises(ValueError, match="inference-only"):
        rows.swiglu(x.float().requires_grad_(), x.float())


def test_accelerate_uses_them_for_half_precision_models(checkpoint_factory):
    from nekomata_core import QwenForCausalLM
    from nekomata_core.accelerate import native_step_problem
    from nekomata_core.accelerate.modules import CpuMLP, CpuRMSNorm, CpuRotary
    from nekomata_core.model import MLP, RMSNorm, Rotary

    folder = checkpoint_factory("tiny", seed=4, init_std=0.1, vocab_size=512, dtype=torch.bfloat16)
    fast = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False)
    plain = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, ops_backend="eager")
    full = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    block = fast.transformer.h[0]
    assert type(block.ln_1) is CpuRMSNorm and type(block.mlp) is CpuMLP and type(block.attn.rotary) is CpuRotary
    for model in (plain, full):
        block = model.transformer.h[0]
        assert type(block.ln_1) is RMSNorm and type(block.mlp) is MLP and type(block.attn.rotary) is Rotary
    assert native_step_problem(fast) is None
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = fast(ids).float(), plain(ids).float()
    # bf16 noise: the C GEMVs and norms round in other places' orders (as tests/test_steps.py's bound).
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
