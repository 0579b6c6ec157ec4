"""byte2token: how many tokens a tokenizer spends per UTF-8 byte of text, by language.

    nekomata byte2token PATH... [--tokenizer MODEL_OR_TIKTOKEN_FILE] [--compare FILE.model|FILE.tiktoken]
        [--label NAME] [--glob '*.txt'] [--lang PATTERN=LANG ...] [--json]

The measure is the one rinna's nekomata model cards use to compare the Qwen tokenizer with Llama-2's:
the *byte2token rate*, "the average number of tokens produced from 1 byte of text", so

    tokens per byte = number of tokens / number of UTF-8 bytes        (lower = more efficient)

It is the headline number; its inverse, bytes per token (higher = more efficient), is printed next to
it because that is how tokenizer efficiency is often quoted elsewhere. Group and overall figures are
byte-weighted: total tokens / total bytes over the files of the group (not the mean of the per-file
ratios), so a long file counts for what it holds.

Counting rules:

* bytes: the file's bytes (it must be valid UTF-8; nothing is normalised or stripped);
* Qwen tokens: `QwenTokenizer.encode(text, allowed_special=set())`, i.e. NFC + Qwen's regex + BPE,
  with special-token surface forms in the text counted as the ordinary text they are;
* a compared `.tiktoken` ranks file: tiktoken with those ranks, `--compare-pattern` (default: Qwen's
  regex), no normalisation and no special tokens;
* a compared SentencePiece `.model` (e.g. Llama-2's tokenizer.model; needs `pip install sentencepiece`):
  `len(sp.encode(text))`, no BOS/EOS counted.

Languages (the table is grouped like rinna's: Japanese / English / other — rinna's third column is a
multilingual collection). Each file is classified by its letters (characters with str.isalpha()):

* japanese: kana + kanji are ≥ 30 % of the letters AND kana are ≥ 10 % of those kana + kanji
  (Chinese has kanji but no kana);
* english: ASCII letters are ≥ 90 % of the letters AND common English function words (the, of, and,
  to, …) are ≥ 10 % of the words (which tells English from French or German);
* other: everything else, including files without letters.

`--lang PATTERN=LANG` overrides the detection: PATTERN is a glob matched against the path as shown
(or a directory whose files it claims); a bare `--lang LANG` sets every file. First match wins.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import fnmatch
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NekomataError
from ..tokenizer import PAT_STR, QwenTokenizer

LANGUAGES = ("japanese", "english", "other")
_LANGUAGE_ALIASES = {
    "ja": "japanese", "jp": "japanese", "jpn": "japanese", "japanese": "japanese",
    "en": "english", "eng": "english", "english": "english",
    "other": "other", "multilingual": "other", "xx": "other",
}  # fmt: skip
DEFAULT_TOKENIZER = "rinna/nekomata-7b"
DEFAULT_GLOB = "*.txt"

# Hiragana, katakana (with the phonetic extensions and half-width forms) and the CJK ideograph blocks.
_KANA = re.compile(r"[\u3041-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_KANJI = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"[A-Za-z]+")
_ENGLISH_FUNCTION_WORDS = frozenset(
    "the of and to a in is that for it as was with on be by are this at from or an have not".split()
)


class Byte2TokenError(NekomataError):
    """The inputs cannot be measured as asked (missing file, not UTF-8, unknown tokenizer file, …)."""


# --------------------------------------------------------------------------------------------------
# Tokenizers: anything that counts the tokens of a text, with a name for the table
# --------------------------------------------------------------------------------------------------
@dataclass
class TokenCounter:
    """A named token counter: `count(text)` is the number of tokens the tokenizer makes of `text`."""

    name: str
    count: Callable[[str], int]
    kind: str = "custom"  # "qwen", "tiktoken", "sentencepiece" or "custom"
    source: str = ""


def qwen_counter(tokenizer: QwenTokenizer, name: str = "Qwen") -> TokenCounter:
    """Count with the Qwen tokenizer; special-token surface forms in the text count as plain text."""

    def count(text: str) -> int:
        return len(tokenizer.encode(text, allowed_special=set()))

    return TokenCounter(name, count, "qwen", str(tokenizer.vocab_file))


def tiktoken_counter(
    path: str | os.PathLike[str], *, pattern: str = PAT_STR, name: str | None = None
) -> TokenCounter:
    """Count with any tiktoken ranks file (`base64 rank` per line) and pre-tokenizer `pattern`."""
    import tiktoken

    path = Path(path)
    ranks = _read_ranks(path)
    try:
        encoding = tiktoken.Encoding(path.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as exc:  # tiktoken raises plain ValueErrors for a bad regex or inconsistent ranks
        raise Byte2TokenError(f"cannot build a tiktoken tokenizer from {str(path)!r}: {exc}") from None

    def count(text: str) -> int:
        return len(encoding.encode_ordinary(text))

    return TokenCounter(name or path.stem, count, "tiktoken", str(path))


def sentencepiece_counter(path: str | os.PathLike[str], *, name: str | None = None) -> TokenCounter:
    """Count with a SentencePiece model (`pip install sentencepiece`); no BOS/EOS are counted."""
    try:
        import sentencepiece
    except ImportError:
        raise Byte2TokenError(
            f"comparing with the SentencePiece model {str(path)!r} needs the sentencepiece package: "
            "pip install sentencepiece"
        ) from None
    path = Path(path)
    if not path.is_file():
        raise Byte2TokenError(f"SentencePiece model {str(path)!r} does not exist")
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise Byte2TokenError(f"{str(path)!r} is not a SentencePiece model: {exc}") from None

    def count(text: str) -> int:
        return len(processor.encode(text))

    return TokenCounter(name or path.stem, count, "sentencepiece", str(path))


def load_counter(
    spec: str | os.PathLike[str] | QwenTokenizer | TokenCounter,
    *,
    name: str | None = None,
    pattern: str | None = None,
    qwen: bool = False,
) -> TokenCounter:
    """A TokenCounter from what the command line gives.

    `qwen=True` (the main --tokenizer): a checkpoint directory, a Hub id or a qwen.tiktoken file, loaded
    as QwenTokenizer. Otherwise (--compare): a `.model` file is SentencePiece, anything else a tiktoken
    ranks file read with `pattern` (default Qwen's regex).
    """
    if isinstance(spec, TokenCounter):
        return spec
    if isinstance(spec, QwenTokenizer):
        return qwen_counter(spec, name or "Qwen")
    if qwen:
        return qwen_counter(QwenTokenizer.from_pretrained(spec), name or "Qwen")
    path = Path(os.fspath(spec)).expanduser()
    if not path.is_file():
        raise Byte2TokenError(f"tokenizer file {str(path)!r} does not exist")
    if path.suffix == ".model":
        return sentencepiece_counter(path, name=name)
    return tiktoken_counter(path, pattern=pattern or PAT_STR, name=name)


def _read_ranks(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise Byte2TokenError(f"tiktoken ranks file {str(path)!r} does not exist")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            ranks[base64.b64decode(fields[0], validate=True)] = int(fields[1])
        except (ValueError, binascii.Error):
            raise Byte2TokenError(
                f"{str(path)!r} line {lineno} is not 'base64 rank'; is it a tiktoken ranks file? (A "
                "SentencePiece model must end in .model.)"
            ) from None
    if not ranks:
        raise Byte2TokenError(f"{str(path)!r} holds no ranks")
    return ranks


# --------------------------------------------------------------------------------------------------
# Files and languages
# --------------------------------------------------------------------------------------------------
def detect_language(text: str) -> str:
    """ "japanese", "english" or "other", by the rules in the module docstring."""
    letters = sum(1 for ch in text if ch.isalpha())
    if letters == 0:
        return "other"
    kana = len(_KANA.findall(text))
    kanji = len(_KANJI.findall(text))
    if (kana + kanji) >= 0.3 * letters and kana >= 0.1 * (kana + kanji):
        return "japanese"
    if len(_ASCII_LETTER.findall(text)) >= 0.9 * letters:
        words = [w.lower() for w in _WORD.findall(text)]
        if words and sum(w in _ENGLISH_FUNCTION_WORDS for w in words) >= 0.1 * len(words):
            return "english"
    return "other"


def normalize_language(name: str) -> str:
    key = name.strip().lower()
    if key not in _LANGUAGE_ALIASES:
        raise Byte2TokenError(f"unknown language {name!r}; use japanese (ja), english (en) or other")
    return _LANGUAGE_ALIASES[key]


def collect_files(paths: Iterable[str | os.PathLike[str]], glob: str = DEFAULT_GLOB) -> list[Path]:
    """Files as given, and every file under a directory whose name matches `glob`, recursively (sorted).

    Raises Byte2TokenError for a path that does not exist or a directory without any matching file.
    """
    files: list[Path] = []
    for item in paths:
        path = Path(os.fspath(item))
        if path.is_dir():
            found = sorted(p for p in path.rglob(glob) if p.is_file())
            if not found:
                raise Byte2TokenError(f"directory {str(path)!r} holds no file matching {glob!r} (see --glob)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise Byte2TokenError(f"{str(path)!r} does not exist")
    return list(dict.fromkeys(files))  # a file named twice counts once


def _language_rules(lang: Sequence[str] | dict[str, str] | None) -> list[tuple[str | None, str]]:
    if lang is None:
        return []
    items = lang.items() if isinstance(lang, dict) else (_split_rule(rule) for rule in lang)
    return [(pattern, normalize_language(language)) for pattern, language in items]


def _split_rule(rule: str) -> tuple[str | None, str]:
    pattern, sep, language = rule.rpartition("=")
    return (pattern, language) if sep else (None, rule)


def _assigned_language(path: Path, rules: list[tuple[str | None, str]]) -> str | None:
    for pattern, language in rules:
        if pattern is None:
            return language
        base = Path(pattern)
        if fnmatch.fnmatch(str(path), pattern) or fnmatch.fnmatch(path.name, pattern):
            return language
        if base.is_dir() and path.resolve().is_relative_to(base.resolve()):
            return language
    return None


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
@dataclass
class FileStats:
    path: str
    language: str
    language_source: str  # "detected" or "--lang"
    bytes: int
    characters: int
    tokens: dict[str, int]  # tokenizer name -> token count

    def tokens_per_byte(self, name: str) -> float | None:
        return self.tokens[name] / self.bytes if self.bytes else None

    def bytes_per_token(self, name: str) -> float | None:
        return self.bytes / self.tokens[name] if self.tokens[name] else None


@dataclass
class GroupStats:
    """Totals over a set of files: ratios are total tokens / total bytes (byte-weighted)."""

    files: int = 0
    bytes: int = 0
    characters: int = 0
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, stats: FileStats) -> None:
        self.files += 1
        self.bytes += stats.bytes
        self.characters += stats.characters
        for name, n in stats.tokens.items():
            self.tokens[name] = self.tokens.get(name, 0) + n

    def tokens_per_byte(self, name: str) -> float | None:
        return self.tokens.get(name, 0) / self.bytes if self.bytes else None

    def bytes_per_token(self, name: str) -> float | None:
        n = self.tokens.get(name, 0)
        return self.bytes / n if n else None


@dataclass
class Byte2TokenReport:
    tokenizers: list[str]  # the headline (Qwen) first
    files: list[FileStats]
    sources: dict[str, str] = field(default_factory=dict)  # tokenizer name -> file it was read from

    def groups(self) -> dict[str, GroupStats]:
        """Per language (japanese, english, other; only those with files) and "all"."""
        groups: dict[str, GroupStats] = {}
        for language in LANGUAGES:
            members = [f for f in self.files if f.language == language]
            if members:
                groups[language] = GroupStats()
                for f in members:
                    groups[language].add(f)
        groups["all"] = GroupStats()
        for f in self.files:
            groups["all"].add(f)
        return groups

    def to_dict(self) -> dict[str, Any]:
        def ratios(item: FileStats | GroupStats) -> dict[str, dict[str, float | int | None]]:
            return {
                name: {
                    "tokens": item.tokens.get(name, 0),
                    "tokens_per_byte": item.tokens_per_byte(name),
                    "bytes_per_token": item.bytes_per_token(name),
                }
                for name in self.tokenizers
            }

        return {
            "definition": "tokens_per_byte = tokens / UTF-8 bytes (rinna's byte2token rate; lower is better)",
            "tokenizers": self.tokenizers,
            "sources": self.sources,
            "files": [
                {
                    "path": f.path,
                    "language": f.language,
                    "language_source": f.language_source,
                    "bytes": f.bytes,
                    "characters": f.characters,
                    "tokenizers": ratios(f),
                }
                for f in self.files
            ],
            "groups": {
                language: {
                    "files": g.files,
                    "bytes": g.bytes,
                    "characters": g.characters,
                    "tokenizers": ratios(g),
                }
                for language, g in self.groups().items()
            },
        }

    def to_table(self) -> str:
        lines = [
            "byte2token: tokens per UTF-8 byte (rinna's byte2token rate; lower = fewer tokens for the same "
            "text) and bytes per token",
            "",
        ]
        header = ["file", "language", "bytes", "chars"]
        for name in self.tokenizers:
            header += [f"{name} tokens", "tok/byte", "byte/tok"]
        rows = [header]
        for f in self.files:
            language = f.language + ("*" if f.language_source == "--lang" else "")
            row = [f.path, language, f"{f.bytes:,}", f"{f.characters:,}"]
            for name in self.tokenizers:
                row += [
                    f"{f.tokens[name]:,}",
                    _fmt(f.tokens_per_byte(name), 4),
                    _fmt(f.bytes_per_token(name), 2),
                ]
            rows.append(row)
        lines += _align(rows, left=2)
        if any(f.language_source == "--lang" for f in self.files):
            lines.append("(* language set by --lang)")

        groups = self.groups()
        columns = [language for language in groups]
        titles = [language.capitalize() if language != "all" else "All" for language in columns]
        lines += ["", "by language: total tokens / total bytes of each group's files (byte-weighted)"]
        table = [["", *titles]]
        table.append(["files", *(f"{groups[c].files:,}" for c in columns)])
        table.append(["bytes", *(f"{groups[c].bytes:,}" for c in columns)])
        for name in self.tokenizers:
            table.append(
                [f"{name} tokens/byte", *(_fmt(groups[c].tokens_per_byte(name), 4) for c in columns)]
            )
        for name in self.tokenizers:
            table.append(
                [f"{name} bytes/token", *(_fmt(groups[c].bytes_per_token(name), 2) for c in columns)]
            )
        head = self.tokenizers[0]
        for name in self.tokenizers[1:]:
            ratio_row = [f"{name} ÷ {head} tokens"]
            for c in columns:
                a, b = groups[c].tokens.get(name, 0), groups[c].tokens.get(head, 0)
                ratio_row.append(_fmt(a / b if b else None, 2) + ("×" if b else ""))
            table.append(ratio_row)
        lines += _align(table, left=1)
        return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _align(rows: list[list[str]], *, left: int) -> list[str]:
    """Left-align the first `left` columns, right-align the numbers."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def byte2token(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    tokenizer: QwenTokenizer | TokenCounter | str | os.PathLike[str],
    compare: TokenCounter | str | os.PathLike[str] | None = None,
    *,
    glob: str = DEFAULT_GLOB,
    lang: Sequence[str] | dict[str, str] | None = None,
    label: str | None = None,
    compare_pattern: str | None = None,
) -> Byte2TokenReport:
    """Measure tokens per UTF-8 byte of the files under `paths` for `tokenizer` (and `compare`).

    `tokenizer`: a QwenTokenizer, a TokenCounter, or what `QwenTokenizer.from_pretrained` accepts
    (checkpoint directory, Hub id, qwen.tiktoken path). `compare`: a TokenCounter or a `.model`
    (SentencePiece) / tiktoken ranks file, named `label` (default: the file's stem). `lang`: rules
    `PATTERN=LANG` (or a bare `LANG`), or a dict {pattern: language}, overriding the detection.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    # The cheap checks first (paths, --lang, the compare file), then the Qwen vocabulary (slow to read).
    files = collect_files(paths, glob)
    rules = _language_rules(lang)
    other = load_counter(compare, name=label, pattern=compare_pattern) if compare is not None else None
    counters = [load_counter(tokenizer, qwen=True)]
    if other is not None:
        if other.name == counters[0].name:
            other.name += " (compare)"
        counters.append(other)
    stats: list[FileStats] = []
    for path in files:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Byte2TokenError(
                f"{str(path)!r} is not valid UTF-8 (byte {exc.start}); byte2token measures UTF-8 text"
            ) from None
        assigned = _assigned_language(path, rules)
        stats.append(
            FileStats(
                path=str(path),
                language=assigned or detect_language(text),
                language_source="--lang" if assigned else "detected",
                bytes=len(data),
                characters=len(text),
                tokens={c.name: c.count(text) for c in counters},
            )
        )
    return Byte2TokenReport([c.name for c in counters], stats, {c.name: c.source for c in counters})


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def add_byte2token_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "byte2token",
        help="tokens per UTF-8 byte of text files (tokenizer efficiency), by language",
        description=(
            "Count the tokens the Qwen tokenizer (and optionally a second tokenizer) makes of text files "
            "and report tokens per UTF-8 byte (rinna's byte2token rate, lower is better) and bytes per "
            "token, per file and per language (Japanese / English / other)."
        ),
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="text files or directories (searched recursively)"
    )
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help=f"checkpoint directory, Hub id or qwen.tiktoken file (default {DEFAULT_TOKENIZER})",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="FILE",
        help="a second tokenizer: a SentencePiece .model (needs sentencepiece) or a tiktoken ranks file",
    )
    parser.add_argument(
        "--label", default=None, help="name of the --compare tokenizer (default: its file stem)"
    )
    parser.add_argument(
        "--compare-pattern",
        default=None,
        metavar="REGEX",
        help="pre-tokenizer regex for a --compare tiktoken file (default: Qwen's)",
    )
    parser.add_argument(
        "--glob", default=DEFAULT_GLOB, help=f"file pattern inside directories (default {DEFAULT_GLOB!r})"
    )
    parser.add_argument(
        "--lang",
        action="append",
        default=None,
        metavar="PATTERN=LANG",
        help="set the language of matching files (japanese/ja, english/en, other); a bare LANG sets all",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run_byte2token)


def run_byte2token(args: argparse.Namespace) -> int:
    from ..hub import CheckpointNotFoundError
    from ..tokenizer import VocabFileError
    from .common import EXIT_USAGE, CLIError

    try:
        tokenizer = load_counter(args.tokenizer, qwen=True)
    except (Byte2TokenError, VocabFileError, CheckpointNotFoundError, FileNotFoundError) as exc:
        # The default tokenizer is a Hub id: name the option that points at a local one instead.
        if args.tokenizer == DEFAULT_TOKENIZER:
            raise CLIError(
                f"the default tokenizer {DEFAULT_TOKENIZER!r} could not be loaded: {exc} Pass "
                "--tokenizer PATH (a checkpoint directory or a qwen.tiktoken file) to use a local one.",
                EXIT_USAGE,
            ) from None
        raise CLIError(
            f"--tokenizer {str(args.tokenizer)!r} could not be loaded: {exc}", EXIT_USAGE
        ) from None
    try:
        report = byte2token(
            args.paths,
            tokenizer,
            args.compare,
            glob=args.glob,
            lang=args.lang,
            label=args.label,
            compare_pattern=args.compare_pattern,
        )
    except (Byte2TokenError, VocabFileError, CheckpointNotFoundError, FileNotFoundError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.to_table())
    return 0
