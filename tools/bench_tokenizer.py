"""Encode throughput of QwenTokenizer.encode against a raw tiktoken.Encoding (benchmark, not a test).

    python tools/bench_tokenizer.py [--vocab FILE | --model DIR_OR_REPO] [--size-mb 2] [--runs 7]
                                    [--file TEXT] [--short N]

Both sides get the same ranks, regex and special tokens and the same NFC text, and must return the
same ids. QwenTokenizer adds NFC normalisation, argument checks and, for texts over 256k characters,
cutting into chunks at exact pre-token boundaries. Reported: the median wall time over interleaved
runs, MB/s, and the ratio raw_time / our_time (>= 0.9 is the target; > 1 means faster than raw
tiktoken), for one big text and for many short (chat-sized) ones. Runs are interleaved so that load
from other processes hits both sides alike; the load average is printed because it moves these
numbers a lot.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import tiktoken

from nekomata_core.tokenizer import (
    PAT_STR,
    SPECIAL_TOKENS,
    VOCAB_FILE_NAME,
    QwenTokenizer,
    load_tiktoken_ranks,
)

# A small mixed corpus; the benchmark text is these shuffled and repeated to the requested size.
PARAGRAPHS = [
    "夏の終わりの夕暮れ、港町の坂道を上ると、遠くに灯台の明かりが見えた。潮の香りを含んだ風が頬をなで、"
    "どこかの家から夕飯の支度をする音が聞こえてくる。私は立ち止まって、しばらく海を眺めていた。",
    "この研究では、日本語と英語が混在する文章を対象に、トークン化の効率と下流タスクの精度を比較した。"
    "その結果、語彙サイズが大きいほど平均トークン長は長くなるが、精度の向上は限定的であることが分かった。",
    "「本日の会議は１４時から第３会議室で行います。資料は事前に共有フォルダへアップロードしてください。」",
    "ｶﾀｶﾅの半角表記やＡＢＣのような全角英字、①②③の丸数字も、実際の文書にはよく現れる。",
    "The committee met on Tuesday to review the 2024 budget. After a long discussion, they agreed to "
    "postpone the decision until more data on regional spending had been collected.\n",
    "Large language models are trained on trillions of tokens; their tokenizers decide how text is cut "
    "into those tokens, and that choice quietly shapes cost, speed and quality.\n",
    "def tokenize(text: str) -> list[int]:\n    ids = tok.encode(text)\n"
    "    return [i for i in ids if i < 151643]\n\n",
    '{"id": 42, "title": "東京の天気", "temp_c": 23.5, "tags": ["晴れ", "sunny"]}\n',
]


def build_text(size_bytes: int, seed: int = 0) -> str:
    """Shuffled paragraphs up to about size_bytes of UTF-8 (already NFC)."""
    rng = random.Random(seed)
    parts, total = [], 0
    while total < size_bytes:
        paragraph = rng.choice(PARAGRAPHS) + rng.choice(["", "\n", "\n\n", " "])
        parts.append(paragraph)
        total += len(paragraph.encode("utf-8"))
    return unicodedata.normalize("NFC", "".join(parts))


def default_vocab() -> Path | None:
    try:
        import dashscope
    except ImportError:
        return None
    path = Path(dashscope.__file__).parent / "resources" / VOCAB_FILE_NAME
    return path if path.is_file() else None


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--vocab", type=Path, help="a qwen.tiktoken file (default: dashscope's bundled copy)")
    source.add_argument("--model", help="a checkpoint directory or Hub repo id holding qwen.tiktoken")
    parser.add_argument("--size-mb", type=float, default=2.0, help="benchmark text size in MB of UTF-8")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per side (median reported)")
    parser.add_argument("--file", type=Path, help="benchmark on this UTF-8 text file instead")
    parser.add_argument(
        "--short", type=int, default=2000, help="also time this many ~500-char texts (0: skip)"
    )
    args = parser.parse_args(argv)

    if args.model is not None:
        tok = QwenTokenizer.from_pretrained(args.model)
    else:
        vocab = args.vocab or default_vocab()
        if vocab is None:
            parser.error(
                "no qwen.tiktoken found: pass --vocab FILE or --model DIR (or pip install dashscope)"
            )
        tok = QwenTokenizer(vocab)
    raw = tiktoken.Encoding(
        "qwen-raw",
        pat_str=PAT_STR,
        mergeable_ranks=load_tiktoken_ranks(tok.vocab_file),
        special_tokens=dict(SPECIAL_TOKENS),
    )

    if args.file is not None:
        text = unicodedata.normalize("NFC", args.file.read_text(encoding="utf-8"))
    else:
        text = build_text(int(args.size_mb * 1e6))
    megabytes = len(text.encode("utf-8")) / 1e6

    expected = raw.encode(text, allowed_special="all")
    if tok.encode(text) != expected:
        print(
            "MISMATCH: QwenTokenizer.encode differs from raw tiktoken on the benchmark text", file=sys.stderr
        )
        return 1

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"text: {len(text):,} chars, {megabytes:.2f} MB UTF-8, {len(expected):,} tokens; "
        f"tiktoken {tiktoken.__version__}; {os.cpu_count()} CPUs, load average {load:.2f}"
    )
    times: dict[str, list[float]] = {"raw": [], "ours": []}
    for _ in range(args.runs):  # interleaved, so background load hits every side alike
        times["raw"].append(timed(lambda: raw.encode(text, allowed_special="all")))
        times["ours"].append(timed(lambda: tok.encode(text)))
    med = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in med.items():
        print(f"  {name:13s} median {seconds * 1e3:8.1f} ms  {megabytes / seconds:6.2f} MB/s")
    print(f"ratio raw/ours: {med['raw'] / med['ours']:.3f}  (target >= 0.9)")

    if args.short:
        rng = random.Random(1)
        texts = [text[i : i + 500] for i in (rng.randrange(len(text) - 500) for _ in range(args.short))]
        short: dict[str, list[float]] = {"raw": [], "ours": []}
        for _ in range(args.runs):
            short["raw"].append(timed(lambda: [raw.encode(t, allowed_special="all") for t in texts]))
            short["ours"].append(timed(lambda: [tok.encode(t) for t in texts]))
        raw_s, ours_s = statistics.median(short["raw"]), statistics.median(short["ours"])
        print(
            f"short texts ({args.short} x 500 chars): raw {raw_s / args.short * 1e6:.1f} us/call, "
            f"ours {ours_s / args.short * 1e6:.1f} us/call, ratio {raw_s / ours_s:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
