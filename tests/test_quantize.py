"""int8 weight-only quantization: the layer against its plain-PyTorch definition, the save/load round
trip, and accuracy against the unquantized model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nekomata_core import QwenForCausalLM, generate
from nekomata_core.quantize import (
    INT4_GROUP_SIZE,
    INT4_TILE_ROWS,
    Int4Linear,
    Int4QkvLinear,
    Int8Linear,
    QuantizeError,
    quantize_int4,
    quantize_int4_weight,
    quantize_int8,
    save_quantized,
)


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
    # Quantizing at load time equals quantizing a loaded model (then accelerated the same way).
    from nekomata_core.accelerate import accelerate

    manual = accelerate(
        quantize_int8(QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False))
    )
    with torch.no_grad():
        assert torch.equal(manual(ids), model(ids))


def test_a_saved_int8_weight_of_minus_128_is_refused(folder, tmp_path):
    """Our int8 codes are -127..127 (the CPU kernels move the activation's sign onto the weight): a file
    holding -128 is refused with the layer named, not multiplied wrongly."""
    from safetensors.torch import load_file, save_file

    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False, quantize="int8")
    saved = save_quantized(model, tmp_path / "int8", source_dir=folder)
    (weights,) = saved.glob("*.safetensors")
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("mlp.w1.weight"))
    tensors[key][0, 0] = -128
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(QuantizeError, match=r"mlp\.w1 holds -128"):
        QwenForCausalLM.from_pretrained(saved, dtype="float32", device="cpu", progress=False)


def test_int4_decode_with_quantized_activations_is_about_as_accurate(folder):
    """The CPU decode GEMVs quantize x to int8 per block of 32 (kernels/cpu/q8.c). Teacher-forced decode
    logits of the int4 model (token by token through those GEMVs) vs the fp32 model: no more than 10%
    above the error of the same int4 weights with unquantized activations (a prefill, one wide call)."""
    from nekomata_core.kernels.cpu import gemv

    if not gemv.available():
        pytest.skip(gemv.unavailable_reason())
    fp32 = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    int4 = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False, quantize="int4")
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = fp32(ids)[0]
        for module in int4.modules():  # the reference: wide calls with unquantized x, whatever this CPU is
            if hasattr(module, "wide_gemv"):
                module.wide_gemv = False
        wide = int4(ids)[0]  # 40 rows: expanded weights, unquantized x
        cache = int4.allocate_cache(1, 48)
        step = [int4(ids[:, t : t + 1], cache=cache)[0, -1] for t in range(40)]  # one row: the C GEMVs
    decode_err = (torch.stack(step) - ref).abs().mean().item()
    wide_err = (wide - ref).abs().mean().item()
    assert 0 < wide_err and decode_err <= 1.1 * wide_err, (decode_err, wide_err)


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
        QwenForCausalLM.from_pretrained(folder, device="cpu", progress=False, quantize="int3")


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

    from nekomata_core import pretrained

    folder = checkpoint_factory("tiny", seed=13, vocab_size=256)
    real_load = pretrained.load_weights
    most = []

    def watching_load(model, *args, after_tensor=None, **kwargs):
        def watch(name):
            after_tensor(name)
            loaded_float = [m for m in model.modules() if type(m) is Linear and not m.weight.is_meta]
            most.append(len(loaded_float))

        return real_load(model, *args, after_tensor=watch, **kwargs)

    monkeypatch.setattr(pretrained, "load_weights", watching_load)
    model = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, quantize="int8")
    assert most and max(most) == 0  # each linear was converted as soon as it was complete
    assert not any(type(m) is Linear for m in model.modules())


# ---------------------------------------------------------------------------------------------- int4


def tile_codes(s: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Group scales s and mins m [N, G] (fp32) stored as the format documents, written out plainly: per
    tile of 8 rows and group g, unit = bf16(max scale / 255) and bf16(max |min| / 127), codes =
    round(value / unit) clamped to 0..255 and -127..127. Returns (scale codes, min codes, scale units,
    min units)."""
    n, groups = s.shape
    tiles = (n + 7) // 8
    scale_units = torch.zeros(tiles, groups, dtype=torch.bfloat16)
    min_units = torch.zeros(tiles, groups, dtype=torch.bfloat16)
    scales = torch.zeros(n, groups, dtype=torch.uint8)
    mins = torch.zeros(n, groups, dtype=torch.int8)
    for t in range(tiles):
        rows = slice(8 * t, min(8 * t + 8, n))
        for g in range(groups):
            su = (s[rows, g].max() / 255).to(torch.bfloat16)
            mu = (m[rows, g].abs().max() / 127).to(torch.bfloat16)
            scale_units[t, g], min_units[t, g] = su, mu
            if su > 0:
                scales[rows, g] = torch.round(s[rows, g] / su.float()).clamp(0, 255).to(torch.uint8)
            if mu > 0:
                mins[rows, g] = torch.round(m[rows, g] / mu.float()).clamp(-127, 127).to(torch.int8)
    return scales, mins, scale_units, min_units


def group_values(scales, mins, scale_units, min_units) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 scale and min [N, G] of every group: code times the unit of the row's tile (row // 8)."""
    tile = torch.arange(scales.shape[0]) // 8
    return scales.float() * scale_units.float()[tile], mins.float() * min_units.float()[tile]


def plain_int4(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same format by the most straightforward rule: per group of 32, scale = (max - min) / 15 and
    min = the group minimum, stored as `tile_codes` does, codes = round((w - min) / scale) against the
    stored values. Returns (codes [N, K] uint8, scales, mins, scale_units, min_units)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // 32, 32)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    stored = tile_codes((hi - lo) / 15, lo)
    s, m = group_values(*stored)
    safe = torch.where(s > 0, s, torch.ones_like(s))[..., None]
    codes = torch.where(s[..., None] > 0, torch.round((groups - m[..., None]) / safe), 0).clamp(0, 15)
    return (codes.reshape(n, k).to(torch.uint8), *stored)


def unpack_by_hand(packed: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] from bytes [N, K/2], one byte at a time, by the documented layout: byte j of each
    group's 16 holds code j (low nibble) and code j + 16 (high nibble)."""
    n, half = packed.shape
    codes = torch.empty(n, 2 * half, dtype=torch.uint8)
    for i in range(half):
        group, j = divmod(i, 16)
        codes[:, group * 32 + j] = packed[:, i] & 15
        codes[:, group * 32 + 16 + j] = packed[:, i] >> 4
    return codes


def pack_by_hand(codes: torch.Tensor) -> torch.Tensor:
    packed = codes.reshape(codes.shape[0], -1, 2, 16)
    return (packed[:, :, 0] | (packed[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def dequantize_by_hand(codes, scales, mins, scale_units, min_units):
    n, k = codes.shape
    s, m = group_values(scales, mins, scale_units, min_units)
    return (codes.float().reshape(n, k // 32, 32) * s[..., None] + m[..., None]).reshape(n, k)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_int4_layout_and_error_against_the_plain_rule(weight_dtype):
    assert INT4_GROUP_SIZE == 32 and INT4_TILE_ROWS == 8
    torch.manual_seed(0)
    w = (torch.randn(44, 256) * 0.02).to(weight_dtype)  # 5 whole tiles of 8 rows and one of 4
    w[3, :32] = 0.5  # a constant group: its min is the value, its scale 0
    packed, scales, mins, scale_units, min_units = quantize_int4_weight(w)
    assert packed.dtype == torch.uint8 and packed.shape == (44, 128)
    assert scales.dtype == torch.uint8 and mins.dtype == torch.int8 and scales.shape == mins.shape == (44, 8)
    assert scale_units.dtype == min_units.dtype == torch.bfloat16 and scale_units.shape == min_units.shape == (6, 8)
    codes = unpack_by_hand(packed)
    ours = dequantize_by_hand(codes, scales, mins, scale_units, min_units)
    layer = Int4Linear(256, 44, False, weight_dtype)
    for name, tensor in zip(layer.INT4_TENSORS, (packed, scales, mins, scale_units, min_units), strict=True):
        getattr(layer, name).data = tensor
    assert torch.equal(layer.dequantized_weight(), ours)  # the layer reads the layout as documented
    assert (ours[3, :32] - w[3, :32].float()).abs().max() <= 0.5 / 127 * 0.5 * 1.01  # the min's code step
    # each tile's units are set by its largest scale and |min|: the top codes are 255 and 127 (or, after
    # the unit's rounding to bf16, one less)
    s, m = group_values(scales, mins, scale_units, min_units)
    tile_of = torch.arange(44) // 8
    for t in range(6):
        assert scales[tile_of == t].amax(dim=0).min() >= 254
        assert mins[tile_of == t].abs().amax(dim=0).min() >= 126
    # each 4-bit code is the nearest one for the stored scale and min
    s3, m3 = s[..., None], m[..., None]
    scaled = (s3 > 0).expand(44, 8, 32)
    nearest = torch.round((w.float().reshape(44, 8, 32) - m3) / torch.where(s3 > 0, s3, 1)).clamp(0, 15)
    assert torch.equal(codes.float().reshape(44, 8, 32)[scaled], nearest[scaled])
    assert not codes.reshape(44, 8, 32)[~scaled].any()
    # the searched scales and mins beat the min/max rule in the same format
    plain = dequantize_by_hand(*plain_int4(w))
    ours_err, plain_err = (ours - w.float()).pow(2), (plain - w.float()).pow(2)
    assert ours_err.sum() < 0.9 * plain_err.sum()


def test_int4_units_belong_to_tiles_of_rows_only():
    """A tile's 8 rows share their units; other tiles' rows do not change them: the rows of a tile
    quantize alike wherever they sit (what makes tensor-parallel shards equal the whole layer's)."""
    torch.manual_seed(2)
    w = torch.randn(32, 128) * 0.02
    w[9] *= 50  # a loud row in the second tile
    whole = quantize_int4_weight(w)
    alone = quantize_int4_weight(w[16:24])  # the third tile on its own
    for full, part in zip(whole, alone, strict=True):
        rows = slice(2, 3) if full.shape[0] == 4 else slice(16, 24)  # units: tile rows; the rest: rows
        assert torch.equal(full[rows], part)
    # the loud row's tile has a unit 50 times the others' (its quiet rows lose precision, no other tile does)
    assert whole[3][1].float().mean() > 20 * whole[3][0].float().mean()


def test_int4_linear_is_exact_with_respect_to_its_dequantized_weight():
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 40, bias=True)
    for dtype in (torch.float32, torch.bfloat16):
        q = Int4Linear.from_linear(linear.to(dtype))
        x = torch.randn(3, 5, 96).to(dtype)
        expected = F.linear(x.float(), q.dequantized_weight(), q.bias.float()).to(dtype)
        out = q(x)
        assert out.shape == (3, 5, 40) and out.dtype == dtype
        if dtype == torch.float32:
            assert (out - expected).abs().max() <= 1e-6 * expected.abs().max()
        else:
            assert (out.float() - expected.float()).abs().max() <= 2 ** -8 * expected.float().abs().max()


def test_int4_c_attn_keeps_its_q_and_k_rows_in_int4_and_its_v_rows_in_int8():
    """Int4QkvLinear: the first two thirds of c_attn's rows (q, k) are exactly the Int4Linear of those rows
    alone, the last third (v) int8 per output channel as written out here, and the forward is the
    fused [q; k; v] projection of those dequantized weights."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 3 * 64, bias=True)
    q = Int4QkvLinear.from_linear(linear)
    w, b = linear.weight.detach(), linear.bias.detach()
    alone = Int4Linear.from_linear(torch.nn.Linear(64, 128, bias=True))
    alone.weight.data, alone.bias.data = w[:128].clone(), b[:128].clone()
    qk = Int4Linear.from_linear(alone)
    for name in Int4Linear.INT4_TENSORS + ("bias",):
        assert torch.equal(getattr(q.qk, name), getattr(qk, name)), name
    scale = w[128:].abs().amax(dim=1) / 127
    codes = torch.round(w[128:] / scale[:, None]).clamp(-127, 127)
    assert q.v.weight.dtype == torch.int8 and torch.equal(q.v.weight, codes.to(torch.int8))
    assert torch.equal(q.v.scales, scale) and torch.equal(q.v.bias, b[128:])
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, torch.cat((qk.dequantized_weight(), codes * scale[:, None])), b)
    out = q(x)
    assert out.shape == (3, 5, 192) and (out - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert torch.equal(q.dequantized_weight(), torch.cat((qk.dequantized_weight(), codes * scale[:, None])))


def test_int4_refuses_inputs_that_do_not_fill_groups():
    with pytest.raises(QuantizeError, match="multiple of 32"):
        quantize_int4_weight(torch.randn(4, 48))
    with pytest.raises(QuantizeError, match="int8"):
        Int4Linear(48, 4, False, torch.float32)


def test_int4_quantize_save_load_gives_the_same_logits(folder, tmp_path):
    model = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, quantize="int4")
    blocks = model.config.num_hidden_layers
    # 4 a block (c_attn's q and k rows, attn.c_proj, w1, w2, mlp.c_proj) + lm_head; c_attn's v rows int8
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 5 * blocks + 1
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(model.lm_head, Int4Linear) and isinstance(c_attn, Int4QkvLinear)
    assert isinstance(c_attn.qk, Int4Linear) and isinstance(c_attn.v, Int8Linear)
    saved = save_quantized(model, tmp_path / "int4", source_dir=folder)
    config = json.loads((saved / "config.json").read_text())
    info = config["quantization"]
    assert info["method"] == "int4_weight_only" and info["group_size"] == 32 and info["version"] == 3
    assert config["bf16"] and not config["fp32"]
    reloaded = QwenForCausalLM.from_pretrained(saved, device="cpu", progress=False)
    assert reloaded.dtype == torch.bfloat16 and reloaded.transformer.h[0].mlp.w1.weight.dtype == torch.uint8
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # quantizing while loading equals quantizing the loaded float model
    manual = quantize_int4(QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False))
    c = manual.state_dict()
    assert all(torch.equal(a[key], c[key]) for key in a)


def test_an_int4_folder_of_the_earlier_format_is_refused_by_name(folder, tmp_path):
    """Version 1 and 2 int4 folders (bf16 scales and mins per group; all of c_attn int8) hold tensors this
    version cannot read: refused before loading with what to do, not a shape error from deep in the
    loader."""
    from nekomata_core.config import ConfigError

    model = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, quantize="int4")
    saved = save_quantized(model, tmp_path / "int4", source_dir=folder)
    config = json.loads((saved / "config.json").read_text())
    for version in (None, 2):  # version 1 wrote none; version 2 kept all of c_attn int8
        if version is None:
            del config["quantization"]["version"]
        else:
            config["quantization"]["version"] = version
        (saved / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=rf"version={version or 1}.*quantize the float checkpoint again"):
            QwenForCausalLM.from_pretrained(saved, device="cpu", progress=False)


def test_int4_model_is_no_less_accurate_than_the_plain_rule(folder):
    """Logits of the int4 model vs the fp32 model, against the same model with every int4 layer
    quantized by `plain_int4` instead (c_attn's v rows int8 in both)."""
    fp32 = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    ours = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False, quantize="int4")
    plain = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False, quantize="int4")
    float_weights = dict(fp32.named_parameters())
    for name, module in plain.named_modules():
        if isinstance(module, Int4Linear):
            if name.endswith(".c_attn.qk"):  # the q and k rows of c_attn
                weight = float_weights[name.removesuffix(".qk") + ".weight"][: module.out_features]
            else:
                weight = float_weights[name + ".weight"]
            codes, *stored = plain_int4(weight.detach())
            for tensor_name, tensor in zip(module.INT4_TENSORS, (pack_by_hand(codes), *stored), strict=True):
                getattr(module, tensor_name).data = tensor
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = fp32(ids)
        ours_err = (ours(ids) - ref).abs().mean().item()
        plain_err = (plain(ids) - ref).abs().mean().item()
    print(f"mean |dlogit| vs fp32: ours {ours_err:.4f}, plain min/max rule {plain_err:.4f}")
    assert 0 < ours_err <= plain_err


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_quantized_calls_on_cpu_compute_the_reference_layers_function(method, dtype):
    """CpuInt8Linear / CpuInt4Linear multiply prefills (≥ 32 rows) in `prefill_dtype` after expanding the
    weight: the same function as the plain quantized layers, fp32 to 1e-5 relative, bf16 to bf16 noise."""
    from nekomata_core.kernels.cpu import gemv

    from nekomata_core.accelerate.modules import CpuInt4Linear, CpuInt8Linear
    from nekomata_core.quantize import Int4Linear, Int8Linear

    if not gemv.available():
        pytest.skip(gemv.unavailable_reason())
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True).to(dtype)
    reference = (Int8Linear if method == "int8" else Int4Linear).from_linear(linear)
    fast = (Int8Linear if method == "int8" else Int4Linear).from_linear(linear)
    fast.__class__ = CpuInt8Linear if method == "int8" else CpuInt4Linear
    fast.prefill_dtype = dtype
    x = torch.randn(2, 20, 256).to(dtype)  # 40 rows: the wide path
    with torch.no_grad():
        got, expected = fast(x).float(), reference(x).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_wide_calls_through_the_gemv_tiles_are_decode_rows(method):
    """With `wide_gemv`, a prefill's rows go through the C GEMVs (their register tiles where the build has
    them, more than gemv.MAX_ROWS rows in several calls): every output row bit-identical to a one-row call,
    i.e. to what decoding computes (x quantized per block of 32; that product's own reference is in
    tests/test_cpu_gemv.py), and int8 within 1e-5 of the float64 q8 reference (tests/q8_reference.py)."""
    from nekomata_core.kernels.cpu import gemv

    from nekomata_core.accelerate.modules import CpuInt4Linear, CpuInt8Linear
    from tests.q8_reference import dequantized_activation

    if not gemv.available():
        pytest.skip(gemv.unavailable_reason())
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 98, bias=True)  # 98 rows: whole tiles and a remainder
    fast = (Int8Linear if method == "int8" else Int4Linear).from_linear(linear)
    fast.__class__ = CpuInt8Linear if method == "int8" else CpuInt4Linear
    fast.wide_gemv = True
    x = torch.randn(3, gemv.MAX_ROWS // 2 + 7, 256)  # 3 * 135 = 405 rows: two calls
    with torch.no_grad():
        got = fast(x)
        rows = x.reshape(-1, 256)
        alone = torch.stack([fast(rows[i : i + 1])[0] for i in range(rows.shape[0])])
    assert got.shape == (3, x.shape[1], 98)
    assert torch.equal(got.reshape(-1, 98), alone)
    if method == "int8":
        q, s = fast.weight.double(), fast.scales.double()
        xq = torch.stack([dequantized_activation(r) for r in rows])
        ref = (xq @ q.T) * s + fast.bias.double()
        bound = (xq.abs() @ q.abs().T) * s + fast.bias.double().abs()
        assert torch.all((got.reshape(-1, 98).double() - ref).abs() <= 1e-5 * bound)


@pytest.mark.parametrize("native_half, tiles, expected", [(False, True, True), (True, True, False), (False, False, False)])
def test_accelerate_sends_quantized_prefills_to_the_gemv_tiles_only_where_they_win(
    folder, monkeypatch, native_half, tiles, expected
):
    """accelerate sets `wide_gemv` on the CPU quantized layers when the GEMVs have register tiles and the CPU
    has no bf16 arithmetic (there they beat the fp32 expansion); otherwise prefills keep the expansion."""
    from nekomata_core.kernels.cpu import gemv

    import nekomata_core.accelerate as acc

    if not gemv.available():
        pytest.skip(gemv.unavailable_reason())
    monkeypatch.setattr(acc, "cpu_has_native_half_matmul", lambda: native_half)
    monkeypatch.setattr(acc, "_cpu_batch_tiles_available", lambda: tiles)
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False, quantize="int4")
    flags = {m.wide_gemv for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))}
    assert flags == {expected}


def test_a_saved_int4_model_smaller_than_one_byte_per_parameter_loads(checkpoint_factory, tmp_path):
    """A wide MLP and a small vocabulary: most parameters are int4 (4.625 bits with scales and mins), so the
    files hold fewer bytes than the config has parameters, as a saved nekomata-7b int4 checkpoint does."""
    folder = checkpoint_factory("tiny", seed=4, vocab_size=64, hidden_size=128, num_attention_heads=4, kv_channels=32,
                                intermediate_size=4096, num_hidden_layers=2)  # fmt: skip
    model = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, quantize="int4")
    saved = save_quantized(model, tmp_path / "int4", source_dir=folder)
    file_bytes = sum(f.stat().st_size for f in saved.glob("*.safetensors"))
    assert file_bytes < model.config.num_parameters()
    reloaded = QwenForCausalLM.from_pretrained(saved, device="cpu", progress=False)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))


def test_quant_error_tool_reports_each_format(folder, capsys):
    """tools/quant_error.py: one line per format with its prefill and decode errors vs fp32 (no timing)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import quant_error
    finally:
        sys.path.pop(0)
    assert quant_error.main([str(folder), "--tokens", "6", "--formats", "int8,int4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: [float(v) for v in line.split()[2:]] for line in lines if line.startswith("nekomata_core")}
    assert set(rows) == {"int8", "int4"}
    assert all(len(v) == 2 and 0 < v[0] and 0 < v[1] for v in rows.values())
    assert rows["int8"][1] < rows["int4"][1]  # int8 perturbs less than int4
    with pytest.raises(SystemExit):
        quant_error.main([str(folder), "--formats", "int3"])


@pytest.mark.parametrize("bias", [False, True])
def test_wide_half_precision_calls_upcast_in_blocks_compute_fp32_rounded_once(bias, monkeypatch):
    """CpuLinear with `upcast_rows` (CPUs without bf16 arithmetic) multiplies wide bf16 calls in fp32, a block
    of weight rows at a time: the fp32 product of the bf16 values, rounded once to bf16. Reference: PyTorch's
    fp32 linear of the same values. fp32 sums in another order differ by ~1e-6 relative, which can move a
    result across a bf16 rounding boundary: one bf16 ulp (at most 2^-7 relative) then, and rarely."""
    from nekomata_core.accelerate import modules
    from nekomata_core.accelerate.modules import CpuLinear

    monkeypatch.setattr(modules, "_WORKSPACE_BYTES", 64 * 256 * 4)  # 64-row blocks: 4 whole blocks and a part
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 300, bias=bias).to(torch.bfloat16)
    x = torch.randn(3, 11, 256).to(torch.bfloat16)  # 33 rows
    b = None if linear.bias is None else linear.bias.float()
    expected = torch.nn.functional.linear(x.float(), linear.weight.float(), b)
    linear.__class__ = CpuLinear
    linear.upcast_rows = 8
    with torch.no_grad():
        got = linear(x)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 11, 300)
    off = (got.float() - expected.to(torch.bfloat16).float()).abs()
    assert torch.all(off <= 2**-7 * expected.abs()) and (off > 0).float().mean() < 0.01
