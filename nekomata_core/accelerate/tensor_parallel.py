"""Tensor parallelism: one model split across the processes of a `torch.distributed` group (the
Megatron / gpt-fast `tp.py` pattern), applied from outside the architecture like every other swap.

Each of the N ranks holds 1/N of every large matrix and computes with it; two collectives per block
put the pieces back together:

    c_attn        column-parallel by heads: rank r keeps the q, k and v rows (and biases) of its heads,
                  so attention runs on its own heads and its own KV cache, with no communication
    attn.c_proj   row-parallel: rank r keeps the input columns of its heads; the partial sums of
                  all ranks are added with one all-reduce, then the bias (once)
    w1, w2        column-parallel: rank r keeps 1/N of the MLP width (the SwiGLU is element-wise)
    mlp.c_proj    row-parallel over that width: one all-reduce, then the bias
    lm_head       column-parallel by vocabulary, then an all-gather: every rank has the full logits
    wte           by vocabulary (Megatron's vocab-parallel embedding): rank r looks up the tokens in
                  its rows and zeros for the others; one all-reduce adds each token's one non-zero
                  row to zeros, which is exact (the 151936-row table is 0.6 GB at qwen-1.8b in bf16,
                  as much as 8 of its blocks: copied to every rank it kept a rank's peak RSS above
                  0.6× one process's at N = 2)
    norms         replicated (tiny)

Every rank therefore computes the same logits [B, T, V], so generation runs unchanged on every rank
and, with the same RNG state (torch's default seed is the same in every process; `--seed` seeds them
alike), samples the same tokens. The sums of a row-parallel layer are added in another order than
in one process (partial sums per rank, then across ranks): float32 logits agree to ~1e-6 relative.

The collectives go through `Collectives`: when every rank runs on this host over gloo (CPU), through
shared memory (`local_collectives`: a few memory copies where gloo makes a TCP loopback round trip, and a
step makes 2 per block + 2), else through torch.distributed; NEKOMATA_TP_SHM=0 keeps torch.distributed.
Shared memory adds in rank order on every rank, so the ranks agree bit for bit either way.

Loading reads only a rank's slices from the files (`shard_selection` → `loader.load_weights`); a rank
of an already loaded model can also be cut from it in memory (`shard_model`). int8 layers shard as
their weights do: scales go with the rows of column-parallel layers and stay whole in row-parallel
ones, whose per-row absmax is agreed by an all-reduce when quantizing on load.

int4 layers (groups of 32 inputs, an 8-bit scale and min code per group, and their units per tile of
8 rows) shard by rows when column-parallel (c_attn's q and k rows by heads, its int8 v rows likewise;
w1, w2, lm_head: packed weight, codes and the tiles' units alike, so each rank's rows must be whole
tiles) and by input columns in whole groups when row-parallel
(the c_proj layers: rank r keeps groups r·K/32N … of every row, i.e. bytes r·K/2N … of the packed
weight, and the same columns of the units), so each rank's share of a layer's inputs must be a multiple
of 32 and its share of rows a multiple of 8 (`check_int4_divisible`). Quantizing on load needs no
communication for int4: a group's codes, and a tile's units, depend on its own weights only (a tile
spans rows, never columns), so a rank quantizing its slice gets exactly those of the same groups and
tiles in one process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import QwenConfig
from ..errors import NekomataError
from ..loader import Selection, select
from ..quantize import INT4_GROUP_SIZE, INT4_TILE_ROWS, Int4Linear, Int4QkvLinear
from . import local_collectives


class TensorParallelError(NekomataError):
    """The model cannot be split over this many processes, or no process group can be set up."""


@dataclass(frozen=True)
class TensorParallel:
    """Where this process stands: rank `rank` of `world_size`, communicating over `group`."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None  # None = the default group
    collectives: Collectives | None = field(default=None, compare=False)  # set by `apply`


class Collectives:
    """The sums and gathers of a tensor-parallel model: through shared memory when every rank of the
    group runs on this host over gloo (`local_collectives`), through torch.distributed otherwise (and
    for tensors shared memory does not take: not on the CPU, or of another dtype). Collective to build."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group, self.world_size = group, dist.get_world_size(group)
        self.shared, self.why_not_shared = local_collectives.setup(group)

    @property
    def kind(self) -> str:
        """What carries the collectives, for reports: "shared memory" or the torch.distributed backend."""
        return "shared memory" if self.shared is not None else f"{dist.get_backend(self.group)} ({self.why_not_shared})"

    def _shares(self, tensor: torch.Tensor) -> bool:
        return self.shared is not None and tensor.device.type == "cpu" and tensor.dtype in local_collectives.DTYPES

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, in place."""
        if self._shares(tensor):
            return self.shared.all_reduce(tensor)
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor`, in rank order."""
        if self._shares(tensor):
            return list(self.shared.all_gather(tensor).unbind(0))
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None


# The pattern of every sharded parameter → how it is split (Int8Linear and Int4Linear tensors alike).
_COLUMN_BY_HEADS = re.compile(r"transformer\.h\.\d+\.attn\.c_attn\.(weight|bias|scales|mins)")
# an int4 model's c_attn (Int4QkvLinear): its int4 q and k rows, its int8 v rows
_QK_BY_HEADS = re.compile(r"transformer\.h\.\d+\.attn\.c_attn\.qk\.(weight|bias|scales|mins|scale_units|min_units)")
_V_BY_HEADS = re.compile(r"transformer\.h\.\d+\.attn\.c_attn\.v\.(weight|bias|scales)")
_ROW = re.compile(r"transformer\.h\.\d+\.(attn|mlp)\.c_proj\.weight")
# int4: [out, in/32] codes and [out/8, in/32] units
_ROW_GROUPS = re.compile(r"transformer\.h\.\d+\.(attn|mlp)\.c_proj\.(scales|mins|scale_units|min_units)")
_COLUMN = re.compile(r"(transformer\.h\.\d+\.mlp\.(w1|w2)|lm_head)\.(weight|bias|scales|mins|scale_units|min_units)")
_EMBEDDING = "transformer.wte.weight"


def init_process_group(device: torch.device) -> TensorParallel:
    """This process's place in the default group, initialising it from the torchrun environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) if nobody has yet: nccl on CUDA, gloo on the CPU."""
    if not dist.is_available():
        raise TensorParallelError("this PyTorch build has no torch.distributed; tensor parallelism needs it")
    if not dist.is_initialized():
        missing = [key for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
        if missing:
            raise TensorParallelError(
                f"tensor_parallel=True needs a process group, and {missing} are not set: start the "
                "program with `torchrun --nproc-per-node N ...` (or call "
                "torch.distributed.init_process_group first)"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def rank_device(requested: str | torch.device, resolved: torch.device) -> torch.device:
    """CUDA under torchrun: one GPU per process, the LOCAL_RANK-th, unless a GPU was named ("cuda:1")."""
    if resolved.type == "cuda" and str(requested) in ("auto", "cuda"):
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)  # nccl works on the current device
    return resolved


def check_divisible(config: QwenConfig, world_size: int) -> None:
    """One error naming every size that the world size does not divide."""
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "the MLP width (intermediate_size // 2)": config.mlp_width,
        "vocab_size": config.vocab_size,
    }
    bad = [f"{name} = {size}" for name, size in sizes.items() if size % world_size]
    if bad:
        raise TensorParallelError(
            f"cannot split this model over {world_size} processes: {', '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not divisible by {world_size}; "
            "use a number of processes that divides the head count, the MLP width and the vocabulary"
        )


def check_int4_divisible(config: QwenConfig, world_size: int) -> None:
    """int4 row-parallel layers are split in whole groups: each rank's share of their inputs (the
    attention width for attn.c_proj, the MLP width for mlp.c_proj) must be a multiple of the group; and
    column-parallel ones in whole tiles: each rank's share of their rows (the MLP width for w1 and w2,
    the vocabulary for lm_head) must be a multiple of the tile."""
    inputs = {"attn.c_proj": config.hidden_size, "mlp.c_proj": config.mlp_width}
    rows = {"attn.c_attn's q and k": config.hidden_size, "mlp.w1 and mlp.w2": config.mlp_width,
            "lm_head": config.vocab_size}  # fmt: skip
    bad = [
        f"{name} has {size} inputs, {size // world_size} per rank, not a multiple of {INT4_GROUP_SIZE}"
        for name, size in inputs.items()
        if (size // world_size) % INT4_GROUP_SIZE
    ] + [
        f"{name} has {size} rows, {size // world_size} per rank, not a multiple of {INT4_TILE_ROWS}"
        for name, size in rows.items()
        if (size // world_size) % INT4_TILE_ROWS
    ]
    if bad:
        raise TensorParallelError(
            f"cannot split this int4 model over {world_size} processes: int4 groups {INT4_GROUP_SIZE} inputs "
            f"and shares scale units among tiles of {INT4_TILE_ROWS} rows, and a rank must hold whole groups "
            f"and tiles, but {'; '.join(bad)}; use quantize='int8' (or no quantization) with {world_size} "
            "processes, or a number of processes that leaves each rank whole groups and tiles"
        )


def shard_selection(
    config: QwenConfig, tp: TensorParallel, stored: str | None = None
) -> Callable[[str], Selection | None]:
    """name → the part of that checkpoint tensor rank `tp.rank` holds (None = the whole tensor).

    `stored`: the quantization of the tensors as they are in the files ("int8", "int4" or None for
    float weights), which sets how the inputs of a row-parallel int4 layer are laid out: its packed
    weight has two inputs a byte, its scales and mins one column a group."""
    check_divisible(config, tp.world_size)
    if stored == "int4":
        check_int4_divisible(config, tp.world_size)
    r, n = tp.rank, tp.world_size
    hidden, width = config.hidden_size, config.mlp_width
    share = hidden // n  # a rank's heads × head_dim

    def selection(name: str) -> Selection | None:
        if _COLUMN_BY_HEADS.fullmatch(name):
            # Rows are [q; k; v], each `hidden` tall: the same heads' rows from each of the three.
            return 0, [(part * hidden + r * share, part * hidden + (r + 1) * share) for part in range(3)]
        if _QK_BY_HEADS.fullmatch(name) or _V_BY_HEADS.fullmatch(name):
            # int4's c_attn: [q; k] and [v], the same heads' rows of each (units: one row per tile)
            tall, part_share = (hidden, share) if not name.endswith("_units") else (hidden // INT4_TILE_ROWS,
                                                                                    share // INT4_TILE_ROWS)
            parts = 2 if ".c_attn.qk." in name else 1
            return 0, [(part * tall + r * part_share, part * tall + (r + 1) * part_share) for part in range(parts)]
        row_weight = _ROW.fullmatch(name)
        if row_weight or (stored == "int4" and _ROW_GROUPS.fullmatch(name)):
            size = share if ".attn." in name else width // n  # the inputs of its heads, or of its width
            if stored == "int4":  # packed: 2 inputs a byte; codes and units: 1 column a group
                size //= 2 if row_weight else INT4_GROUP_SIZE
            return 1, [(r * size, (r + 1) * size)]
        if _COLUMN.fullmatch(name) or name == _EMBEDDING:
            size = (width if ".mlp." in name else config.vocab_size) // n
            if name.endswith("_units"):  # int4: one row per tile of rows
                size //= INT4_TILE_ROWS
            return 0, [(r * size, (r + 1) * size)]
        return None  # the norms, the row-parallel biases and int8 scales: whole

    return selection


def row_absmax(tp: TensorParallel) -> Callable[[str, torch.Tensor], torch.Tensor | None]:
    """For quantize-on-load: a row-parallel int8 layer's per-row max |w| over all ranks' columns, so
    its int8 scales are those of the whole layer (None for the other layers). QuantizeOnLoad asks only
    for int8 layers: an int4 group's fit needs nothing beyond its own 32 weights."""

    def absmax(module_name: str, weight: torch.Tensor) -> torch.Tensor | None:
        if not _ROW.fullmatch(module_name + ".weight"):
            return None
        local = weight.detach().abs().amax(dim=1).float()  # [out]
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=tp.group)
        return local

    return absmax


def shard_model(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Cut rank `tp.rank`'s shard out of a whole loaded model in place, and wire it (see `apply`)."""
    stored = "int4" if any(isinstance(m, Int4Linear) for m in model.modules()) else None
    selection = shard_selection(model.config, tp, stored)
    for name, parameter in list(model.named_parameters()):
        part = selection(name)
        if part is not None:
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(select(parameter.data, part),
                                                                         requires_grad=False))
    return apply(model, tp)


def apply(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Wire a model whose parameters are already rank `tp.rank`'s shards: local head counts and layer
    sizes, an all-reduce after each row-parallel layer, an all-gather after lm_head. Collective: sets
    up the model's `Collectives` (shared memory when the ranks share this host)."""
    check_divisible(model.config, tp.world_size)
    tp = replace(tp, collectives=Collectives(tp.group))
    heads = model.config.num_attention_heads // tp.world_size
    for block in model.transformer.h:
        block.attn.num_heads = heads  # each rank attends with its own heads (and its own cache)
        c_attn = block.attn.c_attn
        column = (c_attn.qk, c_attn.v) if isinstance(c_attn, Int4QkvLinear) else (c_attn,)
        for linear in (*column, block.mlp.w1, block.mlp.w2):
            linear.out_features = linear.weight.shape[0]
        c_attn.out_features = sum(linear.out_features for linear in column)
        for linear in (block.attn.c_proj, block.mlp.c_proj):
            # An Int4Linear's packed weight holds two inputs a byte.
            linear.in_features = linear.weight.shape[1] * (2 if isinstance(linear, Int4Linear) else 1)
            _reduce_after(linear, tp)
    model.lm_head.out_features = model.lm_head.weight.shape[0]
    model.lm_head.register_forward_hook(_GatherVocabulary(tp))
    embedding = model.transformer.wte
    embedding.__class__ = VocabParallelEmbedding
    embedding.num_embeddings = embedding.weight.shape[0]
    embedding.vocab_start = tp.rank * embedding.num_embeddings  # the vocabulary splits evenly
    embedding.collectives = tp.collectives
    model.tensor_parallel = tp
    return model


def _reduce_after(linear: nn.Module, tp: TensorParallel) -> None:
    """Row-parallel: the layer computes its partial sum without the bias; the hook adds the ranks'
    sums and then the bias, once. The bias is kept as `reduced_bias` (so the layer cannot add it)."""
    bias = linear.bias
    if bias is not None:
        linear.bias = None
        linear.register_parameter("reduced_bias", bias)
    linear.register_forward_hook(_AllReduce(tp))


class _AllReduce:
    def __init__(self, tp: TensorParallel) -> None:
        self.collectives = tp.collectives

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        self.collectives.all_reduce(output)  # the sum over the ranks' columns
        bias = getattr(module, "reduced_bias", None)
        return output if bias is None else output + bias


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding holding the rows vocab_start … vocab_start + num_embeddings of the vocabulary: each
    token's row comes from the one rank that has it (the others add zeros), by one all-reduce."""

    vocab_start: int = 0
    collectives: Collectives | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        elsewhere = (local < 0) | (local >= self.num_embeddings)  # [B, T] tokens another rank holds
        rows = F.embedding(local.masked_fill(elsewhere, 0), self.weight)  # [B, T, H]
        rows = rows.masked_fill(elsewhere[..., None], 0)
        self.collectives.all_reduce(rows)  # one non-zero row per token: the sum is exact
        return rows


class _GatherVocabulary:
    def __init__(self, tp: TensorParallel) -> None:
        self.collectives = tp.collectives

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        parts = self.collectives.all_gather(output)  # N × [B, T, V/N]
        return torch.cat(parts, dim=-1)  # [B, T, V], the vocabulary in rank order


__all__ = [
    "Collectives",
    "TensorParallel",
    "TensorParallelError",
    "VocabParallelEmbedding",
    "apply",
    "check_divisible",
    "check_int4_divisible",
    "init_process_group",
    "rank_device",
    "row_absmax",
    "shard_model",
    "shard_selection",
]
