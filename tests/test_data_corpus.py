"""Which files a corpus is, the documents they hold, and the one clear error for each bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heft.configs import base
from heft.data import corpus, prepare
from heft.data.errors import DataError


def _config(corpus_path, tmp_path, **data):
    c = base.get_config()
    c.model.vocab = 300
    c.data.corpus = str(corpus_path)
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.workers = 1
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def _prepare_error(config) -> str:
    with pytest.raises(DataError) as e:
        prepare.prepare(config, progress=False)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_txt_jsonl_and_parquet_documents_in_sorted_path_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "second", "id": 1}) + "\n\n" + json.dumps({"text": "third"}) + "\n"
        + json.dumps({"text": "   "}) + "\n"  # whitespace only: skipped
    )
    (tmp_path / "a.txt").write_text("first\nline two\n")
    pq.write_table(pa.table({"body": ["fourth", None, "fifth ü"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("not part of the corpus")
    files = corpus.resolve(str(tmp_path))
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.txt", "b.jsonl", "c.parquet"]
    docs = [d for f in files for d in corpus.documents(f, "text" if not f.endswith("parquet") else "body")]
    assert docs == ["first\nline two\n", "second", "third", "fourth", "fifth ü"]
    assert corpus.resolve(str(tmp_path / "*.jsonl")) == [str(tmp_path / "b.jsonl")]


def test_embedded_corpus_has_its_documents_and_ignores_the_text_field():
    [path] = corpus.resolve("embedded")
    docs = list(corpus.documents(path, "some_other_field"))
    assert len(docs) == 217
    assert sum(len(d) for d in docs) > 6_000_000
    assert all("\r\n" not in d for d in docs)


def test_heldout_is_the_last_fraction_of_documents():
    assert corpus.heldout_count(100, 0.05) == 5
    assert corpus.heldout_count(217, 0.05) == 11
    assert corpus.heldout_count(10, 0.01) == 1
    assert corpus.heldout_count(10, 0.0) == 0
    with pytest.raises(DataError, match="too few"):
        corpus.heldout_count(1, 0.05)
    with pytest.raises(DataError, match="heldout_fraction"):
        corpus.heldout_count(10, 1.0)


def test_missing_path_is_one_clear_error(tmp_path):
    message = _prepare_error(_config(tmp_path / "nope", tmp_path))
    assert "does not exist" in message and "nope" in message


def test_glob_matching_nothing_is_one_clear_error(tmp_path):
    assert "matches no files" in _prepare_error(_config(tmp_path / "*.jsonl", tmp_path))


def test_empty_corpus_is_one_clear_error(tmp_path):
    (tmp_path / "docs").mkdir()
    assert "empty corpus" in _prepare_error(_config(tmp_path / "docs", tmp_path))
    (tmp_path / "docs" / "blank.txt").write_text("  \n\n")
    (tmp_path / "docs" / "none.jsonl").write_text("")
    assert "corpus is empty" in _prepare_error(_config(tmp_path / "docs", tmp_path))


def test_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    (tmp_path / "good.txt").write_text("fine text " * 50)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    message = _prepare_error(_config(tmp_path, tmp_path))
    assert "latin1.txt is not UTF-8" in message and "offset 3" in message


def test_jsonl_line_without_the_text_field_is_one_clear_error(tmp_path):
    lines = [json.dumps({"text": "one"}), json.dumps({"text": "two"}), json.dumps({"body": "three"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    message = _prepare_error(_config(tmp_path / "d.jsonl", tmp_path))
    assert "d.jsonl:3 has no 'text' field" in message and "data.text_field" in message


def test_parquet_without_the_text_column_is_one_clear_error(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "d.parquet")
    message = _prepare_error(_config(tmp_path / "d.parquet", tmp_path))
    assert "has no column 'text'" in message and "data.text_field" in message


def test_unsupported_file_named_directly_is_one_clear_error(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    assert "is not a .txt/.jsonl/.parquet file" in _prepare_error(_config(tmp_path / "d.csv", tmp_path))


def test_unknown_tokenizer_kind_is_one_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    assert "data.tokenizer='wordpiece'" in _prepare_error(_config(tmp_path, tmp_path, tokenizer="wordpiece"))
