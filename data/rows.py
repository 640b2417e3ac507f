"""The rows of a batch, for any config: which arrays a step reads and how long each row is.

A decoder's batch (loader.py) holds five rows of `train.seq_len`: inputs, targets, positions,
segment ids and weights. An encoder-decoder's (seq2seq.py) holds the encoder's tokens and segment
ids, `seq_len` long, and the decoder's inputs, targets, segment ids and weights, `target_len` long
(for text, the span corruption's own targets length, spans.py, unless `train.target_len` is set).
The train step's abstract batch and `heft size`'s FLOPs both read it here.
"""

import numpy as np

from heft.data import seq2seq, spans

DECODER_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def lengths(config, seq_len: int | None = None) -> dict[str, int]:
    """{batch key: row length} of the batches `config` trains on, with rows of `seq_len` tokens
    (default train.seq_len) for a decoder or an encoder."""
    seq_len = int(seq_len or config.train.seq_len)
    if not seq2seq.is_encoder_decoder(config):
        return dict.fromkeys(DECODER_KEYS, seq_len)
    d = config.data
    span_targets = None
    if d.get("format", "text") == "text":
        span_targets = spans.lengths(seq_len, d.get("noise_density", 0.15), d.get("mean_noise_span", 3.0))[1]
    n = seq2seq.target_len(config, span_targets)
    return {k: seq_len if k in seq2seq.ENCODER_KEYS else n for k in seq2seq.KEYS}


def dtype(key: str) -> np.dtype:
    """A batch row's dtype: float32 loss weights, int32 for everything else (tokens, positions, ids)."""
    return np.dtype(np.float32 if key == "weights" else np.int32)
