"""QwenForCausalLM against transformers' Qwen2ForCausalLM holding the same (mapped) weights.

Below seq_length Qwen v1 and Qwen2 compute the same function (the same weights, mapped), so transformers is an
independent reference for everything but NTK/logn (tests/test_ntk_logn.py covers those).
Tolerance, fp32: max abs error ≤ 1e-5 × max |logit|.
"""

from __future__ import annotations

import pytest
import torch

from nekomata_core import QwenConfig, QwenForCausalLM
from nekomata_core.accelerate import accelerate
from nekomata_core.cache import CacheError
from nekomata_core.model import InputError
from tests.hf_reference import qwen2_reference_from_checkpoint

REL_TOL = 1e-5

SHAPES = {
    # name: config overrides (all below seq_length in these tests)
    "tiny-4x16": dict(
        vocab_size=512, hidden_size=64, num_attention_heads=4, kv_channels=16, intermediate_size=256
    ),
    "2x32-3layers": dict(
        vocab_size=300,
        hidden_size=64,
        num_attention_heads=2,
        kv_channels=32,
        intermediate_size=160,
        num_hidden_layers=3,
    ),
    "8x8-odd-mlp": dict(
        vocab_size=1000,
        hidden_size=64,
        num_attention_heads=8,
        kv_channels=8,
        intermediate_size=198,
        num_hidden_layers=1,
    ),
    "base-500k": dict(vocab_size=257, rotary_emb_base=500000, layer_norm_epsilon=1e-5),
}


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL) -> None:
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} × max |logit| {scale:.3e}"


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, checkpoint_factory):
    folder = checkpoint_factory("tiny", seed=hash(request.param) % 1000, **SHAPES[request.param])
    ours = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    return ours, qwen2_reference_from_checkpoint(folder)


def random_ids(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_fp32_logits_match_transformers_qwen2(pair, backend):
    ours, ref = pair
    accelerate(ours, attention=backend, ops="eager")
    ids = random_ids(ours.config.vocab_size, (2, 37))
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)


def test_left_padded_batch_matches_transformers_on_real_tokens(pair):
    ours, ref = pair
    ids = random_ids(ours.config.vocab_size, (3, 20), seed=1)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :13] = 0
    with torch.no_grad():
        mine, theirs = ours(ids, mask), ref(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(mine).all(), "padding positions must not produce NaN/inf"
    assert_close(mine[real], theirs[real])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_prefill_then_token_by_token_decode_equals_full_forward(pair, backend):
    ours, _ = pair
    accelerate(ours, attention=backend, ops="eager")
    ids = random_ids(ours.config.vocab_size, (2, 30), seed=2)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.allocate_cache(2, 40)
        pieces = [ours(ids[:, :11], cache=cache)]
        pieces.append(ours(ids[:, 11:14], cache=cache))  # a chunk of several tokens
        for t in range(14, 30):
            pieces.append(ours(ids[:, t : t + 1], cache=cache))
    assert cache.length == 30
    assert_close(torch.cat(pieces, dim=1), full)


def test_padded_decode_with_full_or_new_only_mask_forms_agree(pair):
    ours, ref = pair
    accelerate(ours, attention="sdpa", ops="eager")
    ids = random_ids(ours.config.vocab_size, (2, 16), seed=3)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        theirs = ref(ids, attention_mask=mask).logits
        for full_form in (True, False):
            cache = ours.allocate_cache(2, 16)
            pieces = [ours(ids[:, :10], mask[:, :10], cache=cache)]
            for t in range(10, 16):
                step_mask = mask[:, : t + 1] if full_form else mask[:, t : t + 1]
                pieces.append(ours(ids[:, t : t + 1], step_mask, cache=cache))
            mine = torch.cat(pieces, dim=1)
            assert_close(mine[mask.bool()], theirs[mask.bool()])


def test_last_logits_only_and_hidden_states_match_transformers(pair):
    ours, ref = pair
    ids = random_ids(ours.config.vocab_size, (1, 12), seed=4)
    with torch.no_grad():
        last = ours(ids, last_logits_only=True)
        logits, hidden = ours(ids, output_hidden_states=True)
        theirs = ref(ids, output_hidden_states=True)
    assert last.shape == (1, 1, ours.config.vocab_size)
    assert_close(last[:, 0], logits[:, -1])
    assert len(hidden) == len(theirs.hidden_states) == ours.config.num_hidden_layers + 1
    # HF's last hidden state is after the final norm; ours are the raw block outputs, as the
    # docstring says — compare all but the last, then the last through ln_f.
    for mine, their in zip(hidden[:-1], theirs.hidden_states[:-1], strict=False):
        assert_close(mine, their)
    with torch.no_grad():
        assert_close(ours.transformer.ln_f(hidden[-1]), theirs.hidden_states[-1])


def test_bf16_load_stays_bf16_and_tracks_fp32(checkpoint_factory):
    folder = checkpoint_factory("tiny", vocab_size=512)
    bf16 = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False)
    fp32 = QwenForCausalLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = random_ids(512, (1, 24), seed=5)
    with torch.no_grad():
        low, high = bf16(ids), fp32(ids)
    assert low.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; logits of a 2-layer model stay within a few percent.
    assert_close(low, high, rel=5e-2)


def test_parameters_are_exactly_the_checkpoint_table():
    config = QwenConfig.from_preset("qwen-7b")
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == config.parameter_shapes()
    assert sum(p.numel() for p in model.parameters()) == 7_721_324_544 == config.num_parameters()


def test_construction_on_meta_allocates_nothing():
    config = QwenConfig.from_preset("qwen-14b")  # 14B parameters: 57 GB in fp32 if allocated
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())


def test_bad_inputs_give_one_clear_error(pair):
    ours, _ = pair
    vocab = ours.config.vocab_size
    with pytest.raises(InputError, match="outside the vocabulary"):
        ours(torch.tensor([[0, vocab]]))
    with pytest.raises(InputError, match=r"shape \[batch, length\]"):
        ours(torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="integer token ids"):
        ours(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(InputError, match="attention_mask has shape"):
        ours(torch.tensor([[1, 2, 3]]), torch.ones(1, 5))
    with pytest.raises(InputError, match="only 0"):
        ours(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 1]]))
    cache = ours.allocate_cache(1, 4)
    with pytest.raises(CacheError, match="allocated for 1"):
        ours(torch.tensor([[1], [2]]), cache=cache)
    with pytest.raises(CacheError, match="Allocate a larger cache"):
        ours(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)
    with pytest.raises(ValueError, match="attention='flash' is unknown"):
        accelerate(ours, attention="flash")


def test_triton_backend_on_cpu_without_interpreter_is_refused(pair, monkeypatch):
    pytest.importorskip("triton")
    ours, _ = pair
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from nekomata_core.kernels.dispatch import KernelUnavailableError

    with pytest.raises(KernelUnavailableError):
        accelerate(ours, attention="triton")
    accelerate(ours, attention="sdpa", ops="eager")
