"""`--tokenizer bpe:N`: a byte-level BPE of N tokens trained on the sources with Hugging Face
`tokenizers`, saved as a tokenizer.json that `dba sample` and `dba eval` read back through the
run's tokenizer record.

Byte-level (GPT-2's scheme: every byte has a token, no normalizer, no prefix space), so any text
encodes and decodes back to itself. The end-of-text special token takes id 0; the 256 byte tokens
follow, then the merges.
"""

from __future__ import annotations

from dba.errors import UserError

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # 256 bytes + the end-of-text token


def parse_bpe(spec: str) -> int | None:
    """N of a `bpe:N` tokenizer value, None for any other value."""
    text = str(spec).strip()
    if not text.lower().startswith("bpe:"):
        return None
    n = text[4:].replace("_", "")
    if not n.isdigit() or int(n) < MIN_VOCAB:
        raise UserError(f"--tokenizer {text!r}: bpe:N needs a vocabulary size N >= {MIN_VOCAB} (256 bytes + "
                        f"end of text), e.g. bpe:8192")
    if int(n) > 1 << 24:
        raise UserError(f"--tokenizer {text!r}: a vocabulary of {int(n):,} tokens is more than a BPE trained here "
                        f"should have (at most {1 << 24:,})")
    return int(n)


def train_bpe(texts, vocab_size: int, path: str) -> None:
    """Train on the iterable `texts` (consumed once, streamed) and save the tokenizer.json to `path`."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("--tokenizer bpe:N needs the tokenizers package: pip install tokenizers", 1) from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(path)
