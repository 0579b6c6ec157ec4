"""The native (C) step for B > 1 rows: left-padded rows, each with its own key mask and NTK alpha, in one
call that reads every weight once. It must compute what the PyTorch step computes (fp32 to a few ulps),
and each row exactly what the batch-1 native step computes for that row alone."""

from __future__ import annotations

import copy

import pytest
import torch
from nekomata_core.kernels.cpu import build
from nekomata_core.kernels.cpu import step as cpu_step

from nekomata_core import QwenForCausalLM, generate
from nekomata_core.accelerate import NativeStep, StaticStep, accelerate, make_step
from nekomata_core.accelerate.steps import NATIVE_MAX_BATCH_FLOAT, NATIVE_MAX_BATCH_QUANTIZED
from nekomata_core.cache import KVCache

pytestmark = pytest.mark.skipif(not cpu_step.available(), reason=str(cpu_step.unavailable_reason()))

VOCAB = 300
# Real tokens per row of a 20-token batch (left padding before them). With seq_length 16, row 0 (20 real
# tokens) gets NTK alpha 3 and the others alpha 1, so the rows need their own rotary tables; logn is on
# from the first step (position 20 > 16).
REAL = (20, 11, 6, 15)


def padded_batch(rows: int = len(REAL), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, 20), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for b in range(rows):
        mask[b, 20 - REAL[b % len(REAL)] :] = 1
    return ids, mask


def load(checkpoint_factory, *, dtype="float32", quantize=None, **overrides):
    settings = dict(seed=8, init_std=0.15, vocab_size=VOCAB, seq_length=16) | overrides
    folder = checkpoint_factory("tiny", **settings)
    return QwenForCausalLM.from_pretrained(folder, dtype=dtype, device="cpu", progress=False, quantize=quantize)


def prefilled(model, ids, mask, length=36):
    cache = model.allocate_cache(ids.shape[0], length)
    with torch.no_grad():
        model(ids, mask, cache=cache)
    return cache


def row_of(cache: KVCache, b: int) -> KVCache:
    """A batch-1 cache holding exactly row b of `cache` (keys, values, mask, length, alpha)."""
    one = KVCache(cache.config, 1, cache.max_length, dtype=cache.dtype, device="cpu")
    one.keys.copy_(cache.keys[:, b : b + 1])
    one.values.copy_(cache.values[:, b : b + 1])
    one.key_mask.copy_(cache.key_mask[b : b + 1])
    one.length = cache.length
    shared = cache.inv_freq.shape[0] == 1
    one.ntk_alpha = cache.ntk_alpha[:1] if cache.ntk_alpha.shape[0] == 1 else cache.ntk_alpha[b : b + 1]
    one.inv_freq = cache.inv_freq if shared else cache.inv_freq[b : b + 1]
    return one


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # per-row NTK alpha (3, 1, 1, 1) and logn
        dict(seq_length=64),  # every row below seq_length: one shared rotary table (Bα = 1), no logn
        dict(rotary_pct=0.5, no_bias=False),  # rotary on half of each head; biases on every linear
        dict(hidden_size=72, kv_channels=18, intermediate_size=272),  # H = 72, F = 136: K % 16 tails in every kernel
        # D = 74: the attention's 64-element register block, then an 8-lane block, then 2 scalar elements
        dict(hidden_size=148, num_attention_heads=2, kv_channels=74, intermediate_size=272),
    ],
    ids=["per-row-ntk-logn", "shared-alpha", "partial-rotary-biases", "odd-widths", "wide-heads"],
)
def test_batched_native_step_equals_the_static_step_fp32(checkpoint_factory, overrides):
    model = load(checkpoint_factory, **overrides)
    ids, mask = padded_batch()
    plain, fast = prefilled(model, ids, mask), prefilled(model, ids, mask)
    shared = overrides.get("seq_length") == 64
    assert fast.inv_freq.shape[0] == (1 if shared else 4)  # the case this parameter is meant to cover
    static, native = StaticStep(model), NativeStep(model)
    tokens = torch.tensor([[3], [4], [5], [6]])
    with torch.no_grad():
        for _ in range(16):  # positions 20…35: past 2S for row 0 with its alpha 3 kept, logn growing
            expected = static(tokens, plain)
            got = native(tokens, fast)
            assert got.shape == expected.shape == (4, VOCAB) and got.dtype == torch.float32
            # fp32, different summation order only: ≤ 1e-5 of the logit scale, row by row
            scale = expected.abs().amax(dim=-1)
            assert ((got - expected).abs().amax(dim=-1) <= 1e-5 * scale).all()
            tokens = expected.argmax(-1, keepdim=True)
    assert fast.length == plain.length == 36
    # the keys and values it wrote are the model's own (rotated keys, raw values), padding untouched
    for mine, theirs in ((fast.keys, plain.keys), (fast.values, plain.values)):
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_batched_greedy_tokens_equal_the_static_step_through_generate(checkpoint_factory):
    model = load(checkpoint_factory)
    ids, mask = padded_batch()
    native = generate(model, ids, mask, max_new_tokens=16, eos_token_id=(), step_fn=NativeStep(model))
    static = generate(model, ids, mask, max_new_tokens=16, eos_token_id=(), step_fn=make_step(model, "static"))
    assert torch.equal(native.sequences, static.sequences)


@pytest.mark.parametrize(
    ("dtype", "quantize"),
    [("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "int4")],
)
def test_each_batched_row_is_bit_identical_to_the_batch_1_native_step(checkpoint_factory, dtype, quantize):
    """The batched GEMVs sum each (weight row, batch row) in the batch-1 kernel's order, and the rest of the
    step is the same code per row: row b of a batch equals the batch-1 step of row b alone, bit for bit.
    That holds where the batched rows use the batch-1 kernels' code: the avx2 build, int8 and int4 weights
    in every build (kernels/cpu/q8.c: one kernel serves both), and bf16 weights in the avx512bf16 build
    (vdpbf16ps in both); the AVX-512 fp32 kernels sum in another order than the batched AVX2 ones
    (tests/test_cpu_isa.py runs this file again with NEKOMATA_CPU_ISA=avx2 where AVX-512 exists)."""
    same_code = (
        build.isa() == "avx2"
        or quantize is not None
        or (build.isa() == "avx512bf16" and (dtype, quantize) == ("bfloat16", None))
    )
    if not same_code:
        pytest.skip(f"the {build.isa()} build's batch-1 kernels for these weights sum in another order")
    model = load(checkpoint_factory, dtype=dtype, quantize=quantize, init_std=0.1, no_bias=False)
    ids, mask = padded_batch()
    batched = prefilled(model, ids, mask)
    singles = [row_of(batched, b) for b in range(4)]
    native = NativeStep(model)
    tokens = torch.tensor([[3], [4], [5], [6]])
    with torch.no_grad():
        for _ in range(6):
            together = native(tokens, batched)
            alone = torch.cat([native(tokens[b : b + 1], singles[b]) for b in range(4)])
            assert torch.equal(together, alone)
            tokens = together.float().argmax(-1, keepdim=True)
    for b in range(4):
        assert torch.equal(batched.keys[:, b : b + 1], singles[b].keys)
        assert torch.equal(batched.values[:, b : b + 1], singles[b].values)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_batched_half_and_quantized_steps_track_the_pytorch_step(checkpoint_factory, quantize):
    """bf16 activations (bf16, int8 or int4 weights): within bf16 noise (2e-2 of the logit scale) of the
    same model's PyTorch step, as for batch 1. For int8/int4 also the same quantized weights with fp32
    activations (scales and mins widened exactly): within 1e-5, like any fp32 model."""
    # Quantized with fp32 activations: both steps' int8/int4 GEMVs quantize x to int8 (kernels/cpu/q8.c),
    # so where their fp32 inputs to a GEMV differ in the last bit (norms and attention sum in other
    # orders), an element can round to the neighbouring level, a jump of 1/127 of its block's largest
    # value that the layers after it carry on. Such flips are rare: most (step, row) pairs agree to fp32
    # noise (1e-5), every one to 1e-2 of the logit scale.
    # int4 with bf16 activations: twice the bf16 tolerance. Where the two steps' bf16 inputs to the int4
    # lm_head differ in the last bit, an element of x can land on the neighbouring int8 level in one step
    # and not the other; the logit then moves by code * scale * step, and code * scale spans the group's
    # whole range (max - min), up to twice the largest |w| that bounds the same jump in an int8 layer (the
    # mins' term sees x itself and cannot flip).
    std = 0.1 if quantize is None else 0.02
    half = load(checkpoint_factory, dtype="bfloat16", quantize=quantize, init_std=std, no_bias=False)
    models = [(half, 4e-2 if quantize == "int4" else 2e-2)]
    if quantize is not None:
        models.append((accelerate(copy.deepcopy(half).float()), 1e-5))
    ids, mask = padded_batch(rows=3, seed=1)
    for model, tol in models:
        plain, fast = prefilled(model, ids, mask, 30), prefilled(model, ids, mask, 30)
        static, native = StaticStep(model), NativeStep(model)
        tokens = torch.tensor([[3], [4], [5]])
        within = []
        with torch.no_grad():
            for _ in range(8):
                expected = static(tokens, plain).float()
                got = native(tokens, fast)
                assert got.dtype == model.dtype
                scale = expected.abs().amax(dim=-1)
                err = (got.float() - expected).abs().amax(dim=-1)
                if tol == 1e-5:  # quantized, fp32
                    assert (err <= 1e-2 * scale).all(), quantize
                    within.append(err <= tol * scale)
                else:
                    assert (err <= tol * scale).all(), (quantize, tol)
                tokens = expected.argmax(-1, keepdim=True)
        if within:
            assert torch.cat(within).float().mean() >= 0.5, quantize


def test_batched_results_do_not_depend_on_the_thread_count(checkpoint_factory):
    model = load(checkpoint_factory, dtype="bfloat16", init_std=0.1)
    ids, mask = padded_batch()
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = generate(model, ids, mask, max_new_tokens=8, eos_token_id=(), step_fn=NativeStep(model))
            runs.append((out.sequences, NativeStep(model)(torch.tensor([[1], [2], [3], [4]]), prefilled(model, ids, mask))))
    finally:
        torch.set_num_threads(threads)
    for sequences, logits in runs[1:]:
        assert torch.equal(sequences, runs[0][0]) and torch.equal(logits, runs[0][1])  # bit for bit


def test_batches_above_the_native_limit_go_to_the_static_step(checkpoint_factory):
    model = load(checkpoint_factory)
    native = NativeStep(model)
    assert native.max_batch == NATIVE_MAX_BATCH_FLOAT  # float weights
    ids, mask = padded_batch(rows=native.max_batch + 1)
    fast = generate(model, ids, mask, max_new_tokens=3, eos_token_id=(), step_fn=native)
    plain = generate(model, ids, mask, max_new_tokens=3, eos_token_id=(), step_fn=make_step(model, "eager"))
    assert torch.equal(fast.sequences, plain.sequences)
    assert isinstance(native._batched, StaticStep)  # it went there, not through the C step
    quantized = load(checkpoint_factory, dtype="bfloat16", quantize="int8", init_std=0.1)
    assert NativeStep(quantized).max_batch == NATIVE_MAX_BATCH_QUANTIZED


def test_a_bad_token_in_any_row_is_refused_before_the_step(checkpoint_factory):
    model = load(checkpoint_factory)
    ids, mask = padded_batch(rows=3)
    cache = prefilled(model, ids, mask)
    keys = cache.keys.clone()
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside the vocabulary"):
        NativeStep(model)(torch.tensor([[1], [VOCAB], [2]]), cache)
    assert cache.length == 20 and torch.equal(cache.keys, keys)  # nothing was written
