"""Generation against transformers' `generate` on the weight-mapped Qwen2ForCausalLM (fp32, prompts
below seq_length): identical tokens for greedy and for seeded sampling, the same torch.manual_seed
before each call. Plus batching, stop conditions, streaming, NTK through decode, and the model card.
"""

from __future__ import annotations

import pytest
import torch

from nekomata_core import (
    AutoModelForCausalLM,
    AutoTokenizer,
    QwenForCausalLM,
    QwenTokenizer,
    generate,
    stream,
)
from nekomata_core.generation import PromptTooLongError
from nekomata_core.sampling import SamplingParams
from tests.hf_reference import qwen2_reference_from_checkpoint

SMALL_VOCAB = 64  # small enough that eos (id 5 below) really gets sampled
EOS, PAD = 5, 0


@pytest.fixture(scope="module")
def small(checkpoint_factory):
    folder = checkpoint_factory("tiny", seed=3, init_std=0.3, vocab_size=SMALL_VOCAB, seq_length=256)
    ours = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    return ours, qwen2_reference_from_checkpoint(folder)


@pytest.fixture(scope="module")
def real_vocab(checkpoint_factory):
    """A tiny model with the real 151,936-row vocabulary and the real qwen.tiktoken."""
    return checkpoint_factory("tiny", seed=4, init_std=0.1, with_tokenizer=True)


def prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, SMALL_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    # Keep eos and pad out of prompts: transformers treats pad ids in an unmasked prompt as padding.
    ids[(ids == EOS) | (ids == PAD)] = EOS + 1
    return ids


SETTINGS = [
    dict(do_sample=False),
    dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0),
    dict(do_sample=True, temperature=1.0, top_k=8, top_p=1.0),
    dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.8),
    dict(do_sample=True, temperature=1.0, top_k=0, top_p=0.9, repetition_penalty=1.3),
    dict(do_sample=False, repetition_penalty=0.8),
    dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=25),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_tokens_identical_to_transformers_generate(small, setting):
    ours, ref = small
    ids = prompt(1, 9, seed=len(str(setting)))
    for seed in (0, 1):
        torch.manual_seed(seed)
        mine = generate(ours, ids, max_new_tokens=30, eos_token_id=EOS, pad_token_id=PAD, **setting)
        torch.manual_seed(seed)
        theirs = ref.generate(ids, max_new_tokens=30, eos_token_id=EOS, pad_token_id=PAD, **setting)
        assert torch.equal(mine.sequences, theirs), f"seed {seed}: {mine.sequences} vs {theirs}"
        if "min_new_tokens" in setting:
            assert EOS not in mine.new_tokens[0][:25]


def test_some_runs_stop_at_eos_like_transformers(small):
    """The settings above must exercise the eos path too, not only max_new_tokens."""
    ours, ref = small
    reasons = set()
    for seed in range(6):
        torch.manual_seed(seed)
        mine = generate(
            ours, prompt(1, 4, seed), max_new_tokens=40, do_sample=True, eos_token_id=EOS, pad_token_id=PAD
        )
        torch.manual_seed(seed)
        theirs = ref.generate(
            prompt(1, 4, seed), max_new_tokens=40, do_sample=True, top_k=0, eos_token_id=EOS, pad_token_id=PAD
        )
        assert torch.equal(mine.sequences, theirs)
        reasons.add(mine.finish_reasons[0])
    assert reasons == {"eos", "length"}


def test_batched_sampling_with_left_padding_equals_transformers(small):
    ours, ref = small
    ids = prompt(3, 12, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = PAD
    for seed in range(2):
        torch.manual_seed(seed)
        mine = generate(
            ours, ids, mask, max_new_tokens=25, do_sample=True, eos_token_id=EOS, pad_token_id=PAD
        )
        torch.manual_seed(seed)
        theirs = ref.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=25,
            do_sample=True,
            top_k=0,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
        assert torch.equal(mine.sequences, theirs)


def test_batched_greedy_equals_each_prompt_alone_and_rows_stop_independently(small):
    ours, _ = small
    prompts = [prompt(1, n, seed=n)[0].tolist() for n in (3, 11, 7, 15)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    free = generate(ours, ids, mask, max_new_tokens=30, eos_token_id=(), pad_token_id=PAD)
    # Make row 0's 6th new token the eos id, so row 0 stops early and (some) others go on.
    eos = free.new_tokens[0][5]
    eos = eos if eos not in free.new_tokens[0][:5] else free.new_tokens[0][0]
    batched = generate(ours, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD)
    for row, p in enumerate(prompts):
        alone = generate(ours, torch.tensor([p]), max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD)
        assert batched.new_tokens[row] == alone.new_tokens[0]
        assert batched.finish_reasons[row] == alone.finish_reasons[0]
    assert batched.finish_reasons[0] == "eos"
    assert len({len(t) for t in batched.new_tokens}) > 1, "rows should stop at different steps"
    for row, tokens in enumerate(batched.new_tokens):  # after a row stops it is filled with pad
        tail = batched.sequences[row, width + len(tokens) :]
        assert (tail == PAD).all()


def test_decode_keeps_prefill_ntk_alpha_past_seq_length(checkpoint_factory):
    """A prompt past S (alpha 3) generates past 2S with alpha frozen: compare against the plainly written
    reference of tests/test_ntk_logn.py run on the whole final sequence with that alpha."""
    from tests.hf_reference import read_checkpoint_state_dict
    from tests.test_ntk_logn import assert_close, reference_alpha, reference_logits

    folder = checkpoint_factory("tiny", seed=5, init_std=0.15, vocab_size=300, seq_length=16)
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    sd = read_checkpoint_state_dict(folder)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    out = generate(model, ids, max_new_tokens=16, eos_token_id=())
    full = out.sequences[0]
    assert full.shape[0] == 36 > 2 * 16
    ref = reference_logits(model.config, sd, full, reference_alpha(20, 16))  # alpha 3, frozen
    # Greedy: every new token is the argmax of the reference logits at the previous position.
    assert full[20:].tolist() == ref[19:-1].argmax(-1).tolist()
    with torch.no_grad():
        cache = model.allocate_cache(1, 36)
        logits = [model(full[None, :20], cache=cache)]
        logits += [model(full[None, t : t + 1], cache=cache) for t in range(20, 36)]
    assert_close(torch.cat(logits, 1)[0], ref)


def test_stop_strings_end_a_row(real_vocab):
    model = QwenForCausalLM.from_pretrained(real_vocab, dtype="float32", device="cpu", progress=False)
    tokenizer = QwenTokenizer.from_pretrained(real_vocab)
    ids = torch.tensor([tokenizer.encode("猫は")])
    free = generate(model, ids, max_new_tokens=30, eos_token_id=())
    text = tokenizer.decode(free.new_tokens[0])
    stop = text[len(text) // 2 : len(text) // 2 + 1] or text[:1]
    stopped = generate(
        model, ids, max_new_tokens=30, eos_token_id=(), stop_strings=[stop], tokenizer=tokenizer
    )
    assert stopped.finish_reasons == ["stop_string"]
    assert stop in tokenizer.decode(stopped.new_tokens[0])
    assert stopped.new_tokens[0] == free.new_tokens[0][: len(stopped.new_tokens[0])]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, max_new_tokens=3, stop_strings=["x"])


class ScriptedHead(torch.nn.Module):
    """An lm_head that makes greedy decoding emit a fixed script of token ids, one per call."""

    def __init__(self, head: torch.nn.Linear, script: list[int]) -> None:
        super().__init__()
        self.weight, self.script, self.calls = head.weight, script, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape[:-1], self.weight.shape[0])
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return logits


def test_streaming_japanese_concatenates_to_the_decode_without_replacement_chars(real_vocab):
    model = QwenForCausalLM.from_pretrained(real_vocab, dtype="float32", device="cpu", progress=False)
    tokenizer = QwenTokenizer.from_pretrained(real_vocab)
    from nekomata_core.generation import GenerationOutput

    # Every UTF-8 byte of the text as its own token: each character spans three tokens, the worst case.
    text = "吾輩は猫である。名前はまだ無い。🐈‍⬛"
    script = [tokenizer.encoding.encode_single_token(bytes([b])) for b in text.encode("utf-8")]
    model.lm_head = ScriptedHead(model.lm_head, script)
    out = GenerationOutput(torch.empty(0), [], [])
    pieces = list(stream(model, tokenizer, "猫:", max_new_tokens=len(script), eos_token_id=(), output=out))
    assert out.new_tokens[0] == script
    assert "".join(pieces) == tokenizer.decode(script) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) < len(script), "pieces must be whole characters, not one per token"


def test_streaming_a_sampled_continuation_matches_decode(real_vocab):
    model = QwenForCausalLM.from_pretrained(real_vocab, dtype="float32", device="cpu", progress=False)
    tokenizer = QwenTokenizer.from_pretrained(real_vocab)
    from nekomata_core.generation import GenerationOutput

    out = GenerationOutput(torch.empty(0), [], [])
    pieces = list(
        stream(
            model,
            tokenizer,
            "吾輩は猫である。",
            max_new_tokens=40,
            do_sample=True,
            generator=torch.Generator().manual_seed(0),
            eos_token_id=(),
            output=out,
        )
    )
    assert "".join(pieces) == tokenizer.decode(out.new_tokens[0], skip_special_tokens=True)


def test_model_card_snippet_runs_with_only_the_import_changed(real_vocab):
    # --- rinna/nekomata-7b model card, with `from transformers import …` swapped ----------------
    tokenizer = AutoTokenizer.from_pretrained(str(real_vocab), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(real_vocab), device_map="cpu", trust_remote_code=True)
    text = "西田幾多郎は、"
    token_ids = tokenizer.encode(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output_ids = model.generate(
            token_ids.to(model.device),
            max_new_tokens=200,
            min_new_tokens=200,
            do_sample=True,
            temperature=1.0,
            top_p=0.95,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    output = tokenizer.decode(output_ids.tolist()[0])
    # ----------------------------------------------------------------------------------------------
    assert output_ids.shape == (1, token_ids.shape[1] + 200)
    assert output.startswith(text)
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is None
    logits = model(token_ids).logits
    assert logits.shape == (1, token_ids.shape[1], model.config.vocab_size)


def test_compat_generate_falls_back_to_generation_config(real_vocab):
    model = AutoModelForCausalLM.from_pretrained(str(real_vocab), device_map="cpu")
    ids = torch.tensor([[1, 2, 3]])
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=8)  # do_sample, top_p 0.8, top_k 0 from generation_config.json
    torch.manual_seed(0)
    b = generate(
        model.model,
        ids,
        params=SamplingParams(
            do_sample=True, top_p=0.8, top_k=0, max_new_tokens=8, eos_token_id=151643, pad_token_id=151643
        ),
    )
    assert torch.equal(a, b.sequences)


def test_generation_errors_are_clear(small):
    ours, _ = small
    ids = prompt(1, 5)
    with pytest.raises(ValueError, match="temperature"):
        generate(ours, ids, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(ours, ids, top_p=2.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(ours, ids, max_new_tokens=2, min_new_tokens=4)
    with pytest.raises(ValueError, match="LEFT padding"):
        generate(ours, prompt(2, 4), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    too_long = torch.zeros(1, ours.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(PromptTooLongError, match="max_position_embeddings"):
        generate(ours, too_long, max_new_tokens=1)
    assert generate(ours, ids, max_new_tokens=0).sequences.shape == (1, 5)
