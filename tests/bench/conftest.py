"""Shared by the bench tests."""

import pytest


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Every bench test runs on one thread (``one_thread``, tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory):
    """A small tokenized corpus (60 kB of the standard library, vocab 512) for tiny-model runs."""
    from blockopt.bench.corpus import load_corpus, split_ids
    from blockopt.bench.tokenizer import tokenize_corpus

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOCKOPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return split_ids(tokenize_corpus(load_corpus(max_bytes=60_000), 512).ids)
