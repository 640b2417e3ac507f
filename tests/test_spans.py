"""The encoder-decoder's data: T5's span corruption of the token store (exact density, sentinels in
order, inputs and targets that rebuild the text, T5's lengths, batches that depend on the loader's
position alone) and input/target pairs packed for the encoder and the decoder."""

import json

import numpy as np
import pytest

from heft.configs import t5_tiny
from heft.data import loader, rows, seq2seq, spans
from heft.data.errors import DataError
from heft.data.processes import prepare_for_processes

SEQ_LEN, BATCH = 64, 4


def _config(tmp_path, **data):
    c = t5_tiny.get_config()
    c.model.vocab = 384
    c.data.update(**{"cache_dir": str(tmp_path / "cache"), "workers": 1, "sentinels": 64, **data})
    c.train.update(seq_len=SEQ_LEN, batch_size=BATCH)
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("spans")
    rng = np.random.default_rng(0)
    words = ("the king and queen of denmark walk in the garden while a ghost speaks of murder most foul "
             "to be or not to be that is the question whether tis nobler in the mind to suffer").split()
    docs = [{"text": "\n".join(" ".join(rng.choice(words, 12)) for _ in range(20))} for _ in range(40)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


@pytest.fixture(scope="module")
def prepared(corpus):
    c = _config(corpus, corpus=str(corpus / "corpus.jsonl"))
    return c, prepare_for_processes(c, progress=False)


def _rebuild(inputs, targets, first_sentinel, sentinels, eos_id):
    """The original tokens from a corrupted pair, read the plain way: each sentinel in the inputs is
    replaced by what follows that sentinel in the targets, up to the next sentinel or the EOS."""
    is_sentinel = lambda t: first_sentinel - sentinels < t <= first_sentinel  # noqa: E731
    spans_of, current = {}, None
    for t in targets[:-1]:
        if is_sentinel(t):
            current = spans_of.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs[:-1]:
        out += spans_of[t] if is_sentinel(t) else [t]
    assert inputs[-1] == targets[-1] == eos_id
    return out


def test_noise_density_is_exact_over_a_long_sample():
    noise = spans.noise_mask(100_000, 0.15, 3.0, np.random.default_rng(0))
    assert noise.sum() == 15_000
    starts = np.flatnonzero(noise & ~np.concatenate([[False], noise[:-1]]))
    assert len(starts) == 5_000 and not noise[0]  # 5,000 spans of mean length 3, kept tokens first
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], noise.astype(int), [0]]))))[::2]
    assert runs.min() >= 1 and runs.mean() == 3.0


def test_sentinels_descend_from_the_top_of_the_vocabulary_and_rebuild_the_text(prepared):
    c, p = prepared
    assert isinstance(p, spans.SpanCorrupted)
    vocab = p.metadata["tokenizer"]["vocab_size"]
    assert vocab == c.model.vocab - c.data.sentinels and p.first_sentinel == c.model.vocab - 1
    eos = p.metadata["tokenizer"]["eos_id"]
    for seed in range(5):  # windows of 400 tokens: 20 spans, within the 64 sentinels
        tokens = p.open().tokens(400 * seed, 400 * (seed + 1))
        noise = spans.noise_mask(len(tokens), 0.15, 3.0, np.random.default_rng(seed))
        inputs, targets = spans.corrupt(tokens, noise, p.first_sentinel, eos)
        used = [t for t in inputs if t >= vocab]
        assert used == list(range(c.model.vocab - 1, c.model.vocab - 1 - len(used), -1))  # top down, in order
        assert [t for t in targets if t >= vocab] == used
        assert _rebuild(list(inputs), list(targets), p.first_sentinel, c.data.sentinels, eos) == list(tokens)


@pytest.mark.parametrize("inputs_length", [64, 128, 512])
def test_lengths_are_t5s_and_fill_the_inputs(inputs_length):
    tokens, targets = spans.lengths(inputs_length, 0.15, 3.0)
    if inputs_length == 512:
        assert (tokens, targets) == (568, 114)  # T5's own numbers for 512-token inputs
    for n, fits in ((tokens, True), (tokens + 1, False)):  # the longest window whose inputs fit
        noise = spans.noise_mask(n, 0.15, 3.0, np.random.default_rng(0))
        got_inputs, got_targets = spans.corrupt(np.arange(n) + 10, noise, 5, 1)
        assert (len(got_inputs) <= inputs_length) == fits
        if fits:
            assert len(got_targets) == targets


def test_span_batches_depend_on_the_rows_consumed_alone(prepared):
    c, p = prepared
    straight = loader.Loader(p, seq_len=SEQ_LEN, global_batch=BATCH, seed=0, prefetch=0)
    batches = [straight.next() for _ in range(4)]
    lengths = rows.lengths(c)
    for key, value in batches[0].items():
        assert value.shape == (BATCH, lengths[key]), key
    b = batches[0]
    assert (b["weights"] == (b["segment_ids"] > 0)).all() and (b["inputs"][:, 0] == c.model.decoder_start).all()
    np.testing.assert_array_equal(b["inputs"][:, 1:][b["segment_ids"][:, 1:] > 0],
                                  b["targets"][:, :-1][b["segment_ids"][:, 1:] > 0])  # shifted targets
    resumed = loader.Loader(p, seq_len=SEQ_LEN, global_batch=BATCH, seed=0)
    state = dict(straight.state(), rows_consumed=2 * BATCH)
    resumed.restore(state)
    for want in batches[2:]:
        got = resumed.next()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    resumed.close()
    halves = [loader.Loader(p, seq_len=SEQ_LEN, global_batch=BATCH, seed=0, process_index=i, process_count=2,
                            prefetch=0).next() for i in range(2)]
    for key in batches[0]:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[0][key])
    other_seed = loader.Loader(p, seq_len=SEQ_LEN, global_batch=BATCH, seed=1, prefetch=0).next()
    assert not np.array_equal(other_seed["encoder_inputs"], batches[0]["encoder_inputs"])


def test_heldout_span_batches_are_fixed_and_cover_the_split(prepared):
    c, p = prepared
    n = loader.heldout_num_batches(p, SEQ_LEN, BATCH)
    first = list(loader.heldout_batches(p, SEQ_LEN, BATCH))
    second = list(loader.heldout_batches(p, SEQ_LEN, BATCH))
    assert len(first) == n >= 1
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    start, stop = loader.split_range(p, "heldout")
    vocab = p.metadata["tokenizer"]["vocab_size"]
    rows = sum(int((b["weights"].sum(1) > 0).sum()) for b in first)
    dropped = sum(int(((b["targets"] < vocab) & (b["weights"] > 0)).sum()) for b in first) - rows  # less EOS
    window, total = spans.lengths(SEQ_LEN, 0.15, 3.0)[0], stop - start  # every token of the split, once:
    sizes = [window] * (total // window) + ([total % window] if total % window >= 2 else [])
    assert rows == len(sizes) and dropped == sum(round(0.15 * n) for n in sizes)


def test_too_few_sentinels_or_too_small_a_vocab_is_one_clear_error(prepared, corpus):
    from heft.data.prepare import Prepared

    _, p = prepared
    plain = Prepared(p.store_path, p.tokenizer_path, p.metadata)
    needed = spans.spans_in(spans.lengths(SEQ_LEN, 0.15, 3.0)[0], 0.15, 3.0)[1]
    few = _config(corpus, corpus=str(corpus / "corpus.jsonl"), sentinels=needed - 1)
    with pytest.raises(DataError, match=rf"data.sentinels={needed - 1} cannot hold the {needed} sentinels a row .* "
                                        rf"set data.sentinels >= {needed} \(T5: 100\)"):
        spans.for_config(few, plain)
    small = _config(corpus, corpus=str(corpus / "corpus.jsonl"))
    small.model.vocab = 352
    with pytest.raises(DataError, match=r"need 384 ids but model.vocab=352; raise model.vocab"):
        spans.for_config(small, plain)


def test_pairs_pack_whole_into_encoder_and_decoder_rows():
    rows = seq2seq.pack([([5, 6, 1], [7, 8, 1]), ([9, 1], [10, 1]), ([11, 12, 13, 1], [14, 1])],
                        seq_len=6, target_len=5, start_id=0)
    np.testing.assert_array_equal(rows["encoder_inputs"], [[5, 6, 1, 9, 1, 0], [11, 12, 13, 1, 0, 0]])
    np.testing.assert_array_equal(rows["encoder_segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["inputs"], [[0, 7, 8, 0, 10], [0, 14, 0, 0, 0]])
    np.testing.assert_array_equal(rows["targets"], [[7, 8, 1, 10, 1], [14, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["weights"], [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])


def test_a_pairs_line_missing_its_field_is_named(prepared, tmp_path):
    c, p = prepared
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "to be", "completion": "or not"}\n{"prompt": "the king"}\n')
    c = _config(tmp_path, corpus=str(tmp_path / "pairs.jsonl"), format="prompt_completion")
    with pytest.raises(DataError, match=r"pairs.jsonl:2 has no 'completion' field"):
        prepare_for_processes(c, p.tokenizer_path, progress=False)
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "to be", "completion": "or not"}\n' * 20)
    pairs = prepare_for_processes(c, p.tokenizer_path, progress=False)
    row = pairs.split_rows("train", SEQ_LEN)
    assert set(row) == set(seq2seq.KEYS) and row["targets"].shape[1] == SEQ_LEN  # target_len 0: seq_len
    assert (row["encoder_inputs"][0][row["encoder_segment_ids"][0] == 1][-1]) == p.metadata["tokenizer"]["eos_id"]
