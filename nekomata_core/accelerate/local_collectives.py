"""All-reduce (sum) and all-gather through shared memory, for the ranks of a process group that all
run on one host: the fast path of tensor parallelism's per-token collectives on the CPU.

Why: a decode step of a tensor-parallel model makes ~50 small collectives (two all-reduces per block,
one for the vocab-parallel embedding, an all-gather of the logits). gloo sends each over TCP loopback,
a round trip through the kernel's network stack apiece; copying a few KB into a shared segment and
reading the other ranks' copies is a few memory copies. torch.distributed still sets everything up (the rendezvous, the segment's name, the
agreement that every rank could attach) and carries every collective this module does not take.

The segment (one per `SharedMemoryGroup`), N ranks:

    header    magic, layout, a 16-byte random nonce (written by rank 0, checked by the others)
    counters  one int64 per rank, each in its own 64-byte cache line: the number of the last operation
              whose data that rank has published
    slots     per rank two slots of `slot_bytes` (double buffering): operation k uses slot k % 2

An operation k (one chunk of an all-reduce or all-gather; every rank runs the same sequence) on rank r:
copy its input into its slot k % 2, store counter[r] = k, wait until counter[j] ≥ k for every j, read
the N slots k % 2. Why two slots are enough: rank r can only start operation k + 1 after every rank has
published k, i.e. has finished reading operation k - 1, the last one that used slot (k + 1) % 2.

Memory ordering (what this relies on): x86-64 is TSO — a core's stores become visible to the others in
program order and its loads are not reordered with older loads. So the slot's data, stored before the
counter, is visible to any rank that sees the new counter (release), and a rank that has seen a counter
reads the slot after that load (acquire). The compiler cannot move the stores or loads across each
other: they are separate calls into C (torch's copy, CPython's memoryview item access). The counters are
8-byte aligned int64 read and written whole by memoryview item access (a fixed 8-byte memcpy, one `mov`),
which x86-64 makes atomic. On a weakly ordered CPU (ARM) these assumptions do not hold, so the fast path
is only enabled on x86-64 (`fast_path_problem`).

Results: the sum is taken in rank order (slot 0 + slot 1, + slot 2, ... each rounded to the tensor's
dtype as torch's add does), the same on every rank, so all ranks get bit-identical results, equal to the
plain sum in that order (and, for two ranks, to gloo's, since a + b = b + a).

Safety: the project does not use files others can write. Rank 0 creates /dev/shm/nekomata-tp-<random>
with O_CREAT | O_EXCL | O_NOFOLLOW and mode 0600; the others open it with O_NOFOLLOW and check, on the
very descriptor they map, that it is a regular file owned by this user with no group/other permission
bits and of the expected size, and then the nonce. Once every rank has attached (agreed through
torch.distributed) rank 0 unlinks the file: the mappings stay valid, and nothing is left in /dev/shm
even when a rank is killed later (under torchrun the CLI leaves with os._exit, past any atexit).
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import socket
import stat
import struct
import time

import torch
import torch.distributed as dist

from ..errors import NekomataError

SHM_DIR = "/dev/shm"
NAME_PREFIX = "nekomata-tp-"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_SLOT_BYTES = 1 << 20  # a decode step's largest piece: 151936 / 2 float32 logits = 304 KB
DEFAULT_TIMEOUT_S = 600.0  # a rank may compile a CPU kernel on its first call; gloo waits 30 minutes
ENV_SWITCH = "NEKOMATA_TP_SHM"  # "0" turns the fast path off

_MAGIC = b"NEKOSHM1"
_HEADER = struct.Struct("<8sqqq16s")  # magic, world size, slot bytes, data offset, nonce
_LINE = 64  # one counter per cache line: ranks do not write into each other's lines
_PAGE = 4096
_SPINS = 200  # plain polls before yielding the core: the other rank usually arrives within microseconds
_YIELD_S = 0.002  # then sched_yield for this long (immediate when nobody else wants the core), then sleep


class SharedMemoryTimeout(NekomataError):
    """A rank did not reach a shared-memory collective in time: it crashed, hangs, or runs other code."""


class SharedMemoryGroup:
    """All-reduce and all-gather among `world_size` ranks of one host through one shared segment.

    Build it with `setup` (collective over a torch.distributed group); `rank` is the rank in that group.
    Every rank must call the same operations in the same order with the same shapes and dtypes, as
    with torch.distributed, from one thread. After a timeout the ranks' sequences no longer match, so
    the group refuses further use (it would pair one rank's data with another's older data)."""

    def __init__(self, buffer: mmap.mmap, rank: int, world_size: int, slot_bytes: int, data_offset: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S, name: str = "") -> None:  # fmt: skip
        self.rank, self.world_size, self.slot_bytes = rank, world_size, slot_bytes
        self.timeout_s = timeout_s
        self.name = name  # the segment's (already unlinked) name in /dev/shm, for diagnostics
        self._buffer = buffer
        self._counters = memoryview(buffer)[_LINE : _LINE * (1 + world_size)].cast("q")  # every 8th: a rank's
        self._bytes = torch.frombuffer(buffer, dtype=torch.uint8)
        self._data_offset = data_offset
        self._views: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._broken: str | None = None  # the timeout that ended this group
        self._sequence = self._counters[self._counter(rank)]  # 0 on a fresh segment

    # -- the two collectives ------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (like dist.all_reduce); returns it."""
        flat = self._flat(tensor)
        per_slot = self.slot_bytes // flat.element_size()
        for start in range(0, flat.numel(), per_slot):  # tensors larger than a slot go in chunks
            part = flat[start : start + per_slot]
            slots = self._exchange(part, "all-reduce")
            if len(slots) == 1:
                part.copy_(slots[0])
                continue
            torch.add(slots[0], slots[1], out=part)  # rank order, on every rank
            for slot in slots[2:]:
                part.add_(slot)
        if not tensor.is_contiguous():  # `flat` was a contiguous copy
            tensor.copy_(flat.view(tensor.shape))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, stacked in rank order: [world_size, *tensor.shape]."""
        flat = self._flat(tensor)
        out = torch.empty((self.world_size, flat.numel()), dtype=flat.dtype)
        per_slot = self.slot_bytes // flat.element_size()
        for start in range(0, flat.numel(), per_slot):
            slots = self._exchange(flat[start : start + per_slot], "all-gather")
            for j, slot in enumerate(slots):
                out[j, start : start + slot.numel()].copy_(slot)
        return out.view(self.world_size, *tensor.shape)

    def close(self) -> None:
        """Drop the mapping (the file was unlinked at setup). Idempotent; the group is unusable after."""
        if self._buffer is None:
            return
        self._views.clear()
        self._bytes = None
        self._counters.release()
        try:
            self._buffer.close()
        except BufferError:  # a caller still holds a view into a slot: the mapping goes with it
            pass
        self._buffer = None

    # -- one operation ------------------------------------------------------------------------------

    def _exchange(self, part: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Publish `part` as this rank's data of the next operation; the N ranks' slots once all are in."""
        if self._buffer is None or self._broken is not None:
            raise NekomataError(
                f"this shared-memory group is {'closed' if self._broken is None else 'unusable after: ' + self._broken}"
                "; set up a new one with setup(group)"
            )
        self._sequence += 1
        k, which, n = self._sequence, self._sequence % 2, part.numel()
        self._slot(self.rank, which, part.dtype)[:n].copy_(part)
        self._counters[self._counter(self.rank)] = k  # after the data (TSO: seen after it)
        self._wait(k, what)
        return [self._slot(j, which, part.dtype)[:n] for j in range(self.world_size)]

    def _wait(self, k: int, what: str) -> None:
        counters = self._counters
        polls, started = 0, None
        for j in range(self.world_size):
            index = self._counter(j)
            while counters[index] < k:
                polls += 1
                if polls < _SPINS:
                    continue
                now = time.monotonic()
                if started is None:
                    started = now
                waited = now - started
                if waited > self.timeout_s:
                    error = self._timeout(k, what)
                    self._broken = str(error)
                    raise error
                if waited < _YIELD_S:
                    os.sched_yield()
                else:
                    time.sleep(min(1e-3, waited / 100))  # a long wait (another rank compiling) costs little CPU

    def _timeout(self, k: int, what: str) -> SharedMemoryTimeout:
        behind = [j for j in range(self.world_size) if self._counters[self._counter(j)] < k]
        where = ", ".join(f"rank {j} is at #{self._counters[self._counter(j)]}" for j in behind)
        return SharedMemoryTimeout(
            f"rank {self.rank}: shared-memory {what} #{k} timed out after {self.timeout_s:g} s waiting for "
            f"rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))} ({where}): that process "
            "crashed, hangs, or runs different code (every rank must run the same collectives in the same "
            f"order); check its output, or set {ENV_SWITCH}=0 to use torch.distributed's collectives"
        )

    # -- layout -------------------------------------------------------------------------------------

    def _counter(self, rank: int) -> int:
        return rank * (_LINE // 8)

    def _slot(self, rank: int, which: int, dtype: torch.dtype) -> torch.Tensor:
        key = (rank, which, dtype)
        view = self._views.get(key)
        if view is None:
            start = self._data_offset + (2 * rank + which) * self.slot_bytes
            view = self._views[key] = self._bytes[start : start + self.slot_bytes].view(dtype)
        return view

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype not in DTYPES or tensor.device.type != "cpu":
            raise NekomataError(
                f"shared-memory collectives take CPU {', '.join(map(str, DTYPES))} tensors, got "
                f"{tensor.dtype} on {tensor.device}; use torch.distributed for these"
            )
        return tensor.detach().contiguous().view(-1)


def segment_bytes(world_size: int, slot_bytes: int) -> tuple[int, int]:
    """(total size, offset of the first slot) of a segment."""
    data_offset = -(-_LINE * (1 + world_size) // _PAGE) * _PAGE
    return data_offset + 2 * world_size * slot_bytes, data_offset


def fast_path_problem(group: dist.ProcessGroup | None = None) -> str | None:
    """None when the ranks of `group` can use shared memory, else why not. Collective: every rank of
    the group calls it, and they decide on what all of them see, so they all get the same answer."""
    mine = (socket.gethostname(), os.environ.get(ENV_SWITCH, "1") != "0", platform.machine(), os.path.isdir(SHM_DIR))
    seen: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, mine, group=group)
    hosts, switches, machines, shm_dirs = zip(*seen, strict=True)
    if not all(switches):
        return f"{ENV_SWITCH}=0"
    if dist.get_backend(group) != "gloo":
        return f"the backend is {dist.get_backend(group)}, shared memory serves gloo (CPU) ranks"
    if len(set(hosts)) > 1:
        return f"the ranks run on {len(set(hosts))} hosts"
    odd = sorted({m for m in machines if m.lower() not in ("x86_64", "amd64")})
    if odd:
        return f"the CPU is {', '.join(odd)}: the counters rely on x86-64's store ordering"
    if not all(shm_dirs):
        return f"{SHM_DIR} does not exist"
    return None


def setup(group: dist.ProcessGroup | None = None, slot_bytes: int = DEFAULT_SLOT_BYTES,
          timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[SharedMemoryGroup | None, str | None]:  # fmt: skip
    """(the shared-memory group, None), or (None, why not) when the ranks of `group` cannot share memory
    (see `fast_path_problem`) or one of them could not attach. Collective over `group`."""
    problem = fast_path_problem(group)
    if problem is not None:
        return None, problem
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    size, data_offset = segment_bytes(world, slot_bytes)
    box: list = [None]
    fd, path, error = -1, None, None
    if rank == 0:
        name, nonce = NAME_PREFIX + secrets.token_hex(16), secrets.token_bytes(16)
        try:
            fd = _create(os.path.join(SHM_DIR, name), size)
            path = os.path.join(SHM_DIR, name)
            buffer = mmap.mmap(fd, size)
            buffer[: _HEADER.size] = _HEADER.pack(_MAGIC, world, slot_bytes, data_offset, nonce)
            box[0] = (name, nonce)
        except OSError as exc:
            error = f"rank 0 could not create {SHM_DIR}/{name}: {exc}"
    try:  # from here on, rank 0 unlinks the file whatever happens
        dist.broadcast_object_list(box, group=group, group_src=0)  # the name and nonce, or None
        if rank != 0 and box[0] is not None:  # (None: rank 0 reports why)
            name, nonce = box[0]
            try:
                fd, buffer = _attach(os.path.join(SHM_DIR, name), size, (world, slot_bytes, data_offset, nonce))
            except (OSError, NekomataError) as exc:
                error = f"rank {rank} could not attach {SHM_DIR}/{name}: {exc}"
        # Everybody attached (or nobody uses it): only then may rank 0 unlink the file.
        errors: list = [None] * world
        dist.all_gather_object(errors, error, group=group)
    finally:
        if path is not None:
            os.unlink(path)
        if fd >= 0:
            os.close(fd)  # the mapping keeps the memory
    dist.barrier(group=group)  # when setup returns, on any rank, the file is gone
    failed = [e for e in errors if e is not None]
    if failed:
        return None, "; ".join(failed)
    return SharedMemoryGroup(buffer, rank, world, slot_bytes, data_offset, timeout_s, box[0][0]), None


def _create(path: str, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)  # a full /dev/shm fails here, not as SIGBUS mid-step
        else:
            os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def _attach(path: str, size: int, expected: tuple) -> tuple[int, mmap.mmap]:
    """Open and map rank 0's segment, after checking (on this very descriptor) that only we can write it."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NekomataError("it is not a regular file")
        if info.st_uid != os.geteuid():
            raise NekomataError(f"it is owned by uid {info.st_uid}, not by this user ({os.geteuid()})")
        if info.st_mode & 0o077:
            raise NekomataError(f"its mode is {stat.S_IMODE(info.st_mode):o}: others may read or write it (need 600)")
        if info.st_size != size:
            raise NekomataError(f"it has {info.st_size} bytes, not {size}")
        buffer = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    magic, *layout = _HEADER.unpack(buffer[: _HEADER.size])
    if magic != _MAGIC or tuple(layout) != expected:
        buffer.close()
        os.close(fd)
        raise NekomataError("its header is not the one rank 0 wrote (another /dev/shm?)")
    return fd, buffer


__all__ = [
    "DTYPES",
    "ENV_SWITCH",
    "SharedMemoryGroup",
    "SharedMemoryTimeout",
    "fast_path_problem",
    "segment_bytes",
    "setup",
]
