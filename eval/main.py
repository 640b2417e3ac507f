"""`heft eval --checkpoint=DIR`: held-out loss, perplexity and bits per byte, on any mesh.

The held-out split is the data config's (the embedded corpus's last documents by default);
`--corpus` evaluates other text with the checkpoint's own tokenizer.
"""

import json
import math
import sys

from absl import flags

from heft.model.checks import ConfigError
from heft.train.checks import batch_devices, check_mesh_fields
from heft.train.manifest import CheckpointError


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a checkpoint, a workdir (its newest one) or a params-only dir")
    flags.DEFINE_string("corpus", None, "evaluate this corpus's held-out split instead (.txt/.jsonl/.parquet)")
    flags.DEFINE_integer("batches", 0, "held-out batches to evaluate; 0 means the whole split")
    flags.DEFINE_integer("batch_size", 0, "global batch in sequences (default: the checkpoint's)")
    flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes, e.g. 1,2,4 (default: fsdp over all devices)")
    flags.DEFINE_bool("skip_verify", False, "restore without checking the manifest's hashes")
    flags.DEFINE_bool("json", False, "print one JSON object")


def evaluate(config, params, mesh, prepared, batches: int = 0) -> dict:
    """Loss per token (nats), perplexity and bits per UTF-8 byte of the held-out split."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from heft.data import loader as data_loader
    from heft.data import tokenizer as tokenizers
    from heft.train import compiled, sharding

    tok = tokenizers.load(prepared.tokenizer_path)
    with sharding.activated(mesh, config):
        eval_fn = compiled.eval_step(config, mesh)
        total = count = 0.0
        n_bytes = 0
        for local in data_loader.heldout_batches(prepared, config.train.seq_len, config.train.batch_size,
                                                 batches or None, jax.process_index(), jax.process_count()):
            loss_sum, weight_sum = eval_fn(params, data_loader.global_batch(local, sharding.batch_sharding(config, mesh)))
            total += float(loss_sum)
            count += float(weight_sum)
            for row, w in zip(local["targets"], local["weights"]):
                n_bytes += len(tok.decode([int(t) for t in np.asarray(row)[np.asarray(w) > 0]]).encode("utf-8"))
    n_bytes = int(np.asarray(multihost_utils.process_allgather(np.int64(n_bytes))).sum())
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
            "tokens": int(count), "bytes": n_bytes}


def parse_mesh(text: str) -> tuple[int, int, int]:
    """`--mesh=1,2,4` -> (data, fsdp, tensor); a ConfigError naming the fix for anything else."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ConfigError(f"--mesh={text} is not three sizes data,fsdp,tensor; pass e.g. --mesh=1,2,4 "
                          "(one of them may be -1: the devices the others leave)")
    sizes = {"data": int(parts[0]), "fsdp": int(parts[1]), "tensor": int(parts[2])}
    check_mesh_fields(sizes)
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def check_batch(config, mesh) -> None:
    """The evaluation batch splits evenly over the devices that hold the batch."""
    n = batch_devices(config, mesh)
    if config.train.batch_size % n:
        raise ConfigError(f"--batch_size={config.train.batch_size} does not split over the {n} devices that hold "
                          f"the batch on mesh {dict(mesh.shape)}; pass a multiple of {n}, or another --mesh")


def check_flags(f) -> None:
    """The flags' own mistakes, before the checkpoint is even opened."""
    if not f.checkpoint:
        raise CheckpointError("heft eval needs --checkpoint=DIR (a workdir, a step directory or a params-only dir)")
    if f.batches < 0 or f.batch_size < 0:
        raise ConfigError(f"--batches={f.batches} and --batch_size={f.batch_size} cannot be negative "
                          "(0 means the whole split and the checkpoint's batch size)")
    if f.mesh:
        parse_mesh(f.mesh)


def main(argv):
    del argv
    f = flags.FLAGS
    check_flags(f)  # before the imports that take seconds
    from heft.data import processes as data_processes
    from heft.train import checkpoint, sharding

    directory = checkpoint.resolve(f.checkpoint)
    config = checkpoint.read_config(directory)
    if f.mesh:
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = parse_mesh(f.mesh)
    if f.batch_size:
        config.train.batch_size = f.batch_size
    if f.corpus:
        config.data.corpus = f.corpus
    mesh = sharding.make_mesh(config) if f.mesh else checkpoint.serving_mesh(config)
    check_batch(config, mesh)  # before the slow load
    config, params, tokenizer_path = checkpoint.load_params(directory, mesh=mesh, verify=not f.skip_verify,
                                                            config=config)
    # The checkpoint's own tokenizer decides the ids; without one (a checkpoint saved outside
    # heft train), the data config's tokenizer is rebuilt as training built it.
    prepared = data_processes.prepare_for_processes(config, tokenizer_path=tokenizer_path, progress=sys.stderr.isatty())
    result = evaluate(config, params, mesh, prepared, f.batches)
    if f.json:
        print(json.dumps(result))
    else:
        print(f"held-out loss {result['eval_loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
              f"{result['bits_per_byte']:.4f} bits/byte over {result['tokens']:,} tokens "
              f"({result['bytes']:,} bytes) on mesh {dict(mesh.shape)}")
