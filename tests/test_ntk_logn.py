"""Dynamic NTK and logn attention against a plainly written reference of the formulas.

transformers' Qwen2 has neither feature, so the reference here is written from scratch from the
formulas of the original Qwen v1 code (written out in the test): a loop over layers with explicit tensors, no code shared with the model.
Tolerance: fp32, max abs error ≤ 1e-5 × max |logit|.
"""

from __future__ import annotations

import math

import pytest
import torch

from nekomata_core.accelerate import accelerate
from nekomata_core.config import QwenConfig
from nekomata_core.model import QwenForCausalLM, ntk_alpha

S = 16  # a tiny trained context, so that 4S is only 64 tokens
REL_TOL = 1e-5


def reference_alpha(length: int, seq_length: int) -> int:
    """alpha = 1 up to S, then 2^k − 1 for the smallest k with length ≤ 2^(k−1)·S (integers only)."""
    if length <= seq_length:
        return 1
    k = 1
    while length > 2 ** (k - 1) * seq_length:
        k += 1
    return 2**k - 1


def reference_logits(
    cfg: QwenConfig, sd: dict, ids: torch.Tensor, alpha: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [T, V] of ONE sequence ids [T] with a fixed NTK alpha; positions are cache indices."""
    T = ids.shape[0]
    H, N, D, R = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.rotary_dim
    eps = cfg.layer_norm_epsilon
    mask = torch.ones(T, dtype=torch.bool) if key_mask is None else key_mask.bool()

    def rmsnorm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    base = cfg.rotary_emb_base * alpha ** (R / (R - 2))
    inv_freq = torch.tensor([1.0 / base ** (2 * i / R) for i in range(R // 2)], dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, R/2]
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()

    def rope(x):  # x [T, N, D]
        x1, x2 = x[..., : R // 2], x[..., R // 2 : R]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., R:]], dim=-1)

    x = sd["transformer.wte.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        h = rmsnorm(x, sd[p + "ln_1.weight"])
        qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(T, N, D) for t in qkv.split(H, dim=-1))
        q, k = rope(q), rope(k)
        for pos in range(T):  # logn: query at position p scaled by log(p+1)/log(S) once p+1 > S
            if cfg.use_logn_attn and pos + 1 > cfg.seq_length:
                q[pos] = q[pos] * (math.log(pos + 1) / math.log(cfg.seq_length))
        out = torch.zeros(T, N, D)
        for pos in range(T):
            allowed = mask[: pos + 1].clone()
            allowed[pos] = True
            scores = torch.einsum("nd,tnd->nt", q[pos], k[: pos + 1]) / math.sqrt(D)
            scores[:, ~allowed] = float("-inf")
            out[pos] = torch.einsum("nt,tnd->nd", torch.softmax(scores, -1), v[: pos + 1])
        x = x + out.reshape(T, H) @ sd[p + "attn.c_proj.weight"].T
        h = rmsnorm(x, sd[p + "ln_2.weight"])
        gated = h @ sd[p + "mlp.w2.weight"].T
        x = (
            x
            + ((h @ sd[p + "mlp.w1.weight"].T) * (gated * torch.sigmoid(gated)))
            @ sd[p + "mlp.c_proj.weight"].T
        )
    return rmsnorm(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.fixture(scope="module")
def tiny():
    cfg = QwenConfig.from_preset("tiny", vocab_size=300, seq_length=S, num_hidden_layers=2)
    torch.manual_seed(0)
    model = QwenForCausalLM(cfg).eval()  # plain PyTorch modules: SDPA attention
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.15)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(1.0)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return cfg, model, sd


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= REL_TOL * ref.abs().max().item(), (
        f"max abs error {err:.3e} vs max |logit| {ref.abs().max():.3e}"
    )


@pytest.mark.parametrize("length", [1, 15, 16, 17, 31, 32, 33, 64, 65, 100])
def test_ntk_alpha_matches_the_integer_rule(length):
    assert ntk_alpha(length, S) == reference_alpha(length, S)


@pytest.mark.parametrize("length", [12, 16, 24, 32, 70])  # < S, = S, in (S, 2S], = 2S, past 4S
def test_full_forward_matches_reference_with_alpha_from_length(tiny, length):
    cfg, model, sd = tiny
    ids = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ours = model(ids[None])[0]
    assert_close(ours, reference_logits(cfg, sd, ids, reference_alpha(length, S)))


@pytest.mark.parametrize("prompt,total", [(10, 40), (20, 75)])  # alpha 1 kept past S; alpha 3 kept past 4S
def test_decode_keeps_the_prefill_alpha(tiny, prompt, total):
    cfg, model, sd = tiny
    ids = torch.randint(0, cfg.vocab_size, (total,), generator=torch.Generator().manual_seed(total))
    cache = model.allocate_cache(1, total)
    with torch.no_grad():
        pieces = [model(ids[None, :prompt], cache=cache)[0]]
        for t in range(prompt, total):
            pieces.append(model(ids[None, t : t + 1], cache=cache)[0])
    ours = torch.cat(pieces)
    frozen = reference_logits(cfg, sd, ids, reference_alpha(prompt, S))
    assert_close(ours, frozen)
    # The test can tell the difference: re-choosing alpha from the full length gives other logits.
    rechosen = reference_logits(cfg, sd, ids, reference_alpha(total, S))
    assert (ours[-1] - rechosen[-1]).abs().max() > 100 * REL_TOL * rechosen.abs().max()


def test_padded_batch_gets_per_row_alpha_and_absolute_logn(tiny):
    cfg, model, sd = tiny
    total = 40  # > 2S; row 0 has 40 real tokens (alpha 7), row 1 has 30 (alpha 3), row 2 has 12 (alpha 1)
    real = [40, 30, 12]
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (3, total), generator=gen)
    mask = torch.zeros(3, total, dtype=torch.long)
    for row, n in enumerate(real):
        mask[row, total - n :] = 1
    with torch.no_grad():
        ours = model(ids, mask)
    for row, n in enumerate(real):
        ref = reference_logits(cfg, sd, ids[row], reference_alpha(n, S), key_mask=mask[row])
        valid = mask[row].bool()
        assert_close(ours[row][valid], ref[valid])


def test_padded_batch_decode_through_cache(tiny):
    cfg, model, sd = tiny
    total, prompt = 50, 36
    real = [36, 20]
    ids = torch.randint(0, cfg.vocab_size, (2, total), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, total, dtype=torch.long)
    mask[1, : prompt - real[1]] = 0
    cache = model.allocate_cache(2, total)
    with torch.no_grad():
        pieces = [model(ids[:, :prompt], mask[:, :prompt], cache=cache)]
        for t in range(prompt, total):
            pieces.append(model(ids[:, t : t + 1], mask[:, : t + 1], cache=cache))
    ours = torch.cat(pieces, dim=1)
    for row, n in enumerate(real):
        ref = reference_logits(cfg, sd, ids[row], reference_alpha(n, S), key_mask=mask[row])
        valid = mask[row].bool()
        assert_close(ours[row][valid], ref[valid])


def test_logn_switches_off_without_the_flag(tiny):
    cfg, _, sd = tiny
    plain_cfg = QwenConfig.from_dict({**cfg.to_dict(), "use_logn_attn": False, "use_dynamic_ntk": False})
    model = accelerate(QwenForCausalLM(plain_cfg), attention="eager", ops="eager").eval()
    model.load_state_dict(sd)
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None])[0]
    assert_close(ours, reference_logits(plain_cfg, sd, ids, alpha=1.0))
