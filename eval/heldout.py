"""Held-out loss, perplexity and bits per byte of a model, on any mesh (what `heft eval` runs).

The held-out split is the data config's (the embedded corpus's last documents by default);
`--corpus` evaluates other text with the checkpoint's own tokenizer.
"""

import functools
import math

from heft.model.checks import ConfigError
from heft.train.checks import check_mesh_fields


def evaluate(config, params, mesh, prepared, batches: int = 0, bind=None) -> dict:
    """Loss per token (nats), perplexity and bits per UTF-8 byte of the held-out split.
    `bind(model config, params)` makes the model when it is not the float decoder (a quantized
    checkpoint's: heft.quantize.model.binder)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from heft.data import loader as data_loader
    from heft.data import tokenizer as tokenizers
    from heft.train import compiled, sharding, step

    tok = tokenizers.load(prepared.tokenizer_path)
    with sharding.activated(mesh, config):
        if bind is None:
            eval_fn = compiled.eval_step(config, mesh)
        else:  # the parameters' own shardings (they were placed on `mesh` when loaded)
            eval_fn = jax.jit(functools.partial(step.loss_sums, config, bind=bind),
                              out_shardings=sharding.replicated(mesh))
        total = count = 0.0
        n_bytes = 0
        for local in data_loader.heldout_batches(prepared, config.train.seq_len, config.train.batch_size,
                                                 batches or None, jax.process_index(), jax.process_count()):
            loss_sum, weight_sum = eval_fn(params, data_loader.global_batch(local, sharding.batch_sharding(config, mesh)))
            total += float(loss_sum)
            count += float(weight_sum)
            for row, w in zip(local["targets"], local["weights"]):
                # (ids past the tokenizer's, an encoder-decoder's span sentinels, stand for no text)
                ids = [int(t) for t in np.asarray(row)[np.asarray(w) > 0] if t < tok.vocab_size]
                n_bytes += len(tok.decode(ids).encode("utf-8"))
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
