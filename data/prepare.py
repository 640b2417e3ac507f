"""`heft prepare`: train the tokenizer and write the corpus's tokens, once per unchanged input.

    heft prepare --config=configs/tiny.py [--config.data.corpus=DIR_OR_GLOB] [--config.data.cache_dir=DIR]

`prepare(config)` is what training calls: when the corpus files, the tokenizer settings and the
held-out fraction are unchanged it only hashes the files and returns the cached result.
Otherwise it checks every file (bad input fails here, before slow work), trains a sentencepiece
model on the training documents, tokenizes all documents in `data.workers` processes, and
writes the token store (see store.py). Both live under the cache directory, keyed by a hash of
everything that determines them:

    CACHE/tokenizers/KEY.model
    CACHE/tokens/KEY/{tokens,doc_starts,meta.json}
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from absl import app, flags

from heft.data import corpus, store, tokenizer
from heft.data.errors import DataError

FORMAT = 1  # bump when the store's layout or the meaning of its fields changes
KEEP_BYTES = 256 << 20  # a corpus up to this size is read once and held in memory while preparing


def define_flags() -> None:
    """--config=configs/NAME.py (default tiny) with --config.FIELD=VALUE overrides; `heft` calls this."""
    from heft.launch.flags import define_config

    define_config()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Where a prepared corpus lives. `metadata` is the store's meta.json."""

    store_path: str
    tokenizer_path: str
    metadata: dict
    cached: bool = False  # True when this call found everything already prepared

    def open(self) -> store.TokenStore:
        return store.open_store(self.store_path)

    def tokenizer(self) -> tokenizer.Tokenizer:
        return tokenizer.load(self.tokenizer_path)


def cache_dir(configured: str) -> Path:
    """data.cache_dir, else $HEFT_CACHE, else ~/.cache/heft."""
    return Path(os.path.expanduser(configured or os.environ.get("HEFT_CACHE") or "~/.cache/heft"))


def _key(file_hashes: list[str], config, given_tokenizer: bytes | None = None) -> str:
    """Everything that determines the tokenizer and the token store, hashed."""
    d = config.data
    if given_tokenizer is not None:  # a checkpoint's own tokenizer: its bytes decide the ids
        fields = {"format": FORMAT, "files": file_hashes, "text_field": d.text_field,
                  "heldout_fraction": float(d.heldout_fraction), "tokenizer_sha256": _sha256(given_tokenizer)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    fields = {
        "format": FORMAT,
        "files": file_hashes,  # content, in order; not paths, so a moved corpus stays cached
        "text_field": d.text_field if d.corpus != corpus.EMBEDDED else "text",
        "tokenizer": d.tokenizer,
        "vocab": int(config.model.vocab),
        "heldout_fraction": float(d.heldout_fraction),
        "trainer_options": tokenizer.TRAINER_OPTIONS,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cached(store_path: Path, tok_path: Path) -> dict | None:
    """The store's metadata if both it and the very tokenizer that made it are on disk."""
    if not (store.exists(store_path) and tok_path.is_file()):
        return None
    meta = json.loads((store_path / "meta.json").read_text())
    if meta["tokenizer"]["sha256"] != _sha256(tok_path.read_bytes()):
        return None  # the tokenizer was retrained since; its ids differ from the store's
    return meta


def _documents(files: list[str], text_field: str, stop: int | None = None, kept: list[str] | None = None) -> Iterator[str]:
    """Documents 0..stop-1 of the corpus, in corpus order: from `kept` if the scan kept them."""
    if kept is not None:
        yield from kept[:stop]
        return
    i = 0
    for path in files:
        for text in corpus.documents(path, text_field):
            if stop is not None and i >= stop:
                return
            yield text
            i += 1


def _batches(texts: Iterable[str], sizes: collections.deque, max_bytes: int = 1 << 18) -> Iterator[list[str]]:
    """Groups documents into lists of about max_bytes (one pool task each); sizes gets each's bytes."""
    batch, n = [], 0
    for text in texts:
        batch.append(text)
        n += len(text.encode("utf-8"))
        if n >= max_bytes:
            sizes.append(n)
            yield batch
            batch, n = [], 0
    if batch:
        sizes.append(n)
        yield batch


def _train_tokenizer(texts: Iterable[str], config, path: Path) -> None:
    d = config.data
    model = tokenizer.train(texts, d.tokenizer, int(config.model.vocab), threads=d.workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(model)
    os.replace(tmp, path)


def _start_method() -> str:
    """fork is fast and needs no importable __main__ (stdin, notebooks); but once JAX is imported
    (training calls prepare), its threads make fork unsafe, so then spawn fresh interpreters."""
    return "spawn" if "jax" in sys.modules else "fork"


def _encoded(batches: Iterator[list[str]], model: bytes, workers: int) -> Iterator[list]:
    """Each batch's documents as token id arrays, in order, encoded in `workers` processes."""
    if workers <= 1:
        tokenizer.init_worker(model)
        yield from map(tokenizer.encode_documents, batches)
        return
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(_start_method()),
        initializer=tokenizer.init_worker, initargs=(model,),
    ) as pool:
        # At most 2 batches per worker in flight: memory stays bounded however large the corpus,
        # and a worker that dies raises BrokenProcessPool instead of hanging.
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.submit(tokenizer.encode_documents, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _write_tokens(texts: Iterable[str], config, tok_path: Path, store_path: Path, total_bytes: int, progress: bool) -> store.Writer:
    """Tokenizes every document in `data.workers` processes into a new store at store_path."""
    from tqdm import tqdm

    model = tok_path.read_bytes()
    tok = tokenizer.Tokenizer(model)
    writer = store.Writer(store_path, store.token_dtype(tok.vocab_size), tok.eos_id)
    sizes: collections.deque = collections.deque()
    workers = max(1, min(int(config.data.workers), os.cpu_count() or 1))
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress, file=sys.stderr)
    try:
        for arrays in _encoded(_batches(texts, sizes), model, workers):
            for ids in arrays:
                writer.add(ids)
            bar.update(sizes.popleft())
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return writer


def prepare(config, *, progress: bool = True, tokenizer_path: str | None = None) -> Prepared:
    """Makes sure the tokenizer and token store of `config.data` exist; returns where they are.

    With `tokenizer_path` (a checkpoint's sentencepiece model) the corpus is tokenized with that
    tokenizer instead of a newly trained one, e.g. to evaluate a checkpoint on another corpus.

    Idempotent: a second call over unchanged inputs hashes the corpus files and returns.
    Raises DataError for input a user can fix (see corpus.py and tokenizer.py).
    """
    start = time.perf_counter()
    d = config.data
    if d.tokenizer not in tokenizer.KINDS:
        raise DataError(f"data.tokenizer={d.tokenizer!r} is not one of {tokenizer.KINDS}; pick one")
    corpus.heldout_count(2, d.heldout_fraction)  # checks the fraction's range before any work
    files = corpus.resolve(d.corpus)
    hashes = [corpus.file_sha256(f) for f in files]
    given = Path(tokenizer_path).read_bytes() if tokenizer_path else None
    key = _key(hashes, config, given)
    root = cache_dir(d.cache_dir)
    tok_path = root / "tokenizers" / f"{key}.model"
    store_path = root / "tokens" / key
    if (meta := _cached(store_path, tok_path)) is not None:
        return Prepared(str(store_path), str(tok_path), meta, cached=True)

    sources, kept = corpus.scan(files, d.text_field, hashes, keep_bytes=KEEP_BYTES)
    n_docs = sum(s.documents for s in sources)
    n_heldout = corpus.heldout_count(n_docs, d.heldout_fraction)
    if given is not None and not tok_path.is_file():
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tok_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(given)
        os.replace(tmp, tok_path)
    if not tok_path.is_file():
        # Trained on the training documents only, so held-out text is new to it too.
        _train_tokenizer(_documents(files, d.text_field, n_docs - n_heldout, kept), config, tok_path)
        if (meta := _cached(store_path, tok_path)) is not None:  # retrained identically
            return Prepared(str(store_path), str(tok_path), meta, cached=True)
    shutil.rmtree(store_path, ignore_errors=True)  # if present, another tokenizer's ids: stale
    tok_bytes = tok_path.read_bytes()
    tok = tokenizer.Tokenizer(tok_bytes)
    text_bytes = sum(s.text_bytes for s in sources)
    writer = _write_tokens(_documents(files, d.text_field, kept=kept), config, tok_path, store_path, text_bytes, progress)
    num_tokens = writer.num_tokens + 1  # the final EOS that close() appends
    meta = {
        "format": FORMAT,
        "corpus": d.corpus,
        "text_field": d.text_field,
        "sources": [dataclasses.asdict(s) for s in sources],
        "documents": n_docs,
        "text_bytes": text_bytes,
        "tokens": num_tokens,  # stored ids, counting one EOS per document and a final one
        "text_tokens": num_tokens - n_docs - 1,
        "dtype": store.token_dtype(tok.vocab_size).name,
        "tokenizer": {
            "path": str(tok_path),
            "sha256": _sha256(tok_bytes),
            "kind": d.tokenizer,
            "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
        },
        "split": {
            "heldout_fraction": float(d.heldout_fraction),
            "train_documents": n_docs - n_heldout,
            "heldout_documents": n_heldout,
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
    writer.close(meta)
    return Prepared(str(store_path), str(tok_path), meta, cached=False)


def summary(p: Prepared, seconds: float) -> str:
    m = p.metadata
    what = "already prepared" if p.cached else "prepared"
    return (
        f"{what}: {m['documents']} documents ({m['split']['heldout_documents']} held out), "
        f"{m['text_bytes'] / 1e6:.2f} MB of text, {m['text_tokens']:,} tokens "
        f"({m['text_bytes'] / max(1, m['text_tokens']):.2f} bytes/token) in {seconds:.2f} s\n"
        f"  tokens:    {p.store_path}\n  tokenizer: {p.tokenizer_path}"
    )


def main(argv: list[str]) -> None:
    """The `heft prepare` verb. A DataError propagates: `heft` prints it as one line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start = time.perf_counter()
    p = prepare(flags.FLAGS.config)
    print(summary(p, time.perf_counter() - start))
