"""The tokenizer: a sentencepiece model (BPE or unigram), how heft trains it, and how it is used.

Normalization is deliberately none: `normalization_rule_name="identity"`, no whitespace folding,
no dummy prefix. So `decode(encode(t)) == normalize(t)` for every string, where `normalize` only
maps U+2581 "▁" (sentencepiece's own symbol for a space) to " ". Newlines, tabs, runs of spaces
and any Unicode survive; `byte_fallback=True` spells characters the vocabulary lacks as their
UTF-8 bytes, so no text is unrepresentable and the unknown id is never produced.

Special ids are fixed: pad 0, unk 1, bos 2, eos 3.
"""

import io
import re
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from heft.data.errors import DataError

KINDS = ("bpe", "unigram")
PAD, UNK, BOS, EOS = 0, 1, 2, 3

# Every trainer option but the corpus, kind and vocab size. Part of the tokenizer's cache key
# (prepare.py), so changing one here retrains cached tokenizers.
TRAINER_OPTIONS = dict(
    byte_fallback=True,
    character_coverage=1.0,  # every character seen in training gets a piece
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,  # indentation of verse becomes a few pieces, not many
    split_digits=True,
    max_sentence_length=16384,  # bytes; pieces from `training_pieces` are shorter
    input_sentence_size=1_000_000,  # beyond this, sentencepiece trains on a random sample
    shuffle_input_sentence=True,
    pad_id=PAD,
    unk_id=UNK,
    bos_id=BOS,
    eos_id=EOS,
    minloglevel=2,  # sentencepiece's own logging is long; heft prints a summary
)


def training_pieces(texts: Iterable[str], max_chars: int = 4000) -> Iterator[str]:
    """Documents cut at line ends into pieces of at most max_chars: what sentencepiece trains on.

    sentencepiece skips training "sentences" longer than max_sentence_length, so long documents
    are cut; newlines stay inside the pieces so that the vocabulary learns them.
    """
    for text in texts:
        buf: list[str] = []
        n = 0
        for line in text.splitlines(keepends=True):
            while len(line) > max_chars:  # one very long line: cut it anywhere
                if n:
                    yield "".join(buf)
                    buf, n = [], 0
                yield line[:max_chars]
                line = line[max_chars:]
            if n + len(line) > max_chars and n:
                yield "".join(buf)
                buf, n = [], 0
            buf.append(line)
            n += len(line)
        if n:
            yield "".join(buf)


def train(texts: Iterable[str], kind: str, vocab: int, threads: int = 1) -> bytes:
    """Trains a sentencepiece model on `texts` (documents); returns the serialized model.

    Raises DataError if `kind` is unknown or `vocab` does not fit the corpus.
    """
    if kind not in KINDS:
        raise DataError(f"data.tokenizer={kind!r} is not one of {KINDS}; pick one")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_pieces(texts),
            model_writer=model,
            model_type=kind,
            vocab_size=vocab,
            num_threads=max(1, threads),
            **TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        most = re.search(r"value <= (\d+)", str(e))
        if "too high" in str(e) and most:
            raise DataError(
                f"model.vocab={vocab} is larger than this corpus can support for a {kind} tokenizer "
                f"(at most {most.group(1)}); lower model.vocab or add text to data.corpus"
            ) from None
        if "required_chars" in str(e) or "smaller than" in str(e):
            raise DataError(
                f"model.vocab={vocab} is too small for this corpus's {kind} tokenizer "
                f"(it needs 260 ids plus one per distinct character); raise model.vocab"
            ) from None
        raise
    return model.getvalue()


class Tokenizer:
    """A loaded sentencepiece model. `encode(str) -> list[int]`, `decode(list[int]) -> str`."""

    def __init__(self, model: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @staticmethod
    def normalize(text: str) -> str:
        """What `decode(encode(text))` returns: the text, with "▁" (U+2581) read as a space."""
        return text.replace("\u2581", " ")


def load(path: str) -> Tokenizer:
    """Loads a tokenizer from a sentencepiece .model file."""
    with open(path, "rb") as f:
        return Tokenizer(f.read())


# A process pool's workers each load the model once (`init_worker`), then encode batches.
_worker: Tokenizer | None = None


def init_worker(model: bytes) -> None:
    global _worker
    _worker = Tokenizer(model)


def encode_documents(texts: list[str]) -> list[np.ndarray]:
    """[num_docs] texts -> [num_docs] int32 arrays of token ids, in the worker's tokenizer."""
    assert _worker is not None, "init_worker was not called in this process"
    return [np.asarray(ids, np.int32) for ids in _worker.encode_batch(texts)]
