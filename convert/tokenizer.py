"""Tokenizers that travel with the weights: a Llama folder's sentencepiece `tokenizer.model`.

heft reads sentencepiece models only; a byte-level BPE tokenizer (GPT-2's vocab.json and
merges.txt, Llama 3's tokenizer.json) is left behind with a note saying so.
"""

import json
import os
import shutil

import sentencepiece as spm

SENTENCEPIECE = "tokenizer.model"
BPE_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def find(hf_dir: str) -> tuple[str | None, str | None]:
    """(path of the folder's sentencepiece model or None, a note saying why none is imported)."""
    path = os.path.join(hf_dir, SENTENCEPIECE)
    if os.path.exists(path):
        try:
            spm.SentencePieceProcessor(model_file=path)
            return path, None
        except (RuntimeError, OSError):
            return None, (f"{path} is not a sentencepiece model (Llama 3's is tiktoken BPE); heft reads "
                          "sentencepiece tokenizers only, so the weights are imported without a tokenizer")
    bpe = [f for f in BPE_FILES if os.path.exists(os.path.join(hf_dir, f))]
    if bpe:
        return None, (f"{hf_dir} has a byte-level BPE tokenizer ({', '.join(bpe)}), which heft does not support "
                      "(it reads sentencepiece tokenizer.model files); the weights are imported without a tokenizer")
    return None, f"{hf_dir} has no tokenizer; the weights are imported without one"


def special_ids(path: str | None) -> tuple[int | None, int | None]:
    """(bos, eos) ids of a sentencepiece model, None where it has none (or there is no model)."""
    if not path:
        return None, None
    sp = spm.SentencePieceProcessor(model_file=path)
    return (sp.bos_id() if sp.bos_id() >= 0 else None), (sp.eos_id() if sp.eos_id() >= 0 else None)


def write(path: str, out_dir: str) -> list[str]:
    """Copies the model as tokenizer.model, with the tokenizer_config.json that makes transformers'
    AutoTokenizer read it as a Llama tokenizer (BOS first, as Llama's adds it). Returns the files."""
    shutil.copyfile(path, os.path.join(out_dir, SENTENCEPIECE))
    sp = spm.SentencePieceProcessor(model_file=path)
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
              "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id()), "add_bos_token": sp.bos_id() >= 0,
              "add_eos_token": False, "legacy": True}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return [SENTENCEPIECE, "tokenizer_config.json"]
