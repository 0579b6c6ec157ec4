"""The weight loader: what it loads equals what the safetensors library reads, with no hidden copies,
and every way a checkpoint can be broken gives one CheckpointError that names the problem.

References: `safetensors.torch.load_file` (an independent reader of the same files), `Tensor.to`
for dtype conversion, and transformers' Qwen2ForCausalLM (tests/hf_reference.py) for the logits.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nekomata_core import QwenForCausalLM
from nekomata_core.config import QwenConfig
from nekomata_core.loader import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    checkpoint_weight_files,
    iter_safetensors,
    load_weights,
    read_safetensors_header,
    save_safetensors,
    verify_checkpoint,
)
from tools.make_tiny_checkpoint import make_checkpoint

OVERRIDES = {"vocab_size": 512}


# ====================================================================== fixtures and helpers
@pytest.fixture(scope="module")
def config() -> QwenConfig:
    return QwenConfig.from_preset("tiny", **OVERRIDES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One random model written four ways: fp32 in 1, 2 and 3 files, and bf16 in one file."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for name, dtype, shards in (
        ("fp32", torch.float32, 1),
        ("fp32-2", torch.float32, 2),
        ("fp32-3", torch.float32, 3),
        ("bf16", torch.bfloat16, 1),
    ):
        made[name] = make_checkpoint(root / name, "tiny", dtype=dtype, shards=shards, overrides=OVERRIDES)
    return made


def meta_model(config: QwenConfig) -> QwenForCausalLM:
    with torch.device("meta"):
        return QwenForCausalLM(config)


def loaded(
    folder: Path, config: QwenConfig, dtype=torch.float32, device="cpu", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    model = meta_model(config)
    load_weights(model, folder, dtype=dtype, device=device, progress=False, allow_pickle=allow_pickle)
    return dict(model.named_parameters())


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    """A safetensors file byte by byte, so that tests can make every kind of broken one."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def checkpoint_with(tmp_path: Path, config: QwenConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder holding config.json and exactly `tensors` in model.safetensors."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    save_safetensors(tensors, folder / "model.safetensors")
    return folder


def load_error(folder: Path, config: QwenConfig, allow_pickle: bool = False) -> str:
    with pytest.raises(CheckpointError) as info:
        load_weights(
            meta_model(config),
            folder,
            dtype=torch.float32,
            device="cpu",
            progress=False,
            allow_pickle=allow_pickle,
        )
    return str(info.value)


class OpRecorder(TorchDispatchMode):
    """Records every aten op that runs, with the dtypes of the tensors it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.ops.append((str(func), leaf.dtype))
        return out


COPY_OPS = ("_to_copy", "copy_", "clone", "_copy_from")


# ====================================================================== loading gives the file's tensors
def test_single_file_and_sharded_checkpoints_load_identical_tensors(checkpoints, config):
    reference = load_file(checkpoints["fp32"] / "model.safetensors")
    for name in ("fp32", "fp32-2", "fp32-3"):
        params = loaded(checkpoints[name], config)
        assert params.keys() == reference.keys() == config.parameter_shapes().keys()
        for key, tensor in reference.items():
            assert torch.equal(params[key], tensor), (name, key)


def test_sharded_checkpoint_really_has_the_requested_number_of_files(checkpoints):
    assert len(checkpoint_weight_files(checkpoints["fp32-2"])) == 2
    assert len(checkpoint_weight_files(checkpoints["fp32-3"])) == 3


def test_bf16_file_loaded_as_bf16_is_bit_identical_and_a_frozen_cpu_parameter(checkpoints, config):
    reference = load_file(checkpoints["bf16"] / "model.safetensors")
    model = meta_model(config)
    load_weights(model, checkpoints["bf16"], dtype=torch.bfloat16, device="cpu", progress=False)
    for key, param in model.named_parameters():
        assert isinstance(param, torch.nn.Parameter) and not param.requires_grad
        assert param.dtype == torch.bfloat16 and param.device.type == "cpu"
        assert torch.equal(param.view(torch.int16), reference[key].view(torch.int16)), key


def test_fp32_file_loaded_as_bf16_equals_tensor_to_bfloat16(checkpoints, config):
    reference = load_file(checkpoints["fp32"] / "model.safetensors")
    for key, param in loaded(checkpoints["fp32"], config, dtype=torch.bfloat16).items():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, reference[key].to(torch.bfloat16)), key


def test_bf16_file_loaded_as_fp16_and_fp32_equals_tensor_to(checkpoints, config):
    reference = load_file(checkpoints["bf16"] / "model.safetensors")
    for dtype in (torch.float16, torch.float32):
        for key, param in loaded(checkpoints["bf16"], config, dtype=dtype).items():
            assert param.dtype == dtype and torch.equal(param, reference[key].to(dtype)), key


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_may_be_a_string_or_a_torch_device(checkpoints, config, device):
    params = loaded(checkpoints["fp32-2"], config, device=device)
    assert all(p.device == torch.device("cpu") for p in params.values())


def test_progress_bars_do_not_change_the_result(checkpoints, config):
    model = meta_model(config)
    load_weights(model, checkpoints["fp32-2"], dtype=torch.float32, device="cpu", progress=True)
    reference = loaded(checkpoints["fp32-2"], config)
    assert all(torch.equal(p, reference[k]) for k, p in model.named_parameters())


def test_bf16_to_bf16_load_allocates_no_float32_tensor_and_copies_nothing(checkpoints, config):
    model = meta_model(config)
    with OpRecorder() as recorder:
        load_weights(model, checkpoints["bf16"], dtype=torch.bfloat16, device="cpu", progress=False)
    assert recorder.ops, "the recorder saw no ops at all: it would not catch a detour"
    assert [op for op in recorder.ops if op[1] == torch.float32] == []
    assert [op for op in recorder.ops if any(name in op[0] for name in COPY_OPS)] == []
    # Exactly one allocation per parameter: the final tensor, read into in place.
    allocations = [op for op in recorder.ops if "empty" in op[0]]
    assert len(allocations) == len(config.parameter_shapes())


def test_op_recorder_does_see_a_conversion_so_the_no_detour_test_can_fail(checkpoints, config):
    model = meta_model(config)
    with OpRecorder() as recorder:
        load_weights(model, checkpoints["fp32"], dtype=torch.bfloat16, device="cpu", progress=False)
    assert any(dtype == torch.float32 for _, dtype in recorder.ops)
    assert any("_to_copy" in op for op, _ in recorder.ops)


def test_loaded_model_logits_match_transformers_qwen2(checkpoints):
    from tests.hf_reference import qwen2_reference_from_checkpoint

    folder = checkpoints["fp32-3"]
    ours = QwenForCausalLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    reference = qwen2_reference_from_checkpoint(folder)
    ids = torch.randint(0, OVERRIDES["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        actual = ours(ids)
    actual = actual if isinstance(actual, torch.Tensor) else actual.logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


# ====================================================================== the safetensors reader
ALL_DTYPES = list(SAFETENSORS_DTYPES.values())


def sample_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def test_iter_safetensors_reads_every_dtype_and_scalar_and_empty_tensors(tmp_path):
    tensors = {f"t.{dtype}".replace("torch.", ""): sample_tensor((3, 5), dtype) for dtype in ALL_DTYPES}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["empty_bf16"] = torch.zeros(2, 0, dtype=torch.bfloat16)
    path = tmp_path / "all.safetensors"
    save_safetensors(tensors, path)
    got = dict(iter_safetensors(path))
    reference = load_file(path)
    assert got.keys() == tensors.keys()
    for key, tensor in reference.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def test_read_safetensors_header_returns_the_json_header_with_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, path)
    header = read_safetensors_header(path)
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"]["dtype"] == "F32" and header["a"]["shape"] == [2, 3]
    assert header["b"]["dtype"] == "BF16" and header["b"]["shape"] == [4]
    assert sorted(header["a"]["data_offsets"] + header["b"]["data_offsets"]) == [0, 24, 24, 32]


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="abcdefgh._", min_size=1, max_size=8),
        st.tuples(st.lists(st.integers(0, 4), max_size=3), st.sampled_from(ALL_DTYPES)),
        min_size=1,
        max_size=5,
    )
)
def test_iter_safetensors_agrees_with_the_safetensors_library_on_random_files(tmp_path_factory, spec):
    path = tmp_path_factory.mktemp("random") / "r.safetensors"
    tensors = {
        name: sample_tensor(tuple(shape), dtype, i) for i, (name, (shape, dtype)) in enumerate(spec.items())
    }
    save_safetensors(tensors, path)
    got = dict(iter_safetensors(path))
    for key, tensor in load_file(path).items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_every_truncation_of_a_safetensors_file_is_a_checkpoint_error_naming_the_file(tmp_path):
    path = tmp_path / "whole.safetensors"
    save_safetensors({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for length in range(len(data)):
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match="cut.safetensors"):
            read_safetensors_header(cut)


# ====================================================================== every loader error, named
def test_missing_unexpected_and_mismatched_tensors_are_reported_together_before_loading(
    checkpoints, config, tmp_path
):
    tensors = load_file(checkpoints["fp32"] / "model.safetensors")
    del tensors["transformer.h.1.mlp.w1.weight"]
    tensors["transformer.h.0.attn.bogus.weight"] = torch.zeros(2, 2)
    tensors["transformer.ln_f.weight"] = torch.ones(config.hidden_size + 1)
    tensors["transformer.rotary_emb.inv_freq"] = torch.ones(8)  # a known harmless buffer: ignored
    folder = checkpoint_with(tmp_path, config, tensors)
    model = meta_model(config)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, folder, dtype=torch.float32, device="cpu", progress=False)
    message = str(info.value)
    assert "missing 1 tensor(s): transformer.h.1.mlp.w1.weight" in message
    assert "unexpected 1 tensor(s): transformer.h.0.attn.bogus.weight" in message
    assert f"transformer.ln_f.weight: file has shape [{config.hidden_size + 1}]" in message
    assert "inv_freq" not in message
    assert all(p.is_meta for p in model.parameters()), "no weight may be loaded before the check passes"


def test_inv_freq_buffers_are_ignored_but_nothing_else(checkpoints, config, tmp_path):
    tensors = load_file(checkpoints["fp32"] / "model.safetensors")
    tensors["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(8)
    folder = checkpoint_with(tmp_path, config, tensors)
    params = loaded(folder, config)
    assert torch.equal(params["lm_head.weight"], tensors["lm_head.weight"])
    tensors["transformer.h.0.attn.inv_freq_scale"] = torch.ones(8)
    save_safetensors(tensors, folder / "model.safetensors")
    assert "unexpected 1 tensor(s): transformer.h.0.attn.inv_freq_scale" in load_error(folder, config)


def test_integer_tensor_for_a_float_parameter_is_a_mismatch(checkpoints, config, tmp_path):
    tensors = load_file(checkpoints["fp32"] / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.int8)
    message = load_error(checkpoint_with(tmp_path, config, tensors), config)
    assert "lm_head.weight: file has dtype I8" in message and "quantized" in message


def test_truncated_file_is_named_as_truncated(checkpoints, config, tmp_path):
    folder = copy_checkpoint(checkpoints["fp32-2"], tmp_path / "c")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    message = load_error(folder, config)
    assert "model-00002-of-00002.safetensors" in message and "truncated" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\xff" * 64, "header length"),
        (struct.pack("<Q", 9) + b"{not json", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
    ],
    ids=["garbage", "bad-json", "json-array"],
)
def test_corrupt_headers_are_named(tmp_path, config, content, expected):
    folder = checkpoint_with(tmp_path, config, {"x": torch.zeros(1)})
    (folder / "model.safetensors").write_bytes(content)
    message = load_error(folder, config)
    assert expected in message and "model.safetensors" in message and "corrupt" in message


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        ({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 40, "past the end"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12, "which is 8 bytes"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 20, "unexpected bytes"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, b"\0" * 8, "data_offsets"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": 1}', b"\0" * 4, "twice"),
    ],
    ids=["out-of-bounds", "size-mismatch", "overlap", "hole", "trailing", "bad-shape", "bad-offsets", "dup"],
)
def test_inconsistent_headers_are_named(tmp_path, header, data, expected):
    path = tmp_path / "bad.safetensors"
    write_raw_safetensors(path, header, data)
    with pytest.raises(CheckpointError, match="bad.safetensors") as info:
        read_safetensors_header(path)
    assert expected in str(info.value)


def test_unknown_dtype_is_named_with_the_supported_list(tmp_path, config):
    folder = checkpoint_with(tmp_path, config, {"x": torch.zeros(1)})
    write_raw_safetensors(
        folder / "model.safetensors", {"x": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
    )
    message = load_error(folder, config)
    assert "'X9'" in message and "BF16" in message and "supported" in message


def test_missing_shard_is_named(checkpoints, config, tmp_path):
    folder = copy_checkpoint(checkpoints["fp32-3"], tmp_path / "c")
    (folder / "model-00002-of-00003.safetensors").unlink()
    message = load_error(folder, config)
    assert "model-00002-of-00003.safetensors" in message and "incomplete" in message


@pytest.mark.parametrize(
    ("index_text", "expected"),
    [
        ("{", "not valid JSON"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": {"lm_head.weight": "../outside.safetensors"}}', "outside the checkpoint folder"),
        ('{"weight_map": {"lm_head.weight": "/etc/passwd"}}', "outside the checkpoint folder"),
        ('{"weight_map": {"lm_head.weight": "pytorch_model.bin"}}', "*.safetensors"),
    ],
    ids=["bad-json", "no-weight-map", "dot-dot", "absolute", "wrong-suffix"],
)
def test_bad_index_is_named(checkpoints, config, tmp_path, index_text, expected):
    folder = copy_checkpoint(checkpoints["fp32-2"], tmp_path / "c")
    (folder / "model.safetensors.index.json").write_text(index_text)
    message = load_error(folder, config)
    assert expected in message and "model.safetensors.index.json" in message


def test_index_that_misplaces_tensors_is_named(checkpoints, config, tmp_path):
    folder = copy_checkpoint(checkpoints["fp32-2"], tmp_path / "c")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    message = load_error(folder, config)
    assert "does not match its shards" in message and "lm_head.weight" in message


def test_tensor_stored_in_two_shards_is_named(checkpoints, config, tmp_path):
    folder = copy_checkpoint(checkpoints["fp32-2"], tmp_path / "c")
    first = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(first)
    tensors["lm_head.weight"] = torch.zeros(config.vocab_size, config.hidden_size)
    save_safetensors(tensors, first)
    assert "'lm_head.weight' is stored twice" in load_error(folder, config)


def test_folder_without_weights_lists_what_it_holds(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "qwen.tiktoken").write_text("")
    message = load_error(tmp_path, config)
    assert "no model weights" in message and "config.json" in message and "qwen.tiktoken" in message


def test_safetensors_file_with_a_nonstandard_name_is_named(tmp_path, config):
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "consolidated.safetensors")
    message = load_error(tmp_path, config)
    assert "consolidated.safetensors" in message and "model.safetensors" in message


def test_only_pytorch_bin_loads_with_allow_pickle_through_weights_only_with_a_notice(
    checkpoints, config, tmp_path, caplog
):
    reference = load_file(checkpoints["fp32"] / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    torch.save(reference, tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="nekomata_core.loader"):
        params = loaded(tmp_path, config, dtype=torch.bfloat16, allow_pickle=True)
    assert "pytorch_model" in caplog.text and "weights_only" in caplog.text
    for key, tensor in reference.items():
        assert torch.equal(params[key], tensor.to(torch.bfloat16)), key


def test_sharded_pytorch_bin_with_index_loads(checkpoints, config, tmp_path):
    reference = load_file(checkpoints["fp32"] / "model.safetensors")
    keys = list(reference)
    halves = {"pytorch_model-00001-of-00002.bin": keys[:5], "pytorch_model-00002-of-00002.bin": keys[5:]}
    for filename, names in halves.items():
        torch.save({k: reference[k] for k in names}, tmp_path / filename)
    weight_map = {k: filename for filename, names in halves.items() for k in names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = loaded(tmp_path, config, allow_pickle=True)
    assert all(torch.equal(params[k], reference[k]) for k in keys)


class _Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pytorch_bin_with_an_arbitrary_pickled_object_is_refused_not_executed(config, tmp_path):
    marker = tmp_path / "code_ran"
    torch.save(
        {"lm_head.weight": torch.zeros(2), "payload": _Payload(marker)}, tmp_path / "pytorch_model.bin"
    )
    message = load_error(tmp_path, config, allow_pickle=True)
    assert "pickled Python objects" in message and "pytorch_model.bin" in message and "refusing" in message
    assert not marker.exists()


def test_non_floating_dtype_argument_is_rejected(checkpoints, config):
    with pytest.raises(ValueError, match="floating-point"):
        load_weights(meta_model(config), checkpoints["fp32"], dtype=torch.int8, device="cpu")


# ====================================================================== verify_checkpoint
def test_verify_checkpoint_reports_counts_and_sizes_of_a_good_checkpoint(checkpoints, config):
    report = verify_checkpoint(checkpoints["fp32-3"], config)
    assert report.ok, report
    assert [name for name, _ in report.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(size == (checkpoints["fp32-3"] / name).stat().st_size for name, size in report.files)
    assert report.dtypes == ["F32"]
    assert report.num_tensors == len(config.parameter_shapes())
    assert report.num_parameters == config.num_parameters()
    assert report.total_bytes == 4 * config.num_parameters()
    assert report.to_dict()["ok"] is True


def test_verify_checkpoint_never_raises_and_names_the_problem(checkpoints, config, tmp_path):
    folder = copy_checkpoint(checkpoints["fp32-2"], tmp_path / "c")
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    report = verify_checkpoint(folder, config)
    assert not report.ok
    assert any("model-00001-of-00002.safetensors" in p and "truncated" in p for p in report.problems)
    empty = verify_checkpoint(tmp_path / "c" / "..", config)
    assert not empty.ok and "no model weights" in empty.problems[0]


def test_verify_checkpoint_reports_a_config_that_does_not_fit_naming_the_key(checkpoints):
    other = QwenConfig.from_preset("tiny", vocab_size=1024)
    report = verify_checkpoint(checkpoints["bf16"], other)
    assert not report.ok and not report.missing and not report.mismatched
    assert "config key 'vocab_size' is 1,024" in report.problems[0]
    assert "transformer.wte.weight" in report.problems[0] and "vocab_size 512" in report.problems[0]
