"""The Qwen (v1) decoder, as rinna/nekomata-7b and its siblings run it — read top to bottom.

A Qwen v1 model is a GPT-style stack of pre-norm transformer blocks:

    x = wte(input_ids)                              token embedding, no scaling
    for each of the L blocks:
        x = x + attn(rmsnorm_1(x))                  causal self-attention with rotary positions
        x = x + mlp(rmsnorm_2(x))                   SwiGLU feed-forward
    logits = lm_head(rmsnorm_f(x))                  untied output projection

Parameter names follow the original remote code (`transformer.h.{i}.attn.c_attn`, `mlp.w1`, …) so that
checkpoints load without renaming. Five things about Qwen are unusual, and each is marked `Qwen quirk`
where it happens:

1. RMSNorm casts back to the input dtype *before* multiplying by its weight.
2. The MLP width is `intermediate_size // 2`, and `w2` (not `w1`) is the gated branch.
3. Dynamic NTK: past the trained context `seq_length` (S) the rotary base is enlarged; the factor is
   chosen once, at prefill, from the prompt length and then kept for every decode step.
4. logn attention: queries at positions past S are scaled up by log(p + 1) / log(S).
5. `c_attn` (the fused q/k/v projection) has a bias although the config says `no_bias`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import QwenConfig
from .errors import NekomataError

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "eager")
PREFILL_UPCAST_ROWS = 8  # rows from which a half-precision CPU matmul is done in fp32 (see Linear)
OPS_BACKENDS = ("auto", "triton", "eager")


class InputError(NekomataError):
    """The inputs of a forward call are malformed (shape, dtype, token ids, attention mask)."""


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, device: torch.device | None = None) -> None:
    """The checks of `QwenForCausalLM.forward` on token ids [B, T], shared with `generate` so that both
    refuse the same inputs with the same words. `device=None` skips the device check."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch.LongTensor [B, T], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise InputError(
            f"input_ids must have shape [batch, length] with both > 0, got {tuple(input_ids.shape)}; "
            "for one sequence use input_ids[None]"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be integer token ids (torch.long), got {input_ids.dtype}")
    if device is not None and input_ids.device != device:
        raise InputError(
            f"input_ids are on {input_ids.device} but the model is on {device}; "
            f"move them with input_ids.to({str(device)!r})"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(
            f"token id {bad} in input_ids is outside the vocabulary [0, {vocab_size}); "
            "was the input made by this model's tokenizer?"
        )


def check_attention_mask(attention_mask: torch.Tensor, batch: int, lengths: tuple[int, ...]) -> None:
    """An attention mask must be a tensor [batch, one of `lengths`] holding only 0 and 1 (or bool).
    Lists and arrays are refused rather than converted, by `forward` and `generate` alike."""
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(
            f"attention_mask must be a torch.Tensor [batch, length] of 0/1, got {type(attention_mask).__name__}; "
            "convert it with torch.tensor(mask)"
        )
    expected = " or ".join(f"[{batch}, {n}]" for n in dict.fromkeys(lengths))
    if (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != batch
        or attention_mask.shape[1] not in lengths
    ):
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected {expected} "
            "(the shape of input_ids, or cached + new tokens)"
        )
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise InputError(
            "attention_mask must hold only 0 (padding) and 1 (real token); "
            f"it holds {_first_bad_mask_value(attention_mask)}"
        )


def _first_bad_mask_value(mask: torch.Tensor) -> str:
    bad = mask[(mask != 0) & (mask != 1)]
    return repr(bad[0].item())


# --------------------------------------------------------------------------------------------------
# Linear layers (plain nn.Linear, with one CPU speed path)
# --------------------------------------------------------------------------------------------------
def cpu_has_native_half_matmul() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) with a faster route for one case.

    On CPUs without bf16/fp16 arithmetic (no AVX512-BF16, no AMX), PyTorch's half-precision matmul is
    emulated and gets slower with every row: a 128-token prefill runs ~10× slower than in fp32. When
    `upcast_rows` is set and a call has at least that many rows, we multiply in fp32 and round once to
    the model dtype, which is what the native bf16 kernels do too (fp32 accumulation, one rounding),
    in another summation order. Decode (one row) keeps the half-precision GEMV: it is memory-bound and
    reads half the bytes.
    """

    upcast_rows = 0  # 0: never (set by QwenForCausalLM.set_backends)
    # Decode on CPU: a one-row bf16 call goes to kernels.cpu_gemv, a bandwidth-bound AVX2 GEMV
    # (PyTorch's bf16 GEMV is compute-bound on CPUs without bf16 instructions). Set by set_backends.
    native_gemv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_gemv and x.numel() == x.shape[-1]:
            from kernels import cpu_gemv

            if torch.compiler.is_compiling():  # a graph node instead of an opaque ctypes call
                return cpu_gemv.linear_bf16_op(x, self.weight, self.bias)
            return cpu_gemv.linear_bf16(x, self.weight, self.bias)
        if self.upcast_rows and x.dtype != torch.float32 and x.numel() >= self.upcast_rows * x.shape[-1]:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.use_triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from kernels.gpu.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 for accuracy, whatever the model dtype: x · rsqrt(mean(x²) + eps).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        # Qwen quirk 1: cast back to the input dtype BEFORE the weight multiply (the product is then
        # rounded once more in bf16/fp16; doing it in fp32 would differ in the last bit).
        return normed.to(x.dtype) * self.weight


# --------------------------------------------------------------------------------------------------
# Rotary position embedding, with dynamic NTK (Qwen quirk 3)
# --------------------------------------------------------------------------------------------------
def ntk_alpha(length: int, seq_length: int) -> float:
    """The dynamic-NTK factor for a prompt of `length` tokens: 1 up to S, 3 up to 2S, 7 up to 4S, …

    alpha = max(2^ceil(log2(length / S) + 1) − 1, 1)
    """
    if length <= 0:
        return 1.0
    context_value = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def rotary_inv_freq(base: float, rotary_dim: int, alpha: float, device=None) -> torch.Tensor:
    """inv_freq [R/2] for one NTK alpha: base' = base · alpha^(R / (R − 2)), inv_freq = base'^(−2i/R)."""
    ntk_base = base * alpha ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim
    return 1.0 / (ntk_base**exponents)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given absolute positions [T] and per-row inv_freq [Bα, R/2].

    Returns two float32 tensors [Bα, T, R] laid out as cat(freqs, freqs) for rotate-half.
    """
    freqs = positions.float()[None, :, None] * inv_freq[:, None, :]  # [Bα, T, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [Bα, T, R]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of every head of x [B, T, N, D]; the rest pass through.

    The maths is done in float32 from the upcast input and cast back, as the original does.
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [Bα, T, 1, R] broadcast over heads
    rotated, passthrough = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    rotated = rotated * cos + rotate_half(rotated) * sin
    if passthrough.shape[-1] == 0:
        return rotated.to(x.dtype)
    return torch.cat((rotated.to(x.dtype), passthrough), dim=-1)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Qwen quirk 4: the factor log(p + 1) / log(S) for query positions p with p + 1 > S, else 1.

    Computed in float64 for any length (the original tabulates it only up to 32767). [T] float32.
    """
    p1 = positions.to(torch.float64) + 1
    scale = torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
    return scale.float()


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
class AttentionInputs:
    """What every layer's attention needs for one forward call, computed once per call."""

    def __init__(
        self,
        start: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: torch.Tensor | None,
        allowed: torch.Tensor | None,
        key_start: torch.Tensor | None,
        cache: KVCache | None,
        write_index: torch.Tensor | None = None,
    ) -> None:
        self.start = start  # absolute position of the first new token
        self.cos, self.sin = cos, sin  # [Bα, T, R] float32
        self.logn = logn  # [T] float32 query scale, or None below S
        self.allowed = allowed  # [B, 1, T, T_keys] bool, or None when plain causal suffices
        self.key_start = key_start  # [B] first real key per row (left padding), for the kernels
        self.cache = cache
        # Static decode (see QwenForCausalLM.decode_step): the position to write, as a tensor, and
        # attention over the whole preallocated cache with a mask — no shape depends on the step.
        self.write_index = write_index
        self._logn_cast: dict[torch.dtype, torch.Tensor] = {}

    def logn_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The logn factors rounded to `dtype`, shaped [1, 1, T, 1] for q [B, N, T, D]; made once per call."""
        if dtype not in self._logn_cast:
            self._logn_cast[dtype] = self.logn.to(dtype)[None, None, :, None]
        return self._logn_cast[dtype]


class Attention(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.seq_length = config.seq_length
        hidden = config.hidden_size
        # Qwen quirk 5: q, k and v come from ONE projection, with a bias, even though `no_bias` is
        # true (that flag governs the other linears). Rows are [q; k; v], each hidden_size tall.
        self.c_attn = Linear(hidden, 3 * hidden, bias=True)
        self.c_proj = Linear(hidden, hidden, bias=not config.no_bias)
        self.backend = "sdpa"  # "eager" | "sdpa" | "triton", set by QwenForCausalLM.set_backends
        self.rope_backend = "eager"
        self.layer_index = 0

    def forward(self, x: torch.Tensor, ctx: AttentionInputs) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.c_attn(x)  # [B, T, 3H]
        n, d = self.num_heads, self.head_dim
        v = qkv[..., 2 * hidden :].view(batch, length, n, d)  # [B, T, N, D]
        if self.rope_backend == "triton":
            from kernels.gpu.rope import apply_rope

            q = qkv[..., :hidden].view(batch, length, n, d)
            k = qkv[..., hidden : 2 * hidden].view(batch, length, n, d)
            q, k = apply_rope(q, k, ctx.cos, ctx.sin)
        else:
            # q and k sit side by side in qkv: rotate them as 2N heads in one go.
            qk = apply_rotary(qkv[..., : 2 * hidden].view(batch, length, 2 * n, d), ctx.cos, ctx.sin)
            q, k = qk[:, :, :n], qk[:, :, n:]  # [B, T, N, D] each

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, N, T, D]
        if ctx.write_index is not None:
            ctx.cache.keys[self.layer_index].index_copy_(2, ctx.write_index, k)
            ctx.cache.values[self.layer_index].index_copy_(2, ctx.write_index, v)
            k, v = ctx.cache.keys[self.layer_index], ctx.cache.values[self.layer_index]  # [B, N, T_max, D]
        elif ctx.cache is not None:
            # The cache keeps keys after RoPE (and before any logn, which only touches queries).
            ctx.cache.write(self.layer_index, k, v, ctx.start)
            k, v = ctx.cache.layer_view(self.layer_index, ctx.start + length)  # [B, N, T_keys, D]

        if self.backend == "triton" and (ctx.allowed is None or ctx.key_start is not None):
            out = self._triton_attention(q, k, v, ctx)
        else:
            if ctx.logn is not None:
                # Qwen quirk 4: queries past S are sharpened; the factor is rounded to the model
                # dtype first, exactly as the original's `logn_tensor.type_as(query)`.
                q = q * ctx.logn_in(q.dtype)
            out = self._torch_attention(q, k, v, ctx)
        out = out.transpose(1, 2).reshape(batch, length, hidden)  # [B, T, H]
        return self.c_proj(out)

    def _torch_attention(self, q, k, v, ctx: AttentionInputs) -> torch.Tensor:
        plain_causal = ctx.allowed is None
        if self.backend == "sdpa":
            if plain_causal and q.shape[2] == k.shape[2]:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if plain_causal and q.shape[2] == 1:  # one new token sees every cached key
                return F.scaled_dot_product_attention(q, k, v)
            allowed = ctx.allowed if not plain_causal else _causal_mask(q.shape[2], k.shape[2], q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        # eager: the textbook formula, softmax in fp32.
        allowed = ctx.allowed if not plain_causal else _causal_mask(q.shape[2], k.shape[2], q.device)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, N, T, T_keys]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return probs @ v

    def _triton_attention(self, q, k, v, ctx: AttentionInputs) -> torch.Tensor:
        logn_s = self.seq_length if ctx.logn is not None else None
        if q.shape[2] == 1 and ctx.cache is not None:
            from kernels.gpu.decode_attention import decode_attention

            # The query's own position + 1 keys are valid (static decode passes it as a tensor).
            kv_len = ctx.start + 1 if ctx.write_index is None else (ctx.write_index + 1).expand(q.shape[0])
            return decode_attention(
                q,
                ctx.cache.keys[self.layer_index],
                ctx.cache.values[self.layer_index],
                kv_len=kv_len,
                key_start=ctx.key_start,
                logn_seq_length=logn_s,
            )
        from kernels.gpu.attention import flash_attention

        return flash_attention(q, k, v, q_start=ctx.start, key_start=ctx.key_start, logn_seq_length=logn_s)


def _causal_mask(new: int, total: int, device) -> torch.Tensor:
    """[T, T_keys] bool: query i (absolute position total-new+i) sees keys 0 … its own position."""
    q_pos = torch.arange(total - new, total, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= q_pos


# --------------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        # Qwen quirk 2: config.intermediate_size is twice the real width (22016 → 11008 for 7B).
        width = config.mlp_width
        bias = not config.no_bias
        self.w1 = Linear(config.hidden_size, width, bias=bias)  # linear ("up") branch
        self.w2 = Linear(config.hidden_size, width, bias=bias)  # gated branch: silu goes HERE
        self.c_proj = Linear(width, config.hidden_size, bias=bias)
        self.use_triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from kernels.gpu.swiglu import swiglu

            return self.c_proj(swiglu(self.w1(x), self.w2(x)))
        # Qwen quirk 2 (cont.): w1(x) * silu(w2(x)) — not silu(w1(x)) * w2(x) as in LLaMA naming.
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


# --------------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: AttentionInputs) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The body, named `transformer` as in the original so that parameter keys match."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        for i, block in enumerate(self.h):
            block.attn.layer_index = i


class QwenForCausalLM(nn.Module):
    """Qwen v1 causal language model (the original's `QWenLMHeadModel`).

    Forward forms:
    - `model(input_ids)` → logits [B, T, V]: a plain causal forward over the whole sequence.
    - `model(input_ids, attention_mask)`: rows left- (or right-) padded; mask 1 = real token.
    - `model(new_ids, attention_mask, cache=cache)`: incremental. The first call on an empty cache is
      the prefill (it fixes the NTK alpha); later calls append tokens. `attention_mask` may cover
      just the new tokens [B, T_new] or the whole sequence [B, cache.length + T_new] as in HF.
    """

    def __init__(
        self, config: QwenConfig, *, attention_backend: str = "auto", ops_backend: str = "auto"
    ) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)  # untied
        self._requested_backends = (attention_backend, ops_backend)
        self.attention_backend = "sdpa"
        self.ops_backend = "eager"
        if not any(p.is_meta for p in self.parameters()):
            self.set_backends(attention_backend, ops_backend)
        else:
            _check_backend_names(attention_backend, ops_backend)

    # -------------------------------------------------------------- construction and loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str],
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        revision: str | None = None,
        attention_backend: str = "auto",
        ops_backend: str = "auto",
        progress: bool = True,
        quantize: str | None = None,
        allow_pickle: bool = False,
    ) -> QwenForCausalLM:
        """Load a checkpoint from a local directory or a Hub repo id (see `nekomata_core.pretrained`).

        quantize="int8" stores every linear layer as int8 with per-channel scales (nekomata_core.quantize).
        allow_pickle=True also reads pickled pytorch_model*.bin weights (refused by default).
        """
        from .pretrained import load_pretrained

        return load_pretrained(
            cls,
            path_or_repo_id,
            dtype=dtype,
            device=device,
            revision=revision,
            attention_backend=attention_backend,
            ops_backend=ops_backend,
            progress=progress,
            quantize=quantize,
            allow_pickle=allow_pickle,
        )

    def set_backends(self, attention: str | None = None, ops: str | None = None) -> None:
        """Choose the attention ("auto"|"triton"|"sdpa"|"eager") and fused-op ("auto"|"triton"|"eager")
        implementations. "auto" picks Triton on CUDA when it imports, PyTorch otherwise."""
        attention = attention or self._requested_backends[0]
        ops = ops or self._requested_backends[1]
        _check_backend_names(attention, ops)
        from kernels.dispatch import resolve_backend

        device = self.device
        self.attention_backend = resolve_backend(attention, device)
        resolved_ops = resolve_backend(ops, device)
        self.ops_backend = "triton" if resolved_ops == "triton" else "eager"
        self._requested_backends = (attention, ops)
        use_triton_ops = self.ops_backend == "triton"
        upcast = (
            PREFILL_UPCAST_ROWS
            if device.type == "cpu" and self.dtype != torch.float32 and not cpu_has_native_half_matmul()
            else 0
        )
        from .quantize import Int8Linear

        # The CPU GEMV serves bf16 and int8 weights only; probing it builds the C library, so ask only
        # when this model has such layers.
        bf16_gemv = self.dtype == torch.bfloat16
        int8_layers = any(isinstance(m, Int8Linear) for m in self.modules())
        native_gemv = (
            ops == "auto" and device.type == "cpu" and (bf16_gemv or int8_layers) and _cpu_gemv_available()
        )
        for module in self.modules():
            if isinstance(module, Linear):
                module.upcast_rows = upcast
                module.native_gemv = native_gemv and bf16_gemv
            if isinstance(module, Int8Linear):
                module.native_gemv = native_gemv
            if isinstance(module, (RMSNorm, MLP)):
                module.use_triton = use_triton_ops
            if isinstance(module, Attention):
                module.backend = self.attention_backend
                module.rope_backend = "triton" if use_triton_ops else "eager"

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (for an int8 model, the dtype of its scales)."""
        head = self.lm_head
        return head.scales.dtype if hasattr(head, "scales") else head.weight.dtype

    def allocate_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A fresh static KV cache for `batch_size` sequences of up to `max_length` positions."""
        return KVCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device)

    # -------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits [B, T, V] in the model dtype ([B, 1, V] with `last_logits_only`).

        With `output_hidden_states=True` returns `(logits, hidden_states)` where hidden_states holds
        L + 1 tensors [B, T, H]: the embeddings, then each block's output (the last one before ln_f),
        as Hugging Face orders them.
        """
        self._check_input_ids(input_ids)
        batch, length = input_ids.shape
        start = 0
        if cache is not None:
            cache.check_fits(batch, length)
            start = cache.length
        total = start + length
        key_mask = self._key_mask(attention_mask, batch, length, start, total, cache)  # [B, total] | None

        ctx = self._attention_inputs(key_mask, batch, start, length, total, cache)
        x = self.transformer.wte(input_ids)  # [B, T, H]
        hidden_states = [x] if output_hidden_states else None
        for block in self.transformer.h:
            x = block(x, ctx)
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None:
            cache.length = total
        if last_logits_only:
            x = x[:, -1:, :]  # prefill needs only the next-token distribution
        logits = self.lm_head(self.transformer.ln_f(x))
        if hidden_states is not None:
            return logits, tuple(hidden_states)
        return logits

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """One decode step with fixed shapes: logits [B, V] for `tokens` [B, 1] at `position` ([1] long).

        The same computation as `model(tokens, cache=cache)[:, -1]` after a prefill, but written for
        `torch.compile` and CUDA graphs: no Python-side checks, no shape that depends on the step, the
        keys/values written with `index_copy_` and attention taken over the whole preallocated cache
        under a mask. The caller marks the position valid and advances `cache.length`
        (`nekomata_core.decode.StaticDecoder` does both). On x86-64 CPUs at batch 1,
        `nekomata_core.decode.NativeDecoder` runs this same computation as one C call (kernels/cpu_decode.c).
        """
        config = self.config
        device = tokens.device
        # Qwen quirk 3: the inv_freq of the prefill's NTK alpha, fixed in the cache at prefill.
        freqs = position.float()[None, :, None] * cache.inv_freq[:, None, :]  # [Bα, 1, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        logn = None
        if config.use_logn_attn:  # Qwen quirk 4: a factor of exactly 1 until position + 1 > S
            logn = logn_scale(position, config.seq_length)
        slots = torch.arange(cache.max_length, device=device)
        allowed = cache.key_mask & (slots <= position)  # [B, T_max]
        key_start = None
        if self.attention_backend == "triton":  # the kernels take padding as the first real token per row
            key_start = (~cache.key_mask).int().argmin(dim=-1).to(torch.int32)
        ctx = AttentionInputs(
            0, emb.cos(), emb.sin(), logn, allowed[:, None, None, :], key_start, cache, write_index=position
        )
        x = self.transformer.wte(tokens)  # [B, 1, H]
        for block in self.transformer.h:
            x = block(x, ctx)
        return self.lm_head(self.transformer.ln_f(x))[:, -1]

    @torch.no_grad()
    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        layer: int = -1,
        pooling: str = "mean",
    ) -> torch.Tensor:
        """One vector per sequence [B, H] from the hidden states of `layer`, for downstream use.

        layer: index into the L + 1 hidden states (0 = embeddings, -1 = the final block's output after
        ln_f, as transformers' last hidden state). pooling: "mean" averages the real tokens
        (attention_mask 1); "last" takes the last real token (right- or left-padded rows alike);
        "none" returns every position [B, T, H].
        """
        if pooling not in ("mean", "last", "none"):
            raise ValueError(f"pooling={pooling!r}; choose 'mean', 'last' or 'none'")
        n_states = self.config.num_hidden_layers + 1
        if not -n_states <= layer < n_states:
            raise ValueError(f"layer={layer} is out of range: this model has {n_states} hidden states")
        _, hidden = self(input_ids, attention_mask, output_hidden_states=True)
        states = hidden[layer]
        if layer % n_states == n_states - 1:
            states = self.transformer.ln_f(states)  # the final hidden state is the normalised one
        if pooling == "none":
            return states
        mask = (
            torch.ones(input_ids.shape, dtype=torch.bool, device=states.device)
            if attention_mask is None
            else attention_mask.to(device=states.device).bool()
        )
        if pooling == "mean":
            weights = mask.to(torch.float32)[..., None]  # [B, T, 1]
            summed = (states.float() * weights).sum(dim=1)
            return (summed / weights.sum(dim=1).clamp(min=1)).to(states.dtype)
        positions = torch.arange(mask.shape[1], device=states.device).expand_as(mask)
        last = torch.where(mask, positions, -1).argmax(dim=1)  # the rightmost real token per row
        return states[torch.arange(states.shape[0], device=states.device), last]

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        check_input_ids(input_ids, self.config.vocab_size, self.device)

    def _key_mask(self, attention_mask, batch, length, start, total, cache) -> torch.Tensor | None:
        """Which key positions hold real tokens: [B, total] bool, or None when all do."""
        if attention_mask is not None:
            check_attention_mask(attention_mask, batch, (length, total))
            new_part = attention_mask[:, -length:].to(device=self.device, dtype=torch.bool)
        else:
            new_part = None
        if cache is None:
            return None if new_part is None or bool(new_part.all()) else new_part
        if attention_mask is not None and attention_mask.shape[1] == total and start > 0:
            cache.key_mask[:, :start] = attention_mask[:, :start].to(device=self.device, dtype=torch.bool)
        cache.key_mask[:, start:total] = True if new_part is None else new_part
        full = cache.key_mask[:, :total]
        return None if bool(full.all()) else full

    def _attention_inputs(self, key_mask, batch, start, length, total, cache) -> AttentionInputs:
        config = self.config
        device = self.device
        # Qwen quirk 3 — dynamic NTK. A call that starts at position 0 is a prefill: it chooses alpha
        # from the prompt length (per row, from each row's real length, when padded rows exceed S).
        # Every later call reuses the prefill's alpha, even once generation runs past S.
        if start == 0 or cache is None or cache.ntk_alpha is None:
            if not config.use_dynamic_ntk:
                alphas = [1.0]
            elif key_mask is not None and total > config.seq_length:
                real_lengths = key_mask.sum(dim=-1).tolist()
                alphas = [ntk_alpha(n, config.seq_length) for n in real_lengths]
            else:
                alphas = [ntk_alpha(total, config.seq_length)]
            alpha = torch.tensor(alphas, dtype=torch.float64)
            if cache is not None:
                cache.ntk_alpha = alpha
        else:
            alpha = cache.ntk_alpha
        if bool((alpha == alpha[0]).all()):
            alpha = alpha[:1]  # one table serves every row
        inv_freq = torch.stack(
            [rotary_inv_freq(config.rotary_emb_base, config.rotary_dim, float(a), device) for a in alpha]
        )  # [Bα, R/2]
        if cache is not None:
            cache.inv_freq = inv_freq
        positions = torch.arange(start, total, device=device)
        cos, sin = rotary_cos_sin(positions, inv_freq)

        # Qwen quirk 4 — logn attention, only once the keys reach past S.
        logn = None
        if config.use_logn_attn and total > config.seq_length:
            logn = logn_scale(positions, config.seq_length)

        allowed = key_start = None
        if key_mask is not None:
            causal = _causal_mask(length, total, device)  # [T, total]
            allowed = causal[None] & key_mask[:, None, :]  # [B, T, total]
            # A padding query may see no key at all; let it see itself so softmax stays finite
            # (its output is never used, but a NaN would leak through 0·NaN in later layers).
            allowed = allowed | torch.eye(total, device=device, dtype=torch.bool)[None, start:total]
            allowed = allowed[:, None]  # [B, 1, T, total]
            if self.attention_backend == "triton":
                key_start = (~key_mask).int().argmin(dim=-1).to(torch.int32)  # first real token per row
                # The Triton kernels describe padding by `key_start` alone (left padding). Any other mask
                # (right padding, holes) is handled by the PyTorch attention for this call.
                slots = torch.arange(total, device=device)
                if not bool((key_mask == (slots[None, :] >= key_start[:, None])).all()):
                    key_start = None
        return AttentionInputs(start, cos, sin, logn, allowed, key_start, cache)


def _cpu_gemv_available() -> bool:
    """Whether kernels.cpu_gemv can run here (x86-64 with AVX2/FMA and a C compiler; built once)."""
    from kernels import cpu_gemv

    return cpu_gemv.available()


def _check_backend_names(attention: str, ops: str) -> None:
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={attention!r}; choose one of {list(ATTENTION_BACKENDS)}")
    if ops not in OPS_BACKENDS:
        raise ValueError(f"ops_backend={ops!r}; choose one of {list(OPS_BACKENDS)}")


def count_parameters(model: nn.Module, names: Sequence[str] | None = None) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if names is None or n in names)
