"""`heft convert`: Hugging Face safetensors folders <-> heft parameters-only checkpoints.

    heft convert --from_hf=DIR --out=CHECKPOINT   # Llama or GPT-2 config.json + safetensors
    heft convert --to_hf=CHECKPOINT --out=DIR
    heft convert --from_hf=gs://bucket/llama --out=gs://bucket/heft/llama   # folders in buckets too

The imported checkpoint carries the heft config (and a Llama's sentencepiece tokenizer.model),
so `heft eval` and `heft generate` read it directly.
"""

import contextlib

from absl import flags

from heft.convert import paths
from heft.convert.errors import ConvertError


def define_flags():
    flags.DEFINE_string("from_hf", None, "a Hugging Face model folder (config.json + safetensors) to import")
    flags.DEFINE_string("to_hf", None, "a heft checkpoint (workdir, step or parameters-only) to export")
    flags.DEFINE_string("out", None, "a new directory: the heft checkpoint, or the Hugging Face folder")
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                      "import: the dtype heft keeps parameters in (bfloat16 weights widen to float32 exactly)")
    flags.DEFINE_enum("dtype", "param", ["param", "float32", "bfloat16"],
                      "export: dtype of the written tensors; param keeps model.param_dtype")
    flags.DEFINE_integer("max_shard_mb", 2048, "export: the largest safetensors file, in MiB")


def run_import(hf_dir: str, out: str, param_dtype: str = "float32"):
    """Imports `hf_dir` into a parameters-only checkpoint `out`, split over every device. Either may
    be a local folder or a gs:// one."""
    paths.check_import_folder(out)  # before the slow part, and before the imports that take seconds
    from flax import nnx

    from heft.convert import hf, tokenizer
    from heft.train import checkpoint

    overrides = {"model.param_dtype": param_dtype}
    config = hf.heft_config(hf_dir, overrides)  # fails early, before any weight is read
    sentencepiece, note = tokenizer.find(hf_dir)
    if note:
        print(f"heft convert: {note}", flush=True)
    config, params = hf.import_hf(hf_dir, checkpoint.serving_mesh(config), overrides)
    with contextlib.ExitStack() as stack:
        local = stack.enter_context(paths.local_copy(sentencepiece)) if sentencepiece else None
        checkpoint.save_params(out, config, nnx.to_pure_dict(params), local, imported_from=hf_dir)
    return config


def run_export(checkpoint_dir: str, out: str, dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3):
    """Exports a heft checkpoint as a Hugging Face folder `out`; returns the files written. Either
    may be a local folder or a gs:// one."""
    paths.check_export_folder(out)  # before the slow load
    from heft.convert import hf
    from heft.train import checkpoint

    config, params, tokenizer = checkpoint.load_params(checkpoint_dir)
    return hf.export_hf(config, params, out, max_shard_bytes, dtype, tokenizer)


def main(argv):
    del argv
    f = flags.FLAGS
    if bool(f.from_hf) == bool(f.to_hf) or not f.out:
        raise ConvertError("pass --from_hf=HF_DIR or --to_hf=CHECKPOINT (one of the two) and --out=NEW_DIR")
    if f.from_hf:
        config = run_import(f.from_hf, f.out, f.param_dtype)
        print(f"heft convert: wrote {config.name} checkpoint {f.out} from {f.from_hf}")
    else:
        files = run_export(f.to_hf, f.out, None if f.dtype == "param" else f.dtype, f.max_shard_mb * 1024**2)
        print(f"heft convert: wrote {len(files)} files to {f.out} ({', '.join(files)})")
