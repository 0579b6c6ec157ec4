"""QwenTokenizer: the Qwen (v1) byte-level BPE tokenizer on top of `tiktoken`.

What the original (Hugging Face `tokenization_qwen.py`) does, and so what this does:

* text is NFC-normalised, split by the pre-tokenizer regex `PAT_STR`, and each pre-token is
  BPE-merged with the 151,643 ranks of `qwen.tiktoken` (rank == token id == merge priority);
* special tokens sit at fixed ids after the ranks (`<|endoftext|>` 151643, `<|im_start|>` 151644,
  `<|im_end|>` 151645, `<|extra_0|>` ... `<|extra_204|>` 151646 ... 151850), and by default any
  surface form of one found in the text *is* that special token (allowed_special="all");
* decoding joins the token bytes and decodes UTF-8 with errors="replace".

What this adds:

* ids 151851 ... 151935 are embedding rows with no token (the checkpoint pads its vocabulary to
  151,936); they, negative ids and ids past the embedding are handled explicitly in `decode`;
* `IncrementalDecoder` for streaming: one Japanese character is often split over several byte-level
  tokens, so it holds incomplete UTF-8 sequences back instead of printing U+FFFD;
* `encode` survives inputs that break a plain `tiktoken.Encoding.encode`: the Rust regex behind
  `PAT_STR` has a backtracking stack limit, and a run of about a million non-newline whitespace
  characters makes it fail with "Max stack size exceeded". Long texts are therefore cut into
  chunks at places where the regex is guaranteed to split anyway (see `_SAFE_SPLIT` for the
  argument), and long whitespace runs are pre-tokenized here (`_whitespace_run_pieces`, which spells
  out what the regex does with them) and BPE-merged without the regex. The result is identical to
  the unchunked encoding whenever that one finishes; the tests check this against tiktoken itself.
  BPE inside one pre-token is not decomposable, so a single gigantic pre-token ("a" * 5_000_000)
  is still merged in one piece: tiktoken >= 0.13 does that with a heap in O(n log n); older tiktoken
  merges with an O(n^2) scan (5M characters would take hours), and 0.12's regex even overflows on
  "a" * 1_000_000.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import os
import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tiktoken

from nekomata_core.hub import TOKENIZER_PATTERNS, resolve_model_dir

from .errors import NekomataError
from .safe_files import check_inside

if TYPE_CHECKING:
    import torch

__all__ = [
    "PAT_STR",
    "VOCAB_FILE_NAME",
    "NUM_MERGEABLE_RANKS",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "NUM_EMBEDDING_ROWS",
    "VocabFileError",
    "load_tiktoken_ranks",
    "QwenTokenizer",
    "IncrementalDecoder",
]

VOCAB_FILE_NAME = "qwen.tiktoken"

# The pre-tokenizer regex of Qwen v1 (tokenization_qwen.py), in tiktoken's (Rust fancy_regex) dialect.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_MERGEABLE_RANKS = 151_643
MAX_VOCAB_FILE_BYTES = 64 * 1024 * 1024
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Fixed ids, not "len(ranks) + i": the original pins them so a vocabulary extension cannot move them.
SPECIAL_TOKENS: dict[str, int] = {
    name: NUM_MERGEABLE_RANKS + i
    for i, name in enumerate((ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{k}|>" for k in range(205))))
}
VOCAB_SIZE = NUM_MERGEABLE_RANKS + len(SPECIAL_TOKENS)  # 151,851 ids that decode to something
NUM_EMBEDDING_ROWS = 151_936  # the checkpoint's vocab_size: 151851 ... 151935 are rows with no token

_REPLACEMENT_BYTES = "\ufffd".encode()

# ---------------------------------------------------------------------------------------------
# Chunking long texts (why each rule is safe)
# ---------------------------------------------------------------------------------------------
# tiktoken runs the regex left to right (find_iter), and PAT_STR has no look-behind and never
# matches the empty string, so the matches after a match boundary b depend only on text[b:]: the
# right half encodes the same on its own. The left half text[:b] also encodes the same unless some
# earlier alternative that failed on the full text succeeds once the text ends at b; the only way
# "end of text" can turn a failure into a success is the look-ahead in `\s+(?!\S)` when text[b] is
# not whitespace. So a cut at b is exact when b is a match boundary and text[b-1] is not whitespace.
# The pairs (text[b-1], text[b]) below are such boundaries, whatever surrounds them:
#   letter | non-letter  -- every alternative that matches a letter ends its match on letters;
#   digit  | anything    -- `\p{N}` is always a pre-token of exactly one character;
#   symbol | space/tab   -- ` ?[^\s\p{L}\p{N}]+[\r\n]*` can only continue with \r or \n.
# The classes are spelled out (not taken from unicodedata) so that they cannot disagree with the
# Unicode tables inside tiktoken's Rust regex: every character listed is assigned, with that kind of
# category, since Unicode 14 at the latest (older than any table tiktoken ships). None of the pairs
# occurs inside a special token's surface form (`<|extra_12|>` has letter|'_', digit|digit and
# digit|'|', all excluded), so a cut never splits one.
_LETTERS = (
    "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff"  # Latin, Latin-1 letters
    "\u3041-\u3096\u30a1-\u30fa"  # hiragana, katakana
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7a3"  # Hangul syllables
    "\uff21-\uff3a\uff41-\uff5a\uff66-\uff9f"  # full-width Latin, half-width katakana
)
_SYMBOLS = (
    r"!\"#$%&'()*+,\-./:;=?@\[\\\]^`{}~"  # ASCII punctuation except < > | _ (special-token syntax)
    "\u3001\u3002\u300c-\u300f\u30fb"  # 、。「」『』・
    "\uff01\uff08\uff09\uff0c\uff0e\uff1a\uff1b\uff1f"  # ！（），．：；？
)
_SAFE_SPLIT = re.compile(
    rf"(?<=[{_LETTERS}])(?=[{_SYMBOLS}0-9 \t\n\r\u3000])"
    r"|(?<=[0-9])(?=[^0-9|])"
    rf"|(?<=[{_SYMBOLS}])(?=[ \t\u3000])"
)
# `\s` in the Rust regex is Unicode White_Space (Python's str.isspace() also accepts \x1c-\x1f).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NEWLINES = "\r\n"

# Texts up to this many characters go straight to tiktoken: the regex stack overflow needs a
# whitespace run of ~1,000,000 characters, so they cannot trigger it, and there is nothing to gain
# from chunking them.
_DIRECT_MAX_CHARS = 262_144
# Longer texts are cut into chunks of about this many characters. (Encoding the chunks on several
# threads gained nothing over one, so one text stays on one thread; use encode_batch for parallelism
# across texts.)
_CHUNK_CHARS = 65_536
# Whitespace runs at least this long are pre-tokenized in Python instead of by tiktoken's regex.
_LONG_WHITESPACE_CHARS = 32_768


def _long_whitespace_re(min_chars: int) -> re.Pattern[str]:
    return re.compile(f"[{_WHITESPACE}]{{{min_chars},}}")


_LONG_WHITESPACE = _long_whitespace_re(_LONG_WHITESPACE_CHARS)


class VocabFileError(NekomataError):
    """`qwen.tiktoken` is malformed; the message names the file and the line."""


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a `qwen.tiktoken` file: one `base64(token bytes) rank` per line, blank lines ignored.

    Raises FileNotFoundError if the file is missing and `VocabFileError` (a ValueError) naming the
    file and line for a malformed line, bad base64, a negative or non-integer rank, a duplicate rank
    or duplicate token bytes. The whole file must then be exactly Qwen v1's vocabulary shape:
    151,643 ranks (so 0 ... 151642, leaving the special-token ids free) including all 256 single
    bytes; anything else is an error rather than a warning because the special tokens are pinned at
    151643 ... 151850 and a truncated download would otherwise tokenize silently differently.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer vocabulary {str(path)!r} does not exist. Pass the {VOCAB_FILE_NAME} shipped with "
            "the checkpoint (or a directory holding it, via QwenTokenizer.from_pretrained)."
        )
    size = path.stat().st_size
    if size > MAX_VOCAB_FILE_BYTES:  # Qwen's is 2.4 MB; never read a huge or endless file whole
        raise VocabFileError(
            f"{str(path)!r} is {size:,} bytes, far more than a Qwen v1 {VOCAB_FILE_NAME} "
            f"(about 2.5 MB; at most {MAX_VOCAB_FILE_BYTES:,} accepted). Is it the right file?"
        )
    lines = path.read_bytes().splitlines()
    ranks = _parse_ranks_fast(lines)
    if ranks is None:  # something is wrong: find the first bad line, for a precise message
        ranks = _parse_ranks_checked(lines, path)
    if len(ranks) != NUM_MERGEABLE_RANKS or max(ranks.values(), default=-1) != NUM_MERGEABLE_RANKS - 1:
        raise VocabFileError(
            f"{str(path)!r} holds {len(ranks):,} ranks (largest {max(ranks.values(), default=-1)}), but "
            f"Qwen v1 has exactly {NUM_MERGEABLE_RANKS:,} (0 ... {NUM_MERGEABLE_RANKS - 1}); its special "
            f"tokens are pinned right after them. Is the file truncated or from another model? Re-download "
            f"{VOCAB_FILE_NAME} (sha256 b2b1b8df...a33186 for Qwen-7B / nekomata)."
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise VocabFileError(
            f"{str(path)!r} has no token for the single byte(s) "
            f"{', '.join(f'0x{b:02x}' for b in missing[:8])}; byte-level BPE needs all 256 to encode "
            "arbitrary text."
        )
    return ranks


def _parse_ranks_fast(lines: list[bytes]) -> dict[bytes, int] | None:
    """The original's one-line parse plus whole-file checks; None if any check fails. Twice as fast
    as checking line by line, which only runs to explain a failure."""
    try:
        pairs = [line.split() for line in lines if line]
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in pairs}
    except (ValueError, binascii.Error):  # wrong field count, bad base64, non-integer rank
        return None
    values = ranks.values()
    if (
        len(ranks) != len(pairs)
        or len(set(values)) != len(ranks)
        or min(values, default=0) < 0
        or b"" in ranks
    ):
        return None
    return ranks


def _parse_ranks_checked(lines: list[bytes], path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    line_of_token: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {lineno}"
        fields = line.split()
        if len(fields) != 2:
            raise VocabFileError(
                f"{where}: expected 'base64 rank', got {line[:80].decode('utf-8', 'replace')!r}. Is this "
                "really a qwen.tiktoken file?"
            )
        token_b64, rank_text = (field.decode("utf-8", "replace") for field in fields)
        try:
            token = base64.b64decode(token_b64, validate=True)
        except (binascii.Error, ValueError):
            raise VocabFileError(f"{where}: {token_b64[:80]!r} is not valid base64.") from None
        if not token:
            raise VocabFileError(f"{where}: the token is empty; every rank must name at least one byte.")
        try:
            rank = int(rank_text)
        except ValueError:
            raise VocabFileError(f"{where}: rank {rank_text[:40]!r} is not an integer.") from None
        if rank < 0:
            raise VocabFileError(f"{where}: rank {rank} is negative.")
        if rank in line_of_rank:
            raise VocabFileError(f"{where}: rank {rank} was already given on line {line_of_rank[rank]}.")
        if token in line_of_token:
            raise VocabFileError(
                f"{where}: token bytes {token!r} were already given rank {ranks[token]} on line "
                f"{line_of_token[token]}."
            )
        ranks[token] = rank
        line_of_rank[rank] = lineno
        line_of_token[token] = lineno
    return ranks


class QwenTokenizer:
    """Qwen (v1) tokenizer: NFC + tiktoken BPE with Qwen's regex and pinned special tokens.

    >>> tok = QwenTokenizer.from_pretrained("rinna/nekomata-7b")  # doctest: +SKIP
    >>> tok.decode(tok.encode("こんにちは<|endoftext|>"))  # doctest: +SKIP
    'こんにちは<|endoftext|>'
    """

    def __init__(self, vocab_file: str | os.PathLike[str], *, num_threads: int | None = None) -> None:
        """Load `vocab_file` (a qwen.tiktoken). `num_threads` is the thread count of `encode_batch`
        (None: min(8, CPU count), like tiktoken's encode_batch)."""
        self.vocab_file = Path(vocab_file)
        ranks = load_tiktoken_ranks(self.vocab_file)
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=dict(SPECIAL_TOKENS)
        )
        self._all_special = frozenset(SPECIAL_TOKENS)
        # id -> bytes for every id that decodes to something (ranks, then specials); list indexing is
        # the fastest per-token lookup for streaming and for decoding ids tiktoken cannot decode.
        table: list[bytes] = [b""] * VOCAB_SIZE
        for token, rank in ranks.items():
            table[rank] = token
        for name, index in SPECIAL_TOKENS.items():
            table[index] = name.encode("ascii")
        self._id_to_bytes = table
        self.num_threads = num_threads if num_threads is not None else min(8, os.cpu_count() or 1)
        self.eod_id: int = SPECIAL_TOKENS[ENDOFTEXT]
        self.im_start_id: int = SPECIAL_TOKENS[IM_START]
        self.im_end_id: int = SPECIAL_TOKENS[IM_END]

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike[str], *, revision: str | None = None, **kwargs: Any
    ) -> QwenTokenizer:
        """Load from a checkpoint directory holding `qwen.tiktoken`, a path to that file, or a Hub id
        (only the tokenizer files are downloaded)."""
        if revision is None and Path(os.fspath(path_or_repo_id)).expanduser().is_file():
            return cls(Path(os.fspath(path_or_repo_id)).expanduser(), **kwargs)
        folder = resolve_model_dir(path_or_repo_id, revision=revision, allow_patterns=TOKENIZER_PATTERNS)
        vocab_file = folder / VOCAB_FILE_NAME
        if not vocab_file.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} has no {VOCAB_FILE_NAME}; a Qwen v1 checkpoint ships its BPE ranks in that "
                "file. Pass the directory (or the file) that has it."
            )
        # The same rule as for the weights: a link is followed only inside the checkpoint folder or into
        # the Hugging Face cache's own blobs/ of that repo.
        check_inside(vocab_file, folder, error=VocabFileError)
        return cls(vocab_file, **kwargs)

    def __repr__(self) -> str:
        return f"QwenTokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    # -- vocabulary ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """151,851 ids that decode to text: 151,643 BPE ranks + 208 special tokens. The model's
        embedding has 151,936 rows; the rest have no token."""
        return VOCAB_SIZE

    def __len__(self) -> int:
        return VOCAB_SIZE

    @property
    def special_tokens(self) -> dict[str, int]:
        """Surface form -> id of the 208 special tokens (a copy)."""
        return dict(SPECIAL_TOKENS)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken Encoding (same ranks, regex and special tokens)."""
        return self._enc

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's surface form for specials). ValueError for ids
        with no token, naming the id."""
        if not 0 <= token_id < VOCAB_SIZE:
            raise ValueError(_invalid_id_message(token_id))
        return self._id_to_bytes[token_id]

    def convert_ids_to_tokens(self, ids: int | Iterable[int] | Any) -> bytes | str | list[bytes | str]:
        """Like the original: bytes for BPE tokens, str for special tokens (handy for debugging)."""
        single = isinstance(ids, int)
        out: list[bytes | str] = []
        for i in [ids] if single else _as_id_list(ids):
            token = self.id_to_token_bytes(i)
            out.append(token.decode("ascii") if i >= NUM_MERGEABLE_RANKS else token)
        return out[0] if single else out

    # -- encoding --------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | Collection[str] = "all",
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Text -> token ids. NFC-normalises first, like the original.

        Special tokens follow tiktoken's rules, with the original Qwen defaults: surface forms in
        `allowed_special` become special tokens ("all" by default, as in Hugging Face's
        QWenTokenizer); a surface form in `disallowed_special` raises ValueError naming it ("all"
        means every special token not allowed); anything else is encoded as plain text, so
        `allowed_special=set()` with the default `disallowed_special=()` encodes
        "<|endoftext|>" as the 7 ordinary tokens of its characters.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use encode_batch for a list.")
        allowed, disallowed = self._resolve_specials(allowed_special, disallowed_special)
        text = unicodedata.normalize("NFC", text)
        if disallowed:
            _raise_if_disallowed(text, disallowed)
        if len(text) <= _DIRECT_MAX_CHARS:
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        return self._encode_chunked(text, allowed)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        allowed_special: Literal["all"] | Collection[str] = "all",
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[list[int]]:
        """`encode` for each text, on up to `num_threads` threads (tiktoken releases the GIL)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of str, got a single str; use encode.")

        def one(text: str) -> list[int]:
            return self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

        if self.num_threads <= 1 or len(texts) <= 1:
            return [one(t) for t in texts]
        with ThreadPoolExecutor(min(self.num_threads, len(texts))) as pool:
            return list(pool.map(one, texts))

    def _resolve_specials(
        self,
        allowed_special: Literal["all"] | Collection[str],
        disallowed_special: Literal["all"] | Collection[str],
    ) -> tuple[frozenset[str], frozenset[str]]:
        if allowed_special == "all":
            allowed = self._all_special
        elif isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special={allowed_special!r}: pass 'all' or a set of special-token strings "
                "(a bare str would be read as a set of characters)."
            )
        else:
            allowed = frozenset(allowed_special)
            _check_special_names(allowed, "allowed_special")
        if disallowed_special == "all":
            disallowed = self._all_special - allowed
        elif isinstance(disallowed_special, str):
            raise ValueError(
                f"disallowed_special={disallowed_special!r}: pass 'all', () or a set of special-token "
                "strings."
            )
        else:
            disallowed = frozenset(disallowed_special)
            _check_special_names(disallowed, "disallowed_special")
            if disallowed & allowed:
                raise ValueError(
                    f"{sorted(disallowed & allowed)} are both allowed and disallowed; remove them from one "
                    "of allowed_special / disallowed_special."
                )
        return allowed, disallowed

    def _encode_chunked(
        self,
        text: str,
        allowed: frozenset[str],
        *,
        chunk_chars: int = _CHUNK_CHARS,
        direct_max_chars: int = _DIRECT_MAX_CHARS,
        long_whitespace: re.Pattern[str] = _LONG_WHITESPACE,
    ) -> list[int]:
        """Encode a long (already NFC) text piece by piece; equal to encoding it in one call.

        The text is cut at `_SAFE_SPLIT` boundaries into chunks of about `chunk_chars`. Ordinary text
        has such a boundary every few characters, so only a stretch without any (a gigantic word, a
        gigantic whitespace run, ...) yields a chunk longer than `direct_max_chars`; only those are
        searched for long whitespace runs, which keeps the common path free of extra scans. The
        keyword arguments exist so that tests can exercise the cutting logic on small texts.
        """
        enc = self._enc
        out: list[int] = []
        for start, end in _chunk_bounds(text, chunk_chars):
            if end - start <= direct_max_chars:
                out += enc.encode(text[start:end], allowed_special=allowed, disallowed_special=())
                continue
            cursor = start
            # Runs never cross a chunk end (the character before a cut is never whitespace).
            for run in long_whitespace.finditer(text, start, end):
                text_end, pieces, cursor_next = _whitespace_run_pieces(text, run.start(), run.end(), allowed)
                if cursor < text_end:
                    out += enc.encode(text[cursor:text_end], allowed_special=allowed, disallowed_special=())
                for piece in pieces:
                    # Whitespace only (valid UTF-8, never a special token): BPE-merge it without the regex.
                    out += enc._encode_single_piece(piece)
                cursor = cursor_next
            if cursor < end:
                out += enc.encode(text[cursor:end], allowed_special=allowed, disallowed_special=())
        return out

    # -- decoding --------------------------------------------------------------------------------

    def decode(self, ids: Any, *, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Token ids (list/tuple of ints, 1-D numpy array or torch tensor, or one int) -> text.

        Bytes are joined and decoded as UTF-8 with `errors` ("replace" by default, like the original;
        "strict" raises on invalid UTF-8; any Python codec error handler works).

        Ids with no token -- 151851 ... 151935 (embedding rows past the vocabulary), negative ids
        and ids >= 151936 -- raise ValueError naming the id and its position with errors="strict";
        with any other handler each one decodes to U+FFFD ("ignore" drops it), so a model sampling
        an unused row shows up visibly instead of crashing a generation loop.

        skip_special_tokens=True drops every id in 151643 ... 151935 (the special tokens and the
        unused rows), as the original does with `i < eod_id`.
        """
        ids = _as_id_list(ids)
        if not ids:
            return ""
        if min(ids) >= 0 and max(ids) < VOCAB_SIZE:  # the common case: tiktoken joins the bytes
            if skip_special_tokens:
                ids = [i for i in ids if i < NUM_MERGEABLE_RANKS]
            data = self._enc.decode_bytes(ids)
        else:  # positions count every id given, so that an error points at the right one
            data = b"".join(
                self._bytes_of(i, position, errors)
                for position, i in enumerate(ids)
                if not (skip_special_tokens and NUM_MERGEABLE_RANKS <= i < NUM_EMBEDDING_ROWS)
            )
        return data.decode("utf-8", errors)

    def _bytes_of(self, token_id: int, position: int | None, errors: str) -> bytes:
        if 0 <= token_id < VOCAB_SIZE:
            return self._id_to_bytes[token_id]
        if errors == "strict":
            raise ValueError(_invalid_id_message(token_id, position))
        return b"" if errors == "ignore" else _REPLACEMENT_BYTES

    def incremental_decoder(
        self, *, skip_special_tokens: bool = False, errors: str = "replace"
    ) -> IncrementalDecoder:
        """A streaming decoder; see `IncrementalDecoder`."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens, errors=errors)

    # -- batching --------------------------------------------------------------------------------

    def pad(
        self,
        batch: Sequence[Any],
        *,
        padding_side: Literal["left", "right"] = "left",
        pad_id: int | None = None,
        return_tensors: Literal["pt"] | None = "pt",
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor] | dict[str, list[list[int]]]:
        """Pad id sequences to one length: {"input_ids": [B, T], "attention_mask": [B, T]} (1 = real).

        Left padding by default, which is what batched generation wants (every row's last real
        token sits at column T - 1). `pad_id` defaults to `eod_id` (<|endoftext|>), the pad id in
        Qwen's generation_config.json. T is the longest sequence, or `max_length` if given (which
        must be at least that: this never truncates). return_tensors="pt" gives torch.long tensors,
        None gives lists.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: use 'pt' (torch tensors) or None (lists).")
        rows = [_as_id_list(seq) for seq in batch]
        longest = max((len(r) for r in rows), default=0)
        if max_length is not None and max_length < longest:
            raise ValueError(
                f"max_length={max_length} is shorter than the longest sequence ({longest} ids); pad() never "
                "truncates. Truncate the sequences first or raise max_length."
            )
        width = longest if max_length is None else max_length
        pad = self.eod_id if pad_id is None else int(pad_id)
        input_ids: list[list[int]] = []
        attention_mask: list[list[int]] = []
        for row in rows:
            fill = width - len(row)
            if padding_side == "left":
                input_ids.append([pad] * fill + row)
                attention_mask.append([0] * fill + [1] * len(row))
            else:
                input_ids.append(row + [pad] * fill)
                attention_mask.append([1] * len(row) + [0] * fill)
        if return_tensors is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        import torch

        shape = (len(rows), width)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long).reshape(shape),  # [B, T]
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long).reshape(shape),  # [B, T]
        }


class IncrementalDecoder:
    """Streaming detokenizer: `push(id)` returns only the text completed by that token.

    Byte-level BPE splits one Japanese character (3 UTF-8 bytes) over several tokens, so decoding
    token by token would print U+FFFD fragments. This feeds token bytes to Python's incremental
    UTF-8 decoder, which holds back an incomplete sequence until it completes, and emits U+FFFD (with
    errors="replace") as soon as a following byte proves the sequence can never complete. `flush()`
    emits whatever is held back (U+FFFD for an incomplete tail) and resets the decoder, so
    "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids) exactly, with the same
    `skip_special_tokens` and `errors` semantics as `QwenTokenizer.decode`.
    """

    def __init__(
        self, tokenizer: QwenTokenizer, *, skip_special_tokens: bool = False, errors: str = "replace"
    ):
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.errors = errors
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._position = 0  # ids pushed since the last flush, for error messages

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (often "" mid-character)."""
        token_id = int(token_id)
        position = self._position
        self._position += 1
        if self.skip_special_tokens and NUM_MERGEABLE_RANKS <= token_id < NUM_EMBEDDING_ROWS:
            return ""
        return self._utf8.decode(self._tokenizer._bytes_of(token_id, position, self.errors))

    def extend(self, ids: Any) -> str:
        """`push` several ids; return their newly completed text."""
        return "".join(self.push(i) for i in _as_id_list(ids))

    def flush(self) -> str:
        """End of stream: return what was held back and reset for a new stream."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._position = 0
        return tail

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of an incomplete UTF-8 sequence currently held back."""
        return self._utf8.getstate()[0]


# -------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------


def _invalid_id_message(token_id: int, position: int | None = None) -> str:
    at = f" at position {position}" if position is not None else ""
    if VOCAB_SIZE <= token_id < NUM_EMBEDDING_ROWS:
        why = (
            f"is one of the embedding rows {VOCAB_SIZE} ... {NUM_EMBEDDING_ROWS - 1} that have no token "
            "(the checkpoint pads its vocabulary); a model should never sample it"
        )
    else:
        why = f"is outside the embedding (valid ids are 0 ... {VOCAB_SIZE - 1})"
    return (
        f"token id {token_id}{at} {why}. Decode with errors='replace' to get U+FFFD for it, or mask these "
        "rows out of the logits."
    )


def _check_special_names(names: frozenset[str], argument: str) -> None:
    unknown = names - SPECIAL_TOKENS.keys()
    if unknown:
        raise ValueError(
            f"{argument} contains {sorted(unknown)[:5]}, which {'is' if len(unknown) == 1 else 'are'} not "
            f"special tokens of Qwen v1 (they are {ENDOFTEXT}, {IM_START}, {IM_END}, "
            "<|extra_0|> ... <|extra_204|>)."
        )


def _raise_if_disallowed(text: str, disallowed: frozenset[str]) -> None:
    # Every special token starts with "<|", so scanning for that (memchr-fast) finds the leftmost
    # occurrence of any of them, the one tiktoken's own check would report.
    start = text.find("<|")
    while start != -1:
        for name in disallowed:
            if text.startswith(name, start):
                raise ValueError(
                    f"the text contains the special token {name!r} (at character {start}), which is "
                    f"disallowed. Pass allowed_special={{{name!r}, ...}} (or 'all') to encode it as the "
                    f"special token, or remove it from disallowed_special to encode it as plain text."
                )
        start = text.find("<|", start + 1)


def _as_id_list(ids: Any) -> list[int]:
    """A 1-D list of Python ints from a list/tuple, numpy array, torch tensor or a single int."""
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors (any device) without importing torch
        values = ids.tolist()
        if isinstance(values, int):
            return [values]
        if values and isinstance(values[0], list):
            raise ValueError(
                f"expected a 1-D sequence of token ids, got shape {tuple(getattr(ids, 'shape', ()))}; "
                "decode one row at a time."
            )
        return values
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"expected token ids, got {type(ids).__name__}.")
    return list(ids)


def _chunk_bounds(text: str, chunk_chars: int) -> list[tuple[int, int]]:
    """Cut text into [start, end) ranges of roughly chunk_chars at `_SAFE_SPLIT` boundaries. A
    stretch with no safe boundary after chunk_chars (e.g. one gigantic word) stays whole."""
    bounds = []
    pos, end = 0, len(text)
    while end - pos > chunk_chars:
        found = _SAFE_SPLIT.search(text, pos + chunk_chars)
        if found is None:
            break
        bounds.append((pos, found.start()))
        pos = found.start()
    if pos < end:
        bounds.append((pos, end))
    return bounds


def _whitespace_run_pieces(text: str, s: int, e: int, allowed: frozenset[str]) -> tuple[int, list[str], int]:
    """Pre-tokenize the maximal whitespace run text[s:e] exactly as PAT_STR would, without the regex.

    Returns (text_end, pieces, resume): text up to text_end belongs to the preceding text chunk,
    `pieces` are whole pre-tokens (to be BPE-merged directly), and the next text chunk starts at
    resume. What the regex does with the run, alternative by alternative:

    1. If the run follows a symbol (not a letter, digit or whitespace), that symbol's match
       ` ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*` also eats the run's leading newlines -- unless the symbol ends a
       special token, where tiktoken starts a fresh regex scan.
    2. From any position with a newline left in the run, `\\s*[\\r\\n]+` (greedy `\\s*`, then
       backtracking) matches up to and including the run's last newline.
    3. The rest has no newline. If the run ends the text, or an allowed special token follows (tiktoken
       runs the regex on the text between special tokens), `\\s+(?!\\S)` takes all of it. Otherwise
       `\\s+(?!\\S)` takes all but the last character, and that last character is decided by what
       follows (`[^\\r\\n\\p{L}\\p{N}]?\\p{L}+`, ` ?[^\\s...]+` or `\\s+`), so it starts the next text chunk.

    Each cut is a match boundary with whitespace on its right or a non-whitespace character on its
    left, which is what makes encoding the parts separately exact (see `_SAFE_SPLIT`).
    """
    a = s
    if s > 0 and _is_symbol(text[s - 1]) and not _special_ends_at(text, s, allowed):
        while a < e and text[a] in _NEWLINES:
            a += 1
    pieces = []
    last_newline = max(text.rfind("\r", a, e), text.rfind("\n", a, e))
    if last_newline >= 0:
        pieces.append(text[a : last_newline + 1])
        b = last_newline + 1
    else:
        b = a
    resume = b
    if b < e:
        if e == len(text) or _special_starts_at(text, e, allowed):
            pieces.append(text[b:e])
            resume = e
        else:
            if e - b >= 2:
                pieces.append(text[b : e - 1])
            resume = e - 1
    return a, pieces, resume


def _is_symbol(ch: str) -> bool:
    # Not \p{L}, not \p{N} (and, as the character before a whitespace run, not whitespace). This one
    # place uses Python's Unicode tables, which may be older than the Rust regex's; it only matters
    # for a character assigned in a recent Unicode version right before a >= 32k-character run.
    return unicodedata.category(ch)[0] not in "LN"


def _special_starts_at(text: str, pos: int, allowed: frozenset[str]) -> bool:
    return text.startswith("<|", pos) and any(text.startswith(name, pos) for name in allowed)


def _special_ends_at(text: str, pos: int, allowed: frozenset[str]) -> bool:
    # Special tokens cannot overlap ("<|" only at their start), so a suffix match is a real match.
    return text.endswith("|>", 0, pos) and any(text.endswith(name, 0, pos) for name in allowed)
