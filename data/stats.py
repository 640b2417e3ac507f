"""What a model must beat: the corpus's unigram entropy."""

import numpy as np

from heft.data.loader import split_stream


def unigram_cross_entropy(prepared) -> float:
    """Nats per token of the held-out split under the training split's unigram distribution.

    The loss of a model that ignores context; a trained model's held-out loss should be well below
    it. Add-one smoothing keeps tokens unseen in training finite.
    """
    train, _ = split_stream(prepared, "train")
    heldout, _ = split_stream(prepared, "heldout")
    vocab = int(max(train.max(), heldout.max())) + 1
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout[1:]].mean())  # targets: every token after the first
