"""`heft merge --checkpoint=FINETUNE --out=DIR`: a fine-tune and its base as one parameters-only checkpoint.

LoRA is folded into its projections (and full fine-tuning's weights put in place), giving a plain
model of the base's architecture that every verb reads, `heft convert --to_hf` included; adapters,
a prefix or a prompt stay as the model's own pieces, which heft eval and heft generate read.
"""

from absl import flags

from heft.launch.flags import define_verify_key


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a fine-tune: its workdir (the newest step) or a step directory")
    flags.DEFINE_string("out", None, "a new directory for the merged parameters-only checkpoint")
    define_verify_key()


def main(argv):
    del argv
    f = flags.FLAGS
    from heft.train.manifest import CheckpointError

    if not f.checkpoint or not f.out:
        raise CheckpointError("heft merge needs --checkpoint=FINETUNE and --out=NEW_DIR")
    from heft.adapt import load

    merged = load.merge(f.checkpoint, f.out, verify_key=f.verify_key)
    kept = (f"; it keeps its {', '.join(f'{k}={v}' for k, v in merged['hooks'].items())} (heft eval and generate read "
            "it; Hugging Face export needs lora or full)") if merged["hooks"] else ""
    print(f"heft merge: wrote {f.out}: the {merged['method']} fine-tune {f.checkpoint} (step {merged['step']}) merged "
          f"into its base {merged['base']}{kept}")
