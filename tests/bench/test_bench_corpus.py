"""The benchmark corpus: deterministic, file/folder input, clear errors, train/val split."""

import pytest
import torch

from blockopt.bench.corpus import CorpusError, check_long_enough, load_corpus, split_ids, stdlib_dir, stdlib_files


def test_stdlib_corpus_is_deterministic_and_capped():
    first = load_corpus(max_bytes=100_000)
    assert first == load_corpus(max_bytes=100_000)
    assert 99_000 < len(first.encode("utf-8")) <= 100_000
    # A smaller cap gives a prefix of the same text: files come in one fixed order.
    assert first.startswith(load_corpus(max_bytes=20_000))


def test_stdlib_files_are_sorted_and_skip_tests_and_site_packages():
    root = stdlib_dir()
    relative = [f.relative_to(root).as_posix() for f in stdlib_files()]
    assert relative == sorted(relative)
    assert "argparse.py" in relative
    skipped = {"site-packages", "test", "tests", "idlelib"}
    assert not [r for r in relative if skipped & set(r.split("/")[:-1])]


def test_single_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("héllo wörld\n" * 10, encoding="utf-8")
    assert load_corpus(path) == "héllo wörld\n" * 10
    # The cap counts UTF-8 bytes and never leaves half a character behind.
    assert load_corpus(path, max_bytes=2) == "h"


def test_folder_reads_text_files_in_sorted_order_and_skips_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / ".hidden").write_text("secret")
    text = load_corpus(tmp_path)
    assert text.index("one") < text.index("two")
    assert "secret" not in text and "\x00" not in text


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "blob.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(CorpusError, match="no text found"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus(max_bytes=0)


def test_split_ids_keeps_the_tail_for_validation():
    ids = torch.arange(100)
    split = split_ids(ids, val_fraction=0.1)
    assert torch.equal(split.train, ids[:90]) and torch.equal(split.val, ids[90:])
    with pytest.raises(ValueError, match="val_fraction"):
        split_ids(ids, val_fraction=1.0)
    with pytest.raises(ValueError, match="too few"):
        split_ids(torch.arange(1))


def test_a_corpus_shorter_than_one_sequence_names_itself_and_the_fixes():
    data = split_ids(torch.arange(200))  # 190 train, 10 validation tokens
    check_long_enough(data, 9, source="corpus 'notes.txt'")  # a window of 10 fits each part
    with pytest.raises(CorpusError) as short:
        check_long_enough(data, 10, source="corpus 'notes.txt'")
    assert str(short.value) == (
        "corpus 'notes.txt' is too short for seq_len=10: of its 200 tokens the validation part holds 10, and each "
        "part needs more than 10 (about 220 tokens in all); pass a longer corpus or a smaller seq_len (--seq-len)"
    )
    with pytest.raises(CorpusError, match=r"a longer corpus, a larger max_bytes \(--max-bytes\), or a smaller"):
        check_long_enough(data, 10, source="corpus 'notes.txt'", capped=True)
