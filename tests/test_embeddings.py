"""`QwenForCausalLM.embed` against the hidden states of transformers' Qwen2ForCausalLM.

The reference vectors are pooled here from `Qwen2ForCausalLM(..., output_hidden_states=True)`:
hidden_states[layer] (transformers' last one is after the final norm, which is what `embed(layer=-1)`
promises), averaged over the real tokens (mean) or taken at the last real token (last). Batches are
left- and right-padded. Tolerance, fp32: max abs error ≤ 1e-5 × max |reference|.
"""

from __future__ import annotations

import pytest
import torch

from nekomata_core import QwenForCausalLM
from tests.hf_reference import qwen2_reference_from_checkpoint

REL_TOL = 1e-5
N_LAYERS = 3
VOCAB = 512
LENGTHS = (14, 9, 4)  # real tokens per row of the padded batches
LAYERS = (0, 1, 2, N_LAYERS, -1, -2, -4)  # embeddings, blocks, the normalised last state, negatives


@pytest.fixture(scope="module")
def pair(checkpoint_factory):
    folder = checkpoint_factory("tiny", seed=31, vocab_size=VOCAB, num_hidden_layers=N_LAYERS)
    ours = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    return ours, qwen2_reference_from_checkpoint(folder)


def padded_batch(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of LENGTHS random tokens padded to the longest, on the left or the right (pad id 0)."""
    width = max(LENGTHS)
    generator = torch.Generator().manual_seed(7)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        cols = slice(width - n, width) if padding == "left" else slice(0, n)
        ids[row, cols] = torch.randint(1, VOCAB, (n,), generator=generator)
        mask[row, cols] = 1
    return ids, mask


def reference_pooled(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool [B, T, H] over the real tokens, in float64, written out per row."""
    rows = []
    for row in range(states.shape[0]):
        real = mask[row].nonzero().flatten()
        if pooling == "mean":
            rows.append(states[row, real].double().mean(dim=0))
        else:
            rows.append(states[row, int(real.max())].double())
    return torch.stack(rows)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= REL_TOL * scale, f"max abs error {err:.3e} > {REL_TOL:g} × max |ref| {scale:.3e}"


@pytest.fixture(scope="module", params=["left", "right", "none"])
def batch(request, pair):
    """(ids, mask or None, HF hidden states) for a left-padded, right-padded or unpadded batch."""
    _, hf = pair
    if request.param == "none":
        ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(8))
        mask = None
    else:
        ids, mask = padded_batch(request.param)
    with torch.no_grad():
        hidden = hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    return ids, mask, hidden


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("layer", LAYERS)
def test_pooled_embeddings_match_transformers_hidden_states(pair, batch, layer, pooling):
    ours, _ = pair
    ids, mask, hidden = batch
    full_mask = torch.ones_like(ids) if mask is None else mask
    vectors = ours.embed(ids, mask, layer=layer, pooling=pooling)
    assert vectors.shape == (ids.shape[0], ours.config.hidden_size) and vectors.dtype == torch.float32
    assert_close(vectors, reference_pooled(hidden[layer], full_mask, pooling))


@pytest.mark.parametrize("layer", [0, 2, -1])
def test_unpooled_states_match_on_real_tokens(pair, batch, layer):
    ours, _ = pair
    ids, mask, hidden = batch
    states = ours.embed(ids, mask, layer=layer, pooling="none")
    assert states.shape == (*ids.shape, ours.config.hidden_size)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert_close(states[real], hidden[layer][real])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_a_padded_row_embeds_like_the_same_row_alone(pair, padding):
    ours, _ = pair
    ids, mask = padded_batch(padding)
    batched = ours.embed(ids, mask, layer=-1, pooling="mean")
    for row in range(len(LENGTHS)):
        alone = ours.embed(ids[row][mask[row].bool()][None], layer=-1, pooling="mean")
        assert_close(batched[row : row + 1], alone)


def test_bad_layer_or_pooling_is_rejected(pair):
    ours, _ = pair
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="out of range"):
        ours.embed(ids, layer=N_LAYERS + 1)
    with pytest.raises(ValueError, match="out of range"):
        ours.embed(ids, layer=-(N_LAYERS + 2))
    with pytest.raises(ValueError, match="pooling"):
        ours.embed(ids, pooling="max")
