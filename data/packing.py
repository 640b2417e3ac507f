"""Packing: fixed-length rows cut from a split's token stream, with segment ids and positions.

A split's stream is its documents, each led by EOS, then one more EOS (store.py):

    stream:   EOS a a a EOS b b EOS c c c c EOS
    row 0:    EOS a a a EOS b          inputs     = stream[s : s + L]
               a  a a EOS b b          targets    = stream[s + 1 : s + L + 1]
               1  1 1 1  2 2           segment_ids: documents in the row, numbered from 1
               0  1 2 3  0 1           positions:   offset from the document's start (or the row's)

Rows are consecutive L-token windows (row r starts at r * L), so every token is an input exactly
once and every slot of a full row holds a real token: no padding, whatever the document lengths.
A document longer than a row continues in the next row, where its positions restart at 0,
because attention inside a row cannot see the earlier part anyway.

The last input of a document predicts the next document's EOS: under a document mask that
target is still predictable from the document alone ("the text ends here"), so every target of a
full row counts (weight 1). Only padding (rows past the end of the held-out split, or the short
last row there) has segment id 0 and weight 0.
"""

import numpy as np

KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def pack(
    stream: np.ndarray, doc_starts: np.ndarray, row_starts: np.ndarray, row_lengths: np.ndarray, seq_len: int
) -> dict[str, np.ndarray]:
    """Rows of a stream as a batch.

    Args:
      stream: [n] token ids of a split (documents led by EOS, a final EOS; n >= 2).
      doc_starts: [d] sorted indices into stream where documents start; doc_starts[0] == 0.
      row_starts: [rows] index into stream of each row's first input.
      row_lengths: [rows] real inputs in each row, 0..seq_len; the rest is padding.
        Needs row_starts + row_lengths <= n - 1 (each real input has a target).
      seq_len: L.
    Returns:
      inputs, targets, segment_ids, positions: [rows, L] int32; weights: [rows, L] float32.
    """
    row_starts = np.asarray(row_starts, np.int64)
    offsets = np.arange(seq_len, dtype=np.int64)
    real = offsets[None, :] < np.asarray(row_lengths, np.int64)[:, None]  # [rows, L]
    # Padding slots read a harmless in-range index and are zeroed below.
    index = np.where(real, row_starts[:, None] + offsets[None, :], 0)  # [rows, L]
    inputs = stream[index].astype(np.int32)
    targets = stream[index + 1].astype(np.int32)
    doc = np.searchsorted(doc_starts, index, side="right") - 1  # [rows, L] document of each input
    segment_ids = (doc - doc[:, :1] + 1).astype(np.int32)
    segment_start = np.maximum(doc_starts[doc], row_starts[:, None])
    positions = (index - segment_start).astype(np.int32)
    return {
        "inputs": np.where(real, inputs, 0),
        "targets": np.where(real, targets, 0),
        "segment_ids": np.where(real, segment_ids, 0),
        "positions": np.where(real, positions, 0),
        "weights": real.astype(np.float32),
    }


def full_rows(stream_len: int, seq_len: int) -> int:
    """How many full L-token rows a stream of stream_len tokens holds (the rest is < one row)."""
    return (stream_len - 1) // seq_len


def all_rows(stream_len: int, seq_len: int) -> int:
    """How many rows cover every input of the stream, the last possibly short."""
    return -(-(stream_len - 1) // seq_len)
