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
   chosen once, at prefill, from the prompt length and then kept for every later step.
4. logn attention: queries at positions past S are scaled up by log(p + 1) / log(S).
5. `c_attn` (the fused q/k/v projection) has a bias although the config says `no_bias`.

This file is the architecture only: plain `nn.Linear`s and PyTorch ops. Faster implementations (C
GEMVs on CPUs, Triton kernels on GPUs, a whole step in C) are swapped in from outside by
`nekomata_core.accelerate`, module for module, computing the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import QwenConfig
from .embeddings import check_pooling, pool
from .inputs import InputError, check_attention_mask, check_input_ids

__all__ = ["InputError", "QwenForCausalLM", "StepInputs"]


# ==================== RMSNorm =====================================================================
class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for accuracy, whatever the model dtype: x · rsqrt(mean(x²) + eps).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        # Qwen quirk 1: cast back to the input dtype BEFORE the weight multiply (the product is then
        # rounded once more in bf16/fp16; doing it in fp32 would differ in the last bit).
        return normed.to(x.dtype) * self.weight


# ==================== Positions: rotary with dynamic NTK (quirk 3), logn (quirk 4) =============
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


class Rotary(nn.Module):
    """Rotates queries and keys [B, T, N, D] by their positions (no parameters: a swappable op)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        heads = q.shape[2]
        qk = apply_rotary(torch.cat((q, k), dim=2), cos, sin)  # both as 2N heads in one go
        return qk[:, :, :heads], qk[:, :, heads:]


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Qwen quirk 4: the factor log(p + 1) / log(S) for query positions p with p + 1 > S, else 1.

    Computed in float64 for any length (the original tabulates it only up to 32767). [T] float32.
    """
    p1 = positions.to(torch.float64) + 1
    scale = torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
    return scale.float()


@dataclass
class StepInputs:
    """What every layer's attention needs for one forward call, computed once per call."""

    positions: torch.Tensor  # [T] absolute positions of the new tokens
    cos: torch.Tensor  # [Bα, T, R] float32 rotary tables (Bα = 1, or B when rows have their own alpha)
    sin: torch.Tensor
    logn: torch.Tensor | None  # [1, 1, T, 1] query scale in the activation dtype; None below S
    mask: torch.Tensor | None  # [B, 1, T, T_keys] bool, True = may attend; None = plain causal
    key_mask: torch.Tensor | None  # [B, T_keys] real (non-padding) keys; None = all real
    cache: KVCache | None
    write_at: int | torch.Tensor  # where the cache stores the new keys (see KVCache.update)


def step_inputs(
    config: QwenConfig, cache: KVCache | None, key_mask: torch.Tensor | None, start: int, length: int, dtype, device
) -> StepInputs:
    """The inputs of a call that adds `length` tokens after `start` cached ones."""
    total = start + length
    # Qwen quirk 3 — dynamic NTK. A call that starts at position 0 is a prefill: it chooses alpha
    # from the prompt length (per row, from each row's real length, when padded rows exceed S).
    # Every later call reuses the prefill's alpha, even once generation runs past S.
    if cache is None or start == 0 or cache.ntk_alpha is None:
        if not config.use_dynamic_ntk:
            alphas = [1.0]
        elif key_mask is not None and total > config.seq_length:
            alphas = [ntk_alpha(n, config.seq_length) for n in key_mask.sum(dim=-1).tolist()]
        else:
            alphas = [ntk_alpha(total, config.seq_length)]
        tables = alphas[:1] if len(set(alphas)) == 1 else alphas  # one table serves equal rows
        inv_freq = torch.stack(
            [rotary_inv_freq(config.rotary_emb_base, config.rotary_dim, a, device) for a in tables]
        )  # [Bα, R/2]
        if cache is not None:
            cache.ntk_alpha = torch.tensor(alphas, dtype=torch.float64)  # [B] or [1], kept for later calls
            cache.inv_freq = inv_freq
    positions = torch.arange(start, total, device=device)
    cos, sin = rotary_cos_sin(positions, cache.inv_freq if cache is not None else inv_freq)

    # Qwen quirk 4 — logn attention, only once the keys reach past S. The factor is rounded to the
    # model dtype before it multiplies the queries, exactly as the original's `logn_tensor.type_as(query)`.
    logn = None
    if config.use_logn_attn and total > config.seq_length:
        logn = logn_scale(positions, config.seq_length).to(dtype)[None, None, :, None]

    mask = None
    if key_mask is not None:
        mask = causal_mask(length, total, device)[None] & key_mask[:, None, :]  # [B, T, total]
        # A padding query may see no key at all; let it see itself so softmax stays finite
        # (its output is never used, but a NaN would leak through 0·NaN in later layers).
        mask = (mask | torch.eye(total, device=device, dtype=torch.bool)[None, start:total])[:, None]
    return StepInputs(positions, cos, sin, logn, mask, key_mask, cache, start)


def fixed_step_inputs(config: QwenConfig, cache: KVCache, position: torch.Tensor, dtype) -> StepInputs:
    """The inputs of one token per row at `position` ([1] long) with shapes that never change (for
    torch.compile and CUDA graphs): attention covers the whole cache, unwritten positions masked."""
    cos, sin = rotary_cos_sin(position, cache.inv_freq)  # Qwen quirk 3: the prefill's alpha
    logn = None
    if config.use_logn_attn:  # Qwen quirk 4: a factor of exactly 1 until position + 1 > S
        logn = logn_scale(position, config.seq_length).to(dtype)[None, None, :, None]
    slots = torch.arange(cache.max_length, device=position.device)
    key_mask = cache.key_mask & (slots <= position)  # [B, T_max]
    return StepInputs(position, cos, sin, logn, key_mask[:, None, None, :], key_mask, cache, position)


def causal_mask(new: int, total: int, device) -> torch.Tensor:
    """[T, T_keys] bool: query i (absolute position total-new+i) sees keys 0 … its own position."""
    q_pos = torch.arange(total - new, total, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= q_pos


# ==================== Attention ===================================================================
class EagerAttention(nn.Module):
    """The textbook formula: softmax(q kᵀ / √D, masked) v, the softmax in fp32."""

    def forward(self, q, k, v, inputs: StepInputs) -> torch.Tensor:  # q [B, N, T, D], k/v [B, N, T_keys, D]
        if inputs.logn is not None:
            q = q * inputs.logn  # Qwen quirk 4: queries past S are sharpened
        mask = inputs.mask if inputs.mask is not None else causal_mask(q.shape[2], k.shape[2], q.device)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, N, T, T_keys]
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
        return probs.to(q.dtype) @ v


class ScaledDotProductAttention(EagerAttention):
    """The same function through PyTorch's fused `scaled_dot_product_attention` (the default)."""

    def forward(self, q, k, v, inputs: StepInputs) -> torch.Tensor:
        if inputs.logn is not None:
            q = q * inputs.logn  # Qwen quirk 4
        if inputs.mask is None and q.shape[2] in (1, k.shape[2]):  # one new token sees every cached key
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        mask = inputs.mask if inputs.mask is not None else causal_mask(q.shape[2], k.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config: QwenConfig, layer_index: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.layer_index = layer_index  # which of the cache's layers holds this block's keys
        hidden = config.hidden_size
        # Qwen quirk 5: q, k and v come from ONE projection, with a bias, even though `no_bias` is
        # true (that flag governs the other linears). Rows are [q; k; v], each hidden_size tall.
        self.c_attn = nn.Linear(hidden, 3 * hidden, bias=True)
        self.c_proj = nn.Linear(hidden, hidden, bias=not config.no_bias)
        self.rotary = Rotary()
        self.attend = ScaledDotProductAttention()

    def forward(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.c_attn(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # [B, T, N, D] each
        q, k = self.rotary(q, k, inputs.cos, inputs.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, N, T, D]
        if inputs.cache is not None:
            # The cache keeps keys after RoPE (and before logn, which only touches queries) and
            # returns every key and value this call attends to.
            k, v = inputs.cache.update(self.layer_index, k, v, inputs.write_at)
        out = self.attend(q, k, v, inputs)  # [B, N, T, D]
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


# ==================== Feed-forward ================================================================
class MLP(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        # Qwen quirk 2: config.intermediate_size is twice the real width (22016 → 11008 for 7B).
        width = config.mlp_width
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, width, bias=bias)  # linear ("up") branch
        self.w2 = nn.Linear(config.hidden_size, width, bias=bias)  # gated branch: silu goes HERE
        self.c_proj = nn.Linear(width, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Qwen quirk 2 (cont.): w1(x) * silu(w2(x)) — not silu(w1(x)) * w2(x) as in LLaMA naming.
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


# ==================== Block and model =============================================================
class Block(nn.Module):
    def __init__(self, config: QwenConfig, layer_index: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config, layer_index)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), inputs)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The body, named `transformer` as in the original so that parameter keys match."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class QwenForCausalLM(nn.Module):
    """Qwen v1 causal language model (the original's `QWenLMHeadModel`). Loading from files is added by
    `nekomata_core.pretrained.QwenForCausalLM` (the `nekomata_core.QwenForCausalLM` users import).

    Forward forms:
    - `model(input_ids)` → logits [B, T, V]: a plain causal forward over the whole sequence.
    - `model(input_ids, attention_mask)`: rows left- (or right-) padded; mask 1 = real token.
    - `model(new_ids, attention_mask, cache=cache)`: incremental. The first call on an empty cache is
      the prefill (it fixes the NTK alpha); later calls append tokens. `attention_mask` may cover
      just the new tokens [B, T_new] or the whole sequence [B, cache.length + T_new] as in HF.
    - `model(tokens, cache=cache, position=p)`: one token per row at `p` ([1] long, from
      `cache.next_position(B)`) with fixed shapes, for torch.compile / CUDA graphs; no input checks,
      and the caller advances `cache.length` (nekomata_core.accelerate.StaticStep does both).
    """

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the final norm's (a quantized model's linears hold integer codes)."""
        return self.transformer.ln_f.weight.dtype

    def allocate_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A fresh static KV cache for `batch_size` sequences of up to `max_length` positions."""
        heads = self.transformer.h[0].attn.num_heads  # all, or a tensor-parallel rank's share of them
        return KVCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device, num_heads=heads)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        position: torch.Tensor | None = None,
        last_logits_only: bool = False,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits [B, T, V] in the model dtype ([B, 1, V] with `last_logits_only`).

        With `output_hidden_states=True` returns `(logits, hidden_states)` where hidden_states holds
        L + 1 tensors [B, T, H]: the embeddings, then each block's output (the last one before ln_f),
        as Hugging Face orders them.
        """
        if position is not None:
            inputs = fixed_step_inputs(self.config, cache, position, self.dtype)
        else:
            inputs = self._step_inputs(input_ids, attention_mask, cache)
        x = self.transformer.wte(input_ids)  # [B, T, H]
        hidden_states = [x] if output_hidden_states else None
        for block in self.transformer.h:
            x = block(x, inputs)
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None and position is None:
            cache.length += input_ids.shape[1]
        if last_logits_only:
            x = x[:, -1:, :]  # prefill needs only the next-token distribution
        logits = self.lm_head(self.transformer.ln_f(x))
        return (logits, tuple(hidden_states)) if hidden_states is not None else logits

    def _step_inputs(self, input_ids, attention_mask, cache: KVCache | None) -> StepInputs:
        check_input_ids(input_ids, self.config.vocab_size, self.device)
        batch, length = input_ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            cache.check_fits(batch, length)
        if attention_mask is not None:
            check_attention_mask(attention_mask, batch, (length, start + length))
        if cache is not None:
            key_mask = cache.record_keys(attention_mask, length)
        elif attention_mask is not None and not bool(attention_mask.bool().all()):
            key_mask = attention_mask.to(device=self.device, dtype=torch.bool)
        else:
            key_mask = None
        return step_inputs(self.config, cache, key_mask, start, length, self.dtype, self.device)

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
        check_pooling(pooling)
        n_states = self.config.num_hidden_layers + 1
        if not -n_states <= layer < n_states:
            raise InputError(f"layer={layer} is out of range: this model has {n_states} hidden states")
        _, hidden = self(input_ids, attention_mask, output_hidden_states=True)
        states = hidden[layer]
        if layer % n_states == n_states - 1:
            states = self.transformer.ln_f(states)  # the final hidden state is the normalised one
        return pool(states, attention_mask, pooling)
