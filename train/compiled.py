"""The jitted train and eval steps with their shardings: one definition that `heft train` runs and
`heft plan` compiles for a TPU topology, so the plan measures the very program that will run."""

import functools

import jax
from jax.sharding import Mesh

from heft.data import rows
from heft.train import sharding, step
from heft.train import state as train_state


def train_step(config, mesh: Mesh):
    """`step.train_step` jitted over `mesh`: (state, batch) -> (state, metrics), state donated.

    Trace and compile it inside `sharding.activated(mesh, config)`.
    """
    state_sh = train_state.shardings(config, mesh)
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


def abstract_batch(config, mesh: Mesh, batch_size: int | None = None, seq_len: int | None = None) -> dict:
    """The batch a step reads, as ShapeDtypeStructs laid out over `mesh`: the rows data/rows.py lists
    for the config's family, [batch, row length] each."""
    batch, sh = batch_size or config.train.batch_size, sharding.batch_sharding(config, mesh)
    return {k: jax.ShapeDtypeStruct((batch, n), rows.dtype(k), sharding=sh)
            for k, n in rows.lengths(config, seq_len).items()}


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
