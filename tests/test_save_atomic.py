"""`save_quantized` never loses a checkpoint: it refuses to overwrite its own source, and a save that
fails or is killed at any point leaves the previous checkpoint whole (its own config with its own
weights), never a mix of the two and never a stray temporary file inside the target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nekomata_core import QwenForCausalLM
from nekomata_core.quantize import SaveError, save_quantized

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def old_source(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny", seed=31, vocab_size=256, layer_norm_epsilon=1e-6)


@pytest.fixture(scope="module")
def new_source(checkpoint_factory) -> Path:
    # Another config value and other weights: a mix of old and new would be visible in either.
    return checkpoint_factory("tiny", seed=32, vocab_size=256, layer_norm_epsilon=1e-5)


def _int8(folder: Path) -> QwenForCausalLM:
    return QwenForCausalLM.from_pretrained(
        folder, dtype="float32", device="cpu", progress=False, quantize="int8"
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


IDS = torch.arange(12)[None] % 256


def _assert_is_checkpoint_of(folder: Path, model: QwenForCausalLM) -> None:
    """`folder` loads, with the config and the weights of `model` (both, not one of them)."""
    saved = json.loads((folder / "config.json").read_text())
    assert saved["layer_norm_epsilon"] == model.config.layer_norm_epsilon
    reloaded = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS), model(IDS))


def _hidden_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("how", ["the same path", "a symlink to it", "a parent folder of it", "source_dir"])
def test_saving_over_the_source_checkpoint_is_refused_before_writing(old_source, tmp_path, how):
    copy = tmp_path / "models" / "float"
    copy.parent.mkdir()
    copy.mkdir()
    for name, data in _snapshot(old_source).items():
        (copy / name).write_bytes(data)
    model = _int8(copy)
    before = _snapshot(copy)
    kwargs = {}
    if how == "the same path":
        target = copy
    elif how == "a symlink to it":
        target = tmp_path / "link"
        target.symlink_to(copy)
    elif how == "a parent folder of it":
        target = copy.parent
    else:  # the model is in memory only; the source is named explicitly
        del model.checkpoint_dir
        target, kwargs = copy, {"source_dir": copy}
    with pytest.raises(
        SaveError, match=r"the folder the model was loaded from .*Save into a new folder"
    ) as info:
        save_quantized(model, target, **kwargs)
    assert str(copy) in str(info.value) and str(target) in str(info.value)
    assert _snapshot(copy) == before  # nothing written, nothing removed
    assert _hidden_siblings(copy) == [] and sorted(p.name for p in copy.parent.iterdir()) == ["float"]


@pytest.mark.parametrize("content", ["a sub-folder", "no config.json", "a file, not a folder"])
def test_replacing_something_that_is_not_a_checkpoint_is_refused(old_source, tmp_path, content):
    target = tmp_path / "target"
    if content == "a file, not a folder":
        target.write_text("notes")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
        if content == "a sub-folder":
            (target / "config.json").write_text("{}")
            (target / "runs").mkdir()
    with pytest.raises(SaveError, match=r"is not a (checkpoint )?folder.*choose a new"):
        save_quantized(_int8(old_source), target)
    assert target.exists() and _hidden_siblings(target) == []


@pytest.mark.parametrize(
    "failure", ["after writing the weights", "while copying the tokenizer", "at the swap"]
)
def test_a_failed_resave_leaves_the_previous_checkpoint_whole(
    old_source, new_source, tmp_path, monkeypatch, failure
):
    out = tmp_path / "int8"
    old_model = _int8(old_source)
    save_quantized(old_model, out, source_dir=old_source)
    before = _snapshot(out)

    class Boom(RuntimeError):
        pass

    def fail(*args, **kwargs):
        raise Boom(failure)

    if failure == "after writing the weights":
        from nekomata_core import loader

        real = loader.save_safetensors

        def write_then_fail(tensors, path, metadata=None):
            real(tensors, path, metadata)
            raise Boom(failure)

        monkeypatch.setattr(loader, "save_safetensors", write_then_fail)
    elif failure == "while copying the tokenizer":
        monkeypatch.setattr("nekomata_core.quantize.shutil.copyfile", fail)
    else:
        real_rename = os.rename

        def rename(src, dst):  # the old checkpoint moves aside, then the new one fails to move in
            if Path(src).name.startswith(".int8.tmp-"):
                raise Boom(failure)
            real_rename(src, dst)

        monkeypatch.setattr("nekomata_core.quantize.os.rename", rename)
    with pytest.raises(Boom):
        save_quantized(_int8(new_source), out, source_dir=new_source)
    monkeypatch.undo()
    assert _snapshot(out) == before  # the same files, byte for byte: no .tmp, nothing half-replaced
    assert _hidden_siblings(out) == []
    _assert_is_checkpoint_of(out, old_model)


KILLED_SAVE = """
import os, signal, sys
from nekomata_core import QwenForCausalLM, loader
from nekomata_core.quantize import save_quantized

real = loader.save_safetensors
def write_then_die(tensors, path, metadata=None):
    real(tensors, path, metadata)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs after this
loader.save_safetensors = write_then_die
model = QwenForCausalLM.from_pretrained(sys.argv[1], dtype="float32", device="cpu", progress=False,
                                        quantize="int8")
save_quantized(model, sys.argv[2], source_dir=sys.argv[1])
"""


def test_a_resave_killed_midway_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(
    old_source, new_source, tmp_path
):
    out = tmp_path / "int8"
    old_model = _int8(old_source)
    save_quantized(old_model, out, source_dir=old_source)
    before = _snapshot(out)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(new_source), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _snapshot(out) == before
    _assert_is_checkpoint_of(out, old_model)
    assert len(_hidden_siblings(out)) == 1  # the dead save's hidden sibling, outside the target

    new_model = _int8(new_source)
    save_quantized(new_model, out, source_dir=new_source)
    assert _hidden_siblings(out) == []  # the next save removed it
    _assert_is_checkpoint_of(out, new_model)
    copied = out / "generation_config.json"
    assert copied.read_bytes() == (new_source / "generation_config.json").read_bytes()
