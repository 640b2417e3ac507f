"""`heft convert --from_hf=HF_DIR --out=NEW` / `--to_hf=CHECKPOINT --out=HF_DIR`: Hugging Face safetensors
folders in and out of heft checkpoints (convert/checkpoints.py), local or gs://."""

from absl import flags

from heft.convert.checkpoints import run_export, run_import
from heft.convert.errors import ConvertError
from heft.launch.flags import define_verify_key


def define_flags():
    flags.DEFINE_string("from_hf", None, "a Hugging Face model folder (config.json + safetensors) to import")
    flags.DEFINE_string("to_hf", None, "a heft checkpoint (workdir, step or parameters-only) to export")
    flags.DEFINE_string("out", None, "a new directory: the heft checkpoint, or the Hugging Face folder")
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                      "import: the dtype heft keeps parameters in (bfloat16 weights widen to float32 exactly)")
    flags.DEFINE_enum("dtype", "param", ["param", "float32", "bfloat16"],
                      "export: dtype of the written tensors; param keeps model.param_dtype")
    flags.DEFINE_integer("max_shard_mb", 2048, "export: the largest safetensors file, in MiB")
    define_verify_key()


def main(argv):
    del argv
    f = flags.FLAGS
    if bool(f.from_hf) == bool(f.to_hf) or not f.out:
        raise ConvertError("pass --from_hf=HF_DIR or --to_hf=CHECKPOINT (one of the two) and --out=NEW_DIR")
    if f.from_hf:
        config = run_import(f.from_hf, f.out, f.param_dtype)
        print(f"heft convert: wrote {config.name} checkpoint {f.out} from {f.from_hf}")
    else:
        files = run_export(f.to_hf, f.out, None if f.dtype == "param" else f.dtype, f.max_shard_mb * 1024**2,
                           verify_key=f.verify_key)
        print(f"heft convert: wrote {len(files)} files to {f.out} ({', '.join(files)})")
