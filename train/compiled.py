"""The jitted train and eval steps with their shardings: one definition that `heft train` runs and
`heft plan` compiles for a TPU topology, so the plan measures the very program that will run."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from heft.data import seq2seq
from heft.train import sharding, step

BATCH_KEYS = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
              "segment_ids": jnp.int32, "weights": jnp.float32}


def train_step(config, mesh: Mesh):
    """`step.train_step` jitted over `mesh`: (state, batch) -> (state, metrics), state donated.

    Trace and compile it inside `sharding.activated(mesh, config)`.
    """
    state_sh = sharding.state_shardings(config, mesh)
    batch_sh = sharding.batch_sharding(config, mesh)
    return jax.jit(
        functools.partial(step.train_step, config),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def eval_step(config, mesh: Mesh):
    """(params, batch) -> (loss sum, weight sum), over `mesh`."""
    params_sh = sharding.param_dict_shardings(config.model, mesh, config)
    return jax.jit(
        functools.partial(step.eval_step, config),
        in_shardings=(params_sh, sharding.batch_sharding(config, mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def init_state(config, mesh: Mesh) -> dict:
    """A fresh train state created directly in its shards."""
    with sharding.activated(mesh, config):
        return jax.jit(lambda: step.init_state(config), out_shardings=sharding.state_shardings(config, mesh))()


def abstract_state(config, mesh: Mesh) -> dict:
    """The train state as ShapeDtypeStructs carrying their shardings (for AOT compiles, restores)."""
    shapes = jax.eval_shape(lambda: step.init_state(config))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, sharding.state_shardings(config, mesh))


def abstract_batch(config, mesh: Mesh, batch_size: int | None = None, seq_len: int | None = None) -> dict:
    shape = (batch_size or config.train.batch_size, seq_len or config.train.seq_len)
    sh = sharding.batch_sharding(config, mesh)
    if seq2seq.is_encoder_decoder(config):  # the encoder's rows, and the decoder's (data/seq2seq.py)
        return {k: jax.ShapeDtypeStruct((shape[0], n), jnp.float32 if k == "weights" else jnp.int32, sharding=sh)
                for k, n in seq2seq.row_lengths(config, shape[1]).items()}
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh) for k, dt in BATCH_KEYS.items()}


def use_compilation_cache(config) -> str | None:
    """Turns on JAX's persistent compilation cache, so a restart (a preemption, a resumed job, the
    next run of the same shape) loads its compiled step instead of compiling it again.

    `train.compilation_cache`: a directory (local or gs://, which a whole pod can share and which
    survives preemption), "none" to turn it off, or "" for $JAX_COMPILATION_CACHE_DIR, else
    $HEFT_CACHE/compile, else ~/.cache/heft/compile. Returns the directory in use.
    """
    import os

    from heft.data import prepare

    where = config.train.get("compilation_cache", "")
    if where == "none":
        return None
    where = where or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(prepare.cache_dir("") / "compile")
    jax.config.update("jax_compilation_cache_dir", where)
    return where
