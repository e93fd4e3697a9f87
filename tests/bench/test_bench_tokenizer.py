"""The local byte-level BPE tokenizer and its on-disk cache."""

import pytest
import torch

from blockopt.bench import tokenizer as tokenizer_module
from blockopt.bench.corpus import load_corpus
from blockopt.bench.tokenizer import tokenize_corpus

VOCAB = 300


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def text():
    return load_corpus(max_bytes=30_000)


def test_round_trip_is_exact(cache, text):
    tokenized = tokenize_corpus(text, VOCAB)
    assert tokenized.ids.dtype == torch.int64 and tokenized.ids.ndim == 1
    assert 0 <= int(tokenized.ids.min()) and int(tokenized.ids.max()) < VOCAB
    assert len(tokenized.ids) < len(text.encode())  # merges were learned
    assert tokenized.tokenizer.decode(tokenized.ids.tolist()) == text
    # Text the tokenizer never saw round-trips too: byte-level BPE has no unknown tokens.
    sample = "naïve café — 東京 \t\n  x = {'λ': 1e-3}\n"
    assert tokenized.tokenizer.decode(tokenized.tokenizer.encode(sample).ids) == sample


def test_second_call_loads_from_cache_without_training(cache, text, monkeypatch):
    first = tokenize_corpus(text, VOCAB)
    assert not first.from_cache
    assert first.cache_dir.parent == cache and (first.cache_dir / "tokenizer.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    second = tokenize_corpus(text, VOCAB)
    assert second.from_cache and second.cache_dir == first.cache_dir
    assert torch.equal(second.ids, first.ids)
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()


def test_cache_is_keyed_by_text_and_vocab_size(cache, text):
    base = tokenize_corpus(text, VOCAB).cache_dir
    assert tokenize_corpus(text, VOCAB + 1).cache_dir != base
    assert tokenize_corpus(text + "!", VOCAB).cache_dir != base


def test_bad_input(cache):
    with pytest.raises(ValueError, match="vocab_size"):
        tokenize_corpus("some text", 100)
    with pytest.raises(ValueError, match="empty"):
        tokenize_corpus("", VOCAB)
