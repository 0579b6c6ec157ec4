"""byte2token: token and byte counts against tiktoken run directly on the same ranks and regex.

The expected numbers are computed here without nekomata_core: the ranks file is parsed by hand, the
regex is the original Qwen tokenizer's, tokens are `tiktoken.Encoding(...).encode_ordinary(text)` and
bytes are `len(text.encode("utf-8"))`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tiktoken

from nekomata_core.apps.byte2token import (
    Byte2TokenError,
    TokenCounter,
    add_byte2token_parser,
    byte2token,
    detect_language,
)
from nekomata_core.apps.cli import main as cli_main
from nekomata_core.tokenizer import QwenTokenizer


def main(argv: list[str]) -> int:
    """`nekomata byte2token ARGV`, as tools/byte2token.py runs it."""
    return cli_main(argv, command="byte2token")


# Qwen's pre-tokenizer regex, as the original tokenizer (tokenization_qwen.py) writes it.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
JAPANESE = (
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。\n"
)
ENGLISH = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
    "to do: once or twice she had peeped into the book her sister was reading.\n"
)
FRENCH = (
    "Longtemps, je me suis couché de bonne heure. Parfois, à peine ma bougie éteinte, mes yeux se "
    "fermaient.\n"
)
CHINESE = "我们的目标是构建一个强大的语言模型，用于自然语言处理的研究。\n"


@pytest.fixture(scope="module")
def reference_encoding(qwen_tiktoken) -> tiktoken.Encoding:
    ranks = {}
    for line in qwen_tiktoken.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("reference", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="module")
def qwen(qwen_tiktoken) -> QwenTokenizer:
    """Read once for the API tests (reading the 151,643 ranks takes about a second)."""
    return QwenTokenizer(qwen_tiktoken)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "ja").mkdir()
    (root / "en" / "deep").mkdir(parents=True)
    (root / "ja" / "neko.txt").write_text(JAPANESE * 3, encoding="utf-8")
    (root / "en" / "alice.txt").write_text(ENGLISH, encoding="utf-8")
    (root / "en" / "deep" / "alice2.txt").write_text(
        ENGLISH * 2 + "It was <|endoftext|> there.\n", encoding="utf-8"
    )
    (root / "fr.txt").write_text(FRENCH, encoding="utf-8")
    (root / "zh.txt").write_text(CHINESE, encoding="utf-8")
    (root / "notes.md").write_text("not a .txt file, not counted", encoding="utf-8")
    return root


def expected_counts(encoding: tiktoken.Encoding, path: Path) -> tuple[int, int]:
    text = path.read_text(encoding="utf-8")
    return len(encoding.encode_ordinary(text)), len(text.encode("utf-8"))


def test_counts_match_tiktoken_on_the_same_ranks_and_regex(corpus, qwen, reference_encoding):
    report = byte2token(corpus, qwen)
    shown = sorted(Path(f.path).relative_to(corpus).as_posix() for f in report.files)
    assert shown == ["en/alice.txt", "en/deep/alice2.txt", "fr.txt", "ja/neko.txt", "zh.txt"]  # *.txt only
    for stats in report.files:
        tokens, nbytes = expected_counts(reference_encoding, Path(stats.path))
        assert (stats.tokens["Qwen"], stats.bytes) == (tokens, nbytes), stats.path
        assert stats.tokens_per_byte("Qwen") == pytest.approx(tokens / nbytes)
        assert stats.bytes_per_token("Qwen") == pytest.approx(nbytes / tokens)


def test_special_token_text_counts_as_plain_text(corpus, qwen, reference_encoding):
    path = corpus / "en" / "deep" / "alice2.txt"
    (stats,) = byte2token(path, qwen).files
    assert stats.tokens["Qwen"] == len(reference_encoding.encode_ordinary(path.read_text(encoding="utf-8")))


def test_groups_are_byte_weighted_totals(corpus, qwen, reference_encoding):
    report = byte2token(corpus, qwen)
    groups = report.groups()
    assert list(groups) == ["japanese", "english", "other", "all"]
    for language, members in [
        ("english", ["en/alice.txt", "en/deep/alice2.txt"]),
        ("other", ["fr.txt", "zh.txt"]),
        ("all", ["en/alice.txt", "en/deep/alice2.txt", "fr.txt", "ja/neko.txt", "zh.txt"]),
    ]:
        counts = [expected_counts(reference_encoding, corpus / m) for m in members]
        tokens, nbytes = sum(c[0] for c in counts), sum(c[1] for c in counts)
        assert (groups[language].tokens["Qwen"], groups[language].bytes) == (tokens, nbytes)
        assert groups[language].tokens_per_byte("Qwen") == pytest.approx(tokens / nbytes)


def test_japanese_is_cheaper_per_byte_than_its_characters_suggest(corpus, qwen):
    """A sanity check on real text: 3 UTF-8 bytes per kana/kanji, and Qwen merges most of them."""
    groups = byte2token(corpus, qwen).groups()
    assert 0.1 < groups["japanese"].tokens_per_byte("Qwen") < 0.4
    assert 0.1 < groups["english"].tokens_per_byte("Qwen") < 0.4


def test_text_is_nfc_normalised_by_the_qwen_tokenizer(tmp_path, qwen, reference_encoding):
    text = "か\u3099か\u3099み"  # が written as か + combining dakuten
    (tmp_path / "nfd.txt").write_text(text, encoding="utf-8")
    (stats,) = byte2token(tmp_path, qwen).files
    assert stats.bytes == len(text.encode("utf-8"))  # the file's own bytes
    assert stats.tokens["Qwen"] == len(reference_encoding.encode_ordinary(unicodedata.normalize("NFC", text)))


@pytest.mark.parametrize(
    "text, language",
    [
        (JAPANESE, "japanese"),
        ("東京都は日本の首都です。", "japanese"),
        (ENGLISH, "english"),
        (FRENCH, "other"),
        (CHINESE, "other"),  # kanji without kana
        ("12345 67890 !!!", "other"),
        ("", "other"),
    ],
)
def test_language_detection(text, language):
    assert detect_language(text) == language


def test_lang_rules_override_the_detection(corpus, qwen):
    rules = [f"{corpus / 'en'}=ja", "*/fr.txt=english", "zh.txt=other"]
    report = byte2token(corpus, qwen, lang=rules)
    by_name = {Path(f.path).name: (f.language, f.language_source) for f in report.files}
    assert by_name["alice.txt"] == by_name["alice2.txt"] == ("japanese", "--lang")  # a directory rule
    assert by_name["fr.txt"] == ("english", "--lang")  # a glob
    assert by_name["neko.txt"] == ("japanese", "detected")
    everything = byte2token(corpus, qwen, lang=["english"])
    assert {f.language for f in everything.files} == {"english"}
    with pytest.raises(Byte2TokenError, match="unknown language 'klingon'"):
        byte2token(corpus, qwen, lang=["klingon"])


def test_compare_with_a_tiktoken_file_and_another_regex(corpus, qwen, qwen_tiktoken, reference_encoding):
    whitespace = r"\S+|\s+"
    report = byte2token(corpus, qwen, qwen_tiktoken, label="ws-split", compare_pattern=whitespace)
    assert report.tokenizers == ["Qwen", "ws-split"]
    other = tiktoken.Encoding(
        "ws", pat_str=whitespace, mergeable_ranks=reference_encoding._mergeable_ranks, special_tokens={}
    )
    for stats in report.files:
        text = Path(stats.path).read_text(encoding="utf-8")
        assert stats.tokens["ws-split"] == len(other.encode_ordinary(text))


def test_compare_with_a_sentencepiece_model(corpus, qwen, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentences = (JAPANESE + ENGLISH).replace("。", "\n").splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 20), model_writer=model, vocab_size=80, model_type="bpe",
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    path = tmp_path / "tiny-sp.model"
    path.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(path))
    report = byte2token(corpus, qwen, path)
    assert report.tokenizers == ["Qwen", "tiny-sp"]
    for stats in report.files:
        assert stats.tokens["tiny-sp"] == len(processor.encode(Path(stats.path).read_text(encoding="utf-8")))
    assert "tiny-sp ÷ Qwen tokens" in report.to_table()


def test_sentencepiece_missing_is_a_clear_error(corpus, qwen, tmp_path, monkeypatch):
    path = tmp_path / "llama.model"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    with pytest.raises(Byte2TokenError, match="pip install sentencepiece"):
        byte2token(corpus, qwen, path)


def test_a_custom_counter_is_accepted(corpus, qwen):
    chars = TokenCounter("chars", len)
    report = byte2token(corpus / "ja", qwen, chars)
    (stats,) = report.files
    assert stats.tokens["chars"] == stats.characters == len(JAPANESE * 3)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_table_is_grouped_by_language(corpus, qwen_tiktoken, capsys):
    assert main([str(corpus), "--tokenizer", str(qwen_tiktoken)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("byte2token: tokens per UTF-8 byte")
    assert "Japanese" in out and "English" in out and "Other" in out and "All" in out
    assert "Qwen tokens/byte" in out and "Qwen bytes/token" in out
    assert "notes.md" not in out


def test_cli_json(corpus, qwen_tiktoken, reference_encoding, capsys):
    assert main([str(corpus / "ja" / "neko.txt"), "--tokenizer", str(qwen_tiktoken), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    tokens, nbytes = expected_counts(reference_encoding, corpus / "ja" / "neko.txt")
    (entry,) = data["files"]
    assert entry["bytes"] == nbytes and entry["language"] == "japanese"
    assert entry["tokenizers"]["Qwen"] == {
        "tokens": tokens,
        "tokens_per_byte": tokens / nbytes,
        "bytes_per_token": nbytes / tokens,
    }
    assert data["groups"]["all"]["tokenizers"]["Qwen"]["tokens"] == tokens


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "absent.txt", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no file matching '*.txt'"),
        (lambda d: (d / "bad.txt").write_bytes(b"ok \xff\xfe") and d / "bad.txt", "is not valid UTF-8"),
    ],
)
def test_cli_bad_inputs_are_one_line_errors(tmp_path, qwen_tiktoken, capsys, make, message):
    path = make(tmp_path)
    assert main([str(path), "--tokenizer", str(qwen_tiktoken)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_compare_file_is_a_one_line_error(corpus, qwen_tiktoken, tmp_path, capsys):
    bogus = tmp_path / "bogus.tiktoken"
    bogus.write_text("this is not a ranks file\n")
    assert main([str(corpus), "--tokenizer", str(qwen_tiktoken), "--compare", str(bogus)]) == 2
    assert "is not 'base64 rank'" in capsys.readouterr().err
    assert main([str(corpus), "--tokenizer", str(qwen_tiktoken), "--compare", str(tmp_path / "x.model")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parser_plugs_into_a_subcommand_registry(corpus, qwen_tiktoken, capsys):
    parser = argparse.ArgumentParser(prog="nekomata")
    add_byte2token_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["byte2token", str(corpus), "--tokenizer", str(qwen_tiktoken), "--glob", "*.md"])
    assert args.run(args) == 0
    assert "notes.md" in capsys.readouterr().out


def test_tools_script_runs_as_a_program(corpus, qwen_tiktoken):
    done = subprocess.run(
        [sys.executable, "tools/byte2token.py", str(corpus / "fr.txt"), "--tokenizer", str(qwen_tiktoken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "fr.txt" in done.stdout and "other" in done.stdout
