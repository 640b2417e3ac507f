"""The loader: deterministic shuffled packing, per-process slices of one stream, exact resume."""

import json
import random
import textwrap
from collections import Counter

import numpy as np
import pytest
import workers

from heft.configs import base
from heft.data import loader, prepare
from heft.data.errors import DataError

L, B = 16, 8  # seq_len and global batch of these tests
EOS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(Prepared, documents): 60 documents of 1 to ~1500 words, prepared with a 400-piece BPE."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    words = ["".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(1, 7))) for _ in range(200)]
    docs = [" ".join(rng.choices(words, k=rng.choice([1, 5, 12, 40, 200, 1500]))) for _ in range(60)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    c = base.get_config()
    c.model.vocab = 400
    c.data.corpus = str(root)
    c.data.cache_dir = str(root / "cache")
    c.data.workers = 1
    c.data.heldout_fraction = 0.1
    return prepare.prepare(c, progress=False), docs


@pytest.fixture(scope="module")
def prepared(corpus):
    return corpus[0]


def take(ld, n):
    return [ld.next() for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_have_the_promised_keys_shapes_and_dtypes(prepared):
    batch = loader.Loader(prepared, "train", L, B, seed=0, process_index=1, process_count=2).next()
    assert sorted(batch) == sorted(["inputs", "targets", "segment_ids", "positions", "weights"])
    for k, v in batch.items():
        assert v.shape == (B // 2, L)
        assert v.dtype == (np.float32 if k == "weights" else np.int32)


def test_same_seed_gives_same_batches(prepared):
    assert_same(take(loader.Loader(prepared, "train", L, B, seed=3), 30), take(loader.Loader(prepared, "train", L, B, seed=3), 30))


def test_different_seeds_give_different_order(prepared):
    a = take(loader.Loader(prepared, "train", L, B, seed=0), 5)
    b = take(loader.Loader(prepared, "train", L, B, seed=1), 5)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_process_slices_together_are_exactly_one_process_stream(prepared, processes):
    whole = take(loader.Loader(prepared, "train", L, B, seed=0), 40)
    parts = [take(loader.Loader(prepared, "train", L, B, 0, p, processes), 40) for p in range(processes)]
    joined = [{k: np.concatenate([parts[p][i][k] for p in range(processes)]) for k in whole[0]} for i in range(40)]
    assert_same(joined, whole)


def _all_rows(prepared, split="train"):
    stream, _ = loader.split_stream(prepared, split)
    n = (len(stream) - 1) // L
    return stream, Counter(stream[r * L : (r + 1) * L].tobytes() for r in range(n))


def test_each_epoch_visits_every_row_once_in_a_new_order(prepared):
    stream, rows = _all_rows(prepared)
    ld = loader.Loader(prepared, "train", L, 1, seed=0)
    assert ld.rows_per_epoch == sum(rows.values())
    epochs = [[ld.next()["inputs"][0].astype(stream.dtype).tobytes() for _ in range(ld.rows_per_epoch)] for _ in range(2)]
    assert Counter(epochs[0]) == rows == Counter(epochs[1])
    assert epochs[0] != epochs[1]
    assert ld.epoch == 2


@pytest.mark.parametrize("k", [0, 1, 7, 300])
def test_state_saved_after_k_batches_resumes_on_batch_k_plus_1(prepared, k):
    uninterrupted = take(loader.Loader(prepared, "train", L, B, seed=5), k + 3)
    first = loader.Loader(prepared, "train", L, B, seed=5)
    take(first, k)
    state = json.loads(json.dumps(first.state()))
    assert len(json.dumps(state)) < 200
    resumed = loader.Loader(prepared, "train", L, B, seed=5)
    resumed.restore(state)
    assert_same(take(resumed, 3), uninterrupted[k:])


def test_resume_with_a_different_process_count_continues_the_same_stream(prepared):
    uninterrupted = take(loader.Loader(prepared, "train", L, B, seed=2), 13)
    run1 = [loader.Loader(prepared, "train", L, B, 2, p, 2) for p in range(2)]
    for ld in run1:
        take(ld, 10)
    assert run1[0].state() == run1[1].state()
    run2 = [loader.Loader(prepared, "train", L, B, 2, p, 4) for p in range(4)]
    for ld in run2:
        ld.restore(run1[0].state())
    parts = [take(ld, 3) for ld in run2]
    joined = [{k: np.concatenate([parts[p][i][k] for p in range(4)]) for k in uninterrupted[0]} for i in range(3)]
    assert_same(joined, uninterrupted[10:])


def test_packing_fills_at_least_99_percent_of_token_slots(prepared):
    batches = take(loader.Loader(prepared, "train", L, B, seed=0), 100)
    filled = sum(b["weights"].sum() for b in batches) / (100 * B * L)
    assert filled >= 0.99
    assert all((b["segment_ids"] > 0).all() for b in batches)


def test_segment_ids_and_positions_follow_document_boundaries(corpus):
    prepared, docs = corpus
    tok = prepared.tokenizer()
    whole_docs = set(docs)
    seen_whole = 0
    long = 64  # rows long enough to hold the short documents whole
    for b in take(loader.Loader(prepared, "train", long, B, seed=0), 100):
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for inputs, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"]):
            # A document starts exactly where an EOS is: the segment id steps up and the position resets.
            starts = inputs == EOS
            expected_seg = np.cumsum(starts) + (0 if starts[0] else 1)
            np.testing.assert_array_equal(seg, expected_seg)
            for s in np.unique(seg):
                where = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                ids = inputs[where]
                if ids[0] == EOS and where[-1] < long - 1:  # a whole document inside the row
                    assert tok.decode(ids[1:]) in whole_docs
                    seen_whole += 1
    assert seen_whole > 10


def test_heldout_batches_are_fixed_and_cover_the_split_once(prepared):
    stream, _ = loader.split_stream(prepared, "heldout")
    n = loader.heldout_num_batches(prepared, L, B)
    first = list(loader.heldout_batches(prepared, L, B))
    assert len(first) == n
    assert_same(first, list(loader.heldout_batches(prepared, L, B, n)))
    real = np.concatenate([b["inputs"][b["weights"] > 0] for b in first])
    np.testing.assert_array_equal(real, stream[:-1])
    targets = np.concatenate([b["targets"][b["weights"] > 0] for b in first])
    np.testing.assert_array_equal(targets, stream[1:])
    pad = np.concatenate([b["segment_ids"][b["weights"] == 0] for b in first])
    assert (pad == 0).all()
    halves = [list(loader.heldout_batches(prepared, L, B, n, p, 2)) for p in range(2)]
    joined = [{k: np.concatenate([halves[0][i][k], halves[1][i][k]]) for k in first[0]} for i in range(n)]
    assert_same(joined, first)


def test_heldout_batches_past_the_split_are_all_padding(prepared):
    n = loader.heldout_num_batches(prepared, L, B)
    extra = list(loader.heldout_batches(prepared, L, B, n + 2))[n:]
    assert len(extra) == 2 and all(b["weights"].sum() == 0 for b in extra)


def test_bad_loader_arguments_are_one_clear_error(prepared):
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        loader.Loader(prepared, "train", L, B, 0, 0, 3)
    with pytest.raises(DataError, match="fewer than one sequence"):
        loader.Loader(prepared, "heldout", 10**7, B)
    with pytest.raises(DataError, match="split='test'"):
        loader.Loader(prepared, "test", L, B)
    ld = loader.Loader(prepared, "train", L, B, seed=0)
    with pytest.raises(DataError, match="seed=1"):
        ld.restore({**ld.state(), "seed": 1})


def test_global_batch_lays_local_rows_out_on_the_mesh(prepared):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()).reshape(-1), ("data",))
    local = loader.Loader(prepared, "train", L, B, seed=0).next()
    batch = loader.global_batch(local, NamedSharding(mesh, PartitionSpec("data", None)))
    for k, v in local.items():
        assert batch[k].shape == (B, L) and batch[k].dtype == v.dtype
        assert len(batch[k].sharding.device_set) == len(jax.devices())
        np.testing.assert_array_equal(np.asarray(batch[k]), v)


_WORKER = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + os.environ.get("XLA_FLAGS", "")
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from heft.data import loader
    from heft.data.prepare import Prepared
    port, pid, store, tok, meta = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    prepared = Prepared(store, tok, json.loads(meta))
    mesh = Mesh(np.array(jax.devices()).reshape(4), ("data",))
    ld = loader.Loader(prepared, "train", 16, 8, 0, jax.process_index(), jax.process_count())
    ld.next()
    batch = loader.global_batch(ld.next(), NamedSharding(mesh, PartitionSpec("data", None)))
    rows = multihost_utils.process_allgather(batch["inputs"], tiled=True)
    if jax.process_index() == 0:
        print("ROWS", json.dumps(np.asarray(rows).tolist()))
    """
)


def test_global_batch_over_two_processes_holds_the_one_process_batch(prepared, tmp_path):
    outs = workers.run(tmp_path, _WORKER, args=(prepared.store_path, prepared.tokenizer_path,
                                                json.dumps(prepared.metadata)), timeout=180)
    [line] = [x for x in outs[0].splitlines() if x.startswith("ROWS ")]  # gloo also prints
    rows = np.array(json.loads(line[5:]))
    ld = loader.Loader(prepared, "train", L, B, seed=0)
    ld.next()
    expected = ld.next()["inputs"]
    assert rows.shape == expected.shape
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, expected.tolist()))


def _reference_batch(stream, doc_starts, row_starts, lengths):
    """The packing of rows from the whole stream and its document starts (heft's first loader,
    kept as the reference): segment ids by document index, positions from each document's start."""
    offsets = np.arange(L)
    real = offsets[None, :] < lengths[:, None]
    index = np.where(real, row_starts[:, None] + offsets[None, :], 0)
    doc = np.searchsorted(doc_starts, index, side="right") - 1
    return {
        "inputs": np.where(real, stream[index], 0),
        "targets": np.where(real, stream[index + 1], 0),
        "segment_ids": np.where(real, doc - doc[:, :1] + 1, 0),
        "positions": np.where(real, index - np.maximum(doc_starts[doc], row_starts[:, None]), 0),
        "weights": real.astype(np.float32),
    }


def test_rows_read_alone_pack_as_the_whole_stream_with_its_document_starts_does(corpus):
    prepared, docs = corpus
    tok = prepared.tokenizer()
    stream, _ = loader.split_stream(prepared, "train")
    n_train = prepared.metadata["split"]["train_documents"]
    doc_starts = np.r_[0, np.cumsum([len(tok.encode(d)) + 1 for d in docs[: n_train - 1]])]  # from the texts
    ld = loader.Loader(prepared, "train", L, B, seed=0)
    for k in range(60):
        rows = np.array([ld._batches.order[i] for i in range(k * B, (k + 1) * B)])
        expected = _reference_batch(stream, doc_starts, rows * L, np.full(B, L))
        got = ld.next()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_the_loader_reads_only_the_rows_it_serves(prepared, monkeypatch):
    from heft.data import store

    reads = []
    windows, tokens = store.TokenStore.windows, store.TokenStore.tokens
    monkeypatch.setattr(store.TokenStore, "windows", lambda self, s, n: reads.append((len(s), n)) or windows(self, s, n))
    monkeypatch.setattr(store.TokenStore, "tokens", lambda self, a=0, b=None: reads.append((1, b - a)) or tokens(self, a, b))
    take(loader.Loader(prepared, "train", L, B, seed=0, process_index=1, process_count=2, prefetch=0), 5)
    assert reads == [(B // 2, L + 1)] * 5
    reads.clear()
    list(loader.heldout_batches(prepared, L, B))
    assert sum(rows * n for rows, n in reads) < (loader.heldout_num_batches(prepared, L, B) * B) * (L + 1)


def test_prefetch_reads_a_few_batches_ahead_and_close_stops_it(prepared, monkeypatch):
    import time

    ld = loader.Loader(prepared, "train", L, B, seed=0, prefetch=3)
    served = []
    make = ld._batches
    monkeypatch.setattr(ld, "_batches", lambda consumed: served.append(consumed) or make(consumed))
    ld.next()
    deadline = time.time() + 10
    while len(served) < 5 and time.time() < deadline:  # the one taken, 3 queued, 1 waiting to be queued
        time.sleep(0.01)
    time.sleep(0.1)
    assert served == [k * B for k in range(5)]
    thread = ld._thread[0]._thread
    ld.close()
    assert not thread.is_alive()


def test_prefetched_batches_are_the_batches_read_in_place(prepared):
    with loader.Loader(prepared, "train", L, B, seed=7) as ahead:
        assert_same(take(ahead, 20), take(loader.Loader(prepared, "train", L, B, seed=7, prefetch=0), 20))


def test_restore_on_a_loader_that_read_ahead_continues_from_the_restored_position(prepared):
    uninterrupted = take(loader.Loader(prepared, "train", L, B, seed=5, prefetch=0), 6)
    with loader.Loader(prepared, "train", L, B, seed=5) as ld:
        take(ld, 2)
        state = ld.state()
        take(ld, 3)  # read ahead further still
        ld.restore(state)
        assert_same(take(ld, 4), uninterrupted[2:])


def test_a_dropped_loader_stops_its_thread(prepared):
    import gc
    import threading
    import time

    def alive():
        return sum(t.name == "heft-data-prefetch" for t in threading.enumerate())

    before = alive()
    ld = loader.Loader(prepared, "train", L, B, seed=0)
    ld.next()
    assert alive() == before + 1
    del ld
    gc.collect()
    deadline = time.time() + 10
    while alive() > before and time.time() < deadline:
        time.sleep(0.01)
    assert alive() == before


def test_an_error_while_reading_ahead_is_raised_by_next(prepared, monkeypatch):
    ld = loader.Loader(prepared, "train", L, B, seed=0)

    def broken(consumed):
        raise DataError("the disk went away")

    monkeypatch.setattr(ld, "_batches", broken)
    with pytest.raises(DataError, match="the disk went away"):
        ld.next()
    ld.close()


def _bos_prepared(prepared):
    import dataclasses

    return dataclasses.replace(prepared, document_start="bos")


def test_with_document_start_bos_each_document_starts_with_bos_and_targets_are_unchanged(prepared):
    bos = prepared.metadata["tokenizer"]["bos_id"]
    assert bos != EOS
    pairs = [(take(loader.Loader(prepared, "train", L, B, seed=1), 20), take(loader.Loader(_bos_prepared(prepared), "train", L, B, seed=1), 20)),
             (list(loader.heldout_batches(prepared, L, B)), list(loader.heldout_batches(_bos_prepared(prepared), L, B)))]
    for eos_batches, bos_batches in pairs:
        assert sum(((e["inputs"] == EOS) & (e["weights"] > 0)).sum() for e in eos_batches) > 0
        for e, b in zip(eos_batches, bos_batches):
            starts = (e["inputs"] == EOS) & (e["weights"] > 0)
            np.testing.assert_array_equal(b["inputs"], np.where(starts, bos, e["inputs"]))
            assert not ((b["inputs"] == EOS) & (b["weights"] > 0)).any()
            for key in ("targets", "segment_ids", "positions", "weights"):
                np.testing.assert_array_equal(b[key], e[key], err_msg=key)


def test_with_document_start_eos_inputs_are_the_stored_stream(prepared):
    import dataclasses

    explicit = dataclasses.replace(prepared, document_start="eos")
    stream, _ = loader.split_stream(prepared, "heldout")
    real = np.concatenate([b["inputs"][b["weights"] > 0] for b in loader.heldout_batches(explicit, L, B)])
    np.testing.assert_array_equal(real, stream[:-1])
    assert_same(take(loader.Loader(explicit, "train", L, B, seed=2), 5), take(loader.Loader(prepared, "train", L, B, seed=2), 5))
