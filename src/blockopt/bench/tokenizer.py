"""A byte-level BPE tokenizer trained locally on the corpus, and the corpus encoded with it.

Both are cached on disk under ``$BLOCKOPT_CACHE`` (default ``~/.cache/blockopt``), keyed by a hash
of the corpus text and the vocabulary size, so only the first run on a corpus pays for training
and encoding.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..validation import check, integer
from ._io import atomic_write
from .corpus import DEFAULT_MAX_BYTES, load_corpus, split_ids

DEFAULT_VOCAB_SIZE = 2048
# Bump when the tokenizer recipe or the cached file layout changes, so stale caches are ignored.
_CACHE_FORMAT = 1
_LINES_PER_CHUNK = 256
# 256 byte symbols form the base alphabet; below that BPE cannot represent arbitrary text.
_MIN_VOCAB_SIZE = 256


@dataclass(frozen=True)
class TokenizedCorpus:
    """A trained tokenizer, the corpus encoded with it, and where they came from."""

    tokenizer: Tokenizer
    ids: torch.Tensor  # 1-D int64, the whole corpus
    cache_dir: Path
    from_cache: bool
    seconds: float  # time spent training + encoding, or loading from the cache


def cache_root() -> Path:
    """``$BLOCKOPT_CACHE`` if set, else ``~/.cache/blockopt``."""
    return Path(os.environ.get("BLOCKOPT_CACHE") or Path.home() / ".cache" / "blockopt").expanduser()


def cache_key(text: str, vocab_size: int) -> str:
    """A short digest of everything the cached tokenizer and ids depend on."""
    digest = hashlib.sha256(f"bpe-v{_CACHE_FORMAT}-vocab{vocab_size}\n".encode())
    digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:16]


def _chunks(text: str) -> Iterator[str]:
    """The text in line-aligned chunks, so training and encoding can run in parallel."""
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), _LINES_PER_CHUNK):
        yield "".join(lines[start : start + _LINES_PER_CHUNK])


def train_bpe(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``text`` (no cache; see `tokenize_corpus`).

    Byte-level means every string round-trips exactly: ``decode(encode(s)) == s``.
    """
    check("vocab_size", vocab_size, integer(_MIN_VOCAB_SIZE, hint="the byte alphabet alone takes 256 ids"))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_chunks(text), trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Encode ``text`` into a 1-D int64 tensor of token ids."""
    encodings = tokenizer.encode_batch(list(_chunks(text)), add_special_tokens=False)
    return torch.tensor([i for encoding in encodings for i in encoding.ids], dtype=torch.int64)


def tokenize_corpus(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> TokenizedCorpus:
    """Train (or load from the cache) a BPE tokenizer for ``text`` and encode ``text`` with it."""
    if not text:
        raise ValueError("cannot train a tokenizer on empty text")
    start = time.perf_counter()
    cache_dir = cache_root() / f"bpe-{vocab_size}-{cache_key(text, vocab_size)}"
    tokenizer_file, ids_file = cache_dir / "tokenizer.json", cache_dir / "ids.pt"

    if tokenizer_file.is_file() and ids_file.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        ids = torch.load(ids_file, weights_only=True).long()
        return TokenizedCorpus(tokenizer, ids, cache_dir, True, time.perf_counter() - start)

    tokenizer = train_bpe(text, vocab_size)
    ids = encode(tokenizer, text)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(tokenizer_file, lambda p: tokenizer.save(str(p)))
    # int32 halves the file; every vocabulary we train fits.
    atomic_write(ids_file, lambda p: torch.save(ids.to(torch.int32), p))
    return TokenizedCorpus(tokenizer, ids, cache_dir, False, time.perf_counter() - start)


def demo_data(vocab_size: int, corpus: str | os.PathLike | None = None, *, max_bytes: int | None = DEFAULT_MAX_BYTES):
    """``(tokenized, splits)`` of a corpus (default: the built-in one) with a BPE vocabulary of
    ``vocab_size`` (trained once, then cached): what every demo-style run trains on."""
    tokenized = tokenize_corpus(load_corpus(corpus, max_bytes=max_bytes), vocab_size)
    return tokenized, split_ids(tokenized.ids)
