"""The fast decode path (fixed shapes, optionally compiled) gives the plain path's tokens and logits."""

from __future__ import annotations

import pytest
import torch

from nekomata_core import QwenForCausalLM, generate
from nekomata_core.decode import StaticDecoder, make_decoder


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
        step = StaticDecoder(model)
        tokens = torch.tensor([[3], [4]])
        for _ in range(15):  # positions 20…34: past 2S, logn on, alpha 3 kept
            expected = model(tokens, cache=plain)[:, -1]
            got = step(tokens, fast)
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
            tokens = expected.argmax(-1, keepdim=True)
    assert fast.length == plain.length == 35


def test_static_decode_gives_the_plain_greedy_tokens(model):
    ids, mask = padded_batch()
    plain = generate(model, ids, mask, max_new_tokens=20, eos_token_id=())
    fast = generate(
        model, ids, mask, max_new_tokens=20, eos_token_id=(), decode_fn=make_decoder(model, "static")
    )
    assert torch.equal(plain.sequences, fast.sequences)


def test_compiled_decode_gives_the_plain_greedy_tokens(model):
    ids, mask = padded_batch()
    plain = generate(model, ids, mask, max_new_tokens=12, eos_token_id=())
    decoder = make_decoder(model, "compiled")
    for _ in range(2):  # the second call reuses the compiled graph (no recompilation per step)
        fast = generate(model, ids, mask, max_new_tokens=12, eos_token_id=(), decode_fn=decoder)
        assert torch.equal(plain.sequences, fast.sequences)


def test_unknown_decode_mode_and_unprefilled_cache_are_refused(model):
    with pytest.raises(ValueError, match="decode mode"):
        make_decoder(model, "turbo")
    with pytest.raises(RuntimeError, match="prefilled"):
        StaticDecoder(model)(torch.tensor([[1]]), model.allocate_cache(1, 4))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_native_cpu_gemv_decode_tracks_the_pytorch_linears(checkpoint_factory, quantize):
    """bf16 decode through kernels.cpu_gemv (ops_backend="auto") vs PyTorch's own linears ("eager").

    Both accumulate in fp32 and round once to bf16, in different orders: logits agree to bf16 noise.
    """
    from kernels import cpu_gemv

    if not cpu_gemv.available():
        pytest.skip(cpu_gemv.unavailable_reason())
    folder = checkpoint_factory("tiny", seed=9, init_std=0.1, vocab_size=512, dtype=torch.bfloat16)
    kwargs = dict(dtype="bfloat16", device="cpu", progress=False, quantize=quantize)
    native = QwenForCausalLM.from_pretrained(folder, **kwargs)
    plain = QwenForCausalLM.from_pretrained(folder, ops_backend="eager", **kwargs)
    assert native.lm_head.native_gemv and not plain.lm_head.native_gemv
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = [m.allocate_cache(1, 20) for m in (native, plain)]
        for m, c in zip((native, plain), caches, strict=True):
            m(ids, cache=c)
        token = torch.tensor([[7]])
        for _ in range(6):
            a = StaticDecoder(native)(token, caches[0]).float()
            b = StaticDecoder(plain)(token, caches[1]).float()
            assert (a - b).abs().max() <= 2e-2 * b.abs().max()
            token = b.argmax(-1, keepdim=True)
