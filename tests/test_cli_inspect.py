"""`nekomata inspect`: the numbers it prints follow from config.json by the formulas written out here,
and its exit code says whether the checkpoint is usable (0 ok, 1 broken, 2 usage / unresolvable)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nekomata_core.apps.cli import main
from nekomata_core.config import QwenConfig
from tools.make_tiny_checkpoint import make_checkpoint

OVERRIDES = {"vocab_size": 512, "seq_length": 32}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inspect") / "tiny"
    return make_checkpoint(folder, "tiny", dtype=torch.bfloat16, shards=2, overrides=OVERRIDES)


@pytest.fixture(scope="module")
def config(checkpoint) -> QwenConfig:
    return QwenConfig.from_json_file(checkpoint / "config.json")


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nekomata_core", *args], capture_output=True, text=True, timeout=120
    )


def test_inspect_prints_the_shape_and_passes_the_check(checkpoint, config, capsys):
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "layers                   2" in out
    assert "4 × head dim 16" in out
    assert "MLP width                128 (= intermediate_size 256 // 2" in out
    assert "seq_length               32" in out
    assert "bfloat16" in out and "BF16" in out
    assert f"{config.num_parameters():,} (config), {config.num_parameters():,} (in the files)" in out
    assert "model-00001-of-00002.safetensors" in out and "model-00002-of-00002.safetensors" in out
    assert "check" in out and "OK" in out


def test_inspect_json_numbers_follow_from_the_config(checkpoint, config, capsys):
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    h, f, v, n_layers = 64, 128, 512, 2
    params = v * h * 2 + h + n_layers * (2 * h + 3 * h * h + 3 * h + h * h + 3 * h * f)
    assert data["parameters_config"] == data["parameters_files"] == params == config.num_parameters()
    assert data["mlp_width"] == f and data["head_dim"] == 16 and data["heads"] == 4
    assert data["file_dtypes"] == ["BF16"] and data["dtype_flag"] == "bfloat16"
    assert data["weight_bytes"]["float32"] == 4 * params
    assert data["weight_bytes"]["bfloat16"] == data["weight_bytes"]["float16"] == 2 * params
    matrices = [s for s in config.parameter_shapes().values() if len(s) == 2]
    vectors = [s for s in config.parameter_shapes().values() if len(s) == 1]
    int8 = sum(r * c + 2 * r for r, c in matrices) + sum(2 * s[0] for s in vectors)
    assert data["weight_bytes"]["int8_weight_only"] == int8
    # K and V × layers × hidden (N·D) × 2 bytes × 1024 tokens
    assert data["kv_cache_bytes_per_1k_tokens_bf16"] == 2 * n_layers * h * 2 * 1024
    assert data["check"]["ok"] is True and data["check"]["num_tensors"] == len(config.parameter_shapes())


def test_python_m_nekomata_core_inspect_works(checkpoint):
    result = run_module("inspect", str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert "MLP width" in result.stdout and "OK" in result.stdout


def test_inspect_of_a_truncated_shard_exits_1_naming_the_file(checkpoint, tmp_path, capsys):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    shard = broken / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["inspect", str(broken)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "model-00002-of-00002.safetensors" in captured.out
    assert "truncated" in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "model-00002-of-00002.safetensors" in captured.err


def test_inspect_of_a_checkpoint_for_another_config_exits_1_naming_the_mismatch(checkpoint, tmp_path, capsys):
    broken = shutil.copytree(checkpoint, tmp_path / "other")
    raw = json.loads((broken / "config.json").read_text())
    raw["vocab_size"] = 1024
    (broken / "config.json").write_text(json.dumps(raw))
    assert main(["inspect", str(broken), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["check"]["ok"] is False
    assert any(
        "config key 'vocab_size' is 1,024" in p and "vocab_size 512" in p for p in data["check"]["problems"]
    )


def test_inspect_of_a_nonexistent_path_exits_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "does-not-exist")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "does-not-exist" in lines[0] and captured.out == ""


def test_inspect_of_a_nonexistent_path_in_a_subprocess_has_no_traceback(tmp_path):
    result = run_module("inspect", str(tmp_path / "nowhere" / "at" / "all"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_inspect_of_a_folder_without_config_exits_1_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]


@pytest.mark.parametrize(
    "argv",
    [[], ["inspect"], ["inspect", ".", "--bogus"], ["no-such-command"]],
    ids=["no-command", "no-path", "unknown-option", "unknown-command"],
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2


def test_revision_with_a_local_directory_is_a_usage_error(checkpoint, capsys):
    assert main(["inspect", str(checkpoint), "--revision", "main"]) == 2
    assert "revision" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
