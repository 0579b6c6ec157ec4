"""The step functions (fixed shapes, compiled, native C) give the plain forward's tokens and logits."""

from __future__ import annotations

import pytest
import torch

from nekomata_core import QwenForCausalLM, generate
from nekomata_core.accelerate import StaticStep, make_step


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    # seq_length 16 so that a 20-token prompt uses NTK alpha 3 and logn throughout decoding.
    folder = checkpoint_factory("tiny", seed=8, init_std=0.15, vocab_size=300, seq_length=16)
    return QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)


def padded_batch():
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask


def test_static_step_logits_equal_the_plain_forward(model):
    ids, mask = padded_batch()
    with torch.no_grad():
        plain, fast = model.allocate_cache(2, 40), model.allocate_cache(2, 40)
        model(ids, mask, cache=plain)
        model(ids, mask, cache=fast)
        step = StaticStep(model)
        tokens = torch.tensor([[3], [4]])
        for _ in range(15):  # positions 20…34: past 2S, logn on, alpha 3 kept
            expected = model(tokens, cache=plain)[:, -1]
            got = step(tokens, fast)
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
            tokens = expected.argmax(-1, keepdim=True)
    assert fast.length == plain.length == 35


def test_static_decode_gives_the_plain_greedy_tokens(model):
    ids, mask = padded_batch()
    plain = generate(model, ids, mask, max_new_tokens=20, eos_token_id=(), step_fn=make_step(model, "eager"))
    fast = generate(
        model, ids, mask, max_new_tokens=20, eos_token_id=(), step_fn=make_step(model, "static")
    )
    assert torch.equal(plain.sequences, fast.sequences)


def test_decode_fn_the_old_name_of_step_fn_still_works_and_both_at_once_are_refused(model):
    from nekomata_core import stream
    from nekomata_core.generation import GenerationInputError

    ids, mask = padded_batch()
    calls = []

    def counting_step(tokens, cache):
        calls.append(tokens.shape)
        return model(tokens, cache=cache)[:, -1]

    new = generate(model, ids, mask, max_new_tokens=4, eos_token_id=(), step_fn=counting_step)
    old = generate(model, ids, mask, max_new_tokens=4, eos_token_id=(), decode_fn=counting_step)
    assert torch.equal(new.sequences, old.sequences) and len(calls) == 6  # 3 steps after each prefill
    with pytest.raises(GenerationInputError, match="pass step_fn only"):
        generate(model, ids, mask, max_new_tokens=4, step_fn=counting_step, decode_fn=make_step(model, "eager"))
    with pytest.raises(GenerationInputError, match="pass step_fn only"):
        next(stream(model, None, [1, 2], step_fn=counting_step, decode_fn=make_step(model, "eager")))


def test_compiled_decode_gives_the_plain_greedy_tokens(model):
    ids, mask = padded_batch()
    plain = generate(model, ids, mask, max_new_tokens=12, eos_token_id=(), step_fn=make_step(model, "eager"))
    decoder = make_step(model, "compiled")
    for _ in range(2):  # the second call reuses the compiled graph (no recompilation per step)
        fast = generate(model, ids, mask, max_new_tokens=12, eos_token_id=(), step_fn=decoder)
        assert torch.equal(plain.sequences, fast.sequences)


def test_unknown_decode_mode_and_unprefilled_cache_are_refused(model):
    with pytest.raises(ValueError, match="step mode"):
        make_step(model, "turbo")
    with pytest.raises(RuntimeError, match="prefilled"):
        StaticStep(model)(torch.tensor([[1]]), model.allocate_cache(1, 4))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_native_cpu_gemv_decode_tracks_the_pytorch_linears(checkpoint_factory, quantize):
    """bf16 decode through nekomata_core.kernels.cpu.gemv (ops_backend="auto") vs PyTorch's own linears ("eager").

    Both accumulate in fp32 and round once to bf16, in different orders: logits agree to bf16 noise. The
    int8 GEMV also quantizes x to int8 per block of 32 (kernels/cpu/q8.c; its exact arithmetic is tested
    in tests/test_cpu_gemv.py), which costs about as much again: twice the bf16 tolerance there.
    """
    from nekomata_core.kernels.cpu import gemv

    if not gemv.available():
        pytest.skip(gemv.unavailable_reason())
    folder = checkpoint_factory("tiny", seed=9, init_std=0.1, vocab_size=512, dtype=torch.bfloat16)
    kwargs = dict(dtype="bfloat16", device="cpu", progress=False, quantize=quantize)
    native = QwenForCausalLM.from_pretrained(folder, **kwargs)
    plain = QwenForCausalLM.from_pretrained(folder, ops_backend="eager", **kwargs)
    from nekomata_core.accelerate.modules import CpuInt8Linear, CpuLinear

    gemv_layers = (CpuLinear, CpuInt8Linear)
    assert isinstance(native.lm_head, gemv_layers) and getattr(native.lm_head, "use_gemv", True)
    # "eager" never runs the C GEMVs; on a CPU without bf16 matmul instructions it may still upcast wide
    # (prefill) calls to fp32 (CpuLinear with use_gemv False), which decode steps do not reach.
    assert not (isinstance(plain.lm_head, gemv_layers) and getattr(plain.lm_head, "use_gemv", True))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = [m.allocate_cache(1, 20) for m in (native, plain)]
        for m, c in zip((native, plain), caches, strict=True):
            m(ids, cache=c)
        token = torch.tensor([[7]])
        for _ in range(6):
            a = StaticStep(native)(token, caches[0]).float()
            b = StaticStep(plain)(token, caches[1]).float()
            assert (a - b).abs().max() <= (4e-2 if quantize else 2e-2) * b.abs().max()
            token = b.argmax(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- native
# The native step (kernels/cpu/step.c) runs the whole step in C. It must compute what the
# PyTorch model computes: fp32 to a few ulps (only summation orders differ), half precision to the
# same accuracy as PyTorch's own half-precision step.

from nekomata_core.kernels.cpu import step as cpu_step  # noqa: E402

from nekomata_core.accelerate import NativeStep, native_step_problem  # noqa: E402

needs_native = pytest.mark.skipif(not cpu_step.available(), reason=str(cpu_step.unavailable_reason()))


def prefilled(model, ids, length):
    cache = model.allocate_cache(ids.shape[0], length)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache


@needs_native
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # seq_length 16: the 20-token prompt fixes NTK alpha 3, logn from the first step
        dict(rotary_pct=0.5, no_bias=False),  # rotary on half of each head; biases on every linear
    ],
    ids=["ntk-logn", "partial-rotary-biases"],
)
def test_native_step_logits_equal_the_plain_forward_fp32(checkpoint_factory, overrides):
    folder = checkpoint_factory("tiny", seed=8, init_std=0.15, vocab_size=300, seq_length=16, **overrides)
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    plain, fast = prefilled(model, ids, 40), prefilled(model, ids, 40)
    native = NativeStep(model)
    token = torch.tensor([[3]])
    with torch.no_grad():
        for _ in range(20):  # positions 20…39: past 2S with alpha 3 kept, logn growing
            expected = model(token, cache=plain)[:, -1]
            got = native(token, fast)
            # fp32, different summation order only: ≤ 1e-5 of the logit scale
            assert got.shape == expected.shape and got.dtype == torch.float32
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
            token = expected.argmax(-1, keepdim=True)
    assert fast.length == plain.length == 40
    # the keys and values it wrote are the model's own (rotated keys, raw values)
    for mine, theirs in ((fast.keys, plain.keys), (fast.values, plain.values)):
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@needs_native
def test_native_greedy_tokens_equal_transformers(checkpoint_factory):
    """An independent reference: transformers' Qwen2 generate on the mapped weights (below seq_length)."""
    from tests.hf_reference import qwen2_reference_from_checkpoint

    folder = checkpoint_factory("tiny", seed=12, init_std=0.3, vocab_size=500, seq_length=256)
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    reference = qwen2_reference_from_checkpoint(folder)
    ids = torch.randint(1, 500, (1, 11), generator=torch.Generator().manual_seed(2))
    ours = generate(model, ids, max_new_tokens=40, eos_token_id=(), step_fn=make_step(model, "native"))
    theirs = reference.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.sequences, theirs)


@needs_native
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_native_half_precision_is_as_accurate_as_pytorchs_own(checkpoint_factory, quantize):
    """bf16 (and int8 with bf16 activations): both the native step and PyTorch's static step are
    compared with the same model run in fp32 (for int8: the same int8 weights, fp32 activations).
    The native step may not be less accurate than PyTorch's bf16 step (within 25 %)."""
    folder = checkpoint_factory("tiny", seed=9, init_std=0.05, vocab_size=512, seq_length=16)
    kwargs = dict(device="cpu", progress=False, quantize=quantize)
    half = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", **kwargs)
    full = QwenForCausalLM.from_pretrained(folder, dtype="float32", **kwargs)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    caches = [prefilled(half, ids, 36), prefilled(half, ids, 36), prefilled(full, ids, 36)]
    native, static, reference = NativeStep(half), StaticStep(half), StaticStep(full)
    token = torch.tensor([[5]])
    native_err = static_err = 0.0
    with torch.no_grad():
        for _ in range(16):
            exact = reference(token, caches[2])
            scale = exact.abs().max()
            got = native(token, caches[0])
            assert got.dtype == torch.bfloat16
            native_err = max(native_err, float((got.float() - exact).abs().max() / scale))
            static_err = max(static_err, float((static(token, caches[1]).float() - exact).abs().max() / scale))
            token = exact.argmax(-1, keepdim=True)
    assert 0 < static_err < 0.05  # bf16 noise, not a broken model
    assert native_err <= 1.25 * static_err, (native_err, static_err)


@needs_native
def test_native_results_do_not_depend_on_the_thread_count(checkpoint_factory):
    folder = checkpoint_factory("tiny", seed=10, init_std=0.1, vocab_size=400, dtype=torch.bfloat16)
    model = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False)
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(3))
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = generate(model, ids, max_new_tokens=12, eos_token_id=(), step_fn=NativeStep(model))
            cache = prefilled(model, ids, 12)
            runs.append((out.sequences, NativeStep(model)(torch.tensor([[1]]), cache)))
    finally:
        torch.set_num_threads(threads)
    for sequences, logits in runs[1:]:
        assert torch.equal(sequences, runs[0][0]) and torch.equal(logits, runs[0][1])  # bit for bit


@needs_native
def test_native_int8_round_trip_through_a_saved_checkpoint(checkpoint_factory, tmp_path):
    from nekomata_core.quantize import save_quantized

    folder = checkpoint_factory("tiny", seed=11, init_std=0.1, vocab_size=300, dtype=torch.bfloat16)
    quantized = QwenForCausalLM.from_pretrained(folder, device="cpu", progress=False, quantize="int8")
    reloaded = QwenForCausalLM.from_pretrained(save_quantized(quantized, tmp_path / "q"), device="cpu", progress=False)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(4))
    a = NativeStep(quantized)(torch.tensor([[9]]), prefilled(quantized, ids, 8))
    b = NativeStep(reloaded)(torch.tensor([[9]]), prefilled(reloaded, ids, 8))
    assert torch.equal(a, b)


@needs_native
def test_native_batched_greedy_tokens_equal_the_eager_decoder(model):
    # batch 2, one row left-padded (tests/test_native_batched_step.py covers batches in depth)
    ids, mask = padded_batch()
    fast = generate(model, ids, mask, max_new_tokens=10, eos_token_id=(), step_fn=NativeStep(model))
    plain = generate(model, ids, mask, max_new_tokens=10, eos_token_id=(), step_fn=make_step(model, "eager"))
    assert torch.equal(fast.sequences, plain.sequences)


@needs_native
def test_auto_picks_native_only_where_it_computes_the_same_function(checkpoint_factory):
    folder = checkpoint_factory("tiny", seed=8, init_std=0.15, vocab_size=300)
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    assert isinstance(make_step(model, "auto"), NativeStep)

    half = QwenForCausalLM.from_pretrained(folder, dtype="float16", device="cpu", progress=False)
    assert "float16" in native_step_problem(half)
    assert isinstance(make_step(half, "auto"), StaticStep)
    with pytest.raises(ValueError, match="'native' is unavailable.*float16.*use 'static'"):
        make_step(half, "native")

    # A replaced module or a forward hook would be bypassed by the C step: auto falls back.
    handle = model.transformer.h[1].mlp.register_forward_hook(lambda *args: None)
    assert "transformer.h.1.mlp has forward hooks" in native_step_problem(model)
    assert isinstance(make_step(model, "auto"), StaticStep)
    handle.remove()

    class DoubledHead(torch.nn.Linear):  # a user's own head: the C step would silently skip its forward
        def forward(self, x):
            return 2 * super().forward(x)

    model.lm_head = DoubledHead(model.config.hidden_size, model.config.vocab_size, bias=False)
    assert "lm_head is a DoubledHead, not one of the model's own classes" in native_step_problem(model)


@needs_native
def test_native_decoder_errors_are_clear(model):
    native = NativeStep(model)
    with pytest.raises(RuntimeError, match="prefilled"):
        native(torch.tensor([[1]]), model.allocate_cache(1, 4))
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(0))
    full = prefilled(model, ids, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        native(torch.tensor([[1]]), full)
    cache = prefilled(model, ids, 6)
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        native(torch.tensor([[300]]), cache)
    assert cache.length == 4  # nothing was written


def test_stream_read_reads_every_line(tmp_path):
    if not cpu_step.available():
        pytest.skip(cpu_step.unavailable_reason())
    words = torch.arange(1, 64 * 1001 // 4 + 1, dtype=torch.int32)  # 1001 lines of 64 bytes (16 words)
    for threads in (1, 2, 3):
        assert cpu_step.stream_read(words.data_ptr(), words.numel() * 4, threads) == int(words.sum())
        # a trailing partial line is not read
        partial = words.numel() * 4 - 40
        assert cpu_step.stream_read(words.data_ptr(), partial, threads) == int(words[:-16].sum())
    with pytest.raises(ValueError, match="num_threads"):
        cpu_step.stream_read(words.data_ptr(), 64, 0)


@needs_native
def test_native_int4_step_equals_the_pytorch_int4_step(checkpoint_factory):
    """int4 weights (c_attn's q and k int4, its v int8): the C step against the same model's PyTorch
    step, fp32 to fp32 noise (1e-5 of the logit scale) on most steps and within 1e-2 on all (both
    quantize x to int8 in their GEMVs: an element whose fp32 input differs in the last bit can land on
    the neighbouring level, see tests/test_native_batched_step.py); bf16 within bf16 noise (3e-2 of the
    logit scale: the two round the same values at the same points but sum in other orders, and a flipped
    last bit of a bf16 activation moves x's int8 levels in the next GEMV; the largest of these 8 steps
    measured 0.022); bit-identical across 1, 2 and 3 threads."""
    import copy

    from nekomata_core.accelerate import accelerate
    from nekomata_core.accelerate.modules import CpuInt4Linear

    folder = checkpoint_factory("tiny", seed=14, init_std=0.02, vocab_size=300, seq_length=16, no_bias=False)
    half = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, quantize="int4")
    assert isinstance(half.transformer.h[0].mlp.w1, CpuInt4Linear) and native_step_problem(half) is None
    # the same int4 weights with fp32 activations (scales and mins widened exactly)
    full = accelerate(copy.deepcopy(half).float())
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(5))
    for model, tol in ((full, 1e-5), (half, 3e-2)):
        within = []
        plain = prefilled(model, ids, 30)
        fast = [prefilled(model, ids, 30) for _ in range(3)]
        native = NativeStep(model)
        token = torch.tensor([[3]])
        threads = torch.get_num_threads()
        with torch.no_grad():
            for _ in range(8):
                expected = model(token, cache=plain)[:, -1].float()
                runs = []
                try:
                    for n, cache in zip((1, 2, 3), fast, strict=True):
                        torch.set_num_threads(n)
                        runs.append(native(token, cache))
                finally:
                    torch.set_num_threads(threads)
                assert all(torch.equal(runs[0], other) for other in runs[1:])
                err, scale = (runs[0].float() - expected).abs().max(), expected.abs().max()
                assert err <= (1e-2 if tol == 1e-5 else tol) * scale
                within.append(bool(err <= tol * scale))
                token = expected.argmax(-1, keepdim=True)
        assert sum(within) >= len(within) / 2
