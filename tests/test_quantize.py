"""int8 weight-only quantization: the layer against its plain-PyTorch definition, the save/load round
trip, and accuracy against the unquantized model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nekomata_core import QwenForCausalLM, generate
from nekomata_core.quantize import Int8Linear, quantize_int8, save_quantized


@pytest.fixture(scope="module")
def folder(checkpoint_factory):
    return checkpoint_factory("tiny", seed=11, init_std=0.1, vocab_size=512)


@pytest.mark.parametrize("chunk_rows", [4096, 7])  # one block, and blocks that do not divide the rows
def test_int8_linear_equals_its_definition(monkeypatch, chunk_rows):
    monkeypatch.setattr("nekomata_core.quantize.QUANTIZE_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True)
    q = Int8Linear.from_linear(linear)
    w = linear.weight.detach()
    scales = w.abs().amax(dim=1) / 127
    expected_q = torch.round(w / scales[:, None]).clamp(-127, 127)
    assert torch.equal(q.weight.float(), expected_q)
    assert (q.dequantized_weight() - w).abs().max() <= scales.max() / 2 + 1e-7  # round-to-nearest bound
    x = torch.randn(2, 5, 96)
    reference = F.linear(x, expected_q * scales[:, None], linear.bias.detach())
    out = q(x)
    assert out.shape == (2, 5, 80)
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_quantize_save_load_gives_the_same_logits(folder, tmp_path):
    model = QwenForCausalLM.from_pretrained(
        folder, dtype="float32", device="cpu", progress=False, quantize="int8"
    )
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 5 + 1  # 5 per block + lm_head
    saved = save_quantized(model, tmp_path / "int8", source_dir=folder)
    assert json.loads((saved / "config.json").read_text())["quantization"]["method"] == "int8_weight_only"
    reloaded = QwenForCausalLM.from_pretrained(saved, dtype="float32", device="cpu", progress=False)
    assert reloaded.transformer.h[0].mlp.w1.weight.dtype == torch.int8
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))
    # Quantizing at load time equals quantizing a loaded model.
    manual = quantize_int8(
        QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    )
    with torch.no_grad():
        assert torch.equal(manual(ids), model(ids))


def test_int8_tracks_the_bf16_model(folder):
    """Accuracy report: int8 vs bf16 (the dtype it is meant to replace), both against fp32."""
    fp32 = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    bf16 = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False)
    int8 = QwenForCausalLM.from_pretrained(
        folder, dtype="bfloat16", device="cpu", progress=False, quantize="int8"
    )
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp32(ids)
        err_bf16 = ((bf16(ids).float() - ref).abs().max() / ref.abs().max()).item()
        err_int8 = ((int8(ids).float() - ref).abs().max() / ref.abs().max()).item()
    print(f"relative max logit error vs fp32: bf16 {err_bf16:.2e}, int8 {err_int8:.2e}")
    assert err_int8 < 0.1
    greedy_bf16 = generate(bf16, ids[:1, :8], max_new_tokens=24, eos_token_id=()).new_tokens[0]
    greedy_int8 = generate(int8, ids[:1, :8], max_new_tokens=24, eos_token_id=()).new_tokens[0]
    agree = next((i for i, (a, b) in enumerate(zip(greedy_bf16, greedy_int8, strict=False)) if a != b), 24)
    print(f"greedy agreement int8 vs bf16: first {agree} of 24 tokens identical")
    assert agree >= 4


def test_bad_quantize_value_is_refused(folder):
    with pytest.raises(ValueError, match="quantize"):
        QwenForCausalLM.from_pretrained(folder, device="cpu", progress=False, quantize="int4")


def test_saving_an_unquantized_model_is_refused(folder, tmp_path):
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    with pytest.raises(ValueError, match="quantize it first"):
        save_quantized(model, tmp_path / "x")


@pytest.mark.parametrize("shards", [1, 3])
def test_quantize_on_load_equals_quantizing_the_loaded_model(checkpoint_factory, shards):
    """quantize="int8" converts each linear as it is read: the same int8 model as quantizing after a
    full bf16 load, with biases on every linear and tensors spread over shards."""
    folder = checkpoint_factory("tiny", seed=13, vocab_size=256, no_bias=False, shards=shards)
    on_load = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, quantize="int8")
    after = quantize_int8(QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False))
    a, b = on_load.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("mlp.w1.bias") for k in a)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert sum(isinstance(m, Int8Linear) for m in on_load.modules()) == 5 * on_load.config.num_hidden_layers + 1


def test_quantize_on_load_never_holds_two_float_linears(checkpoint_factory, monkeypatch):
    from torch.nn import Linear

    from nekomata_core import loader

    folder = checkpoint_factory("tiny", seed=13, vocab_size=256)
    real_load = loader.load_weights
    most = []

    def watching_load(model, *args, after_tensor=None, **kwargs):
        def watch(name):
            after_tensor(name)
            loaded_float = [m for m in model.modules() if type(m) is Linear and not m.weight.is_meta]
            most.append(len(loaded_float))

        return real_load(model, *args, after_tensor=watch, **kwargs)

    monkeypatch.setattr(loader, "load_weights", watching_load)
    model = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, quantize="int8")
    assert most and max(most) == 0  # each linear was converted as soon as it was complete
    assert not any(type(m) is Linear for m in model.modules())
