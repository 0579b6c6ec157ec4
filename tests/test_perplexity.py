"""Sliding-window perplexity against the Hugging Face perplexity guide's loop run on transformers' Qwen2.

The reference below is the guide's code (windows of `window` tokens every `stride`, labels −100 on the
context, `model(input_ids, labels=...)`, each window's mean loss weighted by its number of scored
tokens) with one correction: the number of scored tokens is counted after the label shift, so it is
exact for every window (the guide's `valid - batch_size` is one short when the window starts with
context). Tolerance, fp32: 1e-5 relative on the loss.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nekomata_core import QwenForCausalLM
from nekomata_core.apps.cli import main as cli_main
from nekomata_core.apps.perplexity import PerplexityError, add_perplexity_parser, perplexity
from tests.hf_reference import qwen2_reference_from_checkpoint


def main(argv: list[str]) -> int:
    """`nekomata perplexity ARGV`, as tools/perplexity.py runs it."""
    return cli_main(argv, command="perplexity")


REL_TOL = 1e-5
VOCAB = 512
JAPANESE = (
    "吾輩は猫である。名前はまだ無い。"
    "どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた。"
)


@pytest.fixture(scope="module")
def folder(checkpoint_factory):
    return checkpoint_factory("tiny", vocab_size=VOCAB, seed=11)  # seq_length 64


@pytest.fixture(scope="module")
def ours(folder):
    return QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def hf(folder):
    return qwen2_reference_from_checkpoint(folder)


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_guide_loss(model, encodings: torch.Tensor, window: int, stride: int) -> tuple[float, int, int]:
    """The guide's loop; returns (mean NLL per scored token, scored tokens, windows)."""
    seq_len = encodings.size(1)
    nll_sum, n_tokens, windows, prev_end_loc = 0.0, 0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + window, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on the last loop
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss  # mean over the labels left after the shift
        scored = int((target_ids[:, 1:] != -100).sum())
        if scored:
            nll_sum += float(loss.double()) * scored
        n_tokens += scored
        windows += 1
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens, windows


@pytest.mark.parametrize(
    "window, stride, length",
    [
        (32, 16, 150),  # overlapping windows (stride < window)
        (32, 32, 150),  # non-overlapping (stride == window)
        (32, 7, 101),  # a stride that does not divide anything
        (64, 16, 20),  # the whole text is shorter than one window
        (24, 24, 73),  # stride == window with a last window of one token (nothing left to score)
    ],
)
def test_loss_matches_the_hf_guide_loop_on_transformers_qwen2(ours, hf, window, stride, length):
    ids = random_ids(length, seed=length)
    result = perplexity(ours, ids, window=window, stride=stride)
    expected, scored, windows = hf_guide_loss(hf, ids, window, stride)
    assert result.tokens_scored == scored
    assert result.windows == windows
    assert abs(result.loss - expected) <= REL_TOL * abs(expected)
    assert result.ppl == pytest.approx(math.exp(expected), rel=2e-5)


def test_every_token_but_the_first_is_scored_once_with_overlapping_windows(ours):
    ids = random_ids(150, seed=1)
    assert perplexity(ours, ids, window=32, stride=16).tokens_scored == 149
    # Non-overlapping windows: the first token of each of the 5 windows has no context.
    result = perplexity(ours, ids, window=32, stride=32)
    assert (result.windows, result.tokens_scored) == (5, 150 - 5)


def test_one_window_is_the_per_token_mean_nll_of_one_forward(ours):
    ids = random_ids(40, seed=2)
    with torch.no_grad():
        logits = ours(ids)[0].float()
    per_token = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").double()
    result = perplexity(ours, ids[0], window=64, stride=64)  # a 1-D input works too
    assert result.windows == 1 and result.tokens_scored == 39
    assert result.loss == pytest.approx(float(per_token.mean()), rel=1e-6)


def test_windows_weight_every_token_equally(ours):
    """The loss is the plain mean of each token's NLL in the window that scored it, not a mean of
    window means: rebuild it token by token."""
    ids = random_ids(70, seed=3)
    window, stride = 32, 24
    nlls = []
    prev_end = 0
    with torch.no_grad():
        for begin in range(0, 70, stride):
            end = min(begin + window, 70)
            logits = ours(ids[:, begin:end])[0].float()
            for t in range(max(prev_end, begin + 1), end):
                nlls.append(float(F.cross_entropy(logits[t - 1 - begin], ids[0, t])))
            prev_end = end
            if end == 70:
                break
    result = perplexity(ours, ids, window=window, stride=stride)
    assert result.tokens_scored == len(nlls) == 69
    assert result.loss == pytest.approx(sum(nlls) / len(nlls), rel=1e-6)


@pytest.mark.parametrize(
    "window, stride, message",
    [(0, 1, "window"), (-4, 1, "window"), (8, 0, "stride"), (8, 9, "larger than window")],
)
def test_bad_window_or_stride_raises(ours, window, stride, message):
    with pytest.raises(PerplexityError, match=message):
        perplexity(ours, random_ids(20), window=window, stride=stride)


def test_fewer_than_two_tokens_raises(ours):
    with pytest.raises(PerplexityError, match="at least 2"):
        perplexity(ours, [5], window=8, stride=4)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tok_folder(checkpoint_factory):
    return checkpoint_factory("tiny", with_tokenizer=True, seed=4)  # real vocabulary + qwen.tiktoken


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "neko.txt"
    path.write_text(JAPANESE * 3, encoding="utf-8")
    return path


def test_cli_prints_the_api_result(tok_folder, text_file, capsys):
    assert main([str(tok_folder), str(text_file), "--window", "32", "--stride", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    from nekomata_core.tokenizer import QwenTokenizer

    ids = QwenTokenizer.from_pretrained(tok_folder).encode(JAPANESE * 3)
    model = QwenForCausalLM.from_pretrained(tok_folder, dtype="float32", device="cpu", progress=False)
    expected = perplexity(model, ids, window=32, stride=16)
    assert data["total_tokens"] == len(ids) and data["tokens_scored"] == len(ids) - 1
    assert data["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert (data["window"], data["stride"], data["beyond_seq_length"]) == (32, 16, False)


def test_cli_window_defaults_to_seq_length_and_half_stride(tok_folder, text_file, capsys):
    assert main([str(tok_folder), str(text_file), "--max-tokens", "100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["window"], data["stride"], data["total_tokens"]) == (64, 32, 100)  # tiny: seq_length 64


def test_cli_table_and_explicit_window_beyond_seq_length(tok_folder, text_file, capsys):
    assert main([str(tok_folder), str(text_file), "--window", "96", "--stride", "48"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "nats/token" in out
    assert "window > seq_length 64: dynamic NTK and logn attention act in each window" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--window", "0"], "--window must be a positive number"),
        (["--window", "-3"], "--window must be a positive number"),
        (["--stride", "0"], "--stride must be a positive number"),
        (["--window", "8", "--stride", "16"], "--stride (16) must not exceed --window (8)"),
        (["--stride", "100"], "--stride (100) must not exceed the window (64)"),
    ],
)
def test_cli_bad_window_is_a_one_line_usage_error(tok_folder, text_file, capsys, extra, message):
    assert main([str(tok_folder), str(text_file), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_missing_file_and_missing_model_are_one_line_errors(tok_folder, tmp_path, capsys):
    assert main([str(tok_folder), str(tmp_path / "absent.txt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "t.txt").write_text("hello world", encoding="utf-8")
    assert main([str(tmp_path / "no-such-model"), str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err
    assert "neither an existing directory" in err and len(err.strip().splitlines()) == 1


def test_cli_parser_plugs_into_a_subcommand_registry(tok_folder, text_file, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="nekomata")
    add_perplexity_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["perplexity", str(tok_folder), str(text_file), "--max-tokens", "20"])
    assert args.run(args) == 0
    assert "20 (19 scored)" in capsys.readouterr().out


def test_tools_script_runs_as_a_program(tmp_path):
    done = subprocess.run(
        [sys.executable, "tools/perplexity.py", "model", str(tmp_path / "absent.txt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"nekomata perplexity: error: text file {str(tmp_path / 'absent.txt')!r} does not exist"
    )
