"""What a checkpoint records besides its arrays: the config as JSON, the data's hashes, the tokenizer.

A training save writes these as its `facts` item, so that a later process can seal the step exactly
as the run that wrote it would have; the manifest (train/manifest.py) carries them for every reader.
"""

import base64
import hashlib
import json

import ml_collections
from etils import epath

from heft.data import paths
from heft.model.checks import sparse
from heft.train import storage

TOKENIZER = "tokenizer.model"
# A checkpoint carries its tokenizer under the name of its kind: sentencepiece's tokenizer.model, or
# Hugging Face's tokenizer.json (imported Llama 3, GPT-2...); `tokenizer_file` tells them apart.
TOKENIZERS = (TOKENIZER, "tokenizer.json")


def config_to_json(config) -> str:
    return config.to_json(sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


def config_dict(config) -> dict:
    return json.loads(config_to_json(config))


# Model fields that decide the parameters' shapes, dtypes or meaning: a checkpoint's must match.
# The rest (remat, compute dtype, RoPE base, norm epsilon, the document mask...) may change on resume.
PARAMETER_FIELDS = ("vocab", "width", "depth", "heads", "kv_heads", "head_dim", "mlp_width", "use_bias",
                    "tied_embeddings", "positions", "norm", "activation", "param_dtype", "mlp")
# A mixture of experts' (model/moe.py), which decide its parameters only when model.mlp=moe.
MOE_PARAMETER_FIELDS = ("moe.experts", "moe.top_k", "moe.expert_width")


def saved_config(saved: dict) -> dict:
    """A manifest's config as today's fields read it (one saved before model.mlp existed is dense)."""
    if "model" in saved and "mlp" not in saved["model"]:
        return {**saved, "model": {**saved["model"], "mlp": "dense"}}
    return saved


def differences(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, saved value, current value) for every field that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def model_differences(saved: dict, config) -> list[tuple[str, object, object]]:
    """The differences between a checkpoint's config (`saved`, as its manifest holds it) and `config`
    in the model fields that decide what its parameters are."""
    saved = saved_config(saved)
    if not isinstance(saved.get("model"), dict):
        return []  # nothing to compare against (a manifest always records the model)
    fields = PARAMETER_FIELDS + (("max_len",) if config.model.positions == "learned" else ())
    fields += MOE_PARAMETER_FIELDS if sparse(config.model) else ()
    diffs = differences(saved["model"], config_dict(config)["model"], "model.")
    return [d for d in diffs if d[0][len("model."):] in fields]


def described(diffs) -> str:
    return ", ".join(f"{k}={a!r} in the checkpoint but {b!r} now" for k, a, b in diffs)


def data_facts(prepared) -> dict:
    """What identifies the data a run trains on: the tokenizer's and the corpus's hashes."""
    if prepared is None:
        return {}
    meta = getattr(prepared, "metadata", {}) or {}
    sources = [s.get("sha256", "") for s in meta.get("sources", [])]
    return {
        "corpus": meta.get("corpus"),
        "corpus_sha256": hashlib.sha256("\n".join(sources).encode()).hexdigest() if sources else None,
        "tokenizer_sha256": (meta.get("tokenizer") or {}).get("sha256"),
        "documents": meta.get("documents"),
        "tokens": meta.get("tokens"),
    }


def tokenizer_file(data: bytes) -> str:
    """The name a checkpoint keeps tokenizer bytes under: tokenizer.json for JSON, else tokenizer.model."""
    return TOKENIZERS[1] if data.lstrip()[:1] == b"{" else TOKENIZER


def tokenizer_in(directory: epath.Path, files) -> str | None:
    """The path of the tokenizer a checkpoint's manifest lists, or None."""
    name = next((n for n in TOKENIZERS if n in files), None)
    return str(directory / name) if name else None


def tokenizer_bytes(prepared) -> bytes | None:
    p = getattr(prepared, "tokenizer_path", None) if prepared is not None else None
    if not p:
        return None
    p = paths.path(p)  # a path the prepared data records as a string
    return p.read_bytes() if p.exists() else None


def read_facts(step_dir: epath.Path) -> dict:
    """The `facts` item a training save wrote (what sealing needs)."""
    return storage.read_json(step_dir / "facts" / "metadata")


def seal_facts(facts: dict) -> tuple[dict, dict]:
    """(manifest facts, extra files to write beside the data) from a save's facts item."""
    facts = dict(facts)
    tokenizer = facts.pop("tokenizer_base64", None)
    if not tokenizer:
        return facts, {}
    data = base64.b64decode(tokenizer)
    return facts, {tokenizer_file(data): data}
