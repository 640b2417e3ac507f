"""Tokenizers that travel with the weights: a Llama folder's sentencepiece `tokenizer.model`.

heft reads sentencepiece models only; a byte-level BPE tokenizer (GPT-2's vocab.json and
merges.txt, Llama 3's tokenizer.json) is left behind with a note saying so. Folders and models may
be local or in a bucket (gs://): models are read as bytes, which sentencepiece takes directly.
"""

import json

import sentencepiece as spm

from heft.convert import paths

SENTENCEPIECE = "tokenizer.model"
BPE_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def _load(path: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=paths.path(path).read_bytes())


def find(hf_dir: str) -> tuple[str | None, str | None]:
    """(path of the folder's sentencepiece model or None, a note saying why none is imported)."""
    path = paths.join(hf_dir, SENTENCEPIECE)
    if paths.path(path).exists():
        try:
            _load(path)
            return path, None
        except (RuntimeError, OSError):
            return None, (f"{path} is not a sentencepiece model (Llama 3's is tiktoken BPE); heft reads "
                          "sentencepiece tokenizers only, so the weights are imported without a tokenizer")
    bpe = [f for f in BPE_FILES if paths.path(hf_dir).joinpath(f).exists()]
    if bpe:
        return None, (f"{hf_dir} has a byte-level BPE tokenizer ({', '.join(bpe)}), which heft does not support "
                      "(it reads sentencepiece tokenizer.model files); the weights are imported without a tokenizer")
    return None, f"{hf_dir} has no tokenizer; the weights are imported without one"


def special_ids(path: str | None) -> tuple[int | None, int | None]:
    """(bos, eos) ids of a sentencepiece model, None where it has none (or there is no model)."""
    if not path:
        return None, None
    sp = _load(path)
    return (sp.bos_id() if sp.bos_id() >= 0 else None), (sp.eos_id() if sp.eos_id() >= 0 else None)


def write(path: str, out_dir: str) -> list[str]:
    """Copies the model as tokenizer.model, with the tokenizer_config.json that makes transformers'
    AutoTokenizer read it as a Llama tokenizer (BOS first, as Llama's adds it). Returns the files."""
    paths.copy(path, paths.join(out_dir, SENTENCEPIECE))
    sp = _load(path)
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
              "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id()), "add_bos_token": sp.bos_id() >= 0,
              "add_eos_token": False, "legacy": True}
    paths.path(out_dir).joinpath("tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return [SENTENCEPIECE, "tokenizer_config.json"]
