"""Bad arguments to generation: one clear NekomataError naming the argument, the same through
`generate`, `stream`, the compat shim's `model.generate` and the CLI; the context limit, the KV-cache
size check, non-finite logits, and Ctrl-C in `nekomata chat`."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from nekomata_core import QwenForCausalLM, QwenTokenizer, generate, stream
from nekomata_core.apps.cli import main
from nekomata_core.cache import CacheError
from nekomata_core.compat import CompatCausalLM
from nekomata_core.errors import NekomataError
from nekomata_core.generation import NonFiniteLogitsError, PromptTooLongError
from nekomata_core.sampling import MIN_TEMPERATURE, SamplingParams, select_next

VOCAB = 300


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    folder = checkpoint_factory("tiny", seed=8, init_std=0.15, vocab_size=VOCAB, seq_length=16)
    return QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def short_context(checkpoint_factory):
    """max_position_embeddings 24: the length limit is reached in a few steps."""
    folder = checkpoint_factory(
        "tiny", seed=8, init_std=0.15, vocab_size=VOCAB, seq_length=16, max_position_embeddings=24
    )
    return QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def cli_ckpt(checkpoint_factory):
    # The same arguments as tests/test_cli_generate.py: the session builds this checkpoint once.
    return checkpoint_factory("tiny", seed=21, init_std=0.1, with_tokenizer=True)


@pytest.fixture(scope="module")
def tokenizer(cli_ckpt):
    return QwenTokenizer.from_pretrained(cli_ckpt)


def ids(length: int = 5) -> torch.Tensor:
    return torch.arange(10, 10 + length)[None]


# Every entry point, called the same way: (model, tokenizer, input_ids, attention_mask, **sampling).
def via_generate(model, tokenizer, input_ids, attention_mask=None, **kw):
    return generate(model, input_ids, attention_mask, **kw).sequences


def via_stream(model, tokenizer, input_ids, attention_mask=None, **kw):
    assert attention_mask is None  # stream takes one unpadded prompt
    return "".join(stream(model, tokenizer, input_ids, **kw))


def via_compat(model, tokenizer, input_ids, attention_mask=None, **kw):
    return CompatCausalLM(model).generate(input_ids, attention_mask, **kw)


ENTRY_POINTS = [via_generate, via_stream, via_compat]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "input_ids,kwargs,message",
    [
        (ids(), dict(pad_token_id=VOCAB), rf"pad_token_id {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"),
        (ids(), dict(pad_token_id=10**9), r"pad_token_id 1000000000 is outside the vocabulary"),
        (ids(), dict(eos_token_id=[3, VOCAB + 7]), rf"eos_token_id {VOCAB + 7} is outside the vocabulary"),
        (ids(), dict(eos_token_id=-1), r"eos_token_id must be a non-negative token id"),
        (torch.tensor([[1, VOCAB, 2]]), {}, rf"token id {VOCAB} in input_ids is outside the vocabulary"),
        (torch.tensor([[1, -4, 2]]), {}, r"token id -4 in input_ids is outside the vocabulary"),
        (torch.tensor([[1.0, 2.0]]), {}, r"input_ids must be integer token ids"),
        (torch.zeros(1, 0, dtype=torch.long), {}, r"input_ids must have shape \[batch, length\]"),
    ],
)
def test_ids_outside_the_vocabulary_or_malformed_are_refused(
    model, tokenizer, entry, input_ids, kwargs, message
):
    with pytest.raises(NekomataError, match=message):
        entry(model, tokenizer, input_ids, max_new_tokens=3, **kwargs)


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("猫は", "token id .* in input_ids is outside the vocabulary \\[0, 300\\)"),  # real ids > 300
        ("!", "pad_token_id 151643 is outside the vocabulary \\[0, 300\\)"),  # from generation_config.json
    ],
)
def test_cli_refuses_ids_outside_the_vocabulary_in_one_line(checkpoint_factory, capsys, prompt, message):
    folder = checkpoint_factory("tiny", seed=8, init_std=0.15, vocab_size=VOCAB, with_tokenizer=True)
    code = main(["generate", str(folder), prompt, "--greedy", "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0
    assert _one_line_error(err, "generate")
    assert re.search(message, err), err


@pytest.mark.parametrize("entry", [via_generate, via_compat], ids=lambda f: f.__name__)
def test_attention_masks_are_checked_exactly_as_model_checks_them(model, tokenizer, entry):
    batch = torch.tensor([[11, 12, 13], [14, 15, 16]])
    bad_masks = [
        ([[1, 1, 1], [0, 1, 1]], "attention_mask must be a torch.Tensor .* got list"),
        (torch.tensor([[1, 1, 1], [0, 2, 1]]), "attention_mask must hold only 0 .* and 1 .*; it holds 2"),
        (
            torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 1.0]]),
            "attention_mask must hold only 0 .*; it holds 0.5",
        ),
        (torch.ones(2, 4, dtype=torch.long), r"attention_mask has shape \(2, 4\); expected \[2, 3\]"),
        (torch.tensor([[1, 1, 1], [1, 1, 0]]), "LEFT padding"),
        (torch.tensor([[1, 1, 1], [0, 0, 0]]), "all padding"),
    ]
    for mask, message in bad_masks:
        with pytest.raises(NekomataError, match=message):
            entry(model, tokenizer, batch, mask, max_new_tokens=2)
        if "LEFT" not in message and "all padding" not in message:
            # model() refuses the same mask with the same words (one shared check).
            with pytest.raises(NekomataError, match=message):
                model(batch, mask)


@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "cli"], ids=lambda f: getattr(f, "__name__", f))
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.5), "temperature must be ≥ 0"),  # refused under greedy too
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature=float("inf"), do_sample=True), "temperature must be a finite number"),
        (dict(temperature=1e-40, do_sample=True), f"temperature must be ≥ {MIN_TEMPERATURE} when sampling"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer ≥ 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer ≥ 0"),
        (
            dict(min_new_tokens=9, max_new_tokens=3),
            r"min_new_tokens \(9\) must not exceed max_new_tokens \(3\)",
        ),
    ],
)
def test_bad_sampling_numbers_are_refused_by_every_entry_point(
    model, tokenizer, cli_ckpt, capsys, entry, kwargs, message
):
    if entry == "cli":
        argv = ["generate", str(cli_ckpt), "猫は", "--device", "cpu"]
        if kwargs.get("do_sample"):
            argv.append("--do-sample")
        for key, value in kwargs.items():
            if key != "do_sample":
                argv += [f"--{key.replace('_', '-')}", str(value)]
        if "max_new_tokens" not in kwargs:
            argv += ["--max-new-tokens", "3"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert _one_line_error(err, "generate") and re.search(message, err), err
        return
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(NekomataError, match=message):
        entry(model, tokenizer, ids(), **kwargs)


def test_small_temperatures_sample_the_argmax_instead_of_crashing():
    # 1e-4 (the floor) times logits of 1e35 overflows float32: the scores are rescaled, not NaN.
    logits = torch.tensor([[1e35, -1e35, 3e34, 0.0]])
    params = SamplingParams(do_sample=True, temperature=MIN_TEMPERATURE)
    from nekomata_core.sampling import process_logits

    scores = process_logits(logits, torch.zeros(1, 1, dtype=torch.long), 0, params)
    assert not bool(torch.isnan(scores).any())
    assert select_next(scores, params, torch.Generator().manual_seed(0)).tolist() == [0]


def test_prompt_over_the_context_limit_is_refused_and_new_tokens_stop_at_it(short_context, tokenizer):
    limit = short_context.config.max_position_embeddings
    for entry in ENTRY_POINTS:
        with pytest.raises(PromptTooLongError, match=f"at most {limit} positions.*max_position_embeddings"):
            entry(short_context, tokenizer, ids(limit + 1), max_new_tokens=1)
        with pytest.raises(PromptTooLongError, match="shorten the prompt"):
            entry(short_context, tokenizer, ids(limit), max_new_tokens=1)  # no room for one new token
    for max_new in (limit, 10**12):
        out = generate(short_context, ids(limit - 6), max_new_tokens=max_new, min_new_tokens=6)
        assert out.sequences.shape == (1, limit)  # stopped at the limit, not at max_new_tokens
        assert out.finish_reasons == ["length"] and len(out.new_tokens[0]) == 6
    sequences = CompatCausalLM(short_context).generate(ids(limit - 2), max_new_tokens=10**12)
    assert sequences.shape[1] <= limit


def test_cli_prompt_over_the_context_limit_is_one_line(checkpoint_factory, capsys):
    folder = checkpoint_factory(
        "tiny", seed=21, init_std=0.1, with_tokenizer=True, seq_length=8, max_position_embeddings=8
    )
    code = main(["generate", str(folder), "猫は" * 20, "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and _one_line_error(err, "generate")
    assert "at most 8 positions" in err and "shorten the prompt" in err


def test_a_kv_cache_that_cannot_fit_is_refused_with_its_size(model, monkeypatch):
    import nekomata_core.cache as cache_module

    monkeypatch.setattr(cache_module, "available_memory_bytes", lambda device: 10 * 2**20)
    # 10**12 new tokens are cut to the 32768-position limit: 2 layers × 2 × 4 heads × 16 × 4 bytes each.
    with pytest.raises(
        CacheError, match=r"needs 0\.03 GiB .* but 0\.01 GiB is available on cpu; lower max_new_tokens"
    ):
        generate(model, ids(), max_new_tokens=10**12)
    # Where the probe cannot tell, the allocator's failure becomes the same error, not its traceback.
    monkeypatch.setattr(cache_module, "available_memory_bytes", lambda device: None)
    with pytest.raises(CacheError, match=r"needs \d+.* GiB .*an unknown amount is available"):
        model.allocate_cache(2**20, 2**40)
    assert cache_module.cache_nbytes(model.config, 3, 7, torch.bfloat16) == 3 * 7 * (2 * 2 * 4 * 16 * 2 + 1)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_a_request_too_large_for_memory_is_the_cache_error_before_any_buffer(
    checkpoint_factory, tokenizer, entry
):
    # A context of 10**15 positions: max_new_tokens 10**12 is within it, and the [1, 10**12] token
    # buffer (8 TB) used to be allocated before the cache's size was checked: an allocator traceback.
    folder = checkpoint_factory(
        "tiny", seed=8, init_std=0.15, vocab_size=VOCAB, seq_length=16, max_position_embeddings=10**15
    )
    huge = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    with pytest.raises(CacheError, match=r"KV cache for 1 sequence\(s\) of 1000000000005 positions needs"):
        entry(huge, tokenizer, ids(), max_new_tokens=10**12)


def test_cache_memory_probe_reports_a_positive_number_on_this_machine():
    from nekomata_core.cache import available_memory_bytes

    available = available_memory_bytes(torch.device("cpu"))
    assert available is None or available > 0


def _poisoned(model: QwenForCausalLM, token: int | None) -> QwenForCausalLM:
    """A copy of `model` whose embedding row `token` is NaN (every row when token is None)."""
    import copy

    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        if token is None:
            poisoned.transformer.h[0].mlp.w1.weight[0, 0] = float("nan")
        else:
            poisoned.transformer.wte.weight[token] = float("nan")
    return poisoned


@pytest.mark.parametrize("decode", ["eager", "static", "native"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
def test_non_finite_logits_stop_generation_naming_the_step(model, decode, do_sample):
    from nekomata_core.accelerate import make_step, native_step_problem

    if decode == "native" and native_step_problem(model) is not None:
        pytest.skip(native_step_problem(model))
    prompt = ids(6)
    params = dict(max_new_tokens=6, do_sample=do_sample, generator=torch.Generator().manual_seed(1))
    broken = _poisoned(model, None)  # NaN in a weight every position reads: the prefill is NaN
    with pytest.raises(NonFiniteLogitsError, match=r"at the prefill .*non-finite weights .*nekomata inspect"):
        generate(broken, prompt, step_fn=make_step(broken, decode), **params)
    # NaN only in the embedding of the first generated token: the prefill is fine, decode step 1 is not.
    first = generate(model, prompt, **params).new_tokens[0][0]
    assert first not in prompt.tolist()[0]  # else the poisoned row would already spoil the prefill
    params["generator"] = torch.Generator().manual_seed(1)
    broken = _poisoned(model, first)
    with pytest.raises(NonFiniteLogitsError, match=r"at decode step 1, batch row\(s\) \[0\]"):
        generate(broken, prompt, step_fn=make_step(broken, decode), **params)


def test_cli_one_line_errors_for_threads_and_native_half_precision(cli_ckpt, capsys):
    assert main(["bench", str(cli_ckpt), "--threads", "0", "--no-transformers"]) == 2
    err = capsys.readouterr().err
    assert _one_line_error(err, "bench") and "--threads ≥ 1" in err
    code = main(
        ["generate", str(cli_ckpt), "猫は", "--decode", "native", "--dtype", "float16", "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code != 0 and _one_line_error(err, "generate")
    assert "'native' is unavailable" in err and "float16" in err and "'static'" in err


def test_generate_usage_reads_model_then_prompt_and_help_shows_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "[MODEL] PROMPT\n" in out and "[[MODEL]" not in out
    defaults = SamplingParams()
    assert f"(default {defaults.max_new_tokens})" in out and "generation_config.json" in out
    assert f"(default {defaults.top_p})" in out and f"(default {defaults.top_k})" in out


def test_byte2token_without_a_reachable_default_tokenizer_names_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    assert main(["byte2token", str(tmp_path / "a.txt")]) == 2
    err = capsys.readouterr().err
    assert _one_line_error(err, "byte2token") and "--tokenizer PATH" in err


# ---------------------------------------------------------------------------------------------- chat
class _Stdin(io.StringIO):
    """stdin whose readline raises KeyboardInterrupt once the scripted lines are used up."""

    def __init__(self, text: str, interrupt_at_end: bool) -> None:
        super().__init__(text)
        self.interrupt_at_end = interrupt_at_end

    def readline(self, *args):
        line = super().readline(*args)
        if not line and self.interrupt_at_end:
            raise KeyboardInterrupt
        return line


@pytest.mark.parametrize("interrupt_at_prompt", [False, True], ids=["ctrl-d", "ctrl-c"])
def test_chat_ctrl_c_stops_the_reply_and_keeps_the_session(
    cli_ckpt, tokenizer, monkeypatch, capsys, interrupt_at_prompt
):
    import nekomata_core.generation as generation

    prompts: list[str] = []

    def fake_stream(model, tok, prompt_ids, params, *, output, **kw):
        prompts.append(tok.decode(prompt_ids))
        output.new_tokens, output.finish_reasons = [[1, 2]], ["eos"]
        yield "part "
        if len(prompts) == 2:  # Ctrl-C in the middle of the second reply
            raise KeyboardInterrupt
        yield f"reply{len(prompts)}"

    monkeypatch.setattr(generation, "stream", fake_stream)
    monkeypatch.setattr(sys, "stdin", _Stdin("first\nsecond\nthird\n", interrupt_at_prompt))
    code = main(["chat", str(cli_ckpt), "--format", "chatml", "--max-new-tokens", "3", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == (130 if interrupt_at_prompt else 0)
    assert "Traceback" not in err and "reply stopped" in err
    assert len(prompts) == 3  # the session went on after the interrupted reply
    # The third prompt holds the first exchange but not the interrupted one.
    assert "first" in prompts[2] and "part reply1" in prompts[2] and "second" not in prompts[2]
    assert out.count("part ") == 3


def test_chat_reply_that_fails_says_why_and_keeps_the_session_and_its_history(
    cli_ckpt, monkeypatch, capsys
):
    import nekomata_core.generation as generation

    prompts: list[str] = []

    def fake_stream(model, tok, prompt_ids, params, *, output, **kw):
        prompts.append(tok.decode(prompt_ids))
        output.new_tokens, output.finish_reasons = [[1]], ["eos"]
        if len(prompts) == 2:  # the history no longer fits: one reply fails, not the session
            raise PromptTooLongError("the prompt has 99 tokens but this model handles at most 8 positions")
        yield f"reply{len(prompts)}"

    monkeypatch.setattr(generation, "stream", fake_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\nthird\n"))
    code = main(["chat", str(cli_ckpt), "--format", "chatml", "--max-new-tokens", "3", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert "[reply failed: the prompt has 99 tokens" in err and "/reset clears the history" in err
    assert len(prompts) == 3 and "reply1" in prompts[2] and "second" not in prompts[2]


def test_chat_sigint_during_a_real_reply_returns_to_the_prompt(cli_ckpt):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nekomata_core", "chat", str(cli_ckpt), "--format", "raw", "--greedy",
         "--max-new-tokens", "30000", "--min-new-tokens", "30000", "--device", "cpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ},
        # A shell's background job starts with SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: give the child the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        proc.stdin.write("こんにちは\n".encode())
        proc.stdin.flush()
        os.set_blocking(proc.stdout.fileno(), False)
        deadline, seen = time.monotonic() + 120, b""
        while not seen and time.monotonic() < deadline:  # wait until the reply is streaming
            seen = proc.stdout.read() or b""
            time.sleep(0.05)
        assert seen, "no reply started"
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "reply stopped" in err and "Traceback" not in err


def _one_line_error(err: str, command: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"nekomata {command}: error:")


def test_arguments_of_the_wrong_kind_are_refused_by_name(model, tokenizer):
    with pytest.raises(NekomataError, match="params must be a SamplingParams, got dict"):
        generate(model, ids(), params={"max_new_tokens": 2})
    with pytest.raises(NekomataError, match=r"unknown generation argument\(s\) \['max_tokens'\]"):
        generate(model, ids(), max_tokens=2)
    with pytest.raises(NekomataError, match="generator must be a torch.Generator"):
        generate(model, ids(), max_new_tokens=2, do_sample=True, generator=7)
    with pytest.raises(NekomataError, match="the prompt must be a str, a list of token ids"):
        "".join(stream(model, tokenizer, [1.5, 2]))
    with pytest.raises(NekomataError, match="input_ids must be a torch.LongTensor"):
        CompatCausalLM(model).generate([[1, 2]], max_new_tokens=2)
    with pytest.raises(NekomataError, match="stop_strings must be non-empty strings, got 5"):
        SamplingParams(stop_strings=5)
    with pytest.raises(NekomataError, match="a token id of the prompt is outside the vocabulary"):
        "".join(stream(model, tokenizer, [1, 2**70]))  # beyond int64: torch's own ValueError before
    with pytest.raises(NekomataError, match=r"stop_strings need the tokenizer.*got str"):
        generate(model, ids(), max_new_tokens=2, stop_strings=["x"], tokenizer="not a tokenizer")
    with pytest.raises(NekomataError, match="max_length must be an integer ≥ 1, got 0"):
        CompatCausalLM(model).generate(ids(), max_length=0)  # was replaced by the default 20


def test_compat_generate_honours_stop_strings_as_transformers_does(model, tokenizer):
    from nekomata_core.compat import CompatTokenizer

    text = tokenizer.decode(generate(model, ids(), max_new_tokens=12).new_tokens[0])
    stop = text[len(text) // 2 :][:2]
    expected = generate(model, ids(), max_new_tokens=12, stop_strings=[stop], tokenizer=tokenizer)
    assert expected.finish_reasons == ["stop_string"]
    compat = CompatCausalLM(model)
    for given in (tokenizer, CompatTokenizer(tokenizer)):
        sequences = compat.generate(ids(), max_new_tokens=12, stop_strings=stop, tokenizer=given)
        assert sequences.tolist() == expected.sequences.tolist()  # was: the stop string ignored
    with pytest.raises(NekomataError, match="stop_strings need the tokenizer"):
        compat.generate(ids(), max_new_tokens=12, stop_strings=[stop])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_the_finite_logits_check_finds_one_bad_value_in_any_row(dtype, bad):
    """check_finite_logits looks at each step's smallest and largest logit only (see there): one NaN, inf
    or -inf anywhere in a [3, 151936] batch is found and its row named; finite logits pass, huge ones too."""
    from nekomata_core.generation import check_finite_logits

    logits = torch.randn(3, 151936, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, 5] = torch.finfo(dtype).max  # large but finite
    check_finite_logits(logits, 3)
    for row, col in ((0, 0), (1, 777), (2, 151935)):
        broken = logits.clone()
        broken[row, col] = bad
        with pytest.raises(NonFiniteLogitsError, match=rf"at decode step 3, batch row\(s\) \[{row}\]"):
            check_finite_logits(broken, 3)
