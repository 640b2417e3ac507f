"""The train state: {"step": int32[], "params": nested dict, "opt_state": optax state}.

Everything a resume needs besides the data loader's position, in one pytree that orbax saves whole.
The same functions serve every trainee: pretraining's params are the whole model's
(`fresh`, `shardings`, `abstract`, `init`), a fine-tune's are its trainable weights
(heft.adapt.finetune): it gives its params' shardings and its optimizer to `new` and `layout`.
Import it as `train_state`: `state` is what every caller calls the tree itself.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from heft.model import build
from heft.train import optimizer, sharding


def new(params: dict, tx: optax.GradientTransformation) -> dict:
    """A fresh state at step 0 for `params` (arrays, or ShapeDtypeStructs under eval_shape)."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def layout(params: dict, abstract_params: dict, tx: optax.GradientTransformation, mesh: Mesh) -> dict:
    """Shardings of the state whose parameters are laid out as `params` (NamedShardings, the shape of
    `abstract_params`): Adam's moments like their parameters, scalars (counts) replicated."""
    # Under optax.multi_transform (μP's per-width groups) each group's state holds a MaskedNode where
    # a parameter belongs to another group: it stays one, having no array to place.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_map_params(
        tx, lambda state, sh: state if masked(state) else sh, jax.eval_shape(tx.init, abstract_params), params,
        transform_non_params=lambda _: sharding.replicated(mesh), is_leaf=masked,
    )
    return {"step": sharding.replicated(mesh), "params": params, "opt_state": opt}


# Pretraining's state: every parameter of the model, from train.seed, with the run's optimizer.


def fresh(config) -> dict:
    """Pretraining's fresh state, unplaced (jit it, or `init` for one made in its shards)."""
    return new(build.init_params(config.model, config.train.seed), optimizer.make_for(config))


def shardings(config, mesh: Mesh) -> dict:
    """Shardings of pretraining's state on `mesh`, from the rules table."""
    return layout(sharding.param_dict_shardings(config.model, mesh, config), build.abstract_params(config.model),
                  optimizer.make_for(config), mesh)


def abstract(config, mesh: Mesh) -> dict:
    """Pretraining's state as ShapeDtypeStructs carrying their shardings (for AOT compiles, restores)."""
    return sharding.placed(jax.eval_shape(lambda: fresh(config)), shardings(config, mesh))


def init(config, mesh: Mesh) -> dict:
    """Pretraining's fresh state, created directly in its shards: no device holds the whole of it."""
    with sharding.activated(mesh, config):
        return jax.jit(lambda: fresh(config), out_shardings=shardings(config, mesh))()
