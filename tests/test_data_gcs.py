"""The data stage on gs://: corpus, cache and token store in a bucket behave as on a local disk."""

import json

import numpy as np
import pytest
from etils import epath
from test_data_prepare import config_for, write_corpus

from heft.data import corpus, loader, prepare, store, tokenizer
from heft.data.errors import DataError

L, B = 16, 8


def upload(local, remote: str) -> None:
    for f in sorted(local.iterdir()):
        (epath.Path(remote) / f.name).write_bytes(f.read_bytes())


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def local_prepared(local_corpus, tmp_path_factory):
    return prepare.prepare(config_for(local_corpus, tmp_path_factory.mktemp("cache")), progress=False)


def test_prepare_on_gcs_gives_the_ids_of_local_paths_and_the_loader_reads_them(gcs, local_corpus, local_prepared):
    upload(local_corpus, f"{gcs}/corpus")
    p = prepare.prepare(config_for(f"{gcs}/corpus", f"{gcs}/cache"), progress=False)
    assert p.store_path.startswith(f"{gcs}/cache/tokens/") and p.tokenizer_path.startswith(f"{gcs}/cache/")
    assert p.tokenizer_bytes() == local_prepared.tokenizer_bytes()
    np.testing.assert_array_equal(p.open().tokens(), local_prepared.open().tokens())
    assert p.metadata["split"] == local_prepared.metadata["split"]
    # The arrays are objects in the bucket (tensorstore's gcs driver), beside meta.json.
    assert (epath.Path(p.store_path) / p.metadata["array"] / "zarr.json").exists()
    with loader.Loader(p, "train", L, B, seed=4) as remote, loader.Loader(local_prepared, "train", L, B, seed=4) as here:
        for _ in range(3):
            a, b = remote.next(), here.next()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    assert prepare.prepare(config_for(f"{gcs}/corpus", f"{gcs}/cache"), progress=False).cached


def test_a_gcs_store_without_its_marker_is_rebuilt(gcs, local_corpus, local_prepared):
    config = config_for(local_corpus, f"{gcs}/cache")
    first = prepare.prepare(config, progress=False)
    (epath.Path(first.store_path) / "meta.json").unlink()  # as if the write had stopped before its end
    assert not store.exists(first.store_path)
    with pytest.raises(DataError, match="meta.json, written last, is missing"):
        store.open_store(first.store_path)
    again = prepare.prepare(config, progress=False)
    assert not again.cached and again.metadata["array"] != first.metadata["array"]
    np.testing.assert_array_equal(again.open().tokens(), local_prepared.open().tokens())


def test_an_interrupted_write_on_gcs_leaves_no_complete_store(gcs, local_corpus, monkeypatch):
    def fail(texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "encode_documents", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(config_for(local_corpus, f"{gcs}/cache"), progress=False)
    assert not epath.Path(f"{gcs}/cache/tokens").exists()  # the writer deleted what it had written
    monkeypatch.undo()
    assert not prepare.prepare(config_for(local_corpus, f"{gcs}/cache"), progress=False).cached


def test_an_unchanged_gcs_corpus_is_not_read_again_and_a_changed_object_is(gcs, local_corpus, monkeypatch):
    upload(local_corpus, f"{gcs}/corpus")
    config = config_for(f"{gcs}/corpus", f"{gcs}/cache")
    prepare.prepare(config, progress=False)
    hashed = []
    sha = corpus.file_sha256
    monkeypatch.setattr(corpus, "file_sha256", lambda path: hashed.append(path) or sha(path))
    assert prepare.prepare(config, progress=False).cached and hashed == []
    (epath.Path(gcs) / "corpus" / "b03.txt").write_text("a new text for this document")
    assert not prepare.prepare(config, progress=False).cached
    assert hashed == [f"{gcs}/corpus/b03.txt"]


def test_a_tokenizer_on_gcs_is_used_as_given(gcs, local_corpus, local_prepared):
    remote = f"{gcs}/ckpt/tokenizer.model"
    epath.Path(remote).write_bytes(local_prepared.tokenizer_bytes())
    assert tokenizer.load(remote).vocab_size == 400
    p = prepare.prepare(config_for(local_corpus, f"{gcs}/cache"), progress=False, tokenizer_path=remote)
    np.testing.assert_array_equal(p.open().tokens(), local_prepared.open().tokens())


@pytest.mark.parametrize("field", ["corpus", "cache_dir"])
def test_a_bucket_that_does_not_exist_is_one_clear_error(gcs, local_corpus, tmp_path, field):
    config = config_for(local_corpus, tmp_path)
    setattr(config.data, field, "gs://no-such-bucket-heft/data")
    with pytest.raises(DataError) as e:
        prepare.prepare(config, progress=False)
    assert f"data.{field}='gs://no-such-bucket-heft/data'" in str(e.value)
    assert "the bucket gs://no-such-bucket-heft does not exist" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_object_is_one_clear_error(gcs, tmp_path):
    upload_to = f"{gcs}/corpus"
    epath.Path(upload_to, "a.txt").write_text("some text")
    for missing in (f"{upload_to}/b.txt", f"{upload_to}/nothing/", f"{upload_to}/*.jsonl"):
        with pytest.raises(DataError, match=r"does not exist|matches no files"):
            prepare.prepare(config_for(missing, tmp_path), progress=False)
    with pytest.raises(DataError, match="the tokenizer .* does not exist"):
        tokenizer.load(f"{gcs}/no.model")


def test_a_recursive_glob_on_gcs_finds_nested_files(gcs):
    for name in ("a.jsonl", "x/b.jsonl", "x/y/c.jsonl", "x/d.txt", "x/.hidden.jsonl"):
        epath.Path(gcs, "c", name).write_text(json.dumps({"text": name}) + "\n")
    assert corpus.resolve(f"{gcs}/c/**/*.jsonl") == [f"{gcs}/c/{n}" for n in ("a.jsonl", "x/b.jsonl", "x/y/c.jsonl")]
    assert corpus.resolve(f"{gcs}/c") == [f"{gcs}/c/{n}" for n in ("a.jsonl", "x/b.jsonl", "x/d.txt", "x/y/c.jsonl")]
