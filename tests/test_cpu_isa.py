"""The CPU kernels' ISA variants (kernels/cpu/build.py ISA_VARIANTS): each one this CPU has is built under
its own cache name, selected by NEKOMATA_CPU_ISA, and passes the GEMV and native-step tests; a variant
the CPU lacks, or a name that is not a variant, is refused with a reason naming it.

The kernels' numerics are tested in tests/test_cpu_gemv.py (float64 references, 2e-6 relative bound,
thread-count independence), tests/test_steps.py and tests/test_native_batched_step.py (the native
step, batch 1 and batched, against the PyTorch model): the
best variant runs them in the main test process; here every other variant runs them again in a
subprocess with NEKOMATA_CPU_ISA set, so that a machine with AVX-512 tests its AVX2 path too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nekomata_core.kernels.cpu import build, gemv

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = build.supported_isas()
requires_kernels = pytest.mark.skipif(not build.available(), reason=f"CPU kernels unavailable: {build.unavailable_reason()}")


@pytest.fixture
def fresh_state():
    build.reset()
    yield
    build.reset()


def _variants(best_included: bool):
    chosen = SUPPORTED if best_included else SUPPORTED[1:]
    return [
        pytest.param(v, marks=pytest.mark.skipif(v not in chosen, reason=f"this CPU lacks {v}"))
        for v in build.ISA_VARIANTS
        if best_included or v != (SUPPORTED[0] if SUPPORTED else None)
    ]


def test_supported_variants_follow_the_cpu_flags(monkeypatch):
    base = {"avx2", "fma", "f16c"}
    monkeypatch.setattr(build, "_cpu_flags", lambda: base)
    assert build.supported_isas() == ["avx2"]
    monkeypatch.setattr(build, "_cpu_flags", lambda: base | {"avx512f", "avx512bw", "avx512dq", "avx512vl"})
    assert build.supported_isas() == ["avx512", "avx2"]
    monkeypatch.setattr(build, "_cpu_flags", lambda: base | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"})
    assert build.supported_isas() == ["avx512vnni", "avx512", "avx2"]
    avx512_all = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"}
    monkeypatch.setattr(build, "_cpu_flags", lambda: base | avx512_all)
    assert build.supported_isas() == ["avx512bf16", "avx512vnni", "avx512", "avx2"]
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512dq", "avx512vl"})
    assert build.supported_isas() == []  # no AVX2/FMA/F16C: nothing at all


def test_each_variant_has_its_own_cache_name():
    files = build.read_sources()
    names = {build.library_name(files, v) for v in build.ISA_VARIANTS}
    assert len(names) == len(build.ISA_VARIANTS)
    for v in build.ISA_VARIANTS:
        assert build.library_name(files, v).startswith(f"nekomata_cpu-{v}-")


@requires_kernels
@pytest.mark.parametrize("variant", _variants(best_included=True))
def test_forcing_a_variant_builds_and_loads_it(variant, monkeypatch, fresh_state):
    monkeypatch.setenv(build.ISA_ENV, variant)
    build.reset()
    assert build.available(), build.unavailable_reason()
    assert build.isa() == variant
    assert build.library_path().name.startswith(f"nekomata_cpu-{variant}-")


@requires_kernels
def test_the_default_is_the_best_variant_this_cpu_has(monkeypatch, fresh_state):
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    build.reset()
    assert build.isa() == SUPPORTED[0]


def test_an_unknown_or_unsupported_variant_is_refused_with_the_reason(monkeypatch, fresh_state):
    monkeypatch.setenv(build.ISA_ENV, "sse2")
    build.reset()
    assert not build.available()
    reason = build.unavailable_reason()
    assert "NEKOMATA_CPU_ISA='sse2'" in reason and "avx2" in reason and "avx512bf16" in reason
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setenv(build.ISA_ENV, "avx512bf16")
    build.reset()
    assert not build.available()
    reason = build.unavailable_reason()
    assert "avx512_bf16" in reason and "this CPU runs avx2" in reason


@requires_kernels
@pytest.mark.parametrize("variant", _variants(best_included=True))
def test_bf16_weights_with_an_fp32_x_of_bf16_values(variant, monkeypatch, fresh_state):
    """The native step hands the bf16 GEMVs fp32 vectors that hold bf16 values (PyTorch rounds the
    activations of a bf16 model): the vdpbf16ps path of avx512bf16. Checked against float64."""
    monkeypatch.setenv(build.ISA_ENV, variant)
    build.reset()
    g = torch.Generator().manual_seed(5)
    for n, k in ((3, 33), (64, 1024), (1000, 4097), (7, 95)):
        x = torch.randn(k, generator=g).to(torch.bfloat16).float()
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        ref = F.linear(x.double(), w.double())
        bound = F.linear(x.double().abs(), w.double().abs())
        y = gemv.linear_bf16(x, w, None)
        assert torch.all((y.double() - ref).abs() <= 2e-6 * bound), (variant, n, k)
        x[k // 2] = 1.0 + 2.0**-20  # one element that is not a bf16 value: the exact fp32 path instead
        ref = F.linear(x.double(), w.double())
        assert torch.all((gemv.linear_bf16(x, w, None).double() - ref).abs() <= 2e-6 * bound), (variant, n, k)


@requires_kernels
@pytest.mark.parametrize("variant", _variants(best_included=False))
def test_the_gemv_and_native_step_tests_pass_under_every_other_variant(variant):
    env = {**os.environ, build.ISA_ENV: variant, "PYTHONPATH": os.pathsep.join(sys.path)}
    tests = ["tests/test_cpu_gemv.py", "tests/test_steps.py", "tests/test_native_batched_step.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests, "-k", "not build and not compiler"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]


@requires_kernels
def test_int8_and_int4_gemvs_are_bit_identical_in_every_variant(monkeypatch, fresh_state):
    """int8 and int4 weights multiply an int8-quantized x (kernels/cpu/q8.c): exact integer sums, then the
    same fp32 operations lane by lane in every build (VNNI, AVX-512 and AVX2), so each variant this CPU
    has gives the avx2 variant's results bit for bit, for one row and for many (the VNNI builds' register
    tiles); their accuracy is tests/test_cpu_gemv.py's."""
    from nekomata_core.quantize import quantize_int4_weight

    g = torch.Generator().manual_seed(3)
    cases = []
    # one row (the batch-1 kernels: in the AVX-512 builds 16 groups at a time, then 4 (2816: 88 groups), then a
    # short tail (608: 19 groups, 1568: 49)) and 13 rows (the batched ones: the VNNI builds' register tiles)
    for n, k, rows in ((37, 32, 1), (5, 96, 1), (64, 1024, 1), (9, 2816, 1), (3, 160, 1), (7, 608, 1), (3, 1568, 1), (37, 256, 13), (9, 2816, 13)):
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
        cases.append(("int4", x, quantize_int4_weight(torch.randn(n, k, generator=g))))
    for n, k, rows in ((7, 33, 1), (64, 1024, 1), (3, 4097, 1), (1000, 64, 1), (7, 33, 13), (66, 1024, 13)):
        x = torch.randn(rows, k, generator=g)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        cases.append(("int8", x, (q, (torch.rand(n, generator=g) / 127).bfloat16())))
    results = {}
    for variant in SUPPORTED:
        monkeypatch.setenv(build.ISA_ENV, variant)
        build.reset()
        assert build.isa() == variant
        results[variant] = [
            (gemv.linear_int4 if kind == "int4" else gemv.linear_int8)(x, *weight) for kind, x, weight in cases
        ]
    for variant, ys in results.items():
        assert all(torch.equal(y, ref) for y, ref in zip(ys, results["avx2"], strict=True)), variant
