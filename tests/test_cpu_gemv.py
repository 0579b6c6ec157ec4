"""The GEMV kernels of `kernels/cpu/gemv` agree with float64 PyTorch, and their build is sane.

Accuracy contract (what is asserted, exactly): let ref be the float64 result and
e = 2e-6 * (sum_k |w_k x_k| * |scale| + |bias|) the fp32 accumulation bound (see REL_TOL). For int8 and
int4 weights, x is first quantized to int8 per block of 32 as kernels/cpu/q8.c documents (the plain
PyTorch reference of tests/q8_reference.py) and ref, e use that x; the kernels' integer sums are exact,
so the same fp32 bound applies to what remains.

- fp32 outputs: |y - ref| <= e.
- bf16 / fp16 outputs: the kernel rounds an fp32 value v with |v - ref| <= e, and rounding is monotonic,
  so y must lie between round(ref - e) and round(ref + e), and equal round(ref) wherever those two are
  equal (ref is not within e of a rounding boundary). Where they are adjacent, y is within 1 ulp of
  round(ref); they are farther apart only under cancellation (|ref| << sum |w x|, where fp32
  accumulation itself can be off by more than a bf16/fp16 ulp of the small result). y differs from
  round(ref) on at most 2% of the outputs.

Results are also bit-identical with 1 and 2 threads (every row is summed the same way whatever the
split). The build tests (of `kernels/cpu/build`, which builds the GEMVs and the fused step as one
library) use fresh cache directories (XDG_CACHE_HOME) and a fake or missing compiler (NEKOMATA_CC); the
ABI values of `kernels/cpu/abi` are checked against those common.h declares. The whole module skips, with the reason, where the kernels cannot run (not x86-64 Linux,
no AVX2/FMA/F16C, no compiler), except the tests of that very reporting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nekomata_core.kernels.cpu import abi, build, gemv

from tests.q8_reference import dequantized_activation

ROOT = Path(__file__).resolve().parents[1]

requires_kernels = pytest.mark.skipif(
    not gemv.available(), reason=f"CPU GEMV kernels unavailable: {gemv.unavailable_reason()}"
)

KS = (1, 7, 31, 32, 33, 1024, 2816, 4097)
NS = (1, 3, 64, 1000)
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32 accumulation error bound, relative to sum |w x|: 1e-5 was asked for; the kernels' blocked sums stay
# below 2e-7 on these shapes (and are deterministic), so the tighter 2e-6 is asserted, which also keeps the
# rounding checks of bf16/fp16 outputs meaningful (a bound wider than their ulp would assert little).
REL_TOL = 2e-6
MAX_TIE_FRACTION = 0.02


@pytest.fixture
def threads():
    """Run the body with a given torch thread count, restoring the previous one afterwards."""
    before = torch.get_num_threads()

    def set_threads(n: int) -> None:
        torch.set_num_threads(n)

    yield set_threads
    torch.set_num_threads(before)


@pytest.fixture
def fresh_state():
    """Make the module build/load again inside the test, and again (from the normal cache) after it."""
    build.reset()
    yield
    build.reset()


def _ordinal(t: torch.Tensor) -> torch.Tensor:
    """Map bf16/fp16 values to integers that step by 1 between adjacent representable values."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _check(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """Assert the accuracy contract of the module docstring for output y (any dtype) against float64."""
    assert y.dtype in X_DTYPES
    tol = REL_TOL * bound
    if y.dtype == torch.float32:
        err = (y.double() - ref).abs()
        assert torch.all(err <= tol), f"max error {(err - tol).max().item():.3g} above the fp32 bound"
        return
    lo, hi, nearest = (ref - tol).to(y.dtype), (ref + tol).to(y.dtype), ref.to(y.dtype)
    assert torch.all((y >= lo) & (y <= hi)), "output outside the rounded tolerance interval"
    narrow = (_ordinal(hi) - _ordinal(lo)) <= 1  # all but cancellations, where e exceeds an ulp of ref
    assert torch.all((_ordinal(y) - _ordinal(nearest)).abs()[narrow] <= 1), "more than 1 ulp from round(ref)"
    assert torch.equal(y[lo == hi], nearest[lo == hi]), "not correctly rounded away from a rounding tie"
    assert (y != nearest).double().mean().item() <= MAX_TIE_FRACTION


def _inputs(n: int, k: int, x_dtype: torch.dtype, with_bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, generator=g).to(x_dtype)
    bias = torch.randn(n, generator=g).to(x_dtype) if with_bias else None
    return g, x, bias


@requires_kernels
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_matches_float64(k, n, with_bias, threads):
    for i, x_dtype in enumerate(X_DTYPES):
        g, x, bias = _inputs(n, k, x_dtype, with_bias, seed=1000 * k + n + i)
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        b64 = None if bias is None else bias.double()
        ref = F.linear(x.double(), w.double(), b64)
        bound = F.linear(x.double().abs(), w.double().abs(), None if b64 is None else b64.abs())
        results = []
        for nt in (1, 2):
            threads(nt)
            y = gemv.linear_bf16(x, w, bias)
            assert y.dtype == x_dtype and y.shape == (n,)
            _check(y, ref, bound)
            results.append(y)
        assert torch.equal(results[0], results[1]), "1 and 2 threads disagree"


@requires_kernels
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_matches_float64(k, n, with_bias, threads):
    for i, x_dtype in enumerate(X_DTYPES):
        g, x, bias = _inputs(n, k, x_dtype, with_bias, seed=1000 * k + n + i + 7)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale_dtype = (torch.float32, torch.bfloat16)[i % 2]
        scales = (torch.rand(n, generator=g) / 127).to(scale_dtype)
        s64, xq = scales.double(), dequantized_activation(x)
        ref = (xq @ q.double().T) * s64
        bound = (xq.abs() @ q.double().abs().T) * s64
        if bias is not None:
            ref, bound = ref + bias.double(), bound + bias.double().abs()
        results = []
        for nt in (1, 2):
            threads(nt)
            y = gemv.linear_int8(x, q, scales, bias)
            assert y.dtype == x_dtype and y.shape == (n,)
            _check(y, ref, bound)
            results.append(y)
        assert torch.equal(results[0], results[1]), "1 and 2 threads disagree"


@requires_kernels
def test_leading_dims_and_strided_x():
    w = torch.randn(5, 40).to(torch.bfloat16)
    x = torch.randn(40, 3)[:, 1]  # a non-contiguous single row is copied, not refused
    assert not x.is_contiguous()
    y = gemv.linear_bf16(x.reshape(1, 1, 40), w)
    assert y.shape == (1, 1, 5)
    assert torch.equal(y.flatten(), gemv.linear_bf16(x.contiguous(), w))
    q = torch.randint(-127, 128, (5, 40), dtype=torch.int8)
    y8 = gemv.linear_int8(x.reshape(1, 40), q, torch.ones(5))
    assert y8.shape == (1, 5)


@requires_kernels
@pytest.mark.parametrize("k", [33, 1024])
def test_nan_and_inf_propagate(k):
    n = 9
    x = torch.randn(k)
    w = torch.randn(n, k).to(torch.bfloat16)
    signs = torch.where(torch.rand(n, 1) < 0.5, -1, 1).to(torch.int8)
    q = torch.randint(1, 128, (n, k), dtype=torch.int8) * signs  # no zero weights: inf * 0 would be NaN
    scales = torch.ones(n)
    cases = []
    for pos in (0, k - 1, k // 2):
        for special in (float("nan"), float("inf"), float("-inf")):
            xs = x.clone()
            xs[pos] = special
            cases.append((xs, w))
    wi = w.clone()
    wi[2, k - 1] = float("inf")
    wi[4, 0] = float("nan")
    cases.append((x, wi))
    for xs, ws in cases:
        ref = F.linear(xs.double(), ws.double()).float()
        y = gemv.linear_bf16(xs, ws)
        assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isposinf(), ref.isposinf())
        assert torch.equal(y.isneginf(), ref.isneginf())
        # int8 quantizes x per block of 32: a non-finite element makes its block's scale non-finite, and
        # every output with it (NaN or inf: the kernel's 0 * inf is NaN where a float GEMV gives inf).
        y8 = gemv.linear_int8(xs, q, scales)
        assert not y8.isfinite().any() if not xs.isfinite().all() else y8.isfinite().all()


@requires_kernels
def test_empty_shapes():
    assert gemv.linear_bf16(torch.randn(8), torch.zeros(0, 8, dtype=torch.bfloat16)).shape == (0,)
    bias = torch.randn(3)
    y = gemv.linear_bf16(torch.randn(0), torch.zeros(3, 0, dtype=torch.bfloat16), bias)
    assert torch.equal(y, bias)
    y8 = gemv.linear_int8(torch.randn(0), torch.zeros(3, 0, dtype=torch.int8), torch.ones(3), bias)
    assert torch.equal(y8, bias)


@requires_kernels
@pytest.mark.parametrize("rows", [2, 3, 5, 31, 130])  # 130: a prefill, many tiles of vectors
@pytest.mark.parametrize("k", [2816, 1000])  # 1000: 15 chunks of 64, one of 32 and 8 single elements
def test_several_rows_equal_each_row_alone(rows, k, threads):
    """M rows go through the batched kernels (each weight row read once for all of them): every output row
    is bit-identical to the one-row GEMV of that row, for any thread count. bf16 outside the avx512bf16
    build: the batched and batch-1 kernels share their order only in the avx2 build (see
    kernels/cpu/gemv.c), so there the check is the fp32 accuracy contract instead."""
    from nekomata_core.quantize import quantize_int4_weight

    g = torch.Generator().manual_seed(rows)
    n = 171  # odd: rows left over after the tiles; several of gemv.c's 128 KB blocks of rows per thread
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) / 127).to(torch.bfloat16)
    calls = {
        "int8": lambda v: gemv.linear_int8(v, q, s),
        "bf16": lambda v: gemv.linear_bf16(v, w),
    }
    if k % 32 == 0:  # int4 groups
        int4 = quantize_int4_weight(torch.randn(n, k, generator=g))
        calls["int4"] = lambda v: gemv.linear_int4(v, *int4)
    for name, call in calls.items():
        for nt in (1, 2):
            threads(nt)
            together = call(x)
            assert together.shape == (rows, n)
            alone = torch.stack([call(x[i]) for i in range(rows)])
            if name != "bf16" or build.isa() in ("avx2", "avx512bf16"):
                assert torch.equal(together, alone), (name, nt)
            else:
                ref = F.linear(x.double(), w.double())
                _check(together, ref, F.linear(x.double().abs(), w.double().abs()))


@requires_kernels
def test_bad_inputs_raise_value_error():
    k, n = 16, 4
    w = torch.randn(n, k).to(torch.bfloat16)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.ones(n)
    x = torch.randn(k)
    bad_bf16 = [
        dict(x=torch.randn(gemv.MAX_ROWS + 1, k), weight=w),  # too many rows
        dict(x=torch.randn(k + 1), weight=w),  # wrong K
        dict(x=torch.randn(k).double(), weight=w),  # unsupported activation dtype
        dict(x=torch.randint(0, 3, (k,)), weight=w),
        dict(x=x, weight=w.float()),  # weight not bf16
        dict(x=x, weight=q),
        dict(x=x, weight=torch.randn(k, n).to(torch.bfloat16).t()),  # non-contiguous weight
        dict(x=x, weight=w[0]),  # 1-D weight
        dict(x=x, weight=w, bias=torch.randn(n + 1)),
        dict(x=x, weight=w, bias=torch.randn(n, 2)[:, 0]),  # non-contiguous bias
        dict(x=x, weight=w, bias=torch.arange(n)),  # integer bias
    ]
    for kwargs in bad_bf16:
        with pytest.raises(ValueError):
            gemv.linear_bf16(**kwargs)
    bad_int8 = [
        dict(x=torch.randn(1, gemv.MAX_ROWS + 1, k), qweight=q, scales=s),
        dict(x=x, qweight=w, scales=s),  # bf16 weight given as int8
        dict(x=x, qweight=q.to(torch.uint8), scales=s),
        dict(x=x, qweight=torch.randint(-3, 3, (k, n), dtype=torch.int8).t(), scales=s),
        dict(x=x, qweight=q, scales=torch.ones(n + 1)),
        dict(x=x, qweight=q, scales=None),
        dict(x=x, qweight=q, scales=torch.ones(n, dtype=torch.float64)),
    ]
    for kwargs in bad_int8:
        with pytest.raises(ValueError):
            gemv.linear_int8(**kwargs)
    with pytest.raises(ValueError, match=f"1 to {gemv.MAX_ROWS} rows"):
        gemv.linear_bf16(torch.randn(gemv.MAX_ROWS + 1, k), w)
    with pytest.raises(ValueError, match="inference-only"):
        gemv.linear_bf16(x.requires_grad_(), w)
    with torch.no_grad():
        gemv.linear_bf16(x, w)


@requires_kernels
def test_build_is_cached_and_keyed_by_every_source_and_the_header(tmp_path, monkeypatch, fresh_state):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = build._build_count
    assert gemv.available(), gemv.unavailable_reason()
    path = gemv.library_path()
    assert path is not None and path.parent == tmp_path / "cache" / "nekomata_core"
    assert build._build_count == built + 1
    mtime = path.stat().st_mtime_ns
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    build.reset()  # as a new process would: the cached library is reused, not rebuilt
    assert gemv.available()
    assert gemv.library_path() == path and path.stat().st_mtime_ns == mtime
    assert build._build_count == built + 1

    # An edited file gets a library of its own, whichever it is: each source, and the header.
    seen = {path}
    for which, original in (("SOURCES", 0), ("SOURCES", 1), ("HEADERS", 0)):
        files = list(getattr(build, which))
        edited = tmp_path / which / files[original].name
        edited.parent.mkdir(exist_ok=True)
        edited.write_bytes(files[original].read_bytes() + b"\n/* edited */\n")
        files[original] = edited
        with monkeypatch.context() as patch:
            patch.setattr(build, which, tuple(files))
            build.reset()
            assert gemv.available(), gemv.unavailable_reason()
            assert gemv.library_path() not in seen
            seen.add(gemv.library_path())
    assert build._build_count == built + 4


def test_the_cache_key_covers_the_flags(monkeypatch):
    files = build.read_sources()
    assert set(files) == {"gemv.c", "q8.c", "step.c", "rows.c", "common.h"}
    name = build.library_name(files)
    monkeypatch.setattr(build, "CFLAGS", (*build.CFLAGS, "-DPF=512"))
    assert build.library_name(files) != name


def _header_values() -> dict[str, int]:
    """The enum constants and integer #defines of common.h, by name."""
    text = re.sub(r"/\*.*?\*/", "", (ROOT / "kernels" / "cpu" / "common.h").read_text(), flags=re.S)
    values = {name: int(v) for name, v in re.findall(r"^#define\s+(\w+)\s+(\d+)\s*$", text, flags=re.M)}
    for body in re.findall(r"enum\s*\{([^}]*)\}", text):
        for name, v in re.findall(r"(\w+)\s*=\s*(\d+)", body):
            values[name] = int(v)
    return values


def test_the_python_abi_is_the_one_common_h_declares():
    header = _header_values()
    assert header["NK_ABI_VERSION"] == abi.ABI_VERSION
    assert header["NK_MAX_HEAD_DIM"] == abi.MAX_HEAD_DIM
    dtype_names = {torch.float32: "DT_F32", torch.bfloat16: "DT_BF16", torch.float16: "DT_F16"}
    assert {header[dtype_names[d]]: d for d in dtype_names} == {c: d for d, c in abi.DTYPE_CODES.items()}
    assert sorted(n for n in header if n.startswith("DT_")) == sorted(dtype_names.values())
    kind_names = {torch.bfloat16: "KIND_BF16", torch.int8: "KIND_INT8", torch.float32: "KIND_F32",
                  torch.uint8: "KIND_INT4"}
    assert {header[kind_names[d]]: d for d in kind_names} == {c: d for d, c in abi.WEIGHT_KINDS.items()}
    assert sorted(n for n in header if n.startswith("KIND_")) == sorted(kind_names.values())
    from nekomata_core.quantize import INT4_GROUP_SIZE, INT4_TILE_ROWS

    assert header["NK_INT4_GROUP"] == abi.INT4_GROUP_SIZE == INT4_GROUP_SIZE
    assert header["NK_INT4_TILE"] == abi.INT4_TILE_ROWS == INT4_TILE_ROWS


# --- int4 ----------------------------------------------------------------------------------------------


def _int4_weight(n: int, k: int, seed: int):
    """(packed, scales, mins, scale_units, min_units) of a random [n, k] weight (quantize_int4_weight)."""
    from nekomata_core.quantize import quantize_int4_weight

    return quantize_int4_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))


def _group_values(scales, mins, scale_units, min_units):
    """The float64 scale and min [N, G] of every group as common.h defines them: code times the unit of
    the row's tile of 8 (row // 8); the products are exact."""
    tile = torch.arange(scales.shape[0]) // 8
    return scales.double() * scale_units.double()[tile], mins.double() * min_units.double()[tile]


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """[N, groups, 32] codes by the layout common.h documents (byte j of a group of 32: code j in the low
    nibble, code j + 16 in the high one)."""
    n, half = packed.shape
    b = packed.reshape(n, half // 16, 16).long()
    return torch.cat((b & 15, b >> 4), dim=2).double()


def _int4_reference(x, packed, scales, mins, scale_units, min_units, bias):
    """W x + bias in float64 as the int4 kernels define it, W unpacked here by the documented layout:
    sum_g scale_g * (codes_g . xq_g) + min_g * sum(x_g), xq the int8-quantized x (tests/q8_reference.py),
    sum(x_g) the group sums of x itself."""
    n = packed.shape[0]
    s, m = _group_values(scales, mins, scale_units, min_units)
    xq = dequantized_activation(x)
    y = (_codes(packed) * s[:, :, None]).reshape(n, -1) @ xq
    y = y + m @ x.double().reshape(-1, 32).sum(dim=1)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("n, k", [(1, 32), (5, 96), (13, 224), (7, 608), (67, 1024), (9, 2816)])  # whole and short tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4_matches_the_dequantized_weight(n, k, dtype, with_bias):
    int4 = _int4_weight(n, k, seed=n * k)
    g = torch.Generator().manual_seed(n * k + 1)  # the test's inputs do not depend on the tests run before it
    x = torch.randn(k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    expected = _int4_reference(x, *int4, bias)
    results = []
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(gemv.linear_int4(x, *int4, bias))
    finally:
        torch.set_num_threads(saved)
    y = results[0]
    assert y.dtype == dtype and y.shape == (n,)
    assert all(torch.equal(y, other) for other in results[1:])  # the row order of sums is fixed
    # fp32 sums in another order: a few ulps of fp32 relative to the sum of |terms| of what the kernels add,
    # scale * (codes . x) and min * sum(x) per group (the two can cancel, so |expected| alone is no bound);
    # half precision: one rounding of the output on top.
    s, m = _group_values(*int4[1:])
    xq = dequantized_activation(x).abs()
    bound = (_codes(int4[0]) * s[:, :, None]).abs().reshape(n, k) @ xq
    bound = bound + m.abs() @ x.double().abs().reshape(-1, 32).sum(dim=1)
    rounding = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    assert torch.all((y.double() - expected).abs() <= 2e-6 * bound + rounding * expected.abs().max())


def test_int4_refuses_k_outside_the_group_size_and_bad_groups():
    packed, scales, mins, scale_units, min_units = _int4_weight(12, 64, seed=1)
    x = torch.randn(64)
    with pytest.raises(ValueError, match="multiple of the int4 group size"):
        gemv.linear_int4(torch.randn(48), packed[:, :24].contiguous(), scales, mins, scale_units, min_units)
    with pytest.raises(ValueError, match=r"scales must be a contiguous CPU torch.uint8 tensor of shape \(12, 2\)"):
        gemv.linear_int4(x, packed, scales[:, :1].contiguous(), mins, scale_units, min_units)
    with pytest.raises(ValueError, match="mins must be a contiguous CPU torch.int8"):
        gemv.linear_int4(x, packed, scales, mins.bfloat16(), scale_units, min_units)
    with pytest.raises(ValueError, match=r"scale_units must be .* shape \(2, 2\)"):  # ceil(12 / 8) tiles
        gemv.linear_int4(x, packed, scales, mins, scale_units[:1].contiguous(), min_units)
    with pytest.raises(ValueError, match="min_units must be .*bfloat16"):
        gemv.linear_int4(x, packed, scales, mins, scale_units, min_units.float())


def _isolate_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))


def test_missing_compiler_is_reported(tmp_path, monkeypatch, fresh_state):
    _isolate_cache(tmp_path, monkeypatch)
    monkeypatch.setenv("NEKOMATA_CC", str(tmp_path / "no-such-cc"))
    assert gemv.available() is False
    reason = gemv.unavailable_reason()
    assert reason and ("no C compiler" in reason or "x86-64" in reason or "lacks" in reason)
    assert gemv.library_path() is None
    with pytest.raises(RuntimeError, match="unavailable"):
        gemv.linear_bf16(torch.randn(4), torch.zeros(2, 4, dtype=torch.bfloat16))


@requires_kernels
def test_failing_compiler_is_reported(tmp_path, monkeypatch, fresh_state):
    _isolate_cache(tmp_path, monkeypatch)
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'fatal: the compiler is broken' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NEKOMATA_CC", str(fake))
    assert gemv.available() is False
    reason = gemv.unavailable_reason()
    assert "exit 3" in reason and "the compiler is broken" in reason
    assert not any((tmp_path / "cache" / "nekomata_core").iterdir())  # no half-built library left


def test_unsupported_cpu_and_opt_out_are_reported(monkeypatch, fresh_state):
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"sse2"})
    assert not gemv.available()
    assert "x86-64" in gemv.unavailable_reason() or "avx2" in gemv.unavailable_reason()
    build.reset()
    monkeypatch.setenv("NEKOMATA_CPU_GEMV", "0")
    assert not gemv.available() and "NEKOMATA_CPU_GEMV=0" in gemv.unavailable_reason()


def test_import_compiles_nothing(tmp_path):
    code = (
        "import nekomata_core.kernels.cpu.gemv, nekomata_core.kernels.cpu.step, os, sys\n"
        "from nekomata_core.kernels.cpu import build as b\n"
        "assert not b._loaded and b._build_count == 0\n"
        "assert not os.path.exists(os.path.join(os.environ['XDG_CACHE_HOME'], 'nekomata_core'))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@requires_kernels
@pytest.mark.parametrize("n, k", [(1, 32), (5, 96), (67, 1024), (130, 2816)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantize_is_the_reference_weight_rounded_once(n, k, out_dtype):
    """The C expansion used by prefills equals code * scale + min in fp32 (the layout read independently
    here, as in _int4_reference), rounded once to the out dtype — bit for bit, for any thread count."""
    int4 = _int4_weight(n, k, seed=k + n)
    s, m = (t.float() for t in _group_values(*int4[1:]))  # exact in fp32 too
    expected = (_codes(int4[0]).float() * s[:, :, None] + m[:, :, None]).reshape(n, k).to(out_dtype)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(gemv.dequantize_int4(*int4, out_dtype), expected)
    finally:
        torch.set_num_threads(saved)


@requires_kernels
@pytest.mark.parametrize("n, k", [(1, 1), (3, 17), (64, 1024), (129, 2816)])
def test_int8_expansion_is_the_weight_in_the_float_dtype(n, k, threads):
    """The prefill's int8 → bf16/fp32 expansion equals PyTorch's conversion bit for bit (int8 values are
    exact in both), for any thread count, written into `out` when given."""
    q = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(n + k), dtype=torch.int8)
    q.view(-1)[0] = -128
    for dtype in (torch.bfloat16, torch.float32):
        for nt in (1, 2):
            threads(nt)
            assert torch.equal(gemv.expand_int8(q, dtype), q.to(dtype))
        out = torch.empty(n, k, dtype=dtype)
        assert gemv.expand_int8(q, dtype, out=out) is out and torch.equal(out, q.to(dtype))
    with pytest.raises(ValueError, match="out must be"):
        gemv.expand_int8(q, torch.bfloat16, out=torch.empty(n, k))
    with pytest.raises(ValueError, match="dtype must be"):
        gemv.expand_int8(q, torch.float16)


@requires_kernels
def test_int4_dequantize_keeps_subnormal_values_and_writes_into_out():
    """The avx512bf16 build rounds with vcvtne2ps2bf16, which reads subnormals as zero: a group whose
    values are subnormal (a scale unit of 1e-39) must still come out as PyTorch rounds them; `out` is
    filled in place."""
    n, k = 3, 256
    packed = torch.randint(0, 256, (n, k // 2), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    scales = torch.full((n, k // 32), 64, dtype=torch.uint8)
    mins = torch.full((n, k // 32), -64, dtype=torch.int8)
    scale_units = torch.full((1, k // 32), 2.0**-8, dtype=torch.bfloat16)  # scale 0.25
    min_units = torch.full((1, k // 32), 2.0**-5, dtype=torch.bfloat16)  # min -2
    scales[1, 3], scale_units[0, 3], min_units[0, 3] = 1, 1e-39, 0.0  # row 1's group 3: subnormal values
    s, m = (t.float() for t in _group_values(scales, mins, scale_units, min_units))
    expected = (_codes(packed).float() * s[:, :, None] + m[:, :, None]).reshape(n, k).to(torch.bfloat16)
    out = torch.empty(n, k, dtype=torch.bfloat16)
    assert gemv.dequantize_int4(packed, scales, mins, scale_units, min_units, torch.bfloat16, out=out) is out
    assert torch.equal(out, expected) and bool((out[1, 96:128] != 0).any())
    with pytest.raises(ValueError, match="out must be"):
        gemv.dequantize_int4(packed, scales, mins, scale_units, min_units, torch.bfloat16, out=torch.empty(n, k))


@requires_kernels
def test_int4_dequantize_refuses_what_it_cannot_expand():
    packed, scales, mins, scale_units, min_units = _int4_weight(4, 64, seed=0)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        gemv.dequantize_int4(packed, scales, mins, scale_units, min_units, torch.float16)
    with pytest.raises(ValueError, match="scales must be a contiguous"):
        gemv.dequantize_int4(packed, scales[:, :1], mins, scale_units, min_units, torch.float32)
