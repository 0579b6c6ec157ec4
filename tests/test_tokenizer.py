"""QwenTokenizer against independent references.

References: dashscope's own Qwen tokenizer (Alibaba's wrapper around the same qwen.tiktoken file,
NFC + tiktoken, defaults allowed_special="all" like the Hugging Face original) and tiktoken called
directly on the whole text (the original's behaviour, used where dashscope itself chunks long texts).
The BPE file is dashscope's packaged `resources/qwen.tiktoken`, checked by sha256.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import random
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nekomata_core.hub import CheckpointNotFoundError
from nekomata_core.tokenizer import (
    NUM_EMBEDDING_ROWS,
    NUM_MERGEABLE_RANKS,
    SPECIAL_TOKENS,
    VOCAB_FILE_NAME,
    QwenTokenizer,
    VocabFileError,
    _long_whitespace_re,
)

dashscope = pytest.importorskip("dashscope")

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
UNUSED_ROWS = range(NUM_MERGEABLE_RANKS + len(SPECIAL_TOKENS), NUM_EMBEDDING_ROWS)  # 151851 ... 151935
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -------------------------------------------------------------------------------------------------
# fixtures and corpus
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_file() -> Path:
    path = Path(dashscope.__file__).parent / "resources" / VOCAB_FILE_NAME
    if not path.is_file():
        pytest.skip(f"dashscope ships no {VOCAB_FILE_NAME} at {path}")
    return path


@pytest.fixture(scope="module")
def tok(vocab_file: Path) -> QwenTokenizer:
    return QwenTokenizer(vocab_file)


@pytest.fixture(scope="module")
def reference(vocab_file: Path):
    """dashscope's QwenTokenizer, built offline from the same file (no model download)."""
    qwen_tokenizer = pytest.importorskip("dashscope.tokenizers.qwen_tokenizer")
    return qwen_tokenizer.QwenTokenizer(str(vocab_file))


JAPANESE_PROSE = [
    "春の朝、駅前の小さな喫茶店は、まだ半分眠っているようだった。窓際の席に座った私は、温かいコーヒーを"
    "両手で包みながら、通りを行き交う人々をぼんやりと眺めていた。自転車で急ぐ学生、犬を連れて散歩する"
    "老人、スーツ姿で足早に歩く会社員。それぞれの一日が、同じ街角から静かに始まっていく。",
    "祖母の家は山あいの村にあり、夏休みになると私たちは毎年そこで過ごした。裏の川では冷たい水が岩の間を"
    "流れ、夕方になると蜩の声が森じゅうに響いた。囲炉裏のそばで聞く昔話は、どれも少し怖くて、けれど"
    "不思議と心が落ち着くものばかりだった。",
    "人工知能の研究は、ここ十年で大きく様変わりした。大規模言語モデルは、膨大な文章から言葉の使われ方を"
    "学び、質問に答えたり、文章を要約したり、プログラムを書いたりできるようになった。一方で、学習データ"
    "の偏りや、もっともらしい誤りを生成してしまう問題など、解決すべき課題も数多く残されている。",
    "「ねえ、明日の天気どうなると思う？」と妹が聞いた。「天気予報では、午前中は曇りで、午後から雨"
    "だって。」私は傘を二本、玄関に用意しておいた。結局、翌日は一日中よく晴れて、傘は一度も開かれる"
    "ことがなかった。",
    "東京都の人口は約１４００万人で、日本の総人口のおよそ１１％を占める。２０２４年の統計によると、外国人"
    "住民の数も過去最多を更新した。（出典：東京都総務局）",
    "鰻重、鱧、鰆、蕎麦、饂飩、麒麟、薔薇、憂鬱、檸檬。難しい漢字も、ひらがなとカタカナの混ざった文も、"
    "ヴァイオリンやウィーン、ティーパーティーのような外来語も、同じように扱えなければならない。",
]
MIXED_FORMS = [
    "ｱｲｳｴｵ ｶﾞｷﾞｸﾞｹﾞｺﾞ ﾊﾟﾋﾟﾌﾟﾍﾟﾎﾟ ｰ｡｢｣､･",
    "ＡＢＣ ａｂｃ １２３ ！？＃＄％ ＠ＴＯＫＹＯ２０２０",
    "ﾃｽﾄ１２３ABCａｂｃ漢字かなカナ",
    "半角ｶﾀｶﾅと全角カタカナ、ＡＳＣＩＩとASCII、123と１２３。",
]
COMBINING = [
    "e\u0301",  # é decomposed
    "cafe\u0301 re\u0301sume\u0301",
    "か\u3099き\u3099く\u3099",  # が ぎ ぐ decomposed (dakuten)
    "ハ\u309aヒ\u309a",  # パ ピ decomposed (handakuten)
    "A\u030angstro\u0308m \u212b \u2126",  # Å decomposed, Angstrom sign, Ohm sign (NFC maps both)
    "\u1100\u1161\u11a8",  # Hangul jamo -> 각
    "q\u0307\u0323 \u1e0b\u0323",  # combining marks whose canonical order changes
]
EMOJI = [
    "😀😃😄 🎉✨",
    "👨\u200d👩\u200d👧\u200d👦 family",
    "🇯🇵🇺🇸 flags",
    "👍🏽👋🏿 skin tones",
    "❤️ ❤ 🏳️\u200d🌈",
    "猫🐈と犬🐕",
]
WHITESPACE = [
    "a\r\nb\r\n\r\nc",
    "  leading",
    "trailing   ",
    "a \t b",
    "\n\n\n",
    "x   \n   y",
    "\u3000全角スペース\u3000です",
    "tabs\t\t\tand  spaces   \n  \n\t",
    "line\rbreaks\r\ronly",
    "  \n",
    " ",
    "",
    "non\xa0breaking\u2009thin\u2028sep",
]
CODE = [
    'def greet(name: str) -> str:\n    """Say hi."""\n    return f"こんにちは、{name}さん！"\n'
    '\n\nprint(greet("世界"))\n',
    '{"name": "猫", "age": 3, "tags": ["かわいい", "ねむい"], "ok": true}',
    '#include <stdio.h>\nint main(void) {\n\tfor (int i = 0; i < 10; ++i) printf("%d\\n", i);\n'
    "\treturn 0;\n}\n",
    "SELECT id, name FROM users WHERE created_at >= '2024-01-01' ORDER BY id DESC;",
    "I'm sure they'll say it's fine, but we'd've known. DON'T SHOUT. I'M HERE.",
]
SPECIAL_SURFACES = [
    "こんにちは<|endoftext|>さようなら",
    "<|im_start|>system\nあなたは親切なアシスタントです。<|im_end|>\n<|im_start|>user\n質問です<|im_end|>\n",
    "<|extra_0|><|extra_204|><|extra_57|>",
    "<|extra_205|> is not special, nor is <|endoftext| or <|unknown|>",
    "<<|im_end|>> <|<|endoftext|>|>",
]
CORPUS = JAPANESE_PROSE + MIXED_FORMS + COMBINING + EMOJI + WHITESPACE + CODE + SPECIAL_SURFACES
# Everything at once, separated in ways that exercise the regex across item boundaries.
CORPUS_TEXT = "\n".join(CORPUS) + "\r\n\r\n" + " ".join(CORPUS) + "".join(CORPUS)


def _all_special_free(text: str) -> bool:
    return "<|" not in text


# -------------------------------------------------------------------------------------------------
# the file and the vocabulary
# -------------------------------------------------------------------------------------------------


def test_vocab_file_is_qwen_v1s(vocab_file: Path) -> None:
    assert hashlib.sha256(vocab_file.read_bytes()).hexdigest() == QWEN_TIKTOKEN_SHA256


def test_vocabulary_shape_and_special_ids(tok: QwenTokenizer) -> None:
    assert tok.vocab_size == len(tok) == 151_851
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151_643, 151_644, 151_645)
    specials = tok.special_tokens
    assert len(specials) == 208
    assert specials["<|extra_0|>"] == 151_646 and specials["<|extra_204|>"] == 151_850
    assert sorted(specials.values()) == list(range(151_643, 151_851))
    for name, index in specials.items():
        assert tok.encode(name) == [index]
        assert tok.decode([index]) == name
        assert tok.convert_ids_to_tokens(index) == name
    assert tok.convert_ids_to_tokens(tok.encode("猫です")) == [b"\xe7\x8c\xab", b"\xe3\x81\xa7\xe3\x81\x99"]
    assert tok.id_to_token_bytes(tok.encode("hello")[0]) == b"hello"
    with pytest.raises(ValueError, match="151851"):
        tok.id_to_token_bytes(151_851)


# -------------------------------------------------------------------------------------------------
# parity with dashscope's tokenizer
# -------------------------------------------------------------------------------------------------


def test_encode_matches_dashscope_on_corpus(tok: QwenTokenizer, reference, capsys) -> None:
    """The parity corpus: 46 items (Japanese prose, half-/full-width forms, combining marks, emoji/ZWJ,
    CRLF and whitespace runs, code, special-token surface forms), one text concatenating them three
    ways, and that text repeated to ~91k characters: 97,544 characters / 55,860 tokens in all
    (6,698 / 3,840 distinct; printed by the test). Hypothesis adds 2 x 200 generated strings below."""
    total_chars = total_tokens = 0
    # The repetition stays under 100k characters: above that dashscope cuts texts at "\n" and every
    # 100k characters before encoding, which is not exact (e.g. "x  \ny" loses the "  \n" pre-token).
    long_text = CORPUS_TEXT * (95_000 // len(CORPUS_TEXT))
    for text in [*CORPUS, CORPUS_TEXT, long_text]:
        ours = tok.encode(text)
        assert ours == reference.encode(text), text
        assert tok.decode(ours) == reference.decode(ours) == unicodedata.normalize("NFC", text)
        total_chars += len(text)
        total_tokens += len(ours)
    with capsys.disabled():
        print(
            f"\n[tokenizer parity corpus] {len(CORPUS)} items + 1 concatenation + 1 repetition: "
            f"{total_chars:,} chars, {total_tokens:,} tokens"
        )


def test_nfc_is_applied_before_bpe(tok: QwenTokenizer) -> None:
    for text in COMBINING:
        nfc = unicodedata.normalize("NFC", text)
        assert tok.encode(text) == tok.encoding.encode(nfc)
    assert tok.encode("か\u3099") == tok.encode("が")
    assert tok.encode("e\u0301") != tok.encoding.encode("e\u0301")  # so NFC really changes the ids here


@FAST
@given(st.text())
def test_encode_matches_dashscope_on_arbitrary_unicode(tok: QwenTokenizer, reference, text: str) -> None:
    assert tok.encode(text) == reference.encode(text)


@FAST
@given(
    st.lists(st.sampled_from([*"aあ漢1１ｱ '\n\r\t\u3000!。、<|>_", "<|endoftext|>", "<|im_end|>"])).map(
        "".join
    )
)
def test_encode_matches_dashscope_on_dense_edge_cases(tok: QwenTokenizer, reference, text: str) -> None:
    assert tok.encode(text) == reference.encode(text)
    assert tok.encode(text, allowed_special=set()) == reference.encode(text, allowed_special=set())


@FAST
@given(st.text())
def test_decode_inverts_encode_up_to_nfc(tok: QwenTokenizer, text: str) -> None:
    nfc = unicodedata.normalize("NFC", text)
    assert tok.decode(tok.encode(text, allowed_special=set())) == nfc
    assert tok.decode(tok.encode(text)) == nfc  # special tokens decode to their surface forms


# -------------------------------------------------------------------------------------------------
# special tokens
# -------------------------------------------------------------------------------------------------


def test_special_tokens_all_allowed_by_default(tok: QwenTokenizer) -> None:
    ids = tok.encode("a<|endoftext|>b<|im_start|>")
    assert ids == [*tok.encode("a"), 151_643, *tok.encode("b"), 151_644]


def test_special_tokens_none_allowed_are_plain_text(tok: QwenTokenizer) -> None:
    text = "a<|endoftext|>b<|extra_204|>"
    ids = tok.encode(text, allowed_special=set())
    assert max(ids) < NUM_MERGEABLE_RANKS
    assert ids == tok.encoding.encode_ordinary(text)
    assert tok.decode(ids) == text


def test_special_tokens_some_allowed(tok: QwenTokenizer) -> None:
    text = "<|im_start|>x<|endoftext|>"
    ids = tok.encode(text, allowed_special={"<|im_start|>"})
    assert ids[0] == tok.im_start_id and tok.eod_id not in ids
    assert ids == tok.encoding.encode(text, allowed_special={"<|im_start|>"}, disallowed_special=())


def test_disallowed_special_token_raises_naming_it(tok: QwenTokenizer) -> None:
    with pytest.raises(ValueError, match=r"'<\|endoftext\|>'"):
        tok.encode("hi <|endoftext|>", allowed_special=set(), disallowed_special="all")
    with pytest.raises(ValueError, match=r"'<\|im_end\|>'"):
        tok.encode(
            "<|im_start|>x<|im_end|>", allowed_special={"<|im_start|>"}, disallowed_special={"<|im_end|>"}
        )
    # only the disallowed ones: other special surfaces pass
    assert tok.encode("<|im_start|>", allowed_special=set(), disallowed_special={"<|im_end|>"}) == (
        tok.encoding.encode_ordinary("<|im_start|>")
    )
    # the long (chunked) path checks too
    with pytest.raises(ValueError, match=r"'<\|extra_3\|>'"):
        tok.encode("あ。" * 200_000 + "<|extra_3|>", allowed_special=set(), disallowed_special="all")


def test_special_token_arguments_are_validated(tok: QwenTokenizer) -> None:
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|endoftext|"})
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", disallowed_special={"<eos>"})
    with pytest.raises(ValueError, match="both allowed and disallowed"):
        tok.encode("x", allowed_special={"<|im_end|>"}, disallowed_special={"<|im_end|>"})
    with pytest.raises(ValueError, match="bare str"):
        tok.encode("x", allowed_special="<|endoftext|>")
    with pytest.raises(TypeError, match="str"):
        tok.encode(["x"])  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# decoding
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [151_851, 151_900, 151_935, -1, 151_936, 2**40])
def test_ids_without_a_token_in_both_error_modes(tok: QwenTokenizer, bad_id: int) -> None:
    a, b = tok.encode("a"), tok.encode("b")
    ids = [*a, bad_id, *b]
    assert tok.decode(ids) == "a\ufffdb"
    assert tok.decode(ids, errors="replace") == "a\ufffdb"
    assert tok.decode(ids, errors="ignore") == "ab"
    with pytest.raises(ValueError, match=rf"token id {bad_id} at position 1"):
        tok.decode(ids, errors="strict")


def test_skip_special_tokens_drops_specials_and_unused_rows(tok: QwenTokenizer) -> None:
    ids = [tok.im_start_id, *tok.encode("猫"), tok.eod_id, 151_850, *UNUSED_ROWS[:3], *tok.encode("犬")]
    assert tok.decode(ids, skip_special_tokens=True) == "猫犬"
    assert tok.decode(ids, skip_special_tokens=True, errors="strict") == "猫犬"
    assert tok.decode(ids) == "<|im_start|>猫<|endoftext|><|extra_204|>\ufffd\ufffd\ufffd犬"
    # negative ids are never "special": still an error, at its position among all the ids given
    with pytest.raises(ValueError, match="token id -5 at position 2"):
        tok.decode([tok.eod_id, 151_900, -5], skip_special_tokens=True, errors="strict")


def test_decode_accepts_lists_tuples_numpy_and_torch(tok: QwenTokenizer) -> None:
    ids = tok.encode("日本語のテキスト")
    expected = "日本語のテキスト"
    assert tok.decode(ids) == tok.decode(tuple(ids)) == expected
    assert tok.decode(np.array(ids, dtype=np.int64)) == expected
    assert tok.decode(np.array(ids, dtype=np.int32)) == expected
    assert tok.decode(torch.tensor(ids)) == expected
    assert tok.decode([np.int64(i) for i in ids]) == expected
    assert tok.decode(torch.tensor(ids[0])) == tok.decode(ids[0]) == tok.decode(ids[:1])
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids, ids]))


def test_decode_invalid_utf8_follows_errors(tok: QwenTokenizer) -> None:
    e3 = tok.encoding.encode_single_token(b"\xe3")
    a = tok.encode("a")[0]
    assert tok.decode([e3, a]) == "\ufffda"
    with pytest.raises(UnicodeDecodeError):
        tok.decode([e3, a], errors="strict")


# -------------------------------------------------------------------------------------------------
# streaming
# -------------------------------------------------------------------------------------------------


def _utf8_complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_streaming_japanese_never_shows_replacement_characters(tok: QwenTokenizer) -> None:
    split_chars = 0
    for text in [*JAPANESE_PROSE, *MIXED_FORMS, *EMOJI, CORPUS_TEXT]:
        ids = tok.encode(text)
        split_chars += sum(not _utf8_complete(tok.id_to_token_bytes(i)) for i in ids)
        stream = tok.incremental_decoder()
        pieces = [stream.push(i) for i in ids]
        tail = stream.flush()
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) + tail == tok.decode(ids) == unicodedata.normalize("NFC", text)
        assert tail == ""
    assert split_chars > 0, "the corpus should contain characters split across byte-level tokens"


def test_streaming_emits_replacement_for_bytes_that_can_never_complete(tok: QwenTokenizer) -> None:
    byte = {b: tok.encoding.encode_single_token(bytes([b])) for b in (0xE3, 0x81, 0x82)}
    a = tok.encode("a")[0]
    stream = tok.incremental_decoder()
    assert stream.push(byte[0xE3]) == ""  # could still become a character
    assert stream.pending_bytes == b"\xe3"
    assert stream.push(a) == "\ufffda"  # 'a' proves E3 can never complete: emitted now, not at flush
    assert stream.push(byte[0x81]) == "\ufffd"  # a lone continuation byte is invalid at once
    assert stream.push(byte[0xE3]) == "" and stream.push(byte[0x81]) == ""
    assert stream.push(byte[0x82]) == "あ"  # E3 81 82
    assert stream.push(byte[0xE3]) == ""
    assert stream.flush() == "\ufffd"  # incomplete at the end of the stream
    assert stream.flush() == ""  # flush resets


@FAST
@given(st.lists(st.integers(min_value=-3, max_value=NUM_EMBEDDING_ROWS + 2), max_size=40))
def test_streaming_concatenation_equals_decode_for_any_ids(tok: QwenTokenizer, ids: list[int]) -> None:
    for skip in (False, True):
        stream = tok.incremental_decoder(skip_special_tokens=skip)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(
            ids, skip_special_tokens=skip
        )


@FAST
@given(st.lists(st.integers(min_value=0, max_value=255), max_size=40))
def test_streaming_concatenation_equals_decode_for_raw_bytes(tok: QwenTokenizer, data: list[int]) -> None:
    ids = [tok.encoding.encode_single_token(bytes([b])) for b in data]
    stream = tok.incremental_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == bytes(data).decode("utf-8", "replace") == tok.decode(ids)


def test_streaming_strict_and_skip_specials(tok: QwenTokenizer) -> None:
    stream = tok.incremental_decoder(errors="strict")
    assert stream.extend(tok.encode("猫")) == "猫"
    with pytest.raises(ValueError, match="151900 at position 1"):
        stream.push(151_900)
    skipping = tok.incremental_decoder(skip_special_tokens=True)
    assert (
        skipping.extend([tok.im_start_id, *tok.encode("犬"), tok.eod_id, 151_900]) + skipping.flush() == "犬"
    )


# -------------------------------------------------------------------------------------------------
# long inputs: chunking is exact, and survives what tiktoken alone cannot
# -------------------------------------------------------------------------------------------------

_EDGE_ATOMS = [
    *" \n\r\t\u3000\xa0\x85\u2028\x1c",
    *"abZあ漢ー1!.。、「'_|<>ｱ１-😀",
    "'s",
    "\r\n",
    " !",
    " a",
    "e\u0301",
    "<|endoftext|>",
    "<|im_start|>",
    "<|extra_12|>",
    "<|extra_1",
]


def test_chunked_encoding_equals_whole_text_encoding(tok: QwenTokenizer) -> None:
    """Tiny chunk sizes and whitespace-run thresholds force every cut and every whitespace-run rule
    on short texts; tiktoken on the whole text is the reference."""
    rng = random.Random(1234)
    choices = [tok.special_tokens.keys(), frozenset(), frozenset({"<|endoftext|>"})]
    # Hand-picked: what precedes a run decides whether its leading newlines join the previous match.
    handpicked = [
        f"{before}\n  \n {after}"
        for before in ["x<|endoftext|>", "<|im_end|>", "!", "a", "1", "。", ""]
        for after in ["a", "!", "1", "<|endoftext|>", ""]
    ]
    for index in range(1500 + len(handpicked)):
        if index < len(handpicked):
            text = handpicked[index]
        else:
            parts = []
            for _ in range(rng.randint(1, 30)):
                if rng.random() < 0.6:
                    parts.append(rng.choice(_EDGE_ATOMS))
                else:
                    parts.append(rng.choice(" \n\t\u3000") * rng.randint(1, 6))
            text = "".join(parts)
        allowed = frozenset(rng.choice(choices))
        expected = tok.encoding.encode(text, allowed_special=allowed, disallowed_special=())
        for chunk_chars, min_run in [(rng.randint(1, 6), rng.randint(1, 4)), (1, 1)]:
            got = tok._encode_chunked(
                text,
                allowed,
                chunk_chars=chunk_chars,
                direct_max_chars=0,
                long_whitespace=_long_whitespace_re(min_run),
            )
            assert got == expected, (text, chunk_chars, min_run)


def test_long_text_with_long_runs_equals_tiktoken(tok: QwenTokenizer) -> None:
    """~0.7 M characters: prose, a 280k-space run (pre-tokenized by us, since its chunk is long), a
    200k-character word; tiktoken on the whole text still finishes here and is the reference."""
    prose = "\n".join(JAPANESE_PROSE + CODE) + "\n"
    body = prose * (100_000 // len(prose))
    text = body + " " * 280_000 + "\n" + body[:50_000] + "a" * 200_000 + "。" + body
    ours = tok.encode(text)
    assert ours == tok.encoding.encode(text, allowed_special="all")
    assert tok.decode(ours) == text


def test_whitespace_run_that_overflows_tiktoken_is_encoded(tok: QwenTokenizer) -> None:
    """A million spaces makes tiktoken's regex fail ("Max stack size exceeded"); we pre-tokenize the
    run as the regex would without its stack limit: all spaces but the last are one pre-token, the
    last one joins the following letters."""
    run = " " * 1_000_000
    with pytest.raises(ValueError, match="stack"):
        tok.encoding.encode(run, allowed_special="all")
    tail = "あ" * 1000 + "x"
    ours = tok.encode(run + tail)
    tail_ids = tok.encoding.encode(" " + tail)
    assert ours[-len(tail_ids) :] == tail_ids
    # (not recomputed: the rest is tiktoken's own BPE of the one 999,999-space pre-token)
    assert tok.decode(ours[: -len(tail_ids)]) == run[:-1]


def test_long_ordinary_text_equals_tiktoken(tok: QwenTokenizer) -> None:
    text = unicodedata.normalize("NFC", "".join(CORPUS) * 170)
    assert len(text) > 262_144  # the chunked path
    expected = tok.encoding.encode(text, allowed_special="all")
    assert tok.encode(text) == expected
    assert tok._encode_chunked(text, frozenset(SPECIAL_TOKENS), chunk_chars=4096) == expected


def test_encode_batch_equals_encode(tok: QwenTokenizer) -> None:
    texts = CORPUS[:20]
    sequential = copy.copy(tok)
    sequential.num_threads = 1
    threaded = copy.copy(tok)
    threaded.num_threads = 4
    assert threaded.encode_batch(texts) == sequential.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, allowed_special=set()) == [
        tok.encode(t, allowed_special=set()) for t in texts
    ]
    assert tok.encode_batch([]) == []
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("abc")


# -------------------------------------------------------------------------------------------------
# padding
# -------------------------------------------------------------------------------------------------


def test_pad_left_by_default_with_eod(tok: QwenTokenizer) -> None:
    out = tok.pad([[1, 2, 3], [4], []])
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    eod = tok.eod_id
    assert out["input_ids"].tolist() == [[1, 2, 3], [eod, eod, 4], [eod, eod, eod]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_pad_right_custom_id_max_length_and_lists(tok: QwenTokenizer) -> None:
    out = tok.pad([torch.tensor([1, 2]), np.array([3])], padding_side="right", pad_id=0, max_length=4)
    assert out["input_ids"].tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    plain = tok.pad([[5], [6, 7]], return_tensors=None)
    assert plain == {"input_ids": [[tok.eod_id, 5], [6, 7]], "attention_mask": [[0, 1], [1, 1]]}
    assert tok.pad([])["input_ids"].shape == (0, 0)


def test_pad_rejects_bad_arguments(tok: QwenTokenizer) -> None:
    with pytest.raises(ValueError, match="never truncates"):
        tok.pad([[1, 2, 3]], max_length=2)
    with pytest.raises(ValueError, match="padding_side"):
        tok.pad([[1]], padding_side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="return_tensors"):
        tok.pad([[1]], return_tensors="np")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# loading
# -------------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("YQ== 0\nYg==\n", r"line 2: expected 'base64 rank'"),
        ("YQ== 0 7\n", r"line 1: expected 'base64 rank'"),
        ("YQ== 0\n!!notbase64 1\n", r"line 2: .* is not valid base64"),
        ("YQ== zero\n", r"line 1: rank 'zero' is not an integer"),
        ("YQ== -3\n", r"line 1: rank -3 is negative"),
        ("YQ== 0\n\nYg== 0\n", r"line 3: rank 0 was already given on line 1"),
        ("YQ== 0\nYQ== 1\n", r"line 2: token bytes b'a' were already given rank 0 on line 1"),
        ("YQ== 0\nYg== 1\n", r"holds 2 ranks .* exactly 151,643"),
    ],
)
def test_malformed_vocab_files_are_rejected_naming_file_and_line(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / VOCAB_FILE_NAME
    path.write_text(content)
    with pytest.raises(VocabFileError, match=message) as info:
        QwenTokenizer(path)
    assert str(path) in str(info.value)


def test_vocab_without_every_single_byte_is_rejected(tmp_path: Path, vocab_file: Path) -> None:
    lines = vocab_file.read_bytes().splitlines()
    index = next(i for i, line in enumerate(lines) if base64.b64decode(line.split()[0]) == b"\x00")
    replacement = _b64(b"never-a-token-\x00-").encode()
    lines[index] = replacement + b" " + lines[index].split()[1]
    path = tmp_path / VOCAB_FILE_NAME
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(VocabFileError, match="single byte.*0x00"):
        QwenTokenizer(path)


def test_missing_vocab_file_is_a_clear_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QwenTokenizer(tmp_path / VOCAB_FILE_NAME)
    with pytest.raises(FileNotFoundError, match=f"has no {VOCAB_FILE_NAME}"):
        QwenTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        QwenTokenizer.from_pretrained(tmp_path / "not" / "here")


def test_from_pretrained_accepts_a_directory_or_the_file(tmp_path: Path, vocab_file: Path) -> None:
    shutil.copyfile(vocab_file, tmp_path / VOCAB_FILE_NAME)  # a copy: links out of the folder are refused
    from_dir = QwenTokenizer.from_pretrained(tmp_path)
    from_file = QwenTokenizer.from_pretrained(vocab_file, num_threads=1)
    assert from_dir.encode(CORPUS_TEXT) == from_file.encode(CORPUS_TEXT)
    assert from_file.num_threads == 1
