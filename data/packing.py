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

Everything is computed from the row's own L + 1 tokens: an input that is EOS starts a document
(no document holds an EOS), so a reader needs no table of document starts and reads only the
rows it serves.

The last input of a document predicts the next document's EOS: under a document mask that
target is still predictable from the document alone ("the text ends here"), so every target of a
full row counts (weight 1). Only padding (rows past the end of the held-out split, or the short
last row there) has segment id 0 and weight 0.

`data.document_start="bos"` (Llama's tokenizers, imported from Hugging Face) changes one thing:
the input at each document's start is BOS instead of EOS. Targets are the same, so every
document still ends by predicting EOS: `BOS a a a` -> `a a a EOS`, Llama's training format.
"""

import numpy as np

KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def pack(windows: np.ndarray, lengths: np.ndarray, eos_id: int, start_id: int | None = None) -> dict[str, np.ndarray]:
    """Rows of a stream as a batch.

    Args:
      windows: [rows, L + 1] token ids: row r's inputs are windows[r, :L] and its targets
        windows[r, 1:]. Slots past a row's length are ignored.
      lengths: [rows] real inputs in each row, 0..L; the rest is padding.
      eos_id: the id that leads every document in the store.
      start_id: the id the model sees at a document's start (BOS for data.document_start="bos");
        None or eos_id leaves the store's EOS.
    Returns:
      inputs, targets, segment_ids, positions: [rows, L] int32; weights: [rows, L] float32.
    """
    windows = np.asarray(windows)
    seq_len = windows.shape[1] - 1
    offsets = np.arange(seq_len, dtype=np.int32)
    real = offsets[None, :] < np.asarray(lengths, np.int64)[:, None]  # [rows, L]
    inputs = windows[:, :-1].astype(np.int32)
    targets = windows[:, 1:].astype(np.int32)
    starts = (inputs == eos_id) & real  # [rows, L] a document starts at this input
    # A row that begins inside a document continues it as segment 1, from position 0.
    segment_ids = (np.cumsum(starts, axis=1, dtype=np.int32) + ~starts[:, :1]).astype(np.int32)
    segment_start = np.maximum.accumulate(np.where(starts, offsets[None, :], 0), axis=1)
    positions = offsets[None, :] - segment_start
    if start_id is not None and start_id != eos_id:
        inputs = np.where(starts, np.int32(start_id), inputs)
    return {
        "inputs": np.where(real, inputs, 0),
        "targets": np.where(real, targets, 0),
        "segment_ids": np.where(real, segment_ids, 0),
        "positions": np.where(real, positions, 0).astype(np.int32),
        "weights": real.astype(np.float32),
    }


def full_rows(stream_len: int, seq_len: int) -> int:
    """How many full L-token rows a stream of stream_len tokens holds (the rest is < one row)."""
    return (stream_len - 1) // seq_len


def all_rows(stream_len: int, seq_len: int) -> int:
    """How many rows cover every input of the stream, the last possibly short."""
    return -(-(stream_len - 1) // seq_len)
