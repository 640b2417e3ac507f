"""`heft export --checkpoint=WORKDIR --out=DIR`: a parameters-only checkpoint for serving.

It holds the parameters (no optimizer state, a third of a train state's size under Adam), the
config, the tokenizer and a manifest; `heft eval`, `heft generate` and `heft convert` read it.
"""

from absl import flags

from heft.launch.flags import define_verify_key


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a training checkpoint or workdir (its newest checkpoint)")
    flags.DEFINE_string("out", None, "a new directory for the parameters-only checkpoint")
    define_verify_key()


def main(argv):
    del argv
    f = flags.FLAGS
    from heft.train import checkpoint
    from heft.train.manifest import CheckpointError

    if not f.checkpoint or not f.out:
        raise CheckpointError("heft export needs --checkpoint=DIR and --out=NEW_DIR")
    source = checkpoint.export_params(f.checkpoint, f.out, verify_key=f.verify_key)
    print(f"wrote parameters-only checkpoint {f.out} from {source}")
