"""Build the CLIP BPE vocabulary and merges for the closed shapes language (used by train_shapes.py;
the shipped model carries the files it wrote in dlx/zoo/shapes/tokenizer/)."""

from __future__ import annotations

import json
from pathlib import Path

from dlx.zoo.shapes_data import MAX_TOKENS, WORDS


def build_vocab_merges(words=WORDS):
    """Every word of the language becomes one token "<word></w>" through a chain of
    merges; single characters (with and without "</w>") are in the vocabulary too, so
    text outside the language still tokenizes (into characters) instead of failing."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []

    def bpe(parts):
        ranks = {m: i for i, m in enumerate(merges)}
        parts = list(parts)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    # a merge added last has the highest rank, so it never changes earlier words' results
    for w in words:
        parts = bpe(list(w[:-1]) + [w[-1] + "</w>"])
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = bpe(list(w[:-1]) + [w[-1] + "</w>"])
    return vocab, merges


def write_tokenizer(folder: str | Path):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))  # tokenizer_config.json keeps model_max_length
    return tok
