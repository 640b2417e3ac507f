"""The loader: global batches of packed rows, in a seeded order, each process reading only its own rows.

The stream is defined once for all processes. A split holds R full rows (packing.py); the
global stream is R rows per epoch, forever, in the order of grain's
`MapDataset.range(R).shuffle(seed).repeat()`: a fresh permutation each epoch, deterministic from
the seed and the epoch. Global batch k is stream rows [k * B, (k + 1) * B); process p of P takes
the contiguous block [p * B/P, (p + 1) * B/P) of it. The loader's whole state is how many rows of
the stream have been consumed (plus the seed, split and seq_len, checked on restore), so a run
that restarts with a different number of processes still continues at exactly the next batch.

Why grain is used only for the order: grain's `MapDataset` gives the permutation by index
(`index_shuffle`, O(1) memory however large the split), which is what a global, process-count
independent stream needs. Its iterators are not used because their checkpoint state is per
shard (`ds[p::P]`) and does not carry over when P changes, and because packing a batch is one
vectorized pass over the rows it read (packing.py), far faster than grain's per-element `map`.

Memory does not grow with the corpus: a batch reads its own rows (L + 1 tokens each) from the
token store (tensorstore, local or gs://), with a bounded cache of decoded chunks
(store.READ_CACHE_BYTES), and segment ids and positions come from the EOS tokens inside each row.
A thread reads `prefetch` batches ahead into a bounded queue, so the training step does not wait
on storage; `close()` (or `with Loader(...) as loader:`) stops it, and so does dropping the loader.

Prompt/completion pairs (pairs.py) come packed into rows in memory; the stream over them, the
state and the held-out batches are the same as a token store's.
"""

import hashlib
import queue
import threading
import weakref

import grain
import numpy as np

from heft.data import packing, pairs, spans
from heft.data.errors import DataError

SPLITS = ("train", "heldout")
FORMAT = 1  # of state(); bump if the meaning of the stream changes
PREFETCH = 4  # batches read ahead of the training step


def split_range(prepared, split: str) -> tuple[int, int]:
    """[first, stop): where a split's stream lies in the token store.

    The stream is the split's documents, each led by EOS, then the EOS that follows them (the next
    split's first, or the store's last); so the train and held-out streams share one token.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {SPLITS}")
    meta = prepared.metadata
    s = meta["split"]
    if "heldout_start" not in s:
        raise DataError(
            f"the token store at {prepared.store_path} predates this heft (no split.heldout_start in its "
            f"meta.json); run heft prepare with the same config to rebuild it"
        )
    if split == "heldout" and not s["heldout_documents"]:
        raise DataError(
            f"the {split} split is empty (data.heldout_fraction={s['heldout_fraction']}); "
            f"set data.heldout_fraction > 0 to evaluate"
        )
    return (0, s["heldout_start"] + 1) if split == "train" else (s["heldout_start"], meta["tokens"])


def split_stream(prepared, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole token stream of a split, in memory, and where its documents start: for tests and
    small corpora only (the loader reads rows, never a whole split).

    Returns:
      stream: [n] token ids: the split's documents, each led by EOS, then one EOS.
      doc_starts: [documents] indices into stream; doc_starts[0] == 0.
    """
    first, stop = split_range(prepared, split)
    stream = prepared.open().tokens(first, stop)
    return stream, np.flatnonzero(stream[:-1] == prepared.metadata["tokenizer"]["eos_id"]).astype(np.int64)


def _local_rows(global_batch: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch % process_count:
        raise DataError(
            f"train.batch_size={global_batch} is not divisible by the {process_count} processes; "
            f"pick a multiple of {process_count}"
        )
    return global_batch // process_count


def _grain_seed(seed: int, split: str) -> int:
    # grain reseeds epoch e with seed + e, so seeds 0 and 1 would share all but one epoch's order;
    # hashing spreads user seeds apart.
    return int.from_bytes(hashlib.sha256(f"heft/{split}/{seed}".encode()).digest()[:4], "little")


def _start_id(prepared) -> int:
    """The id a document's first input is: BOS for data.document_start="bos", else the store's EOS."""
    tok = prepared.metadata["tokenizer"]
    return tok["bos_id"] if getattr(prepared, "document_start", "eos") == "bos" else tok["eos_id"]


class _Batches:
    """This process's share of global batch k, as a function of the rows consumed before it.

    Everything the prefetch thread needs, and nothing that refers back to the Loader, so that a
    loader nobody holds is collected (and its thread stopped) as usual.
    """

    def __init__(self, prepared, first: int, seq_len: int, order, local_batch: int, offset: int):
        self.store = prepared.open()
        self.first, self.seq_len, self.order = first, seq_len, order
        self.local_batch, self.offset = local_batch, offset
        self.eos_id, self.start_id = prepared.metadata["tokenizer"]["eos_id"], _start_id(prepared)
        self.lengths = np.full(local_batch, seq_len, np.int64)

    def __call__(self, consumed: int) -> dict[str, np.ndarray]:
        first = consumed + self.offset
        rows = np.fromiter((self.order[i] for i in range(first, first + self.local_batch)), np.int64, self.local_batch)
        windows = self.store.windows(self.first + rows * self.seq_len, self.seq_len + 1)
        return packing.pack(windows, self.lengths, self.eos_id, self.start_id)


class _Packed:
    """`_Batches` for rows already packed in memory ([rows, seq_len] arrays: prompt/completion pairs)."""

    def __init__(self, rows: dict, order, local_batch: int, offset: int):
        self.rows, self.order, self.local_batch, self.offset = rows, order, local_batch, offset

    def __call__(self, consumed: int) -> dict[str, np.ndarray]:
        first = consumed + self.offset
        rows = np.fromiter((self.order[i] for i in range(first, first + self.local_batch)), np.int64, self.local_batch)
        return {k: v[rows] for k, v in self.rows.items()}


class _Prefetch:
    """Runs make(start), make(start + step), ... in a thread, at most `depth` results ahead of `get()`."""

    def __init__(self, make, start: int, step: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, start, step), name="heft-data-prefetch", daemon=True)
        self._thread.start()

    def _run(self, make, position: int, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (position, make(position), None)
            except BaseException as e:  # handed to the consumer, which raises it
                item = (position, None, e)
            self._queue.put(item)  # blocks while `depth` results wait; close() drains it
            if item[2] is not None:
                return
            position += step

    def get(self) -> tuple[int, dict]:
        position, batch, error = self._queue.get()
        if error is not None:
            raise error
        return position, batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # make room, so a put() that is blocked returns and the thread sees the stop
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass


def _close(holder: list) -> None:
    if holder[0] is not None:
        holder[0].close()
        holder[0] = None


class Loader:
    """Shuffled, endlessly repeating batches of one split, for one process.

    `next()` returns this process's rows of the next global batch: a dict of
    [global_batch // process_count, seq_len] arrays (packing.KEYS). Batches are read `prefetch`
    ahead in a thread (0: read in `next()` itself); `close()` stops it.
    """

    def __init__(
        self,
        prepared,
        split: str = "train",
        seq_len: int = 128,
        global_batch: int = 16,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = PREFETCH,
    ):
        self.split, self.seq_len, self.global_batch, self.seed = split, int(seq_len), int(global_batch), int(seed)
        self.local_batch = _local_rows(self.global_batch, process_index, process_count)
        self.process_index, self.process_count = process_index, process_count
        packed = prepared.split_rows(split, self.seq_len) if isinstance(prepared, pairs.Pairs) else None
        if packed is not None:
            self.rows_per_epoch = len(packed["inputs"])
        elif isinstance(prepared, spans.SpanCorrupted):  # an encoder-decoder's rows (spans.py)
            first, stop = split_range(prepared, split)
            self.rows_per_epoch = prepared.rows(stop - first, self.seq_len)
        else:
            first, stop = split_range(prepared, split)
            self.rows_per_epoch = packing.full_rows(stop - first, self.seq_len)
        if self.rows_per_epoch < 1:
            raise DataError(
                f"the {split} split has {stop - first} tokens, fewer than one sequence of "
                f"train.seq_len={self.seq_len} + 1; lower train.seq_len or add text"
            )
        order = grain.MapDataset.range(self.rows_per_epoch).shuffle(seed=_grain_seed(self.seed, split)).repeat()
        offset = process_index * self.local_batch
        self._batches = (_Packed(packed, order, self.local_batch, offset) if packed is not None
                         else spans.Batches(prepared, first, self.seq_len, order, self.local_batch, offset)
                         if isinstance(prepared, spans.SpanCorrupted)
                         else _Batches(prepared, first, self.seq_len, order, self.local_batch, offset))
        self._prefetch = max(0, int(prefetch))
        self._thread = [None]  # the running _Prefetch, in a list that the finalizer below shares
        self._finalizer = weakref.finalize(self, _close, self._thread)
        self._consumed = 0  # rows of the global stream before the next batch

    def next(self) -> dict[str, np.ndarray]:
        """This process's [global_batch // process_count, seq_len] share of the next global batch."""
        if not self._prefetch:
            batch = self._batches(self._consumed)
        else:
            if self._thread[0] is None:
                self._thread[0] = _Prefetch(self._batches, self._consumed, self.global_batch, self._prefetch)
            position, batch = self._thread[0].get()
            assert position == self._consumed, (position, self._consumed)
        self._consumed += self.global_batch
        return batch

    __next__ = next

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stops the prefetch thread; `next()` would start it again."""
        _close(self._thread)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def epoch(self) -> int:
        return self._consumed // self.rows_per_epoch

    def state(self) -> dict:
        """JSON-serializable position: rows consumed of the global stream, and what defines it."""
        return {"format": FORMAT, "split": self.split, "seed": self.seed, "seq_len": self.seq_len, "rows_consumed": self._consumed}

    def restore(self, state: dict) -> None:
        """Continues after the batch at which `state()` was taken, with any process count or batch size."""
        mine = self.state()
        for key in ("format", "split", "seed", "seq_len"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"the checkpoint's data position is for {key}={state.get(key)!r} but this run has "
                    f"{key}={mine[key]!r}; restore with the same data.seed, train.seq_len and split"
                )
        self.close()  # batches read ahead are from the old position
        self._consumed = int(state["rows_consumed"])


def heldout_batches(
    prepared, seq_len: int, global_batch: int, n: int | None = None, process_index: int = 0, process_count: int = 1
):
    """The held-out split in a fixed order: n batches (default: enough to cover it once), each this
    process's [global_batch // process_count, seq_len] share, padded (weight 0) past the end.

    The same arguments give the same batches every call; every held-out token is a target exactly
    once in the first `heldout_num_batches` batches. Reads only this process's rows.
    """
    local = _local_rows(global_batch, process_index, process_count)
    if isinstance(prepared, pairs.Pairs):
        yield from _packed_heldout(prepared.split_rows("heldout", seq_len), global_batch, n, local, process_index)
        return
    first, stop = split_range(prepared, "heldout")
    if isinstance(prepared, spans.SpanCorrupted):
        yield from spans.heldout_batches(prepared, first, stop, seq_len, global_batch, n, local, process_index)
        return
    store = prepared.open()
    eos_id, start_id = prepared.metadata["tokenizer"]["eos_id"], _start_id(prepared)
    inputs = stop - first - 1
    if n is None:
        n = -(-packing.all_rows(stop - first, seq_len) // global_batch)
    for k in range(n):
        rows = k * global_batch + process_index * local + np.arange(local, dtype=np.int64)
        starts = rows * seq_len
        lengths = np.clip(inputs - starts, 0, seq_len)
        windows = np.zeros((local, seq_len + 1), np.int64)
        full = lengths == seq_len
        if full.any():
            windows[full] = store.windows(first + starts[full], seq_len + 1)
        for i in np.flatnonzero((lengths > 0) & ~full):  # the split's last row, cut short by its end
            windows[i, : lengths[i] + 1] = store.tokens(first + starts[i], first + starts[i] + lengths[i] + 1)
        yield packing.pack(windows, lengths, eos_id, start_id)


def _packed_heldout(rows: dict, global_batch: int, n: int | None, local: int, process_index: int):
    """`heldout_batches` over rows packed in memory: in order, padded with empty rows past the end."""
    total = len(rows["inputs"])
    for k in range(-(-total // global_batch) if n is None else n):
        index = k * global_batch + process_index * local + np.arange(local)
        real = index < total
        yield {key: np.where(real.reshape(-1, 1), v[np.minimum(index, total - 1)], 0).astype(v.dtype)
               for key, v in rows.items()}


def heldout_num_batches(prepared, seq_len: int, global_batch: int) -> int:
    """How many held-out batches cover the held-out split exactly once."""
    if not prepared.metadata["split"]["heldout_documents"]:
        return 0
    if isinstance(prepared, pairs.Pairs):
        return -(-len(prepared.split_rows("heldout", seq_len)["inputs"]) // global_batch)
    first, stop = split_range(prepared, "heldout")
    if isinstance(prepared, spans.SpanCorrupted):
        return -(-spans.heldout_rows(prepared, stop - first, seq_len) // global_batch)
    return -(-packing.all_rows(stop - first, seq_len) // global_batch)


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
    """Each process's rows assembled into global [global_batch, seq_len] jax.Arrays laid out by `sharding`.

    Every process calls this with its own local batch; process p's rows land on its own devices,
    so which global row index a row gets depends on the mesh, not on p. The batch is the same
    set of rows either way, and the loss, a mean over rows, is the same.
    """
    import jax

    out = {}
    for key, local in local_batch.items():
        shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out
