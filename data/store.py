"""The token store: a corpus's token ids as one zarr v3 array, local or on gs://, and the marker that says it is whole.

A store is a folder (local, or a gs:// prefix; tensorstore's `file` or `gcs` kvstore):
  meta.json       what produced it (tokenizer and source hashes) and what it holds (counts, the
                  split); written last, it is the mark of a complete store (below).
  tokens-ID/      [num_tokens] uint16 (int32 if the vocab exceeds 65536): each document as EOS
                  followed by its tokens, in corpus order, then one final EOS. The EOS *before* a
                  document marks its start; the last token of a document has the next EOS as its
                  target, which is how a model learns where documents end.

Every document is led by EOS and no document holds one (sentencepiece never encodes text to a
control id; `Writer.add` checks), so the EOS tokens are the document boundaries: a reader finds
the documents inside any window it reads, and no table of document starts is kept.

Layout of the array: shards of SHARD tokens (one file or object each), each of CHUNK-token zstd
chunks. A reader of one row decodes only the chunks the row touches (CHUNK tokens, not a whole
shard), and on gs:// fetches them with ranged reads of the shard; the shard keeps the number
of objects of a large corpus small. bench/bench_data.py measured the choice.

Complete means meta.json exists. GCS has no atomic rename, so rather than writing elsewhere and
renaming, a writer fills its own `tokens-ID/` folder (ID unique to the writer) and then writes
meta.json, one small file or object, which names that folder. A store whose meta.json is
missing is incomplete whatever else is there, and `prepare` builds it again (into a new folder),
so an interrupted write is never read. Two writers of the same store leave the first one's
meta.json in place (the second discards its own folder); a meta.json that is replaced (a stale
store, made by another tokenizer) has its folder deleted after the new one is written.
"""

import dataclasses
import json
import uuid

import numpy as np
import tensorstore as ts
from etils import epath

from heft.data import paths
from heft.data.errors import DataError

FORMAT = 2  # of the store's layout and meta.json; bump when either changes (caches are then rebuilt)
CHUNK = 1 << 12  # tokens a reader decodes at least: 8 KiB of uint16
SHARD = 1 << 22  # tokens per file or object: 8 MiB of uint16 before compression
_MAX_TOKENS = 1 << 42  # the array's extent while writing; cut to the real length on close
# Decoded chunks kept for readers (tensorstore's cache pool), per process. Enough to hold a small
# store whole (the embedded corpus's is 4 MB) and many shard indexes; rows of a large store
# rarely share chunks, so more buys little, and the pool's resident memory runs at ~3x its
# limit (bench/RESULTS.md).
READ_CACHE_BYTES = 16 << 20
META = "meta.json"
_shared_context: ts.Context | None = None  # one cache pool for every store a process opens


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def _spec(folder: epath.Path, dtype: np.dtype | None = None) -> dict:
    spec = {"driver": "zarr3", "kvstore": paths.kvstore(folder)}
    if dtype is not None:
        inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 3}}]
        spec["metadata"] = {
            "shape": [_MAX_TOKENS],
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [CHUNK],
                "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            }}],
        }
    return spec


def read_meta(path: epath.Path) -> dict | None:
    """The store's meta.json if the store is complete (of any format), else None."""
    try:
        return json.loads((path / META).read_bytes())
    except FileNotFoundError:
        return None


def exists(path: epath.PathLike) -> bool:
    """Whether a complete store of this FORMAT is at `path`."""
    meta = read_meta(paths.path(path))
    return meta is not None and meta.get("format") == FORMAT


class Writer:
    """Appends documents' token ids to a new store at `path`; `close(meta)` marks it complete."""

    def __init__(self, path: epath.PathLike, dtype: np.dtype, eos_id: int):
        self.path = paths.path(path)
        self.array = f"tokens-{uuid.uuid4().hex[:12]}"
        self._dtype = np.dtype(dtype)
        self._eos_id = eos_id
        self._eos = np.asarray([eos_id], self._dtype)
        self._tokens = ts.open(_spec(self.path / self.array, self._dtype), create=True).result()
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._written = 0  # tokens already written; a multiple of SHARD until close

    @property
    def num_tokens(self) -> int:
        return self._written + self._pending_len

    def add(self, ids: np.ndarray) -> int:
        """Appends one document: [length] token ids (without EOS). Returns where its leading EOS is."""
        ids = np.asarray(ids)
        if (ids == self._eos_id).any():
            raise DataError(
                f"the tokenizer encoded text to its EOS id {self._eos_id}, which marks document starts in the "
                "token store; use a tokenizer whose EOS is a control symbol (as heft trains them)"
            )
        start = self.num_tokens
        self._pending += [self._eos, ids.astype(self._dtype)]
        self._pending_len += 1 + len(ids)
        if self._pending_len >= SHARD:
            self._flush(final=False)
        return start

    def _flush(self, final: bool) -> None:
        if not self._pending_len:
            return
        buf = np.concatenate(self._pending)
        # Whole shards only until the end: a shard written in part would be read back and rewritten.
        n = len(buf) if final else len(buf) // SHARD * SHARD
        start, stop = self._written, self._written + n
        self._tokens[start:stop].write(buf[:n]).result()
        self._written = stop
        self._pending = [buf[n:].copy()]  # a copy, so the flushed part can be freed
        self._pending_len = len(buf) - n

    def close(self, meta: dict) -> dict:
        """Writes the final EOS, then meta.json (the mark of completion); returns the store's meta."""
        self._pending.append(self._eos)
        self._pending_len += 1
        try:
            self._flush(final=True)
            self._tokens.resize(exclusive_max=[self._written], resize_metadata_only=True, shrink_only=True).result()
        except BaseException:
            self.abort()
            raise
        meta = {**meta, "format": FORMAT, "array": self.array, "tokens": self._written}
        previous = read_meta(self.path)
        if previous is not None and _same_content(previous, meta):
            self.abort()  # another writer finished this very store first; theirs is as good
            return previous
        paths.write_bytes(self.path / META, (json.dumps(meta, indent=1) + "\n").encode())
        if previous is not None and previous.get("array") and previous["array"] != self.array:
            paths.remove_tree(self.path / previous["array"])  # a stale store's ids: nothing names them now
        return meta

    def abort(self) -> None:
        """Deletes what this writer wrote (its folder, and the store's folder if that is left empty)."""
        paths.remove_tree(self.path / self.array)
        if not paths.is_gcs(self.path):  # on GCS a folder is only a prefix: nothing is left
            try:
                if not any(self.path.iterdir()):  # else another writer's files, or a complete store
                    self.path.rmdir()
            except OSError:  # removed meanwhile, or filled meanwhile
                pass


def _same_content(a: dict, b: dict) -> bool:
    keys = ("format", "tokens", "sources", "text_field")
    return all(a.get(k) == b.get(k) for k in keys) and a.get("tokenizer", {}).get("sha256") == b["tokenizer"]["sha256"]


@dataclasses.dataclass(frozen=True)
class TokenStore:
    """An open store. Reads return numpy arrays in the store's dtype."""

    path: str
    meta: dict
    _tokens: ts.TensorStore

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.shape[0])

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """[stop - start] token ids."""
        stop = self.num_tokens if stop is None else stop
        return self._tokens[start:stop].read().result()

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] token ids: row i is tokens[starts[i] : starts[i] + length].

        One batch of reads, so tensorstore decodes each chunk that several rows share once and
        issues the reads together.
        """
        with ts.Batch() as batch:
            futures = [self._tokens[int(s) : int(s) + length].read(batch=batch) for s in starts]
        out = np.empty((len(futures), length), self._tokens.dtype.numpy_dtype)
        for i, f in enumerate(futures):
            out[i] = f.result()
        return out


def _context(cache_bytes: int | None) -> ts.Context:
    """The process's shared context (its cache pool bounds the memory of every reader together,
    however many loaders are open), or a private one with a cache of `cache_bytes`."""
    global _shared_context
    if cache_bytes is not None:
        return ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}})
    if _shared_context is None:
        _shared_context = ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}})
    return _shared_context


def open_store(path: epath.PathLike, cache_bytes: int | None = None) -> TokenStore:
    """Opens the complete store at `path` for reading. Decoded chunks are kept in the process's
    shared cache of READ_CACHE_BYTES, or, given `cache_bytes`, in a cache of this store's own.

    Raises DataError if there is no complete store there, or one of another format, or a damaged one.
    """
    path = paths.path(path)
    meta = read_meta(path)
    if meta is None:
        raise DataError(
            f"no complete token store at {path} (its {META}, written last, is missing); run heft prepare to build it"
        )
    if meta.get("format") != FORMAT or "array" not in meta:
        raise DataError(
            f"the token store at {path} has format {meta.get('format')}, but this heft reads format {FORMAT}; "
            f"run heft prepare with the same config to rebuild it"
        )
    try:
        tokens = ts.open(_spec(path / meta["array"]), open=True, read=True, context=_context(cache_bytes)).result()
    except ValueError as e:  # tensorstore's NOT_FOUND and friends
        raise DataError(
            f"the token store at {path} is damaged ({str(e).splitlines()[0][:200]}); "
            f"delete it and run heft prepare again"
        ) from None
    if tokens.shape[0] != meta["tokens"]:
        raise DataError(
            f"the token store at {path} holds {tokens.shape[0]} tokens but its {META} says {meta['tokens']}; "
            f"delete it and run heft prepare again"
        )
    return TokenStore(str(path), meta, tokens)
