"""The tokenizer: a sentencepiece model (BPE or unigram), how heft trains it, and how it is used;
or a Hugging Face `tokenizer.json` that came with imported weights (`HFTokenizer`, at the end).

Normalization is deliberately none: `normalization_rule_name="identity"`, no whitespace folding,
no dummy prefix. So `decode(encode(t)) == normalize(t)` for every string, where `normalize` only
maps U+2581 "▁" (sentencepiece's own symbol for a space) to " ". Newlines, tabs, runs of spaces
and any Unicode survive; `byte_fallback=True` spells characters the vocabulary lacks as their
UTF-8 bytes, so no text is unrepresentable and the unknown id is never produced.

Special ids are fixed: pad 0, unk 1, bos 2, eos 3.

Training is deterministic: the same texts, kind, vocab and thread count give the same model bytes
in any process on any host, so hosts that train separately still agree on every id. Two things
make it so. sentencepiece's own sampling of a large input (`input_sentence_size`) varies from
process to process even under `set_random_generator_seed` (measured with 0.2.3), so heft samples
the training pieces itself, with a seeded reservoir, and hands sentencepiece exactly those; and
sentencepiece's generator is seeded for whatever else it draws.
"""

import io
import os
import random
import re
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from heft.data.errors import DataError, TokenizerFormatError

KINDS = ("bpe", "unigram")
PAD, UNK, BOS, EOS = 0, 1, 2, 3
SEED = 0  # of the sample of training pieces, and of sentencepiece's generator

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
    # Beyond this many pieces training uses a sample; `sample` takes it, so sentencepiece's own
    # (which these two options would start) never runs. Kept so that model files stay as before.
    input_sentence_size=1_000_000,
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


SAMPLE_PIECES = TRAINER_OPTIONS["input_sentence_size"]  # training pieces beyond this are sampled down to it


def sample(pieces: Iterable[str], size: int | None = None, seed: int = SEED) -> list[str]:
    """At most `size` of `pieces`, chosen uniformly by a seeded reservoir (Algorithm R).

    Fewer than `size` pieces come back whole and in order; the same pieces and seed always give
    the same sample.
    """
    size = SAMPLE_PIECES if size is None else size
    rng = random.Random(seed)
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if i < size:
            out.append(piece)
        elif (j := rng.randrange(i + 1)) < size:
            out[j] = piece
    return out


def train(texts: Iterable[str], kind: str, vocab: int, threads: int = 1) -> bytes:
    """Trains a sentencepiece model on `texts` (documents); returns the serialized model.

    Deterministic (see the module docstring). Raises DataError if `kind` is unknown or `vocab`
    does not fit the corpus.
    """
    if kind not in KINDS:
        raise DataError(f"data.tokenizer={kind!r} is not one of {KINDS}; pick one")
    pieces = sample(training_pieces(texts))
    model = io.BytesIO()
    spm.set_random_generator_seed(SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(pieces),
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


def read(path: "str | os.PathLike") -> bytes:
    """The bytes of a tokenizer file (sentencepiece .model or tokenizer.json), local or on gs://.
    Raises DataError if it is missing."""
    from heft.data import paths  # here, not above: tokenizing workers import this module and read no files

    try:
        return paths.path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"the tokenizer {path} does not exist; check the path (or the checkpoint it came from)") from None


def load(path: str) -> "Tokenizer | HFTokenizer":
    """Loads a tokenizer from a sentencepiece .model file or a tokenizer.json, local or on gs://."""
    return from_bytes(read(path))


def is_json(model: bytes) -> bool:
    """Whether tokenizer bytes are a Hugging Face tokenizer.json (sentencepiece models are protobuf)."""
    return model.lstrip()[:1] == b"{"


def from_bytes(model: bytes) -> "Tokenizer | HFTokenizer":
    """The tokenizer these bytes hold, of either kind."""
    return HFTokenizer(model) if is_json(model) else Tokenizer(model)


# A process pool's workers each load the model once (`init_worker`), then encode batches.
_worker: "Tokenizer | HFTokenizer | None" = None


def init_worker(model: bytes) -> None:
    global _worker
    _worker = from_bytes(model)


def encode_documents(texts: list[str]) -> list[np.ndarray]:
    """[num_docs] texts -> [num_docs] int32 arrays of token ids, in the worker's tokenizer."""
    assert _worker is not None, "init_worker was not called in this process"
    return [np.asarray(ids, np.int32) for ids in _worker.encode_batch(texts)]


# Hugging Face tokenizer.json (Llama 3, GPT-2, ... as imported by heft convert).

# A tokenizer.json does not say which of its special tokens begins or ends a text (transformers
# reads that from tokenizer_config.json); heft takes BOS from the post-processor's template (what
# Llama 3 puts first) and otherwise both from these names, the conventions of the model families.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>")


def _template_first(spec: dict) -> str | None:
    """The special token a TemplateProcessing post-processor puts first in a single text, if any."""
    processors = spec.get("processors", [spec]) if spec.get("type") == "Sequence" else [spec]
    for p in processors:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None


class HFTokenizer:
    """A Hugging Face tokenizer.json, through the `tokenizers` library, with `Tokenizer`'s interface.

    `encode` adds no special tokens (heft leads every document with its own start token, as the
    store and the prompts do); `decode` drops special tokens, as sentencepiece drops its control ids.
    Special ids are -1 where the file has none (see BOS_NAMES).
    """

    def __init__(self, model: bytes):
        import json

        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_str(model.decode("utf-8"))
        except Exception as e:  # the Rust parser raises plain Exceptions
            raise TokenizerFormatError(f"the tokenizer.json cannot be read by the tokenizers library ({str(e)[:200]}); "
                                       "pass the file as saved by transformers or tokenizers") from None
        spec = json.loads(model)
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        first = _template_first(spec.get("post_processor") or {})
        if first and self._tok.token_to_id(first) is None:
            raise DataError(f"tokenizer.json's post_processor template starts with {first!r}, which is not in its "
                            "vocabulary; add the token to added_tokens or fix the template")
        self.bos_id: int = self._tok.token_to_id(first) if first else self._named(special, BOS_NAMES)
        self.eos_id: int = self._named(special, EOS_NAMES)
        if self.eos_id < 0 and len(special) == 1:  # a single special token ends texts (GPT-2-like)
            self.eos_id = next(iter(special.values()))
        self.pad_id: int = self._named(special, PAD_NAMES)
        self.unk_id: int = self._named(special, UNK_NAMES)

    @staticmethod
    def _named(special: dict, names: tuple[str, ...]) -> int:
        return next((special[n] for n in names if n in special), -1)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    @staticmethod
    def normalize(text: str) -> str:
        """What `decode(encode(text))` returns for a byte-level BPE without a normalizer: the text."""
        return text
