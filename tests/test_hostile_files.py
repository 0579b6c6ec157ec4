"""Hostile checkpoint files and configs: each class of bad input is one NekomataError naming the file,
the key and the problem, raised before anything large is read or built.

Every JSON file the library reads goes through nekomata_core.safe_files, so the JSON classes (size,
nesting, UTF-8) are run over every kind of file: config.json, generation_config.json, the shard index
and the safetensors header.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nekomata_core import QwenForCausalLM
from nekomata_core.apps.cli import main
from nekomata_core.config import ConfigError, QwenConfig
from nekomata_core.errors import NekomataError
from nekomata_core.hub import download_command, hub_cli_name, login_command
from nekomata_core.loader import (
    INDEX_FILE,
    MAX_HEADER_BYTES,
    CheckpointError,
    check_checkpoint,
    checkpoint_weight_files,
    convert_bin_checkpoint,
    read_safetensors_header,
    save_safetensors,
    verify_checkpoint,
)
from nekomata_core.safe_files import INDEX_JSON_MAX_BYTES, MAX_JSON_DEPTH, SMALL_JSON_MAX_BYTES
from nekomata_core.sampling import load_generation_config
from tools.make_tiny_checkpoint import make_checkpoint

OVERRIDES = {"vocab_size": 512, "seq_length": 32}
SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("hostile") / "sharded", "tiny", shards=2, overrides=OVERRIDES
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hostile") / "single", "tiny", overrides=OVERRIDES)


@pytest.fixture
def copy(tmp_path) -> Callable[[Path], Path]:
    def make(src: Path, name: str = "ckpt") -> Path:
        return Path(shutil.copytree(src, tmp_path / name))

    return make


def load(folder: Path, **kwargs) -> QwenForCausalLM:
    return QwenForCausalLM.from_pretrained(folder, device="cpu", progress=False, **kwargs)


# ====================================================================== every JSON file the library reads
def _write_header(folder: Path, body: bytes, header_len: int | None = None) -> None:
    raw = struct.pack("<Q", len(body) if header_len is None else header_len) + body
    (folder / SHARD_1).write_bytes(raw)


# kind → (the file, how to write content into it, the call that reads it)
JSON_KINDS = {
    "config.json": (
        "config.json",
        lambda folder, body: (folder / "config.json").write_bytes(body),
        lambda folder: QwenConfig.from_json_file(folder / "config.json"),
    ),
    "generation_config.json": (
        "generation_config.json",
        lambda folder, body: (folder / "generation_config.json").write_bytes(body),
        lambda folder: load_generation_config(folder / "generation_config.json"),
    ),
    "index": (
        INDEX_FILE,
        lambda folder, body: (folder / INDEX_FILE).write_bytes(body),
        lambda folder: checkpoint_weight_files(folder),
    ),
    "safetensors-header": (
        SHARD_1,
        _write_header,
        lambda folder: check_checkpoint(folder, QwenConfig.from_json_file(folder / "config.json")),
    ),
}


def _sparse(path: Path, size: int) -> None:
    """A file of `size` bytes that takes no disk space: proof enough that it is never read whole."""
    with open(path, "wb") as f:
        f.write(b"{")
        f.truncate(size)


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_every_json_file_above_its_size_bound_is_refused_before_it_is_read(sharded, copy, kind):
    folder = copy(sharded)
    name, write, read = JSON_KINDS[kind]
    if kind == "safetensors-header":
        _write_header(folder, b"{}", header_len=MAX_HEADER_BYTES + 1)
        expected = f"{MAX_HEADER_BYTES:,}"
    else:
        bound = INDEX_JSON_MAX_BYTES if kind == "index" else SMALL_JSON_MAX_BYTES
        _sparse(folder / name, bound + 1)
        expected = f"more than the {bound:,} bytes"
    with pytest.raises(NekomataError, match=name) as info:
        read(folder)
    assert expected in str(info.value)


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_deeply_nested_json_is_one_error_naming_the_file(sharded, copy, kind):
    folder = copy(sharded)
    name, write, read = JSON_KINDS[kind]
    for depth in (MAX_JSON_DEPTH + 5, 100_000):  # past our bound, and past Python's recursion limit
        write(folder, b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
        with pytest.raises(NekomataError, match=name) as info:
            read(folder)
        assert f"nested more than {MAX_JSON_DEPTH} levels" in str(info.value)


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_invalid_utf8_is_one_error_naming_the_file_and_the_offset(sharded, copy, kind):
    folder = copy(sharded)
    name, write, read = JSON_KINDS[kind]
    write(folder, b'{"weight_map": "\xff"}')
    offset = 16 + (8 if kind == "safetensors-header" else 0)
    with pytest.raises(NekomataError, match=name) as info:
        read(folder)
    assert f"not valid UTF-8 (invalid byte at file offset {offset})" in str(info.value)


@pytest.mark.parametrize("kind", JSON_KINDS)
def test_json_that_is_not_an_object_is_one_error_naming_the_file(sharded, copy, kind):
    folder = copy(sharded)
    name, write, read = JSON_KINDS[kind]
    write(folder, b"[1, 2]")
    with pytest.raises(NekomataError, match=name) as info:
        read(folder)
    assert "JSON array, not an object" in str(info.value)


# ====================================================================== generation_config.json key types
@pytest.mark.parametrize(
    ("content", "key"),
    [
        ({"stop_strings": 3}, "stop_strings"),
        ({"stop_strings": ["ok", 1]}, "stop_strings"),
        ({"eos_token_id": "151643"}, "eos_token_id"),
        ({"eos_token_id": [151643, None]}, "eos_token_id"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"top_k": 1.5}, "top_k"),
        ({"temperature": [1]}, "temperature"),
        ({"chat_format": {"name": "raw"}}, "chat_format"),
        ({"top_p": 7.0}, "top_p"),  # the right type, a value SamplingParams refuses
    ],
)
def test_generation_config_key_of_the_wrong_type_names_the_file_and_the_key(tmp_path, content, key):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match="generation_config.json") as info:
        load_generation_config(path)
    assert repr(key) in str(info.value) or key in str(info.value)


# ====================================================================== config.json values
@pytest.mark.parametrize(
    ("text", "key", "spelled"),
    [
        ("Infinity", "layer_norm_epsilon", "Infinity"),
        ("NaN", "rotary_emb_base", "NaN"),
        ("1e999", "rotary_emb_base", "Infinity"),
        ("-Infinity", "initializer_range", "-Infinity"),
        ('{"factor": [1, NaN]}', "rope_scaling", "NaN"),
    ],
)
def test_non_finite_number_anywhere_in_config_json_is_refused_naming_the_key(
    sharded, copy, text, key, spelled
):
    folder = copy(sharded)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, key: "@@"}).replace('"@@"', text))
    where = "rope_scaling.factor[1]" if key == "rope_scaling" else key
    with pytest.raises(ConfigError, match="config.json") as info:
        QwenConfig.from_json_file(folder / "config.json")
    assert f"key {where!r} is {spelled}" in str(info.value) and "finite" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_flash_attn", {"on": 1}),
        ("layer_norm_epsilon", "1e-6"),
        ("use_logn_attn", 1),
        ("kv_channels", [16]),
    ],
)
def test_config_key_of_the_wrong_type_is_refused_naming_the_file_and_the_key(sharded, copy, key, value):
    folder = copy(sharded)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, key: value}))
    with pytest.raises(ConfigError, match=f"config.json.*config key {key!r} must be"):
        QwenConfig.from_json_file(folder / "config.json")


def _build_forbidden(*args, **kwargs):
    raise AssertionError("the model or its per-layer table was built before the config was checked")


@pytest.mark.parametrize(
    ("changes", "key", "held"),
    [
        ({"num_hidden_layers": 1_000_000_000}, "num_hidden_layers", "hold 2 layer(s)"),
        ({"num_hidden_layers": 1}, "num_hidden_layers", "hold 2 layer(s)"),
        ({"vocab_size": 10**12}, "vocab_size", "vocab_size 512"),
        ({"hidden_size": 128, "kv_channels": 32}, "hidden_size", "hidden_size 64"),
        ({"intermediate_size": 512}, "intermediate_size", "intermediate_size 256"),
    ],
    ids=["billion-layers", "fewer-layers", "huge-vocab", "hidden", "intermediate"],
)
def test_config_disagreeing_with_the_tensors_fails_before_anything_is_built(
    sharded, copy, monkeypatch, changes, key, held
):
    folder = copy(sharded)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **changes}))
    monkeypatch.setattr(QwenForCausalLM, "__init__", _build_forbidden)
    monkeypatch.setattr(QwenConfig, "parameter_shapes", _build_forbidden)
    with pytest.raises(ConfigError, match=f"config key '{key}'") as info:
        load(folder)
    assert held in str(info.value) and "config.json" in str(info.value)
    # inspect: the same check first, one problem naming the key (nothing per layer is built or listed)
    report = verify_checkpoint(folder, QwenConfig.from_json_file(folder / "config.json"))
    assert not report.ok and any(f"config key '{key}'" in p for p in report.problems)
    assert not report.missing and not report.mismatched


def test_inspect_of_a_config_with_a_billion_layers_exits_1_naming_the_key(sharded, copy, capsys):
    folder = copy(sharded)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 10**9}))
    assert main(["inspect", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "config key 'num_hidden_layers' is 1,000,000,000" in captured.out
    assert "missing" not in captured.out and len(captured.err.strip().splitlines()) == 1


# ====================================================================== safetensors header field types
@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "dtype"),
        ({"dtype": 32, "shape": [1], "data_offsets": [0, 4]}, "dtype"),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": {"begin": 0}}, "data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1]}, "data_offsets"),
    ],
)
def test_header_field_of_the_wrong_type_names_file_tensor_and_field(tmp_path, entry, field):
    path = tmp_path / "bad.safetensors"
    body = json.dumps({"lm_head.weight": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    with pytest.raises(CheckpointError, match="bad.safetensors") as info:
        read_safetensors_header(path)
    assert "'lm_head.weight'" in str(info.value) and f"field '{field}'" in str(info.value)


def test_header_entry_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    body = json.dumps({"lm_head.weight": ["F32", [1], [0, 4]]}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    with pytest.raises(CheckpointError, match="'lm_head.weight' is a JSON list, not an object"):
        read_safetensors_header(path)


# ====================================================================== symlinks
@pytest.mark.parametrize("name", [SHARD_2, INDEX_FILE, "config.json", "generation_config.json"])
def test_symlink_out_of_the_checkpoint_folder_is_refused(sharded, copy, tmp_path, name):
    folder = copy(sharded)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)
    with pytest.raises(NekomataError, match="outside the checkpoint folder") as info:
        if name == "generation_config.json":  # read by generate/chat/the compat shim, not the loader
            load_generation_config(folder / name)
        else:
            load(folder)
    assert name in str(info.value) and "refusing" in str(info.value)


def test_symlink_to_a_text_file_does_not_print_its_bytes(sharded, copy, tmp_path, capsys):
    folder = copy(sharded)
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2-password-do-not-print\n")
    (folder / SHARD_1).unlink()
    (folder / SHARD_1).symlink_to(secret)
    assert main(["inspect", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "outside the checkpoint folder" in captured.out
    printed = captured.out + captured.err
    assert "hunter2" not in printed
    assert str(int.from_bytes(secret.read_bytes()[:8], "little")) not in printed  # not as a "length" either
    # a text file inside the folder: named as not safetensors, its bytes not printed as a number
    (folder / SHARD_1).unlink()
    shutil.copy(secret, folder / SHARD_1)
    assert main(["inspect", str(folder)]) == 1
    printed = "".join(capsys.readouterr())
    assert "not a safetensors file" in printed
    assert str(int.from_bytes(secret.read_bytes()[:8], "little")) not in printed


def _hf_cache_layout(src: Path, root: Path, repo: str) -> Path:
    """src laid out as the Hugging Face cache does: snapshots/<rev>/<file> → ../../blobs/<hash>."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot = repo_dir / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(src.iterdir())):
        shutil.copy(path, repo_dir / "blobs" / f"blob{i:04d}")
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i:04d}")
    return snapshot


def test_hugging_face_cache_layout_links_into_its_own_blobs_are_followed(sharded, tmp_path):
    snapshot = _hf_cache_layout(sharded, tmp_path / "hub", "owner/name")
    model = load(snapshot)
    reference = load_file(sharded / SHARD_2)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in reference.items())
    assert verify_checkpoint(snapshot, model.config, check_values=True).ok
    # ...but a link into the blobs of another repo is refused
    other = _hf_cache_layout(sharded, tmp_path / "hub", "owner/other")
    (snapshot / SHARD_2).unlink()
    (snapshot / SHARD_2).symlink_to(other / SHARD_2)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load(snapshot)


# ====================================================================== no pickle
def test_pytorch_bin_is_refused_without_allow_pickle_and_loads_with_it_or_after_conversion(sharded, tmp_path):
    tensors = {**load_file(sharded / SHARD_1), **load_file(sharded / SHARD_2)}
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(sharded / "config.json", folder / "config.json")
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled PyTorch weights") as info:
        load(folder)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "allow_pickle=True" in message
    assert "convert_bin_checkpoint" in message  # the conversion command
    with_pickle = dict(load(folder, allow_pickle=True).named_parameters())
    assert all(torch.equal(with_pickle[k], v) for k, v in tensors.items())
    # the command from the message, run as written, converts it; then it loads without allow_pickle
    command = message.split("python -c ")[1].split(" (writes")[0]
    subprocess.run(f"{sys.executable} -c {command}", shell=True, check=True, timeout=120)
    converted = dict(load(folder).named_parameters())
    assert all(torch.equal(converted[k], v) for k, v in tensors.items())


def test_sharded_pytorch_bin_converts_to_shards_and_an_index(sharded, tmp_path):
    folder = tmp_path / "bin2"
    folder.mkdir()
    shutil.copy(sharded / "config.json", folder / "config.json")
    weight_map = {}
    for i, shard in enumerate((SHARD_1, SHARD_2), start=1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        part = load_file(sharded / shard)
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    written = convert_bin_checkpoint(folder)
    assert sorted(p.name for p in written) == sorted([INDEX_FILE, SHARD_1, SHARD_2])
    assert verify_checkpoint(folder, QwenConfig.from_json_file(folder / "config.json")).ok


# ====================================================================== inspect: NaN/inf and broken files
def test_inspect_reports_non_finite_tensors_by_name(single, copy, capsys):
    folder = copy(single)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.1.mlp.w2.weight"][3, 5] = float("nan")
    tensors["lm_head.weight"][0, :2] = float("-inf")
    save_safetensors(tensors, folder / "model.safetensors")
    assert main(["inspect", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "non-finite: transformer.h.1.mlp.w2.weight: 1 NaN, 0 inf" in captured.out
    assert "non-finite: lm_head.weight: 0 NaN, 2 inf" in captured.out
    assert len(captured.err.splitlines()) == 1 and "lm_head.weight: 0 NaN, 2 inf" in captured.err
    assert main(["inspect", str(folder), "--headers-only"]) == 0  # headers alone cannot see it
    assert "values not read" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["[1, 2]", '{"a":' * 100 + "1" + "}" * 100, '{"stop_strings": 3}'])
def test_inspect_reports_a_generation_config_that_generate_would_refuse(single, copy, capsys, content):
    folder = copy(single)
    (folder / "generation_config.json").write_text(content)
    assert main(["inspect", str(folder), "--headers-only"]) == 1  # was: "OK", then generate refused it
    captured = capsys.readouterr()
    assert "problem: " in captured.out and "generation_config.json" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_inspect_of_a_truncated_file_names_it_once_and_lists_no_tensor_as_missing(
    single, sharded, copy, capsys, which
):
    folder = copy(single if which == "single" else sharded)
    name = "model.safetensors" if which == "single" else SHARD_2
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    assert main(["inspect", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "missing:" not in out and "does not match its shards" not in out
    problems = [line for line in out.splitlines() if line.startswith("  problem:")]
    assert sum("truncated" in line and name in line for line in problems) == 1
    unreadable = [line for line in problems if "unreadable" in line]
    assert len(unreadable) == 1 and f"because '{name}' is broken" in unreadable[0]


# ====================================================================== Hub messages
def test_hub_messages_name_the_cli_of_the_installed_huggingface_hub(monkeypatch, tmp_path):
    import huggingface_hub

    assert hub_cli_name() == "hf"  # huggingface_hub ≥ 0.34 (installed: a current one)
    assert download_command("rinna/nekomata-7b") == "hf download rinna/nekomata-7b"
    assert login_command() == "hf auth login"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="`hf download REPO"):
        checkpoint_weight_files(tmp_path)
    monkeypatch.setattr(huggingface_hub, "__version__", "0.20.3")
    assert download_command("a/b") == "huggingface-cli download a/b"
    assert login_command() == "huggingface-cli login"


@pytest.mark.parametrize("value", ["1", "yes", "TRUE"])
def test_offline_mode_is_named_instead_of_an_unreachable_hub(tmp_path, value):
    env = {**os.environ, "HF_HUB_OFFLINE": value, "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "nekomata_core", "inspect", "nobody-here/no-such-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "offline mode is on" in result.stderr and f"HF_HUB_OFFLINE={value!r}" in result.stderr
    assert "Could not reach" not in result.stderr and "hf download nobody-here/no-such-model" in result.stderr


# ====================================================================== the tokenizer's vocabulary file
def test_tokenizer_vocab_symlink_out_of_the_folder_is_refused(tmp_path):
    from nekomata_core.tokenizer import QwenTokenizer, VocabFileError

    folder, outside = tmp_path / "ckpt", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (outside / "qwen.tiktoken").write_bytes(b"not a vocabulary\n")
    (folder / "qwen.tiktoken").symlink_to(outside / "qwen.tiktoken")
    with pytest.raises(VocabFileError, match="outside the checkpoint folder.*refusing"):
        QwenTokenizer.from_pretrained(folder)


def test_tokenizer_vocab_file_far_too_large_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from nekomata_core import tokenizer

    monkeypatch.setattr(tokenizer, "MAX_VOCAB_FILE_BYTES", 1000)
    (tmp_path / "qwen.tiktoken").write_bytes(b"x" * 1001)
    with pytest.raises(tokenizer.VocabFileError, match="1,001 bytes.*at most 1,000"):
        tokenizer.QwenTokenizer.from_pretrained(tmp_path)
