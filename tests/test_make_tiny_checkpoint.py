"""tools/make_tiny_checkpoint.py writes the Hugging Face layout of the real Qwen repos, readable by the
safetensors library and by transformers' Qwen2ForCausalLM (the independent references here)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nekomata_core.apps.checkpoint_builder import GENERATION_CONFIG, _split_evenly, make_checkpoint
from nekomata_core.config import QwenConfig
from tests.hf_reference import (
    qwen2_reference_from_checkpoint,
    qwen_to_qwen2_state_dict,
    read_checkpoint_state_dict,
)
from tools.make_tiny_checkpoint import main as script_main

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"vocab_size": 512}
DASHSCOPE_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
HAS_DASHSCOPE = importlib.util.find_spec("dashscope") is not None


def file_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_single_file_checkpoint_has_the_hugging_face_file_names(tmp_path):
    out = make_checkpoint(tmp_path / "c", overrides=OVERRIDES, tokenizer_file=_fake_tokenizer(tmp_path))
    assert out == tmp_path / "c"
    assert file_names(out) == {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "qwen.tiktoken",
        "model.safetensors",
    }
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharded_checkpoint_has_numbered_shards_and_an_index_with_the_right_total_size(tmp_path):
    out = make_checkpoint(tmp_path / "c", shards=3, dtype=torch.bfloat16, overrides=OVERRIDES)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(shards) <= file_names(out) and "model.safetensors" not in file_names(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    config = QwenConfig.from_json_file(out / "config.json")
    assert index["metadata"]["total_size"] == 2 * config.num_parameters()
    assert index["weight_map"].keys() == config.parameter_shapes().keys()
    total = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            keys = set(f.keys())
            assert f.metadata() == {"format": "pt"}
            total += sum(_nbytes(f, k) for k in keys)
        assert keys, f"{shard} is empty"
        assert keys == {k for k, v in index["weight_map"].items() if v == shard}
    assert total == index["metadata"]["total_size"]


def _nbytes(f, key: str) -> int:
    tensor = f.get_tensor(key)
    return tensor.numel() * tensor.element_size()


@pytest.mark.parametrize(("dtype", "flag", "header_dtype"), [
    (torch.float32, "fp32", "F32"), (torch.bfloat16, "bf16", "BF16"), (torch.float16, "fp16", "F16"),
])  # fmt: skip
def test_config_json_round_trips_and_sets_the_dtype_flag_of_the_stored_dtype(
    tmp_path, dtype, flag, header_dtype
):
    out = make_checkpoint(tmp_path / "c", "tiny", dtype=dtype, overrides={**OVERRIDES, "seq_length": 32})
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["QWenLMHeadModel"] and raw["model_type"] == "qwen"
    assert raw["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert raw["transformers_version"] and [k for k in ("bf16", "fp16", "fp32") if raw[k]] == [flag]
    config = QwenConfig.from_json_file(out / "config.json")
    expected = QwenConfig.from_preset("tiny", **OVERRIDES, seq_length=32, **{flag: True})
    assert config.parameter_shapes() == expected.parameter_shapes()
    for name in ("seq_length", "max_position_embeddings", "rotary_emb_base", "layer_norm_epsilon", flag):
        assert getattr(config, name) == getattr(expected, name), name
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {header_dtype}


def test_generation_config_is_qwen_7b_s(tmp_path):
    out = make_checkpoint(tmp_path / "c", overrides=OVERRIDES)
    assert json.loads((out / "generation_config.json").read_text()) == GENERATION_CONFIG
    assert GENERATION_CONFIG["eos_token_id"] == GENERATION_CONFIG["pad_token_id"] == 151643


@pytest.mark.skipif(not HAS_DASHSCOPE, reason="dashscope (which ships qwen.tiktoken) is not installed")
def test_tokenizer_is_copied_from_dashscope_by_default(tmp_path):
    out = make_checkpoint(tmp_path / "c", overrides=OVERRIDES)
    assert hashlib.sha256((out / "qwen.tiktoken").read_bytes()).hexdigest() == DASHSCOPE_TIKTOKEN_SHA256


def _fake_tokenizer(tmp_path: Path) -> Path:
    path = tmp_path / "my.tiktoken"
    path.write_text("IQ== 0\n")
    return path


def test_tokenizer_file_argument_is_copied_verbatim(tmp_path):
    source = _fake_tokenizer(tmp_path)
    out = make_checkpoint(tmp_path / "c", overrides=OVERRIDES, tokenizer_file=source)
    assert (out / "qwen.tiktoken").read_bytes() == source.read_bytes()


def test_weights_are_deterministic_per_seed_and_independent_of_sharding(tmp_path):
    single = load_file(make_checkpoint(tmp_path / "a", seed=1, overrides=OVERRIDES) / "model.safetensors")
    sharded = read_checkpoint_state_dict(
        make_checkpoint(tmp_path / "b", seed=1, shards=3, overrides=OVERRIDES)
    )
    other = load_file(make_checkpoint(tmp_path / "c", seed=2, overrides=OVERRIDES) / "model.safetensors")
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert not any(torch.equal(single[k], other[k]) for k in single)


def test_weights_are_shaped_so_that_bias_and_norm_weight_bugs_show(tmp_path):
    tensors = load_file(
        make_checkpoint(tmp_path / "c", overrides=OVERRIDES, init_std=0.05) / "model.safetensors"
    )
    config = QwenConfig.from_preset("tiny", **OVERRIDES)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == config.parameter_shapes()
    for name, tensor in tensors.items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert not torch.all(tensor == 1) and (tensor - 1).abs().max() < 0.5, name
        else:  # matrices and the c_attn bias: normal(0, init_std), clearly non-zero
            assert tensor.abs().max() > 0 and abs(tensor.std().item() - 0.05) < 0.02, name


def test_shards_split_roughly_evenly_by_bytes_and_are_never_empty():
    assert _split_evenly([(str(i), 10) for i in range(12)], 3) == [
        [str(i) for i in range(4)], [str(i) for i in range(4, 8)], [str(i) for i in range(8, 12)],
    ]  # fmt: skip
    assert _split_evenly([("a", 1000), ("b", 1), ("c", 1), ("d", 1000)], 3) == [["a"], ["b", "c"], ["d"]]
    assert _split_evenly([("a", 1), ("b", 1000)], 2) == [["a"], ["b"]]
    assert _split_evenly([("a", 1000), ("b", 1), ("c", 1)], 3) == [["a"], ["b"], ["c"]]


def test_impossible_shard_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="shards must be between 1 and 19"):
        make_checkpoint(tmp_path / "c", shards=20, overrides=OVERRIDES)


def test_existing_weights_are_not_overwritten_unless_asked(tmp_path):
    make_checkpoint(tmp_path / "c", overrides=OVERRIDES)
    with pytest.raises(FileExistsError, match="model.safetensors"):
        make_checkpoint(tmp_path / "c", shards=2, overrides=OVERRIDES)
    make_checkpoint(tmp_path / "c", shards=2, overrides=OVERRIDES, overwrite=True)
    # The stale single file is gone, or it would win over the new shards when loading.
    assert "model.safetensors" not in file_names(tmp_path / "c")


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    script = REPO / "tools" / "make_tiny_checkpoint.py"
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)


def test_script_mode_writes_the_same_checkpoint_as_the_function(tmp_path):
    args = [
        "--dtype",
        "bfloat16",
        "--shards",
        "2",
        "--seed",
        "3",
        "--set",
        "vocab_size=512",
        "--set",
        "seq_length=32",
    ]
    result = run_script(tmp_path / "script", *args)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    config = QwenConfig.from_json_file(tmp_path / "script" / "config.json")
    assert (config.vocab_size, config.seq_length, config.bf16) == (512, 32, True)
    direct = make_checkpoint(
        tmp_path / "direct",
        dtype=torch.bfloat16,
        shards=2,
        seed=3,
        overrides={"vocab_size": 512, "seq_length": 32},
    )
    a, b = read_checkpoint_state_dict(tmp_path / "script"), read_checkpoint_state_dict(direct)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_script_main_reports_bad_arguments_in_one_line(tmp_path, capsys):
    assert script_main([str(tmp_path / "x"), "--set", "vocab_size=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size" in err[0]


# ====================================================================== transformers can load it
def test_transformers_qwen2_loads_the_checkpoint_strictly_and_completely(tmp_path):
    folder = make_checkpoint(tmp_path / "c", shards=2, overrides=OVERRIDES)
    model = qwen2_reference_from_checkpoint(folder)
    config = QwenConfig.from_json_file(folder / "config.json")
    mapped = qwen_to_qwen2_state_dict(read_checkpoint_state_dict(folder), config)
    hf_state = model.state_dict()
    assert hf_state.keys() == mapped.keys()  # complete: every HF parameter comes from the checkpoint
    assert all(torch.equal(hf_state[k], mapped[k]) for k in mapped)
    assert model.config.intermediate_size == config.mlp_width
    # strict: a missing tensor is an error, not a silently random weight
    del mapped["model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(RuntimeError, match="k_proj.bias"):
        model.load_state_dict(mapped, strict=True)


def test_transformers_qwen2_reference_builds_in_bf16_with_fp32_rope(tmp_path):
    folder = make_checkpoint(tmp_path / "c", dtype=torch.bfloat16, overrides=OVERRIDES)
    model = qwen2_reference_from_checkpoint(folder, dtype=torch.bfloat16)
    reference = load_file(folder / "model.safetensors")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, reference["lm_head.weight"])
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
