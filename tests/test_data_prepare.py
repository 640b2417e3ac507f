"""`heft prepare`: the token store holds exactly the tokenizer's ids; a second run does nothing."""

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from heft.configs import base
from heft.data import corpus, prepare, store, tokenizer
from heft.data.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def write_corpus(root: Path, seed: int = 0) -> list[str]:
    """A small corpus of 40 documents (3 to 1500 words) in .txt and .jsonl files; returns them in corpus order."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(1, 8))) for _ in range(300)]
    docs = []
    for i in range(40):
        n = rng.choice([3, 20, 80, 300, 1500])
        lines = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(max(1, n // 6))]
        docs.append(f"doc {i}: " + "\n".join(lines) + rng.choice(["", "\n", " ünï ✓"]))
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:25]))
    for i, d in enumerate(docs[25:]):
        (root / f"b{i:02d}.txt").write_text(d)
    return docs


def config_for(corpus: Path, cache: Path, vocab: int = 400, workers: int = 1):
    c = base.get_config()
    c.model.vocab = vocab
    c.data.corpus = str(corpus)
    c.data.cache_dir = str(cache)
    c.data.workers = workers
    c.data.heldout_fraction = 0.1
    return c


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


def test_store_holds_each_document_led_by_eos_then_a_final_eos(corpus_dir, tmp_path):
    root, docs = corpus_dir
    p = prepare.prepare(config_for(root, tmp_path), progress=False)
    tok = tokenizer.load(p.tokenizer_path)
    expected = np.concatenate([np.r_[tok.eos_id, tok.encode(d)] for d in docs] + [[tok.eos_id]])
    s = p.open()
    np.testing.assert_array_equal(s.tokens(), expected)
    starts = np.r_[0, np.cumsum([len(tok.encode(d)) + 1 for d in docs])]
    np.testing.assert_array_equal(np.flatnonzero(s.tokens() == tok.eos_id), starts)  # EOS marks document starts only
    m = p.metadata
    assert (m["documents"], m["tokens"], m["text_tokens"]) == (40, len(expected), len(expected) - 41)
    assert m["split"] == {"heldout_fraction": 0.1, "train_documents": 36, "heldout_documents": 4, "heldout_start": starts[36]}
    assert m["text_bytes"] == sum(len(d.encode()) for d in docs)
    assert m["tokenizer"]["sha256"] == hashlib.sha256(Path(p.tokenizer_path).read_bytes()).hexdigest()
    assert [(Path(x["path"]).name, x["sha256"]) for x in m["sources"]] == [
        (f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in sorted(root.iterdir())
    ]
    assert m["dtype"] == "uint16" and s.tokens().dtype == np.uint16


def test_second_run_over_unchanged_inputs_does_nothing(corpus_dir, tmp_path):
    root, _ = corpus_dir
    first = prepare.prepare(config_for(root, tmp_path), progress=False)
    stamps = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*") if f.is_file()}
    again = prepare.prepare(config_for(root, tmp_path), progress=False)
    assert again.cached and not first.cached
    assert again.store_path == first.store_path and again.metadata == first.metadata
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*") if f.is_file()} == stamps
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # the same content elsewhere is the same corpus
    assert prepare.prepare(config_for(moved, tmp_path), progress=False).store_path == first.store_path


def test_changed_input_or_settings_prepare_again(corpus_dir, tmp_path):
    root, docs = corpus_dir
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    first = prepare.prepare(config_for(copy, tmp_path / "cache"), progress=False)
    (copy / "b00.txt").write_text(docs[25] + " changed")
    changed = prepare.prepare(config_for(copy, tmp_path / "cache"), progress=False)
    assert not changed.cached and changed.store_path != first.store_path
    unigram = config_for(copy, tmp_path / "cache")
    unigram.data.tokenizer = "unigram"
    other = prepare.prepare(unigram, progress=False)
    assert other.tokenizer_path != changed.tokenizer_path and other.metadata["tokenizer"]["kind"] == "unigram"


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # other tests imported JAX; the child never uses it
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_parallel_tokenization_writes_the_same_store_as_one_process(corpus_dir, tmp_path, monkeypatch, start_method):
    root, _ = corpus_dir
    monkeypatch.setattr(prepare, "_start_method", lambda: start_method)
    monkeypatch.setattr(store, "SHARD", 512)  # many shards and flushes, even for a small corpus
    monkeypatch.setattr(store, "CHUNK", 128)
    one = prepare.prepare(config_for(root, tmp_path / "one", workers=1), progress=False)
    two = prepare.prepare(config_for(root, tmp_path / "two", workers=2), progress=False)
    # The model files differ only in the trainer's recorded thread count; the vocabularies agree.
    tok1, tok2 = one.tokenizer(), two.tokenizer()
    assert [tok1.piece(i) for i in range(400)] == [tok2.piece(i) for i in range(400)]
    np.testing.assert_array_equal(one.open().tokens(), two.open().tokens())
    assert len(list((Path(two.store_path) / two.metadata["array"] / "c").iterdir())) > 10


def test_an_interrupted_write_leaves_no_store(corpus_dir, tmp_path, monkeypatch):
    root, _ = corpus_dir

    def fail(texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "encode_documents", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(config_for(root, tmp_path), progress=False)
    assert list((tmp_path / "tokens").iterdir()) == []
    monkeypatch.undo()
    assert not prepare.prepare(config_for(root, tmp_path), progress=False).cached


def test_a_store_made_by_another_tokenizer_is_rebuilt(corpus_dir, tmp_path):
    root, docs = corpus_dir
    first = prepare.prepare(config_for(root, tmp_path), progress=False)
    meta_file = Path(first.store_path) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["tokenizer"]["sha256"] = "0" * 64  # as if the tokenizer file had been replaced since
    meta_file.write_text(json.dumps(meta))
    again = prepare.prepare(config_for(root, tmp_path), progress=False)
    assert not again.cached and again.store_path == first.store_path
    assert again.metadata["tokenizer"]["sha256"] == first.metadata["tokenizer"]["sha256"]
    Path(first.tokenizer_path).unlink()  # retrained from the same inputs: the store is reused or rebuilt
    third = prepare.prepare(config_for(root, tmp_path), progress=False)
    tok = third.tokenizer()
    np.testing.assert_array_equal(third.open().tokens(1, 1 + len(tok.encode(docs[0]))), tok.encode(docs[0]))


def _heft(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        ["heft", "prepare", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_cli_prepares_the_embedded_corpus_then_finds_it_prepared(tmp_path):
    cache = f"--config.data.cache_dir={tmp_path}"
    first = _heft("--config=configs/tiny.py", cache)
    assert first.returncode == 0, first.stderr
    assert "prepared: 217 documents (11 held out)" in first.stdout
    assert len(list((tmp_path / "tokens").iterdir())) == 1
    second = _heft("--config=configs/tiny.py", cache)
    assert second.returncode == 0, second.stderr
    assert "already prepared: 217 documents" in second.stdout


def test_cli_reports_a_bad_corpus_in_one_line(tmp_path):
    result = _heft(f"--config.data.corpus={tmp_path}/missing", f"--config.data.cache_dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"heft prepare: data.corpus='{tmp_path}/missing' does not exist; "
        "pass a directory or glob of .txt/.jsonl/.parquet files"
    ]


def test_an_unchanged_corpus_is_not_read_again_and_a_changed_file_is(corpus_dir, tmp_path, monkeypatch):
    root, docs = corpus_dir
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    config = config_for(copy, tmp_path / "cache")
    prepare.prepare(config, progress=False)
    hashed = []
    sha = corpus.file_sha256
    monkeypatch.setattr(corpus, "file_sha256", lambda path: hashed.append(path) or sha(path))
    assert prepare.prepare(config, progress=False).cached and hashed == []
    (copy / "b03.txt").write_text(docs[28] + " changed")
    changed = prepare.prepare(config, progress=False)
    assert not changed.cached and hashed == [str(copy / "b03.txt")]
    assert changed.metadata["sources"][4]["sha256"] == hashlib.sha256((copy / "b03.txt").read_bytes()).hexdigest()


def test_a_store_whose_marker_is_missing_is_rebuilt(corpus_dir, tmp_path):
    root, _ = corpus_dir
    first = prepare.prepare(config_for(root, tmp_path), progress=False)
    (Path(first.store_path) / "meta.json").unlink()  # the arrays are all there, the mark of completion is not
    again = prepare.prepare(config_for(root, tmp_path), progress=False)
    assert not again.cached and again.metadata["array"] != first.metadata["array"]
    np.testing.assert_array_equal(again.open().tokens(), first.open().tokens())


def test_a_store_of_another_format_is_one_clear_error(corpus_dir, tmp_path):
    root, _ = corpus_dir
    p = prepare.prepare(config_for(root, tmp_path), progress=False)
    meta_file = Path(p.store_path) / "meta.json"
    meta_file.write_text(json.dumps({**p.metadata, "format": 1}))
    with pytest.raises(DataError, match=r"has format 1, but this heft reads format 2; run heft prepare"):
        p.open()


def test_a_document_start_other_than_eos_or_bos_is_one_clear_error(corpus_dir, tmp_path):
    config = config_for(corpus_dir[0], tmp_path)
    config.data.document_start = "pad"
    with pytest.raises(DataError, match=r"data.document_start='pad' is not one of \('eos', 'bos'\)"):
        prepare.prepare(config, progress=False)


def test_sigterm_while_tokenizing_stops_in_one_line_and_leaves_no_partial_store(tmp_path):
    """A preemption during `heft prepare` (or `heft train`'s data preparation) stops between batches and
    removes the store's partial array, instead of running on past the grace period to a SIGKILL that
    leaves it behind for good."""
    import signal
    import time

    cache = tmp_path / "cache"
    first = _heft("--config=configs/tiny.py", f"--config.data.cache_dir={cache}")
    assert first.returncode == 0, first.stderr
    (model,) = (cache / "tokenizers").glob("*.model")
    big = tmp_path / "big"
    big.mkdir()
    rng = np.random.default_rng(0)
    words = np.array("the king and queen walk in the garden while a ghost speaks of murder most foul".split())
    for i in range(8):  # ~40 MB: seconds of tokenizing on two cores
        (big / f"part{i}.txt").write_text("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(17000)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    before = sorted(str(p) for p in (cache / "tokens").glob("*/*"))  # the tiny corpus's store
    proc = subprocess.Popen(["heft", "prepare", "--config=configs/tiny.py", f"--config.data.cache_dir={cache}",
                             f"--config.data.corpus={big}", f"--config.data.tokenizer={model}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((cache / "tokens").glob("*/tokens-*"))) < 2:
        time.sleep(0.05)
    assert len(list((cache / "tokens").glob("*/tokens-*"))) == 2, "tokenizing never started"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err[-3000:])
    assert err.strip().splitlines()[-1] == ("heft prepare: stopped while tokenizing the corpus (SIGTERM); nothing "
                                            "half-written is left: run it again to prepare the corpus"), err[-3000:]
    assert sorted(str(p) for p in (cache / "tokens").glob("*/*")) == before
