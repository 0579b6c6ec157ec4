"""Shared-memory collectives (nekomata_core.accelerate.local_collectives) among 2 and 3 gloo ranks of this
host, against gloo's own all-reduce / all-gather and against the rank-order sum written here.

The ranks run once per world size (a module fixture) with 256-byte slots, so 64 float32 or 128
bfloat16 values a chunk: the sizes below sit on both sides of one and two chunks. They send back
their inputs and results as float32 (exact for bfloat16 and float16), and the tests compare here.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from nekomata_core.accelerate import local_collectives
from nekomata_core.errors import NekomataError
from tests.ranks import run_ranks

SLOT_BYTES = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _sizes(dtype: torch.dtype) -> list[int]:
    per_slot = SLOT_BYTES // dtype.itemsize
    return [1, per_slot - 1, per_slot, per_slot + 1, 2 * per_slot, 2 * per_slot + 3]


def _input(rank: int, dtype: torch.dtype, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * rank + 10 * DTYPES.index(dtype) + size)
    return torch.randn(size, generator=generator).to(dtype)  # well inside float16's range


def _rank_main(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    out: dict = {"cases": {}}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        shm, problem = local_collectives.setup(slot_bytes=SLOT_BYTES)
        assert shm is not None, problem
        out["name"], out["listed_after_setup"] = shm.name, shm.name in os.listdir("/dev/shm")
        for dtype in DTYPES:
            for size in _sizes(dtype):
                x = _input(rank, dtype, size)
                mine, theirs = shm.all_reduce(x.clone()), x.clone()
                dist.all_reduce(theirs)
                gathered = shm.all_gather(x)
                gloo_parts = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(gloo_parts, x)
                out["cases"][str(dtype), size] = {
                    "input": x.float().numpy(), "shm_sum": mine.float().numpy(), "gloo_sum": theirs.float().numpy(),
                    "shm_gather": gathered.float().numpy(), "gloo_gather": torch.stack(gloo_parts).float().numpy(),
                }  # fmt: skip
        # A non-contiguous [3, 5, 7] view (the sum lands in it) and a gather keeping the shape.
        base = _input(rank, torch.float32, 105).view(7, 5, 3)
        view = base.clone().transpose(0, 2)
        shm.all_reduce(view)
        out["strided"] = (base.transpose(0, 2).numpy(), view.numpy(), shm.all_gather(view).shape)
        # The timeout: rank world-1 never joins the next all-reduce; the others must name it.
        shm.timeout_s = 0.5
        if rank != world - 1:
            try:
                shm.all_reduce(torch.ones(4))
            except local_collectives.SharedMemoryTimeout as exc:
                out["timeout"] = str(exc)
            try:
                shm.all_reduce(torch.ones(4))
            except NekomataError as exc:
                out["after_timeout"] = str(exc)
        dist.barrier()
        shm.close()
        shm.close()  # idempotent
        # Every rank decides alike: one rank's NEKOMATA_TP_SHM=0 turns the fast path off for all.
        if rank == world - 1:
            os.environ[local_collectives.ENV_SWITCH] = "0"
        out["switched_off"] = local_collectives.setup(slot_bytes=SLOT_BYTES)
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # reported to the test instead of hanging it
        out["crash"] = repr(exc)
    results.put((rank, out))


@pytest.fixture(scope="module")
def runs():
    return {world: run_ranks(_rank_main, world) for world in (2, 3)}


def _rank_order_sum(world: int, dtype: torch.dtype, size: int) -> torch.Tensor:
    total = _input(0, dtype, size)
    for rank in range(1, world):
        total = total + _input(rank, dtype, size)  # rounded to the dtype after each addition
    return total.float()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_reduce_is_the_rank_order_sum_on_every_rank_bit_for_bit(runs, world, dtype):
    for size in _sizes(dtype):
        expected = _rank_order_sum(world, dtype, size)
        for rank, out in runs[world].items():
            case = out["cases"][str(dtype), size]
            assert torch.equal(torch.from_numpy(case["input"]), _input(rank, dtype, size).float())
            assert torch.equal(torch.from_numpy(case["shm_sum"]), expected), (rank, size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_rank_all_reduce_equals_gloos_bit_for_bit(runs, dtype):
    for size in _sizes(dtype):
        for rank, out in runs[2].items():
            case = out["cases"][str(dtype), size]
            assert torch.equal(torch.from_numpy(case["shm_sum"]), torch.from_numpy(case["gloo_sum"])), (rank, size)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_gather_stacks_every_ranks_tensor_in_rank_order_like_gloo(runs, world, dtype):
    for size in _sizes(dtype):
        expected = torch.stack([_input(r, dtype, size).float() for r in range(world)])
        for rank, out in runs[world].items():
            case = out["cases"][str(dtype), size]
            assert torch.equal(torch.from_numpy(case["shm_gather"]), expected), (rank, size)
            assert torch.equal(torch.from_numpy(case["gloo_gather"]), expected), (rank, size)


@pytest.mark.parametrize("world", [2, 3])
def test_a_non_contiguous_tensor_is_summed_in_place_and_gathered_in_its_shape(runs, world):
    inputs = [torch.from_numpy(runs[world][r]["strided"][0]) for r in range(world)]
    expected = inputs[0]
    for x in inputs[1:]:
        expected = expected + x
    for out in runs[world].values():
        assert torch.equal(torch.from_numpy(out["strided"][1]), expected)
        assert tuple(out["strided"][2]) == (world, 3, 5, 7)


def test_a_rank_that_never_arrives_is_named_in_one_timeout_error(runs):
    message = runs[2][0]["timeout"]
    assert "rank 0" in message and "timed out after 0.5 s" in message and "waiting for rank 1 " in message
    assert "NEKOMATA_TP_SHM=0" in message
    for rank in (0, 1):  # at N = 3 both waiting ranks name rank 2, and only it
        message = runs[3][rank]["timeout"]
        assert "waiting for rank 2 (rank 2 is at #" in message, message
    assert "timeout" not in runs[2][1] and "timeout" not in runs[3][2]
    # Afterwards the sequences disagree: the group refuses to pair one rank's data with another's older data.
    assert runs[2][0]["after_timeout"].startswith("this shared-memory group is unusable after: rank 0: ")


@pytest.mark.parametrize("world", [2, 3])
def test_one_ranks_switch_turns_the_fast_path_off_for_every_rank(runs, world):
    for out in runs[world].values():
        assert out["switched_off"] == (None, f"{local_collectives.ENV_SWITCH}=0")


@pytest.mark.parametrize("world", [2, 3])
def test_the_segment_is_unlinked_once_every_rank_attached(runs, world):
    names = {out["name"] for out in runs[world].values()}
    assert len(names) == 1 and next(iter(names)).startswith(local_collectives.NAME_PREFIX)
    assert not any(out["listed_after_setup"] for out in runs[world].values())
    assert not [n for n in os.listdir(local_collectives.SHM_DIR) if n in names]


@pytest.fixture
def segment_path():
    path = os.path.join(local_collectives.SHM_DIR, f"{local_collectives.NAME_PREFIX}test-{os.getpid()}")
    yield path
    if os.path.lexists(path):
        os.unlink(path)


def test_created_segments_are_private_to_the_user_whatever_the_umask(segment_path):
    old = os.umask(0)
    try:
        fd = local_collectives._create(segment_path, 8192)
    finally:
        os.umask(old)
    os.close(fd)
    info = os.stat(segment_path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid() and info.st_size == 8192
    with pytest.raises(FileExistsError):  # never reuses an existing file
        local_collectives._create(segment_path, 8192)


def test_attaching_refuses_a_segment_others_may_write(segment_path):
    size, offset = local_collectives.segment_bytes(2, SLOT_BYTES)
    fd = local_collectives._create(segment_path, size)
    os.close(fd)
    os.chmod(segment_path, 0o660)
    with pytest.raises(NekomataError, match="its mode is 660: others may read or write it"):
        local_collectives._attach(segment_path, size, (2, SLOT_BYTES, offset, bytes(16)))
    os.chmod(segment_path, 0o600)
    with pytest.raises(NekomataError, match="its header is not the one rank 0 wrote"):  # all zeros
        local_collectives._attach(segment_path, size, (2, SLOT_BYTES, offset, bytes(16)))
    with pytest.raises(NekomataError, match="bytes, not"):
        local_collectives._attach(segment_path, size + 4096, (2, SLOT_BYTES, offset, bytes(16)))


def test_attaching_does_not_follow_a_symlink(segment_path, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(bytes(8192))
    target.chmod(0o600)
    os.symlink(target, segment_path)
    with pytest.raises(OSError):
        local_collectives._attach(segment_path, 8192, (2, SLOT_BYTES, 4096, bytes(16)))
