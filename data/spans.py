"""T5's span corruption (Raffel et al., 2020, section 3.1.4): an encoder-decoder's pretraining on text.

A row of a split's token stream (the token store's: documents led by EOS) of `tokens_length` tokens
loses `data.noise_density` of them, in spans of mean length `data.mean_noise_span`. The encoder reads
what is left, each dropped span replaced by one sentinel; the decoder writes the dropped spans, each
led by its sentinel (seq2seq.py lays both out as a batch row):

    tokens:   The cute dog walks in the park
    noise:        ^^^^^^^^          ^^^
    inputs:   The <0> walks in <1> park EOS
    targets:  <0> cute dog <1> the EOS

Sentinel i is the id `tokenizer vocab + data.sentinels - 1 - i`: the top of the vocabulary, above
every id the tokenizer makes. heft trains its tokenizer with model.vocab - data.sentinels pieces;
T5's <extra_id_i> is 32099 - i, above its 32,000. The mask is T5's `random_spans_noise_mask`:
exactly round(length * density) noise tokens in round(noise / mean span) spans, the row starting
with kept tokens and alternating, each side's span lengths a uniformly random split. `lengths` picks
tokens_length so that the inputs fill train.seq_len, and gives the targets' length (T5's
`compute_input_and_target_lengths`).

Deterministic and resumable: row k of the loader's stream (k counts rows consumed, across epochs)
is corrupted by a generator seeded with (data.seed, split, k), so a batch is a function of the
loader's position alone, whatever the number of processes, and a resumed run continues exactly
(loader.py's contract: its state is rows consumed). A new epoch corrupts the same text anew;
held-out rows are corrupted the same way at every evaluation.
"""

import dataclasses
import hashlib

import numpy as np

from heft.data import prepare, seq2seq
from heft.data.errors import DataError

SPLIT_CODE = {"train": 0, "heldout": 1}


@dataclasses.dataclass(frozen=True)
class SpanCorrupted(prepare.Prepared):
    """A prepared token store that an encoder-decoder reads through span corruption: everything that
    reads a Prepared reads this one, and the loader (loader.py) corrupts its rows."""

    noise_density: float = 0.15
    mean_noise_span: float = 3.0
    sentinels: int = 0
    decoder_start: int = 0
    target_len_setting: int = 0  # train.target_len; 0: the span corruption's own
    seed: int = 0

    @property
    def first_sentinel(self) -> int:
        return self.metadata["tokenizer"]["vocab_size"] + self.sentinels - 1

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """(tokens per row of the stream, the decoder's row length) for inputs of seq_len tokens."""
        tokens, targets = lengths(seq_len, self.noise_density, self.mean_noise_span)
        if self.target_len_setting and self.target_len_setting < targets:
            raise DataError(f"train.target_len={self.target_len_setting} is shorter than span corruption's targets "
                            f"({targets} tokens for train.seq_len={seq_len}); set it to 0 or at least {targets}")
        return tokens, self.target_len_setting or targets

    def rows(self, split_tokens: int, seq_len: int) -> int:
        """Whole rows of the stream in a split of `split_tokens` tokens."""
        return split_tokens // self.lengths(seq_len)[0]

    def corrupt_rows(self, windows: np.ndarray, keys, split: str, seq_len: int, sizes=None) -> dict[str, np.ndarray]:
        """A batch (seq2seq.KEYS) from stream windows [rows, tokens_length]: row i corrupted with the
        generator of (seed, split, keys[i]), its first sizes[i] tokens only (default: all; 0: padding)."""
        _, target_len = self.lengths(seq_len)
        out = seq2seq.empty_rows(len(windows), seq_len, target_len)
        eos_id = self.metadata["tokenizer"]["eos_id"]
        seed = _seed(self.seed)
        for i, (window, key) in enumerate(zip(windows, keys)):
            n = len(window) if sizes is None else int(sizes[i])
            if n < 2:  # padding, or too short to hide anything
                continue
            rng = np.random.default_rng([seed, SPLIT_CODE[split], int(key)])
            noise = noise_mask(n, self.noise_density, self.mean_noise_span, rng)
            source, targets = corrupt(np.asarray(window[:n]), noise, self.first_sentinel, eos_id)
            seq2seq.put(out, i, (0, 0), 1, source, targets, self.decoder_start)
        return out


def _seed(seed: int) -> int:
    # Spreads user seeds apart (as loader.py does for the order), so seeds 0 and 1 share no masks.
    return int.from_bytes(hashlib.sha256(f"heft/spans/{seed}".encode()).digest()[:8], "little")


def _inputs_targets(tokens_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths, each with its sentinels and EOS, for a row of tokens_length tokens."""
    noise = int(round(tokens_length * density))
    spans = int(round(noise / mean_span))
    return tokens_length - noise + spans + 1, noise + spans + 1


def lengths(inputs_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(tokens_length, targets_length): the longest row whose corrupted inputs fit `inputs_length`,
    and the length of its targets (T5's `compute_input_and_target_lengths`)."""
    tokens = inputs_length
    while _inputs_targets(tokens + 1, density, mean_span)[0] <= inputs_length:
        tokens += 1
    targets = _inputs_targets(tokens, density, mean_span)[1]
    if density == 0.5 and targets > inputs_length:  # T5's: keep targets at the (round) inputs length
        tokens, targets = tokens - 1, targets - 1
    return tokens, targets


def spans_in(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in a row of `length` tokens, as `noise_mask` draws them."""
    noise = min(max(int(round(length * density)), 1), length - 1)
    return noise, max(min(int(round(noise / mean_span)), length - noise), 1)  # each span between kept tokens


def _segments(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """`items` cut into `segments` nonempty runs at uniformly random places: [segments] lengths."""
    cuts = np.sort(rng.choice(items - 1, segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [items]]))


def noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """[length] bool, True for the tokens to drop: T5's `random_spans_noise_mask`."""
    noise, spans = spans_in(length, density, mean_span)
    kept = _segments(length - noise, spans, rng)
    dropped = _segments(noise, spans, rng)
    runs = np.stack([kept, dropped], axis=1).reshape(-1)  # kept, dropped, kept, dropped, ...
    return np.repeat(np.tile([False, True], spans), runs)


def corrupt(tokens: np.ndarray, noise: np.ndarray, first_sentinel: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [n] and their noise mask [n] -> (inputs, targets), both ending with EOS: the inputs
    keep the other tokens with sentinel i in place of noise span i; the targets are the noise spans,
    each led by its sentinel."""
    starts = noise & ~np.concatenate([[False], noise[:-1]])  # the first token of each noise span
    sentinels = first_sentinel - (np.cumsum(starts) - 1)  # sentinel of the span each token is in
    inputs = np.where(starts, sentinels, tokens)[~noise | starts]
    dropped = np.flatnonzero(noise)
    led = starts[dropped]
    at = np.arange(len(dropped)) + np.cumsum(led)  # each dropped token's slot, after its span's sentinel
    targets = np.empty(len(dropped) + int(led.sum()), np.int64)
    targets[at] = tokens[dropped]
    targets[at[led] - 1] = sentinels[dropped][led]
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def for_config(config, prepared):
    """`prepared` as an encoder-decoder reads text: span-corrupted (checked); decoders get it as it is."""
    if not seq2seq.is_encoder_decoder(config) or isinstance(prepared, SpanCorrupted):
        return prepared
    d = config.data
    density, mean_span, sentinels = d.get("noise_density", 0.15), d.get("mean_noise_span", 3.0), d.get("sentinels", 0)
    if not isinstance(density, (int, float)) or not 0 < density < 1:
        raise DataError(f"data.noise_density={density!r} must be in (0, 1): the share of tokens span corruption drops")
    if not isinstance(mean_span, (int, float)) or not mean_span >= 1:
        raise DataError(f"data.mean_noise_span={mean_span!r} must be >= 1 (tokens per dropped span)")
    vocab, model_vocab = prepared.metadata["tokenizer"]["vocab_size"], int(config.model.vocab)
    seq_len = int(config.train.seq_len)
    tokens, _ = lengths(seq_len, density, mean_span)
    spans = spans_in(tokens, density, mean_span)[1]
    if not isinstance(sentinels, int) or sentinels < spans:
        raise DataError(f"data.sentinels={sentinels!r} cannot hold the {spans} sentinels a row of span corruption "
                        f"needs (train.seq_len={seq_len}, data.noise_density={density}, "
                        f"data.mean_noise_span={mean_span}); set data.sentinels >= {spans} (T5: 100)")
    if vocab + sentinels > model_vocab:
        raise DataError(f"the tokenizer's {vocab} ids and data.sentinels={sentinels} sentinels above them need "
                        f"{vocab + sentinels} ids but model.vocab={model_vocab}; raise model.vocab or lower "
                        "data.sentinels (a tokenizer heft trains has model.vocab - data.sentinels ids)")
    spanned = SpanCorrupted(**{f.name: getattr(prepared, f.name) for f in dataclasses.fields(prepare.Prepared)},
                            noise_density=float(density), mean_noise_span=float(mean_span), sentinels=sentinels,
                            decoder_start=int(config.model.get("decoder_start", 0)),
                            target_len_setting=int(config.train.get("target_len", 0) or 0), seed=int(d.seed))
    spanned.lengths(seq_len)  # a target_len too short stops here
    return spanned


class Batches:
    """The loader's `_Batches` for span corruption: this process's share of global batch k, as a
    function of the rows consumed before it (stream row k is corrupted by key k)."""

    def __init__(self, prepared: SpanCorrupted, first: int, seq_len: int, order, local_batch: int, offset: int):
        self.prepared, self.store = prepared, prepared.open()
        self.first, self.seq_len, self.order = first, seq_len, order
        self.local_batch, self.offset = local_batch, offset
        self.tokens_length = prepared.lengths(seq_len)[0]

    def __call__(self, consumed: int) -> dict[str, np.ndarray]:
        keys = np.arange(consumed + self.offset, consumed + self.offset + self.local_batch)
        rows = np.fromiter((self.order[int(k)] for k in keys), np.int64, self.local_batch)
        windows = self.store.windows(self.first + rows * self.tokens_length, self.tokens_length)
        return self.prepared.corrupt_rows(windows, keys, "train", self.seq_len)


def heldout_rows(prepared: SpanCorrupted, split_tokens: int, seq_len: int) -> int:
    """Rows that cover the held-out stream once (the last one possibly short)."""
    return -(-split_tokens // prepared.lengths(seq_len)[0])


def heldout_batches(prepared: SpanCorrupted, first: int, stop: int, seq_len: int, global_batch: int, n: int | None,
                    local: int, process_index: int):
    """The held-out stream in order, corrupted by row index: n batches (default: all of it once),
    each this process's `local` rows, padded (weight 0) past the end."""
    store = prepared.open()
    tokens_length = prepared.lengths(seq_len)[0]
    total = stop - first
    if n is None:
        n = -(-heldout_rows(prepared, total, seq_len) // global_batch)
    for k in range(n):
        rows = k * global_batch + process_index * local + np.arange(local, dtype=np.int64)
        sizes = np.clip(total - rows * tokens_length, 0, tokens_length)
        windows = np.zeros((local, tokens_length), np.int64)
        for i in np.flatnonzero(sizes > 0):
            start = first + rows[i] * tokens_length
            windows[i, :sizes[i]] = store.tokens(start, start + sizes[i])
        yield prepared.corrupt_rows(windows, rows, "heldout", seq_len, sizes)
