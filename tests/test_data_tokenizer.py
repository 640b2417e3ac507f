"""The tokenizer: exact round trips (its normalization is only "▁" -> " "), special ids, vocab errors."""

import subprocess
import sys

import pytest

from heft.data import corpus, tokenizer
from heft.data.errors import DataError

NON_ASCII = [
    "Ωμέγα — naïve café, Straße, 東京, 🙂👍🏽",
    "\tindented\n\n   three spaces, trailing  \r\nCRLF\x00NUL",
    "Ελληνικά και русский текст, עברית, العربية",
]
SMALL = ["the quick brown fox jumps over the lazy dog.\n" * 3, "a second document, with commas; and more words."] * 20


@pytest.fixture(scope="module")
def embedded_split():
    """(train documents, held-out documents) of the embedded corpus at the default fraction."""
    [path] = corpus.resolve("embedded")
    docs = list(corpus.documents(path, "text"))
    n = corpus.heldout_count(len(docs), 0.05)
    return docs[:-n], docs[-n:]


@pytest.fixture(scope="module")
def embedded_tokenizer(embedded_split):
    return tokenizer.Tokenizer(tokenizer.train(embedded_split[0], "bpe", 4096, threads=2))


def test_heldout_split_round_trips_exactly(embedded_tokenizer, embedded_split):
    tok = embedded_tokenizer
    for doc in embedded_split[1]:
        ids = tok.encode(doc)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == tok.normalize(doc) == doc


def test_non_ascii_text_round_trips_through_byte_fallback(embedded_tokenizer):
    tok = embedded_tokenizer
    for text in NON_ASCII:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert any(tok.piece(i).startswith("<0x") for i in tok.encode("東京"))  # unseen: spelled in bytes


def test_normalization_only_reads_the_meta_space_as_a_space(embedded_tokenizer):
    text = "a\u2581b"
    assert embedded_tokenizer.decode(embedded_tokenizer.encode(text)) == tokenizer.Tokenizer.normalize(text) == "a b"


def test_special_ids_and_vocab_size(embedded_tokenizer):
    tok = embedded_tokenizer
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 3, 4096)
    assert tok.eos_id not in tok.encode("</s> <s> <pad>")  # control ids never come from text


def test_unigram_tokenizer_round_trips(tmp_path):
    tok = tokenizer.Tokenizer(tokenizer.train(SMALL, "unigram", 295))
    assert tok.vocab_size == 295
    for text in SMALL[:2] + NON_ASCII:
        assert tok.decode(tok.encode(text)) == text
    path = tmp_path / "t.model"
    path.write_bytes(tokenizer.train(SMALL, "bpe", 300))
    loaded = tokenizer.load(str(path))
    assert loaded.decode(loaded.encode(NON_ASCII[0])) == NON_ASCII[0]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_vocab_larger_than_the_corpus_supports_is_one_clear_error(kind):
    with pytest.raises(DataError, match=r"model.vocab=4096 is larger than this corpus can support .*at most \d+"):
        tokenizer.train(SMALL, kind, 4096)


def test_training_pieces_keep_lines_and_stay_short():
    doc = "".join(f"line {i}\n" for i in range(1000)) + "x" * 9000
    pieces = list(tokenizer.training_pieces([doc], max_chars=1000))
    assert "".join(pieces) == doc
    assert max(len(p) for p in pieces) <= 1000
    assert all(p.endswith("\n") for p in pieces if not p.startswith("x"))


def test_vocab_too_small_for_the_characters_is_one_clear_error():
    with pytest.raises(DataError, match=r"model.vocab=270 is too small"):
        tokenizer.train(SMALL, "bpe", 270)


_TRAIN_IN_A_FRESH_PROCESS = """
import hashlib, sys
from heft.data import corpus, tokenizer
[path] = corpus.resolve("embedded")
docs = list(corpus.documents(path, "text"))[:40]
tokenizer.SAMPLE_PIECES = 150  # fewer than the 302 pieces: training samples
print(hashlib.sha256(tokenizer.train(docs, "bpe", 1000)).hexdigest())
"""


def test_training_in_two_processes_gives_identical_bytes_even_when_sampling():
    # In separate processes: sentencepiece's own sampling repeats itself within one process.
    runs = [subprocess.run([sys.executable, "-c", _TRAIN_IN_A_FRESH_PROCESS], capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.strip()) == 64


def test_sample_keeps_a_small_input_whole_and_samples_a_large_one_the_same_way_each_time():
    pieces = [f"piece {i}" for i in range(1000)]
    assert tokenizer.sample(pieces[:10], size=10) == pieces[:10]
    a, b = tokenizer.sample(iter(pieces), size=100), tokenizer.sample(iter(pieces), size=100)
    assert a == b and len(set(a)) == 100 and set(a) <= set(pieces)
    assert tokenizer.sample(iter(pieces), size=100, seed=1) != a
    # Uniform: each piece is kept with probability 100/1000, so later pieces are not favoured.
    assert 30 < sum(int(p.split()[1]) >= 500 for p in a) < 70
