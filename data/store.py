"""The token store: a corpus's token ids and document boundaries, as zarr v3 arrays on disk.

A store is a directory:
  tokens/      [num_tokens] uint16 (int32 if the vocab exceeds 65536), zstd-compressed chunks:
               each document as EOS followed by its tokens, in corpus order, then one final EOS.
               The EOS *before* a document marks its start; the last token of a document has
               the next EOS as its target, which is how a model learns where documents end.
  doc_starts/  [num_documents + 1] int64: the index of each document's leading EOS; the last
               entry is the index of the final EOS (num_tokens - 1).
  meta.json    what produced it (tokenizer and source hashes) and what it holds (counts, split).

It is written into a temporary directory and renamed into place when complete, so a store that
exists is whole: an interrupted `heft prepare` leaves nothing that a later run would trust.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import tensorstore as ts

CHUNK = 1 << 17  # tokens per chunk: 256 KiB of uint16 before compression


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def _spec(path: Path, dtype: np.dtype | None = None, chunk: int | None = None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if dtype is not None:
        spec["metadata"] = {
            "shape": [0],
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk or CHUNK]}},
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 3}},
            ],
        }
    return spec


class Writer:
    """Appends documents' token ids to a new store; `close(meta)` makes it visible at `path`."""

    def __init__(self, path: str | Path, dtype: np.dtype, eos_id: int):
        self.path = Path(path)
        self._tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self._dtype = np.dtype(dtype)
        self._eos = np.asarray([eos_id], self._dtype)
        self._tokens = ts.open(_spec(self._tmp / "tokens", self._dtype), create=True).result()
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._written = 0  # tokens already on disk; always a multiple of CHUNK until close
        self._starts: list[int] = []

    @property
    def num_tokens(self) -> int:
        return self._written + self._pending_len

    def add(self, ids: np.ndarray) -> None:
        """Appends one document: [length] token ids (without EOS)."""
        self._starts.append(self.num_tokens)
        self._pending += [self._eos, np.asarray(ids, self._dtype)]
        self._pending_len += 1 + len(ids)
        if self._pending_len >= 8 * CHUNK:  # write whole chunks once a few are ready
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending_len:
            return
        buf = np.concatenate(self._pending)
        # Only whole chunks until the end: a partial chunk written now would be rewritten later.
        n = len(buf) if final else len(buf) // CHUNK * CHUNK
        start, stop = self._written, self._written + n
        self._tokens = self._tokens.resize(exclusive_max=[stop], expand_only=True).result()
        self._tokens[start:stop].write(buf[:n]).result()
        self._written = stop
        self._pending = [buf[n:].copy()]  # a copy, so the flushed part can be freed
        self._pending_len = len(buf) - n

    def close(self, meta: dict) -> None:
        """Writes the final EOS, the document starts and meta.json, then moves the store into place."""
        self._pending.append(self._eos)
        self._pending_len += 1
        self._flush(final=True)
        starts = np.asarray(self._starts + [self._written - 1], np.int64)
        docs = ts.open(_spec(self._tmp / "doc_starts", np.int64, chunk=1 << 16), create=True).result()
        docs = docs.resize(exclusive_max=[len(starts)], expand_only=True).result()
        docs.write(starts).result()
        (self._tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(self._tmp, self.path)
        except OSError:  # another process finished the same store first; theirs is as good
            shutil.rmtree(self._tmp, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class TokenStore:
    """An open store. Reads return numpy arrays."""

    path: Path
    meta: dict
    doc_starts: np.ndarray  # [num_documents + 1] int64
    _tokens: ts.TensorStore

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.shape[0])

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """[stop - start] token ids, in the store's dtype."""
        stop = self.num_tokens if stop is None else stop
        return self._tokens[start:stop].read().result()


def exists(path: str | Path) -> bool:
    return (Path(path) / "meta.json").is_file()


def open_store(path: str | Path) -> TokenStore:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    tokens = ts.open(_spec(path / "tokens"), open=True, read=True).result()
    doc_starts = ts.open(_spec(path / "doc_starts"), open=True, read=True).result().read().result()
    return TokenStore(path, meta, np.asarray(doc_starts, np.int64), tokens)
