"""`heft quantize --checkpoint=DIR --out=NEW --weights=int8|int4 [--group_size=N]`: weight-only
post-training quantization with qwix (quantize/); `heft eval` and `heft generate` read the result."""

import time

from absl import flags

from heft.launch.flags import define_verify_key
from heft.model.checks import ConfigError
from heft.train.manifest import CheckpointError


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a float checkpoint: a workdir (its newest step), a step or a params-only dir")
    flags.DEFINE_string("out", None, "a new directory for the quantized parameters-only checkpoint (local or gs://)")
    flags.DEFINE_enum("weights", "int8", ["int8", "int4"], "the integer type of the matmul weights")
    flags.DEFINE_integer("group_size", 0, "inputs per scale along each weight's contraction axis; 0: one scale per "
                         "output channel")
    define_verify_key()


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.checkpoint or not f.out:
        raise CheckpointError("heft quantize needs --checkpoint=DIR (a float checkpoint) and --out=NEW_DIR")
    import jax

    from heft.quantize import checkpoint as qcheckpoint
    from heft.quantize import model, rules
    from heft.train import checkpoint, size

    source = checkpoint.resolve(f.checkpoint)
    config = checkpoint.read_config(source)
    if rules.is_quantized(config):
        raise ConfigError(f"{source} is already quantized ({rules.describe(config)}); quantize its float checkpoint")
    qconfig = config.copy_and_resolve_references()
    qconfig.quantize = dict(rules.section(config), weights=f.weights, group_size=f.group_size, qat=False)
    rules.check(qconfig)  # a group size that does not divide a width stops here, before the load
    model.qwix()
    start = time.perf_counter()
    loaded = checkpoint.load(source, accept=(checkpoint.FLOAT,), verify_key=f.verify_key)
    params, facts = loaded.params, loaded.facts
    qparams = model.quantize(qconfig, params, jax.tree.leaves(params)[0].sharding.mesh)
    qcheckpoint.save(f.out, qconfig, qparams, loaded.tokenizer, quantized_from=str(source), step=facts.get("step"),
                     tokens_seen=facts.get("tokens_seen"))
    before, after = sum(size.bytes_by_dtype(params).values()), sum(size.bytes_by_dtype(qparams).values())
    print(f"heft quantize: wrote {f.out} ({rules.describe(qconfig)}) from {source}: parameters "
          f"{before / 2**20:,.2f} MiB -> {after / 2**20:,.2f} MiB, in {time.perf_counter() - start:.1f} s")
