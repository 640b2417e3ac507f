"""`heft convert`: Hugging Face safetensors folders <-> heft parameters-only checkpoints.

    heft convert --from_hf=DIR --out=CHECKPOINT   # Llama or GPT-2 config.json + safetensors
    heft convert --to_hf=CHECKPOINT --out=DIR
    heft convert --from_hf=gs://bucket/llama --out=gs://bucket/heft/llama   # folders in buckets too

The imported checkpoint carries the heft config (and the tokenizer: tokenizer.model or tokenizer.json),
so `heft eval` and `heft generate` read it directly.
"""

import contextlib

from etils import epath

from heft.convert import paths
from heft.data import paths as data_paths


def run_import(hf_dir: epath.PathLike, out: epath.PathLike, param_dtype: str = "float32"):
    """Imports `hf_dir` into a parameters-only checkpoint `out`, split over every device. Either may
    be a local folder or a gs:// one."""
    hf_dir, out = data_paths.path(hf_dir), data_paths.path(out)
    paths.check_import_folder(out)  # before the slow part, and before the imports that take seconds
    from flax import nnx

    from heft.convert import hf, tokenizer
    from heft.train import checkpoint

    overrides = {"model.param_dtype": param_dtype}
    config = hf.heft_config(hf_dir, overrides)  # fails early, before any weight is read
    tokenizer_file, note = tokenizer.find(hf_dir)
    note = note or tokenizer.check_specials(tokenizer_file, hf.read_config(hf_dir))
    if note:
        print(f"heft convert: {note}", flush=True)
    config, params = hf.import_hf(hf_dir, checkpoint.serving_mesh(config), overrides)
    with contextlib.ExitStack() as stack:
        local = stack.enter_context(paths.local_copy(tokenizer_file)) if tokenizer_file else None
        checkpoint.save_params(out, config, nnx.to_pure_dict(params), local, imported_from=str(hf_dir))
    return config


def run_export(checkpoint_dir: epath.PathLike, out: epath.PathLike, dtype: str | None = None,
               max_shard_bytes: int = 2 * 1024**3, verify_key: str | None = None):
    """Exports a heft checkpoint as a Hugging Face folder `out`; returns the files written. Either
    may be a local folder or a gs:// one. With `verify_key`, the checkpoint's seal must be signed by it."""
    out = data_paths.path(out)
    paths.check_export_folder(out)  # before the slow load
    from heft.convert import hf
    from heft.train import checkpoint

    config, params, tokenizer = checkpoint.load_params(checkpoint_dir, verify_key=verify_key)
    return hf.export_hf(config, params, out, max_shard_bytes, dtype, tokenizer)
