"""What a model must beat: the corpus's unigram entropy."""

import numpy as np

from heft.data import pairs
from heft.data.loader import split_range

BLOCK = 1 << 22  # tokens read at a time: memory stays this, whatever the split's size
MAX_TOKENS = 1 << 28  # per split: a larger split is measured on evenly spaced blocks of it


def _counts(store, first: int, stop: int, vocab: int, skip_first: bool) -> np.ndarray:
    """[vocab] counts of tokens[first:stop] (without the first one if skip_first), read in blocks;
    beyond MAX_TOKENS, from evenly spaced blocks that hold MAX_TOKENS in all."""
    n = stop - first
    blocks = -(-n // BLOCK)
    keep = min(blocks, -(-MAX_TOKENS // BLOCK))
    counts = np.zeros(vocab, np.int64)
    for b in np.linspace(0, blocks - 1, keep).round().astype(np.int64) if keep < blocks else range(blocks):
        start = first + int(b) * BLOCK
        ids = store.tokens(start + (skip_first and start == first), min(stop, start + BLOCK))
        counts += np.bincount(ids, minlength=vocab)[:vocab]
    return counts


def unigram_cross_entropy(prepared) -> float:
    """Nats per token of the held-out split under the training split's unigram distribution.

    The loss of a model that ignores context; a trained model's held-out loss should be well below
    it. Add-one smoothing keeps tokens unseen in training finite. Exact for splits up to
    MAX_TOKENS tokens; an estimate from a fixed sample of blocks beyond.
    """
    if isinstance(prepared, pairs.Pairs):
        return pairs.unigram_cross_entropy(prepared)
    store = prepared.open()
    vocab = int(prepared.metadata["tokenizer"]["vocab_size"])
    train = _counts(store, *split_range(prepared, "train"), vocab, skip_first=False)
    heldout = _counts(store, *split_range(prepared, "heldout"), vocab, skip_first=True)  # targets: after the first
    seen = int(max(np.flatnonzero(train).max(), np.flatnonzero(heldout).max())) + 1  # ids up to the largest seen
    train, heldout = train[:seen] + 1.0, heldout[:seen]
    return float(-(heldout * np.log(train / train.sum())).sum() / heldout.sum())
