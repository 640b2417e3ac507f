"""`heft size --config=configs/NAME.py [--batch N] [--seq_len N] [--json]`: what a config costs, from the
abstract model (model/size.py); nothing is allocated."""

import json

from absl import flags


def define_flags():
    from heft.launch.flags import define_config

    define_config()
    flags.DEFINE_integer("batch", None, "global batch in sequences (default: train.batch_size)")
    flags.DEFINE_integer("seq_len", None, "sequence length (default: train.seq_len)")
    flags.DEFINE_bool("json", False, "print one JSON object instead of a table")


def main(argv):
    del argv
    f = flags.FLAGS
    from heft.train import size  # here, not above: `heft size --help` needs no JAX

    r = size.report(f.config, f.batch, f.seq_len, quantized=_quantized(f.config))
    print(json.dumps(r) if f.json else size.table(r))


def _quantized(config) -> dict:
    """{label: abstract quantized parameters} for int8 and int4 at the config's quantize.group_size
    (qwix builds the structure abstractly: nothing is allocated). Empty without qwix installed."""
    try:
        import qwix  # noqa: F401
    except ImportError:
        return {}
    from heft.model.checks import sparse
    from heft.quantize import model

    if sparse(config.model):  # heft quantize refuses a mixture of experts: the int rows stay estimates
        return {}
    out = {}
    for weights in ("int8", "int4"):
        c = config.copy_and_resolve_references()
        c.quantize.update(weights=weights, qat=False)
        label = f"{weights}/g{c.quantize.group_size}" if c.quantize.group_size else weights
        out[label] = model.abstract_params(c)
    return out
