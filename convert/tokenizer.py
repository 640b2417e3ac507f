"""Tokenizers that travel with the weights: a sentencepiece `tokenizer.model` (Llama 1 and 2) or a
Hugging Face `tokenizer.json` (Llama 3, GPT-2 and most models since), read by heft.data.tokenizer.

A folder with both (Llama 2's hub folders) keeps its sentencepiece model; Llama 3's `tokenizer.model`
is tiktoken's format, not sentencepiece, so its `tokenizer.json` is taken. Folders and files may be
local or in a bucket (gs://): tokenizers are read as bytes.
"""

import json

from etils import epath

from heft.convert import hf_folder, paths
from heft.convert.errors import ConvertError
from heft.data import tokenizer as tokenizers
from heft.data.errors import DataError, TokenizerFormatError

SENTENCEPIECE = "tokenizer.model"
HF_JSON = "tokenizer.json"
OLD_BPE_FILES = ("vocab.json", "merges.txt")  # GPT-2's files before tokenizer.json
# The largest hub tokenizers (a few hundred thousand pieces) are tens of MB; read none beyond this.
MAX_BYTES = 256 << 20


def _load(path: epath.Path):
    return tokenizers.from_bytes(hf_folder.read_bytes(path, MAX_BYTES))


def _readable(path: epath.Path) -> bool:
    try:
        _load(path)
        return True
    except (RuntimeError, OSError, DataError):
        return False


def find(hf_dir: epath.Path) -> tuple[epath.Path | None, str | None]:
    """(path of the folder's tokenizer file or None, a note saying what was left behind and why).

    A tokenizer.json the tokenizers library cannot parse (a newer format, say) is left behind with a
    note, and the weights are imported alone. One it parses that heft cannot use (its template names a
    token not in its vocabulary) stops the import (ConvertError), as one past its size limit, outside
    the folder or not a regular file does: the file is the folder's tokenizer, and it is broken."""
    spm = hf_folder.member(hf_dir, SENTENCEPIECE)
    if spm and _readable(spm):
        return spm, None
    hf = hf_folder.member(hf_dir, HF_JSON)
    if hf:
        try:
            _load(hf)
        except TokenizerFormatError:
            return None, (f"{hf} cannot be read by the tokenizers library; the weights are imported without a "
                          "tokenizer")
        except DataError as e:
            raise ConvertError(f"{hf}: {e} (or delete it to import the weights without a tokenizer)") from None
        return hf, None
    if spm:
        return None, (f"{spm} is not a sentencepiece model and the folder has no {HF_JSON}; the weights are "
                      "imported without a tokenizer")
    old = [f for f in OLD_BPE_FILES if (hf_dir / f).exists()]  # never read
    if old:
        return None, (f"{hf_dir} has {' and '.join(old)} but no {HF_JSON}; save the tokenizer with transformers "
                      "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) to write one, then import again")
    return None, f"{hf_dir} has no tokenizer; the weights are imported without one"


def check_specials(path: epath.Path | None, hf: dict) -> str | None:
    """A note when config.json's bos/eos ids are not the ones heft reads from the tokenizer file."""
    if not path:
        return None
    tok = _load(path)
    said = []
    for name, mine in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)):
        theirs = hf.get(name)
        theirs = theirs[0] if isinstance(theirs, list) and theirs else theirs
        if theirs is not None and theirs != mine:
            said.append(f"config.json's {name}={theirs} but heft reads {mine if mine >= 0 else 'none'} "
                        f"from {path.name}")
    return "; ".join(said) + " (generation stops at heft's)" if said else None


def special_ids(path: epath.Path | None) -> tuple[int | None, int | None]:
    """(bos, eos) ids of a tokenizer file, None where it has none (or there is no file)."""
    if not path:
        return None, None
    tok = _load(path)
    return (tok.bos_id if tok.bos_id >= 0 else None), (tok.eos_id if tok.eos_id >= 0 else None)


def write(path: epath.Path, out_dir: epath.Path) -> list[str]:
    """Copies the tokenizer under its own name, with the tokenizer_config.json that makes transformers'
    AutoTokenizer read it (a LlamaTokenizer for sentencepiece, BOS first as Llama's adds it; a fast
    tokenizer for tokenizer.json). Returns the files written."""
    tok = _load(path)
    piece = lambda i: tok.piece(i) if i >= 0 else None  # noqa: E731
    if isinstance(tok, tokenizers.HFTokenizer):
        paths.copy(path, out_dir / HF_JSON)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(tok.bos_id),
                  "eos_token": piece(tok.eos_id), "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id)}
        name = HF_JSON
    else:
        paths.copy(path, out_dir / SENTENCEPIECE)
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
                  "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id), "add_bos_token": tok.bos_id >= 0,
                  "add_eos_token": False, "legacy": True}
        name = SENTENCEPIECE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return [name, "tokenizer_config.json"]
