"""A byte-level BPE CLIP tokenizer written offline, in the layout of the real checkpoints' (vocab.json, merges.txt)."""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few real-looking merges so common words become multi-character tokens; each result must be buildable
# from byte-level symbols or earlier merges.
MERGES = (
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"),
    ("o", "n"), ("e", "r"), ("r", "e"), ("a", "t"), ("o", "r"), ("e", "n"),
)  # fmt: skip


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in GPT-2/CLIP order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(directory: Path) -> int:
    """Write a byte-level BPE CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json) to ``directory``.

    Layout mirrors the real CLIP vocabulary: 256 byte symbols, their ``</w>`` variants, the merge results,
    then ``<|startoftext|>`` and ``<|endoftext|>`` (highest id). Returns the vocabulary size.
    """
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in MERGES] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token in tiny CLIP vocabulary"
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return len(vocab)
