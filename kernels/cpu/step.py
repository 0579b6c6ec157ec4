"""A whole step of a Qwen v1 model for B rows (one token per row in, their logits out) in one C call
(``step.c``), for x86-64 CPUs.

At batch 1 a step reads every weight once, so its floor is weight bytes / memory bandwidth. The GEMVs of
`nekomata_core.kernels.cpu.gemv` reach that bandwidth, but a PyTorch step also runs ~60 small operations per block
(norms, rotary, attention, casts, residuals), each with dispatch and allocation costs, and wakes the
thread team for every GEMV: on a 2-core machine that was a third of the step. `FusedStep` hands the
whole step — every block, the final norm and lm_head — to C, where one OpenMP region covers it.

For B > 1 rows each linear reads every weight row once and multiplies it into all B rows
(``nk_gemv_rows_batch`` in gemv.c), so a batch costs about the weight bytes of one step plus the
arithmetic: the step is bandwidth-amortised. Row b of a batched step is bit-identical to a batch-1 step
of row b alone (same operations, same order). Rows are left-padded sequences at one shared position,
each with its own key-mask row and its own rotary tables (per-row NTK alpha) or one shared table.

It computes what `nekomata_core.model` computes in the model dtype, with the same rounding points (see
the header of step.c); only summation orders differ. Weights may be fp32, bf16, int8 with
per-row scales (`Int8Linear`) or int4 with group scales and mins (`Int4Linear`), activations fp32,
bf16 or fp16.

This module knows tensors, not models: the caller (`nekomata_core.accelerate.NativeStep`) hands over each
block's tensors as a `BlockWeights`. The plan keeps references to every tensor it points at, so they
stay alive as long as it does; replacing a model's parameters afterwards needs a new plan (in-place
updates such as ``param.copy_()`` are seen).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from . import build
from .abi import DTYPE_CODES, INT4_GROUP_SIZE, MAX_HEAD_DIM, WEIGHT_KINDS
from .build import available, unavailable_reason  # the fused step ships in the GEMVs' library
from .gemv import _describe, _int4_scales

__all__ = [
    "MAX_HEAD_DIM",
    "BlockWeights",
    "FusedStep",
    "LinearWeights",
    "available",
    "stream_read",
    "unavailable_reason",
]


@dataclass(frozen=True)
class LinearWeights:
    """One linear layer: weight [N, K] (fp32, bf16, or int8 with `scales` [N]), or an int4 weight (uint8
    [N, K/2] with uint8 `scales` and int8 `mins` [N, K/32] and bf16 `scale_units` and `min_units`
    [ceil(N/8), K/32], see `nekomata_core.quantize.Int4Linear`); optional bias [N]."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None
    scale_units: torch.Tensor | None = None
    min_units: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockWeights:
    """The tensors of one transformer block, named as in the original Qwen checkpoint. `c_attn_v`: when
    given, c_attn holds only the q and k rows [2H, H] and c_attn_v the v rows [H, H] (an int4 model's
    c_attn: q and k int4, v int8), each with its part of the bias."""

    ln_1: torch.Tensor
    c_attn: LinearWeights
    attn_c_proj: LinearWeights
    ln_2: torch.Tensor
    w1: LinearWeights
    w2: LinearWeights
    mlp_c_proj: LinearWeights
    c_attn_v: LinearWeights | None = None


# The structs of step.c (nk_linear, nk_layer, nk_model, nk_step), field for field.
class _Linear(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("W", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("mins", ctypes.c_void_p),
        ("scale_units", ctypes.c_void_p),
        ("min_units", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("ln_1", ctypes.c_void_p),
        ("c_attn", _Linear),
        ("c_attn_v", _Linear),
        ("attn_proj", _Linear),
        ("ln_2", ctypes.c_void_p),
        ("w1", _Linear),
        ("w2", _Linear),
        ("mlp_proj", _Linear),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("rotary_dim", ctypes.c_int64),
        ("mlp_width", ctypes.c_int64),
        ("vocab", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("act", ctypes.c_int),
        ("layers", ctypes.POINTER(_Layer)),
        ("ln_f", ctypes.c_void_p),
        ("lm_head", _Linear),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int64),
        ("embedding", ctypes.c_void_p),
        ("tokens", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("rotary_rows", ctypes.c_int64),
        ("logn", ctypes.c_float),
        ("position", ctypes.c_int64),
        ("max_length", ctypes.c_int64),
        ("key_mask", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
        ("nthreads", ctypes.c_int),
    ]


def _library():
    lib = build.library()
    if lib is None:
        raise RuntimeError(f"the fused CPU step is unavailable: {build.unavailable_reason()}")
    return lib


def stream_read(address: int, nbytes: int, num_threads: int) -> int:
    """Read the whole 64-byte lines of the `nbytes` bytes at `address` once, with `num_threads` threads
    (a memory-bandwidth probe, see bench.ReadBandwidth); returns the sum of the 32-bit words read. The
    caller keeps the memory alive and readable."""
    if nbytes < 0 or num_threads < 1:
        raise ValueError(f"stream_read: nbytes must be ≥ 0 and num_threads ≥ 1, got {nbytes} and {num_threads}")
    return _library().nekomata_stream_read(address, nbytes, num_threads)


class FusedStep:
    """A step of any batch size bound to one model's tensors (see the module docstring).

    `step(...)` runs one token per row through every block and returns their logits [B, V] in the
    activation dtype.
    Construction checks every tensor (dtype, shape, device, layout) and raises ValueError naming the
    first one that does not fit; `step` checks the cache and the per-step inputs.
    """

    def __init__(
        self,
        *,
        embedding: torch.Tensor,
        blocks: list[BlockWeights],
        ln_f: torch.Tensor,
        lm_head: LinearWeights,
        num_heads: int,
        head_dim: int,
        rotary_dim: int,
        eps: float,
    ) -> None:
        lib = _library()
        self._step_fn = lib.nekomata_step
        self._scratch_bytes = lib.nekomata_step_scratch_bytes
        if embedding.dim() != 2:
            raise ValueError(f"embedding must be [vocab, hidden], got {_describe(embedding)}")
        act = embedding.dtype
        if act not in DTYPE_CODES:
            raise ValueError(f"the activation dtype must be float32, bfloat16 or float16, got {act}")
        self.act_dtype = act
        vocab_in, hidden = embedding.shape
        if num_heads * head_dim != hidden:
            raise ValueError(f"num_heads * head_dim = {num_heads * head_dim} but the hidden size is {hidden}")
        if not 0 < head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"head_dim {head_dim} is outside 1..{MAX_HEAD_DIM}, which the C step supports")
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and within 1..head_dim ({head_dim})")
        if not blocks:
            raise ValueError("a model needs at least one block")
        mlp_width = blocks[0].w1.weight.shape[0]
        self._keep: list[torch.Tensor] = []  # every tensor a pointer refers to
        self.embedding = self._tensor(embedding, "embedding", act, (vocab_in, hidden))
        self.num_layers, self.hidden, self.num_heads, self.head_dim = len(blocks), hidden, num_heads, head_dim
        layers = (_Layer * len(blocks))()
        for i, b in enumerate(blocks):
            name = f"blocks[{i}]"
            layers[i].ln_1 = self._vector(b.ln_1, f"{name}.ln_1", hidden)
            if b.c_attn_v is None:
                layers[i].c_attn = self._linear(b.c_attn, f"{name}.c_attn", 3 * hidden, hidden)
            else:  # q and k rows, then v rows (c_attn_v.W != NULL tells the C step)
                layers[i].c_attn = self._linear(b.c_attn, f"{name}.c_attn", 2 * hidden, hidden)
                layers[i].c_attn_v = self._linear(b.c_attn_v, f"{name}.c_attn_v", hidden, hidden)
            layers[i].attn_proj = self._linear(b.attn_c_proj, f"{name}.attn_c_proj", hidden, hidden)
            layers[i].ln_2 = self._vector(b.ln_2, f"{name}.ln_2", hidden)
            layers[i].w1 = self._linear(b.w1, f"{name}.w1", mlp_width, hidden)
            layers[i].w2 = self._linear(b.w2, f"{name}.w2", mlp_width, hidden)
            layers[i].mlp_proj = self._linear(b.mlp_c_proj, f"{name}.mlp_c_proj", hidden, mlp_width)
            if b.w1.weight.dtype != b.w2.weight.dtype:  # the C step prepares x once for both
                raise ValueError(
                    f"{name}: w1 and w2 must have the same weight dtype, got {b.w1.weight.dtype} and "
                    f"{b.w2.weight.dtype}"
                )
        self._layers = layers
        vocab = lm_head.weight.shape[0]
        self.vocab_size = vocab
        self._model = _Model(
            n_layers=len(blocks),
            hidden=hidden,
            n_heads=num_heads,
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            mlp_width=mlp_width,
            vocab=vocab,
            eps=eps,
            act=DTYPE_CODES[act],
            layers=layers,
            ln_f=self._vector(ln_f, "ln_f", hidden),
            lm_head=self._linear(lm_head, "lm_head", vocab, hidden),
        )
        self._scratch = torch.empty(0, dtype=torch.uint8)  # grown to the largest batch stepped
        self._cache_checked: tuple | None = None
        # The scratch buffers are shared by every call: two threads stepping one plan at once (ctypes
        # releases the GIL) would overwrite each other's activations, so calls are serialised.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ checks and pointers
    def _tensor(self, t, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if not (
            isinstance(t, torch.Tensor)
            and t.dtype == dtype
            and tuple(t.shape) == shape
            and t.device.type == "cpu"
            and t.is_contiguous()
        ):
            raise ValueError(
                f"{name}: expected a contiguous CPU {dtype} tensor of shape {shape}, got {_describe(t)}"
            )
        self._keep.append(t)
        return t

    def _vector(self, t, name: str, n: int) -> int:
        return self._tensor(t, name, self.act_dtype, (n,)).data_ptr()

    def _linear(self, lin: LinearWeights, name: str, n: int, k: int) -> _Linear:
        w = lin.weight
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{name}.weight: expected a tensor, got {_describe(w)}")
        kind = WEIGHT_KINDS.get(w.dtype)
        mins = scale_units = min_units = None
        int4_parts = (lin.mins, lin.scale_units, lin.min_units)
        if w.dtype == torch.int8:
            if lin.scales is None:
                raise ValueError(f"{name}: an int8 weight needs its per-row scales")
            scales = self._vector(lin.scales, f"{name}.scales", n)
        elif w.dtype == torch.uint8:  # int4, two codes a byte
            if lin.scales is None or any(t is None for t in int4_parts):
                raise ValueError(f"{name}: an int4 weight needs its scales, mins, scale_units and min_units")
            if k % INT4_GROUP_SIZE:
                raise ValueError(f"{name}: int4 needs K divisible by {INT4_GROUP_SIZE}, got {k}")
            parts = (lin.scales, *int4_parts)
            scales, mins, scale_units, min_units = _int4_scales(n, k, *parts, name)  # checked as linear_int4 does
            self._keep.extend(parts)
        elif kind is not None:
            if lin.scales is not None or any(t is not None for t in int4_parts):
                raise ValueError(f"{name}: scales are only for int8/int4 weights, this one is {w.dtype}")
            scales = None
        else:
            raise ValueError(
                f"{name}.weight: the C step reads float32, bfloat16, int8 or int4 (uint8) weights, got {w.dtype}"
            )
        self._tensor(w, f"{name}.weight", w.dtype, (n, k // 2) if w.dtype == torch.uint8 else (n, k))
        bias = None if lin.bias is None else self._vector(lin.bias, f"{name}.bias", n)
        return _Linear(kind=kind, W=w.data_ptr(), scales=scales, mins=mins, scale_units=scale_units,
                       min_units=min_units, bias=bias, N=n, K=k)

    def _check_cache(self, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor) -> None:
        ident = (keys.data_ptr(), values.data_ptr(), key_mask.data_ptr(), tuple(keys.shape))
        if ident == self._cache_checked:
            return
        batch, t_max = (keys.shape[1], keys.shape[3]) if keys.dim() == 5 else (-1, -1)
        want = (self.num_layers, batch, self.num_heads, t_max, self.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            if not (
                isinstance(t, torch.Tensor)
                and tuple(t.shape) == want
                and t.dtype == self.act_dtype
                and t.device.type == "cpu"
                and t.is_contiguous()
            ):
                raise ValueError(
                    f"cache {name}: expected a contiguous CPU {self.act_dtype} tensor [L, B, N, T_max, D] = "
                    f"{list(want)}, got {_describe(t)}"
                )
        if not (
            key_mask.dtype == torch.bool and key_mask.is_contiguous() and tuple(key_mask.shape) == (batch, t_max)
        ):
            raise ValueError(
                f"key_mask: expected a contiguous bool tensor [B, T_max] = [{batch}, {t_max}], got {_describe(key_mask)}"
            )
        self._cache_checked = ident

    # ------------------------------------------------------------------ the step
    def step(
        self,
        tokens: torch.Tensor,
        position: int,
        *,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: float | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor,
        num_threads: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, V] (activation dtype) of `tokens` [B] (int64, one per row) at `position`; writes
        their keys/values into the cache.

        cos/sin: fp32 [Bα, R] rotary tables for this position, Bα = B (each row its own NTK alpha) or 1
        (shared); logn: the factor already rounded to the activation dtype, or None; keys/values:
        [L, B, N, T_max, D]; key_mask: [B, T_max] bool (True = real token, the new position included;
        left padding False). Positions 0..position-1 must hold the earlier keys.
        """
        self._check_cache(keys, values, key_mask)
        batch, t_max = keys.shape[1], keys.shape[3]
        if not 0 <= position < t_max:
            raise ValueError(f"position {position} is outside the cache (0..{t_max - 1})")
        if not (isinstance(tokens, torch.Tensor) and tokens.dtype == torch.int64 and tuple(tokens.shape) == (batch,)):
            raise ValueError(f"tokens: expected an int64 tensor of shape ({batch},), got {_describe(tokens)}")
        tokens = tokens.contiguous()
        vocab_in = self.embedding.shape[0]
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_in:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_in})")
        rotary_dim = self._model.rotary_dim
        for name, t in (("cos", cos), ("sin", sin)):
            if not (
                t.dtype == torch.float32
                and t.is_contiguous()
                and t.dim() == 2
                and t.shape[0] in (1, batch)
                and t.shape[1] == rotary_dim
            ):
                raise ValueError(
                    f"{name}: expected contiguous float32 tables [1 or {batch}, {rotary_dim}], got {_describe(t)}"
                )
        if cos.shape[0] != sin.shape[0]:
            raise ValueError(f"cos and sin must have the same rows, got {cos.shape[0]} and {sin.shape[0]}")
        logits = torch.empty(batch, self.vocab_size, dtype=self.act_dtype)
        with self._lock:
            nbytes = self._scratch_bytes(ctypes.byref(self._model), batch)
            if self._scratch.numel() < nbytes:
                self._scratch = torch.empty(nbytes, dtype=torch.uint8)
            args = _Step(
                batch=batch,
                embedding=self.embedding.data_ptr(),
                tokens=tokens.data_ptr(),
                cos=cos.data_ptr(),
                sin=sin.data_ptr(),
                rotary_rows=cos.shape[0],
                logn=0.0 if logn is None else float(logn),
                position=position,
                max_length=t_max,
                key_mask=key_mask.data_ptr(),
                keys=keys.data_ptr(),
                values=values.data_ptr(),
                logits=logits.data_ptr(),
                scratch=self._scratch.data_ptr(),
                nthreads=num_threads or torch.get_num_threads(),
            )
            status = self._step_fn(ctypes.byref(self._model), ctypes.byref(args))
        if status == -1:
            raise MemoryError("the fused CPU step could not allocate its per-thread work buffers")
        if status != 0:
            raise RuntimeError(f"the fused CPU step failed (status {status})")
        return logits
