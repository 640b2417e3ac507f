"""Prompt/completion pairs, for fine-tuning: the loss falls on the completion alone.

`data.format="prompt_completion"` reads the corpus's .jsonl (or .jsonl.xz) files as one example a
line, `{"prompt": "...", "completion": "..."}` (the fields `data.prompt_field` and
`data.completion_field` name). An example becomes one segment of a row:

    inputs:   START p p p c c c
    targets:  p     p p c c c EOS
    weights:  0     0 0 1 1 1 1

so the model learns to continue the prompt with the completion and then to stop; the prompt is
context, never a target. START is what leads every document (`data.document_start`).

Examples are packed whole, in file order, into rows of `train.seq_len` tokens, as many as fit,
each its own segment with positions from 0 (the document mask keeps them apart); the rest of a row
is padding (weight 0). Pretraining's packing cuts documents across rows, which here would train a
completion without its prompt. An example longer than a row keeps the end of its prompt (and the
start of its completion, if the completion alone is too long); `metadata["truncated"]` counts them.

Unlike pretraining's token store, pairs are held in memory and tokenized by every process with the
same given tokenizer (a checkpoint's: a fine-tune reads text with its base's ids). Fine-tuning
sets are small: the embedded task's 5,258 examples tokenize in under a second. The last
`data.heldout_fraction` of the examples are the held-out split.
"""

import dataclasses
import hashlib

import numpy as np

from heft.data import corpus, tokenizer
from heft.data.errors import DataError

FORMATS = ("text", "prompt_completion")
SUFFIXES = (".jsonl", ".jsonl.xz")
KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Prompt/completion examples packed into rows of one length, and what identifies them.

    `metadata` has the keys custody and the loop read from a token store's (corpus, sources,
    documents, tokens, tokenizer); `rows[split]` is a dict of [rows, seq_len] arrays (KEYS).
    """

    tokenizer_path: str
    metadata: dict
    rows: dict
    seq_len: int
    document_start: str = "eos"

    def split_rows(self, split: str, seq_len: int) -> dict[str, np.ndarray]:
        """The packed rows of `split` ("train" or "heldout"); the loader asks for its own length."""
        if seq_len != self.seq_len:
            raise DataError(f"the prompt/completion data was packed into rows of {self.seq_len} tokens, not "
                            f"{seq_len}; prepare it again with train.seq_len={seq_len}")
        rows = self.rows[split]
        if not len(rows["inputs"]):
            raise DataError(f"the {split} split of the prompt/completion data is empty; add examples or "
                            "change data.heldout_fraction")
        return rows

    def tokenizer(self):
        return tokenizer.load(self.tokenizer_path)


def _field(record, lineno: int, path: str, name: str, config_field: str) -> str:
    if not isinstance(record, dict) or name not in record:
        raise DataError(f"{path}:{lineno} has no {name!r} field; each line of prompt/completion data is "
                        f'{{"prompt": ..., "completion": ...}} (or set data.{config_field} to the field that holds it)')
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno} field {name!r} is a {type(value).__name__}, not a string; "
                        f"make it text (or set data.{config_field})")
    return value


def read(files: list[str], prompt_field: str, completion_field: str) -> list[tuple[str, str]]:
    """Every (prompt, completion) of the files, in order. Raises DataError naming the first bad line."""
    examples = []
    for path in files:
        if not path.endswith(SUFFIXES):
            raise DataError(f"{path} is not a .jsonl file; data.format=prompt_completion reads one "
                            '{"prompt": ..., "completion": ...} object a line from .jsonl or .jsonl.xz files')
        for lineno, record in corpus.json_lines(path):
            examples.append((_field(record, lineno, path, prompt_field, "prompt_field"),
                             _field(record, lineno, path, completion_field, "completion_field")))
    if not examples:
        raise DataError(f"the prompt/completion data {', '.join(files[:3])} holds no example; add some")
    return examples


def example(prompt: list[int], completion: list[int], seq_len: int, start_id: int, eos_id: int):
    """One example's (inputs, targets, weights), each [n <= seq_len], and whether it was cut."""
    inputs = [start_id] + prompt + completion
    targets = prompt + completion + [eos_id]
    weights = [0.0] * len(prompt) + [1.0] * (len(completion) + 1)
    cut = max(0, len(inputs) - seq_len)
    if cut > len(prompt):  # the completion alone is too long: keep its start
        return inputs[len(prompt):][:seq_len], targets[len(prompt):][:seq_len], weights[len(prompt):][:seq_len], True
    if cut:  # keep the end of the prompt, next to its completion
        inputs = inputs[:1] + inputs[1 + cut:]
        return inputs, targets[cut:], weights[cut:], True
    return inputs, targets, weights, False


def pack(examples, seq_len: int) -> dict[str, np.ndarray]:
    """Rows from (inputs, targets, weights) examples, whole and in order, as many to a row as fit.

    Returns KEYS -> [rows, seq_len] arrays (int32; weights float32); segment ids number the
    examples in a row from 1, positions restart at 0 for each, padding is 0 everywhere.
    """
    rows: list[list[tuple]] = []
    used = seq_len  # forces a first row
    for ex in examples:
        if used + len(ex[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex[0])
    out = {k: np.zeros((len(rows), seq_len), np.float32 if k == "weights" else np.int32) for k in KEYS}
    for r, row in enumerate(rows):
        at = 0
        for segment, (inputs, targets, weights) in enumerate(row, start=1):
            span = slice(at, at + len(inputs))
            out["inputs"][r, span], out["targets"][r, span], out["weights"][r, span] = inputs, targets, weights
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(len(inputs))
            at += len(inputs)
    return out


def prepare(config, tokenizer_path: str | None) -> Pairs:
    """Reads, tokenizes and packs `config.data`'s prompt/completion examples with the given tokenizer."""
    d = config.data
    if not tokenizer_path:
        raise DataError("data.format=prompt_completion needs a trained tokenizer: fine-tune from a checkpoint "
                        "that holds one (heft finetune --base=...), or prepare a text corpus first")
    files = list(corpus.find(d.corpus))
    texts = read(files, d.get("prompt_field", "prompt"), d.get("completion_field", "completion"))
    n_heldout = corpus.heldout_count(len(texts), d.heldout_fraction)
    tok_bytes = tokenizer.read(tokenizer_path)
    tok = tokenizer.load(tokenizer_path)
    start = d.get("document_start", "eos")
    start_id = tok.bos_id if start == "bos" else tok.eos_id
    if start_id < 0:
        raise DataError(f"data.document_start={start!r} but the tokenizer {tokenizer_path} has no such id; "
                        "set data.document_start to the other")
    prompts = tok.encode_batch([p for p, _ in texts])
    completions = tok.encode_batch([c for _, c in texts])
    seq_len = int(config.train.seq_len)
    examples = [example(list(p), list(c), seq_len, start_id, tok.eos_id) for p, c in zip(prompts, completions)]
    split = len(examples) - n_heldout
    rows = {"train": pack([e[:3] for e in examples[:split]], seq_len),
            "heldout": pack([e[:3] for e in examples[split:]], seq_len)}
    sources = [{"path": path, "sha256": corpus.file_sha256(path)} for path in files]
    metadata = {
        "corpus": d.corpus,
        "format": "prompt_completion",
        "sources": sources,
        "documents": len(examples),
        "tokens": int(sum(len(e[0]) for e in examples)),
        "completion_tokens": int(sum(sum(e[2]) for e in examples)),
        "truncated": int(sum(e[3] for e in examples)),
        "tokenizer": {"path": str(tokenizer_path), "sha256": hashlib.sha256(tok_bytes).hexdigest(),
                      "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "split": {"heldout_fraction": float(d.heldout_fraction), "train_documents": split,
                  "heldout_documents": n_heldout},
    }
    return Pairs(str(tokenizer_path), metadata, rows, seq_len, start)


def unigram_cross_entropy(pairs: Pairs) -> float:
    """Nats per completion token of the held-out split under the training completions' unigram
    distribution (add-one smoothed): what a model that ignores the prompt would score."""
    def counts(rows):
        keep = rows["weights"] > 0
        return np.bincount(rows["targets"][keep], minlength=pairs.metadata["tokenizer"]["vocab_size"])

    train = counts(pairs.rows["train"]) + 1.0
    heldout = counts(pairs.rows["heldout"])
    return float(-(heldout * np.log(train / train.sum())).sum() / max(heldout.sum(), 1))
