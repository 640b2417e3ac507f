"""Train the tokenizer and write the corpus's tokens, once per unchanged input (`heft prepare`).

`prepare(config)` makes sure they exist: when the corpus files, the tokenizer settings and the
held-out fraction are unchanged it only lists the files and returns the cached result (a file's
sha256 is recomputed only when its size, mtime or gs:// generation changed: corpus.file_hashes).
Otherwise it checks every file (bad input fails here, before slow work), trains a sentencepiece
model on the training documents, tokenizes all documents in `data.workers` processes, and
writes the token store (see store.py). Both live under the cache directory (local or gs://),
keyed by a hash of everything that determines them:

    CACHE/tokenizers/KEY.model
    CACHE/tokens/KEY/{meta.json, tokens-ID/}
    CACHE/corpus/HASH.json           each corpus file's version and sha256

Training with several processes calls `processes.prepare_for_processes` instead, which makes
every process use process 0's tokenizer.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator

from etils import epath

from heft.data import corpus, paths, store, tokenizer
from heft.data.errors import DataError, PrepareStopped

FORMAT = store.FORMAT  # part of every cache key: a new store format never meets an old cache
KEEP_BYTES = 256 << 20  # a corpus up to this size is read once and held in memory while preparing
DOCUMENT_STARTS = ("eos", "bos")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Where a prepared corpus lives, and how its documents are fed. `metadata` is the store's meta.json.

    `document_start` is `data.document_start`: "bos" makes every reader of the store (the loader,
    the held-out batches) give BOS as each document's first input instead of the stored EOS.
    """

    store_path: str
    tokenizer_path: str
    metadata: dict
    cached: bool = False  # True when this call found everything already prepared
    document_start: str = "eos"

    def open(self) -> store.TokenStore:
        return store.open_store(self.store_path)

    def tokenizer_bytes(self) -> bytes:
        return tokenizer.read(self.tokenizer_path)

    def tokenizer(self) -> "tokenizer.Tokenizer | tokenizer.HFTokenizer":
        return tokenizer.from_bytes(self.tokenizer_bytes())


def cache_dir(configured: str) -> epath.Path:
    """data.cache_dir, else $HEFT_CACHE, else ~/.cache/heft; an epath (local or gs://)."""
    return paths.path(configured or os.environ.get("HEFT_CACHE") or "~/.cache/heft")


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
        "vocab": tokenizer_vocab(config),
        "heldout_fraction": float(d.heldout_fraction),
        "trainer_options": tokenizer.TRAINER_OPTIONS,
        "sample": {"pieces": tokenizer.SAMPLE_PIECES, "seed": tokenizer.SEED},
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cached(store_path: epath.Path, tok_path: epath.Path) -> dict | None:
    """The store's metadata if it is complete and the very tokenizer that made it is in the cache."""
    meta = store.read_meta(store_path)
    if meta is None or meta.get("format") != FORMAT or not tok_path.is_file():
        return None
    if meta["tokenizer"]["sha256"] != _sha256(tok_path.read_bytes()):
        return None  # the tokenizer was retrained since; its ids differ from the store's
    return meta


def _document_start(config) -> str:
    start = config.data.get("document_start", "eos")
    if start not in DOCUMENT_STARTS:
        raise DataError(f"data.document_start={start!r} is not one of {DOCUMENT_STARTS}; pick one")
    return start


def existing(config, store_path: epath.PathLike, tokenizer_path: epath.PathLike) -> Prepared | None:
    """The store at store_path, if it is complete and was made by the tokenizer at tokenizer_path
    (e.g. process 0's, in a cache every process shares); else None."""
    store_path, tokenizer_path = paths.path(store_path), paths.path(tokenizer_path)
    meta = _cached(store_path, tokenizer_path)
    return None if meta is None else _prepared(store_path, tokenizer_path, meta, True, _document_start(config))


def _prepared(store_path: epath.Path, tok_path: epath.Path, meta: dict, cached: bool, document_start: str) -> Prepared:
    if document_start == "bos" and meta["tokenizer"]["bos_id"] < 0:
        raise DataError(
            f"data.document_start='bos' but the tokenizer {tok_path} has no BOS id; "
            f"set data.document_start=eos or use a tokenizer with a BOS piece"
        )
    return Prepared(str(store_path), str(tok_path), meta, cached=cached, document_start=document_start)


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


def tokenizer_vocab(config) -> int:
    """The size of the tokenizer heft trains: model.vocab, less the ids `data.sentinels` keeps above
    it for an encoder-decoder's span corruption (spans.py)."""
    return int(config.model.vocab) - int(config.data.get("sentinels", 0) or 0)


def _train_tokenizer(texts: Iterable[str], config, path: epath.Path) -> None:
    d = config.data
    paths.write_bytes(path, tokenizer.train(texts, d.tokenizer, tokenizer_vocab(config), threads=d.workers))


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


def _write_tokens(texts: Iterable[str], config, tok_bytes: bytes, store_path: epath.Path, total_bytes: int,
                  progress: bool, heldout_document: int, stop=lambda: False) -> tuple[store.Writer, int]:
    """Tokenizes every document in `data.workers` processes into a new store at store_path.

    Returns the writer (to be closed) and where document `heldout_document` (the held-out split's
    first) starts: the index of its leading EOS, or of the final EOS if there is no such document.
    """
    from tqdm import tqdm

    tok = tokenizer.from_bytes(tok_bytes)
    writer = store.Writer(store_path, store.token_dtype(tok.vocab_size), tok.eos_id)
    sizes: collections.deque = collections.deque()
    workers = max(1, min(int(config.data.workers), os.cpu_count() or 1))
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress, file=sys.stderr)
    heldout_start, i = None, 0
    try:
        for arrays in _encoded(_batches(texts, sizes), tok_bytes, workers):
            for ids in arrays:
                start = writer.add(ids)
                if i == heldout_document:
                    heldout_start = start
                i += 1
            bar.update(sizes.popleft())
            if stop():
                raise PrepareStopped("stopped while tokenizing the corpus")
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return writer, writer.num_tokens if heldout_start is None else heldout_start


@contextlib.contextmanager
def _full_disk_in_one_line(root: epath.Path):
    try:
        yield
    except Exception as e:
        if not paths.no_space(e):
            raise
        raise DataError(f"no space left on {paths.device_of(root)} while preparing the corpus's tokens in {root} "
                        "(nothing half-written is left); free some space or set data.cache_dir to a larger disk"
                        ) from None


def prepare(config, *, progress: bool = True, tokenizer_path: str | None = None,
            tokenizer_bytes: bytes | None = None, stop=lambda: False) -> Prepared:
    """Makes sure the tokenizer and token store of `config.data` exist; returns where they are.

    With `tokenizer_path` (a checkpoint's sentencepiece model, local or gs://) or `tokenizer_bytes`
    (process 0's, in `prepare_for_processes`) the corpus is tokenized with that tokenizer instead
    of a newly trained one, e.g. to evaluate a checkpoint on another corpus.

    Idempotent: a second call over unchanged inputs lists the corpus files and returns.
    Raises DataError for input a user can fix (see corpus.py and tokenizer.py), and PrepareStopped
    once `stop()` turns True while the corpus is tokenized (checked after each batch; a tokenizer
    being trained finishes first), after removing the store's partial array.
    """
    root = cache_dir(config.data.cache_dir)
    with _full_disk_in_one_line(root):
        return _prepare(config, root, progress=progress, tokenizer_path=tokenizer_path, tokenizer_bytes=tokenizer_bytes,
                        stop=stop)


def _prepare(config, root: epath.Path, *, progress: bool, tokenizer_path: str | None, tokenizer_bytes: bytes | None,
             stop) -> Prepared:
    start = time.perf_counter()
    d = config.data
    if d.tokenizer not in tokenizer.KINDS and not str(d.tokenizer).endswith((".json", ".model")):
        raise DataError(f"data.tokenizer={d.tokenizer!r} is not one of {tokenizer.KINDS} nor a tokenizer file "
                        "(.model or tokenizer.json); pick one")
    if tokenizer_path is None and tokenizer_bytes is None and d.tokenizer not in tokenizer.KINDS:
        tokenizer_path = d.tokenizer  # a given file (e.g. an imported model's tokenizer.json), used as it is
    corpus.heldout_count(2, d.heldout_fraction)  # checks the fraction's range before any work
    document_start = _document_start(config)
    paths.check_bucket(root, "data.cache_dir")
    files = corpus.find(d.corpus)
    hashes = corpus.file_hashes(files, root / "corpus" / f"{_sha256(str(d.corpus).encode())[:24]}.json")
    given = tokenizer_bytes if tokenizer_bytes is not None else tokenizer.read(tokenizer_path) if tokenizer_path else None
    key = _key(hashes, config, given)
    tok_path = root / "tokenizers" / f"{key}.model"
    store_path = root / "tokens" / key
    if (meta := _cached(store_path, tok_path)) is not None:
        return _prepared(store_path, tok_path, meta, True, document_start)

    sources, kept = corpus.scan(files, d.text_field, hashes, keep_bytes=KEEP_BYTES)
    n_docs = sum(s.documents for s in sources)
    n_heldout = corpus.heldout_count(n_docs, d.heldout_fraction)
    if given is not None and not tok_path.is_file():
        paths.write_bytes(tok_path, given)
    if not tok_path.is_file():
        # Trained on the training documents only, so held-out text is new to it too.
        _train_tokenizer(_documents(files, d.text_field, n_docs - n_heldout, kept), config, tok_path)
        if (meta := _cached(store_path, tok_path)) is not None:  # retrained identically
            return _prepared(store_path, tok_path, meta, True, document_start)
    tok_bytes = tok_path.read_bytes()
    tok = tokenizer.from_bytes(tok_bytes)
    text_bytes = sum(s.text_bytes for s in sources)
    if stop():
        raise PrepareStopped("stopped before tokenizing the corpus")
    writer, heldout_start = _write_tokens(_documents(files, d.text_field, kept=kept), config, tok_bytes, store_path,
                                          text_bytes, progress, heldout_document=n_docs - n_heldout, stop=stop)
    num_tokens = writer.num_tokens + 1  # the final EOS that close() appends
    meta = {
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
            "heldout_start": heldout_start,  # index of the held-out split's leading EOS (the final EOS if none)
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
    meta = writer.close(meta)
    return _prepared(store_path, tok_path, meta, False, document_start)


def summary(p: Prepared, seconds: float) -> str:
    m = p.metadata
    what = "already prepared" if p.cached else "prepared"
    return (
        f"{what}: {m['documents']} documents ({m['split']['heldout_documents']} held out), "
        f"{m['text_bytes'] / 1e6:.2f} MB of text, {m['text_tokens']:,} tokens "
        f"({m['text_bytes'] / max(1, m['text_tokens']):.2f} bytes/token) in {seconds:.2f} s\n"
        f"  tokens:    {p.store_path}\n  tokenizer: {p.tokenizer_path}"
    )
