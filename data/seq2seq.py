"""Rows for an encoder-decoder (`model.family=encoder_decoder`): what the encoder reads and the decoder writes.

A batch holds, for each row:

    encoder_inputs, encoder_segment_ids    [rows, train.seq_len]     the input
    inputs, targets, segment_ids, weights  [rows, target_len]        the decoder's side

The decoder's inputs are `model.decoder_start` followed by the targets but the last, example by
example; segment ids number the examples packed in a row from 1 on both sides (example k's decoder
tokens attend to example k's encoder tokens only) and mark padding with 0 (weight 0):

    encoder_inputs:   x x x x EOS  y y EOS    0        encoder_segment_ids: 1 1 1 1 1  2 2 2  0
    inputs:           S a a        S b        0        segment_ids:         1 1 1      2 2    0
    targets:          a a EOS      b EOS      0        weights:             1 1 1      1 1    0

Two sources fill it. Pretraining: T5's span corruption of the token store (spans.py), one
corrupted window of the stream per row. Fine-tuning: input/target pairs, the prompt/completion
.jsonl of pairs.py (the prompt is the input, the completion the target), tokenized with a
checkpoint's tokenizer and packed here whole, as many to a row as fit on both sides. An input ends
with EOS, as T5's do; one too long keeps its end (and the EOS), a target too long its start.
"""

import hashlib

import numpy as np

from heft.data import corpus, pairs, tokenizer
from heft.data.errors import DataError

KEYS = ("encoder_inputs", "encoder_segment_ids", "inputs", "targets", "segment_ids", "weights")
ENCODER_KEYS = ("encoder_inputs", "encoder_segment_ids")


def is_encoder_decoder(config) -> bool:
    """`model.family == "encoder_decoder"` (heft.model.checks.family's rule: data/ sits below model/)."""
    return config.model.get("family", "decoder") == "encoder_decoder"


def target_len(config, span_targets: int | None = None) -> int:
    """The decoder's row length: `train.target_len`, or when 0 the span corruption's own targets
    length (`span_targets`, for text) or train.seq_len (for pairs)."""
    n = int(config.train.get("target_len", 0) or 0)
    if n < 0:
        raise DataError(f"train.target_len={n} must be >= 0 (0: span corruption's own length, or train.seq_len)")
    if n:
        return n
    return span_targets if span_targets is not None else int(config.train.seq_len)


def encoder_tokens(ids: list[int], eos_id: int) -> list[int]:
    """An input as the encoder reads it: its tokens, then EOS (T5's format; `heft generate` too)."""
    return list(ids) + [eos_id]


def example(prompt: list[int], completion: list[int], seq_len: int, target_len: int, eos_id: int):
    """(encoder tokens [<= seq_len], targets [<= target_len]) of one pair, and whether either was cut."""
    source = encoder_tokens(prompt[max(0, len(prompt) + 1 - seq_len):], eos_id)
    targets = (list(completion) + [eos_id])[:target_len]
    return source, targets, len(prompt) + 1 > seq_len or len(completion) + 1 > target_len


def empty_rows(rows: int, seq_len: int, target_len: int) -> dict[str, np.ndarray]:
    """Zeroed batch arrays (KEYS) for `rows` rows: all padding."""
    return {k: np.zeros((rows, seq_len if k in ENCODER_KEYS else target_len),
                        np.float32 if k == "weights" else np.int32) for k in KEYS}


def put(out: dict, row: int, at: tuple[int, int], segment: int, source, targets, start_id: int) -> None:
    """Writes one example into `out` (KEYS arrays) at `row`, from (encoder, decoder) offsets `at`."""
    e, d = at
    out["encoder_inputs"][row, e:e + len(source)] = source
    out["encoder_segment_ids"][row, e:e + len(source)] = segment
    out["targets"][row, d:d + len(targets)] = targets
    out["inputs"][row, d:d + len(targets)] = [start_id] + list(targets[:-1])
    out["segment_ids"][row, d:d + len(targets)] = segment
    out["weights"][row, d:d + len(targets)] = 1.0


def pack(examples, seq_len: int, target_len: int, start_id: int) -> dict[str, np.ndarray]:
    """Rows from (encoder tokens, targets) examples, whole and in order, as many to a row as fit on
    both sides. Returns KEYS -> [rows, seq_len] (encoder) or [rows, target_len] (decoder) arrays."""
    rows: list[list[tuple]] = []
    used = (seq_len, target_len)  # forces a first row
    for source, targets in examples:
        if used[0] + len(source) > seq_len or used[1] + len(targets) > target_len:
            rows.append([])
            used = (0, 0)
        rows[-1].append((source, targets))
        used = (used[0] + len(source), used[1] + len(targets))
    out = empty_rows(len(rows), seq_len, target_len)
    for r, row in enumerate(rows):
        at = (0, 0)
        for segment, (source, targets) in enumerate(row, start=1):
            put(out, r, at, segment, source, targets, start_id)
            at = (at[0] + len(source), at[1] + len(targets))
    return out


def prepare(config, tokenizer_path: str | None) -> pairs.Pairs:
    """Reads, tokenizes and packs `config.data`'s prompt/completion .jsonl as input/target pairs with
    the given tokenizer (a fine-tune's base's)."""
    d = config.data
    if not tokenizer_path:
        raise DataError("data.format=prompt_completion needs a trained tokenizer: fine-tune from a checkpoint "
                        "that holds one (heft finetune --base=...), or prepare a text corpus first")
    files = list(corpus.find(d.corpus))
    texts = pairs.read(files, d.get("prompt_field", "prompt"), d.get("completion_field", "completion"))
    n_heldout = corpus.heldout_count(len(texts), d.heldout_fraction)
    tok_bytes = tokenizer.read(tokenizer_path)
    tok = tokenizer.load(tokenizer_path)
    seq_len, n = int(config.train.seq_len), target_len(config)
    start_id = int(config.model.get("decoder_start", 0))
    prompts = tok.encode_batch([p for p, _ in texts])
    completions = tok.encode_batch([c for _, c in texts])
    examples = [example(p, c, seq_len, n, tok.eos_id) for p, c in zip(prompts, completions)]
    split = len(examples) - n_heldout
    rows = {"train": pack([e[:2] for e in examples[:split]], seq_len, n, start_id),
            "heldout": pack([e[:2] for e in examples[split:]], seq_len, n, start_id)}
    metadata = {
        "corpus": d.corpus,
        "format": "prompt_completion",
        "sources": [{"path": path, "sha256": corpus.file_sha256(path)} for path in files],
        "documents": len(examples),
        "tokens": int(sum(len(s) + len(t) for s, t, _ in examples)),
        "completion_tokens": int(sum(len(t) for _, t, _ in examples)),
        "truncated": int(sum(cut for _, _, cut in examples)),
        "tokenizer": {"path": str(tokenizer_path), "sha256": hashlib.sha256(tok_bytes).hexdigest(),
                      "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "split": {"heldout_fraction": float(d.heldout_fraction), "train_documents": split,
                  "heldout_documents": n_heldout},
    }
    return pairs.Pairs(str(tokenizer_path), metadata, rows, seq_len, d.get("document_start", "eos"))
