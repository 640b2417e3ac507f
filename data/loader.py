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
shard (`ds[p::P]`) and does not carry over when P changes, and because cutting rows and
computing segment ids is one vectorized gather per batch over the in-memory stream
(packing.py), far faster than grain's per-element `map`. There is no prefetch: building a
batch takes well under a millisecond (bench/bench_data.py).

Memory: each process holds its split's token ids (2 bytes a token for vocabularies up to 65536).
"""

import hashlib

import grain
import numpy as np

from heft.data import packing
from heft.data.errors import DataError

SPLITS = ("train", "heldout")
FORMAT = 1  # of state(); bump if the meaning of the stream changes


def split_stream(prepared, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The token stream of a split and where its documents start in it.

    Returns:
      stream: [n] token ids: the split's documents, each led by EOS, then one EOS.
      doc_starts: [documents] indices into stream; doc_starts[0] == 0.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {SPLITS}")
    s = prepared.metadata["split"]
    first, stop = (0, s["train_documents"]) if split == "train" else (s["train_documents"], prepared.metadata["documents"])
    if stop <= first:
        raise DataError(
            f"the {split} split is empty (data.heldout_fraction={s['heldout_fraction']}); "
            f"set data.heldout_fraction > 0 to evaluate"
        )
    store = prepared.open()
    starts = store.doc_starts[first : stop + 1]  # the last is the EOS that follows the split
    stream = store.tokens(int(starts[0]), int(starts[-1]) + 1)
    return stream, (starts[:-1] - starts[0]).astype(np.int64)


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


class Loader:
    """Shuffled, endlessly repeating batches of one split, for one process.

    `next()` returns this process's rows of the next global batch: a dict of
    [global_batch // process_count, seq_len] arrays (packing.KEYS).
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
    ):
        self.split, self.seq_len, self.global_batch, self.seed = split, int(seq_len), int(global_batch), int(seed)
        self.local_batch = _local_rows(self.global_batch, process_index, process_count)
        self.process_index, self.process_count = process_index, process_count
        self._stream, self._doc_starts = split_stream(prepared, split)
        self.rows_per_epoch = packing.full_rows(len(self._stream), self.seq_len)
        if self.rows_per_epoch < 1:
            raise DataError(
                f"the {split} split has {len(self._stream)} tokens, fewer than one sequence of "
                f"train.seq_len={self.seq_len} + 1; lower train.seq_len or add text"
            )
        self._order = grain.MapDataset.range(self.rows_per_epoch).shuffle(seed=_grain_seed(self.seed, split)).repeat()
        self._lengths = np.full(self.local_batch, self.seq_len, np.int64)
        self._consumed = 0  # rows of the global stream before the next batch

    def next(self) -> dict[str, np.ndarray]:
        """This process's [global_batch // process_count, seq_len] share of the next global batch."""
        first = self._consumed + self.process_index * self.local_batch
        rows = np.fromiter((self._order[i] for i in range(first, first + self.local_batch)), np.int64, self.local_batch)
        self._consumed += self.global_batch
        return packing.pack(self._stream, self._doc_starts, rows * self.seq_len, self._lengths, self.seq_len)

    __next__ = next

    def __iter__(self):
        return self

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
        self._consumed = int(state["rows_consumed"])


def heldout_batches(
    prepared, seq_len: int, global_batch: int, n: int | None = None, process_index: int = 0, process_count: int = 1
):
    """The held-out split in a fixed order: n batches (default: enough to cover it once), each this
    process's [global_batch // process_count, seq_len] share, padded (weight 0) past the end.

    The same arguments give the same batches every call; every held-out token is a target exactly
    once in the first `heldout_num_batches` batches.
    """
    local = _local_rows(global_batch, process_index, process_count)
    stream, doc_starts = split_stream(prepared, "heldout")
    total_rows = packing.all_rows(len(stream), seq_len)
    inputs = len(stream) - 1
    if n is None:
        n = -(-total_rows // global_batch)
    for k in range(n):
        rows = k * global_batch + process_index * local + np.arange(local, dtype=np.int64)
        starts = rows * seq_len
        lengths = np.clip(inputs - starts, 0, seq_len)
        yield packing.pack(stream, doc_starts, np.minimum(starts, inputs), lengths, seq_len)


def heldout_num_batches(prepared, seq_len: int, global_batch: int) -> int:
    """How many held-out batches cover the held-out split exactly once."""
    s = prepared.metadata["split"]
    if not s["heldout_documents"]:
        return 0
    store = prepared.open()
    n = int(store.doc_starts[-1] - store.doc_starts[s["train_documents"]]) + 1
    return -(-packing.all_rows(n, seq_len) // global_batch)


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
