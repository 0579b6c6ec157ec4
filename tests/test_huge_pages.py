"""Moving the weights onto huge pages (accelerate/huge_pages): the same parameters, the same values, the
same outputs and saved checkpoints; only the memory under them changes."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch
from torch import nn

from nekomata_core import QwenForCausalLM
from nekomata_core.accelerate import StepUnavailableError, make_step
from nekomata_core.accelerate.huge_pages import HUGE_PAGE_BYTES, huge_pages_available, move_to_huge_pages
from nekomata_core.quantize import save_quantized

needs_huge_pages = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")


@pytest.fixture(scope="module")
def folder(checkpoint_factory):
    return checkpoint_factory("tiny", seed=5, init_std=0.1, vocab_size=512)


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))


@needs_huge_pages
def test_moved_parameters_keep_their_objects_and_values_and_start_on_a_huge_page(folder):
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    before = {name: (p, p.detach().clone(), p.data_ptr()) for name, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(_ids())
    moved = move_to_huge_pages(model, min_bytes=0)
    assert moved == sum(p.numel() * p.element_size() for p, _, _ in before.values())
    for name, p in model.named_parameters():
        obj, value, address = before[name]
        assert p is obj and torch.equal(p, value) and not p.requires_grad
        assert p.data_ptr() != address and p.data_ptr() % HUGE_PAGE_BYTES == 0
    with torch.no_grad():
        assert torch.equal(model(_ids()), expected)
    assert move_to_huge_pages(model, min_bytes=0) == 0  # already moved: nothing moves twice


@needs_huge_pages
def test_only_parameters_of_at_least_min_bytes_move_and_shared_ones_stay_shared():
    big, small = nn.Linear(1024, 1024, bias=True), nn.Linear(4, 4)  # 4 MiB of fp32 weight; tiny ones
    pair = nn.ModuleList([big, small, nn.Linear(1024, 1024, bias=False)])
    pair[2].weight = big.weight  # one parameter in two modules
    pair.append(nn.Linear(1024, 1024, bias=False))
    pair[3].weight = nn.Parameter(big.weight.data, requires_grad=False)  # another parameter over the same tensor
    small_address = small.weight.data_ptr()
    assert move_to_huge_pages(pair) == 1024 * 1024 * 4  # the shared weight once; biases are small
    assert big.weight.data_ptr() % HUGE_PAGE_BYTES == 0 and pair[2].weight is big.weight
    assert pair[3].weight.data_ptr() == big.weight.data_ptr()
    assert small.weight.data_ptr() == small_address


def test_nothing_moves_when_turned_off(folder, monkeypatch):
    monkeypatch.setenv("NEKOMATA_HUGE_PAGES", "0")
    assert not huge_pages_available()
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    addresses = [p.data_ptr() for p in model.parameters()]
    assert move_to_huge_pages(model, min_bytes=0) == 0
    assert [p.data_ptr() for p in model.parameters()] == addresses


def test_no_huge_pages_where_the_kernel_has_none(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr("nekomata_core.accelerate.huge_pages._THP_SETTING", setting)
    assert not huge_pages_available()
    monkeypatch.setattr("nekomata_core.accelerate.huge_pages._THP_SETTING", tmp_path / "missing")
    assert not huge_pages_available()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        setting.write_text("always [madvise] never\n")
        monkeypatch.setattr("nekomata_core.accelerate.huge_pages._THP_SETTING", setting)
        assert huge_pages_available() == sys.platform.startswith("linux")


@needs_huge_pages
def test_a_moved_quantized_model_saves_and_reloads_the_same(folder, tmp_path):
    # safetensors refuses tensors that share a storage: each moved parameter has a mapping of its own
    model = QwenForCausalLM.from_pretrained(folder, dtype="bfloat16", device="cpu", progress=False, quantize="int4")
    with torch.no_grad():
        expected = model(_ids())
    assert move_to_huge_pages(model, min_bytes=0) > 0
    saved = save_quantized(model, tmp_path / "int4", source_dir=folder)
    reloaded = QwenForCausalLM.from_pretrained(saved, device="cpu", progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()), expected)


def test_the_native_step_leaves_the_parameters_and_their_values_alone(folder):
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    try:
        make_step(model, "native")
    except StepUnavailableError as exc:  # no C compiler, or not x86-64
        pytest.skip(str(exc))
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1])


@needs_huge_pages
def test_when_no_mapping_can_be_made_the_parameters_stay_where_they_are(folder, monkeypatch):
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    addresses = [p.data_ptr() for p in model.parameters()]

    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr("nekomata_core.accelerate.huge_pages.mmap.mmap", no_memory)
    assert move_to_huge_pages(model, min_bytes=0) == 0
    assert [p.data_ptr() for p in model.parameters()] == addresses
