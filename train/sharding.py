"""From logical axis names to devices: the mesh, the rules table, and placed parameters.

`model/` names every parameter's and activation's axes (`embed`, `heads`, `batch`, ...);
`config.mesh.rules` maps each name to mesh axes (`data`, `fsdp`, `tensor`). This module is the only
place the two meet. The mesh uses Auto axis types (classic GSPMD propagation between the named
constraints), which is what logical axis rules expect.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from heft.model.checks import ConfigError
from heft.model.decoder import Decoder, abstract, abstract_params

AXES = ("data", "fsdp", "tensor")


def mesh_shape(config, n_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes for `n_devices`, with one -1 filling the rest."""
    sizes = [config.mesh[a] for a in AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {dict(zip(AXES, sizes))} has more than one -1; at most one axis can fill")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {dict(zip(AXES, sizes))} has a size below 1; use positive sizes or -1")
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh {dict(zip(AXES, sizes))} cannot fill {n_devices} devices: {fixed} does not "
                f"divide {n_devices}; pick sizes whose product divides the device count"
            )
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but there are "
            f"{n_devices} devices; make the product equal the device count or set one axis to -1"
        )
    return tuple(sizes)


def make_mesh(config, devices=None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) shaped by `config.mesh`."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(config, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.array(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def rules(config) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)


def spec(names, config) -> PartitionSpec:
    """The mesh PartitionSpec for a tuple of logical axis names."""
    return nn.logical_to_mesh_axes(names, rules(config))


@contextlib.contextmanager
def activated(mesh: Mesh, config):
    """Within it, the model's activation constraints resolve against `mesh` and the rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules(config)):
        yield


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def param_shardings(abstract_state, mesh: Mesh, config):
    """NamedShardings for an (abstract) nnx.State whose variables carry logical `out_sharding`.

    Raises ConfigError naming the parameter when a dimension is not divisible by its mesh axes.
    """

    def one(path, var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        pspec = spec(names, config)
        for dim, names_i, axes in zip(var.shape, names, tuple(pspec) + (None,) * len(var.shape)):
            if dim % _axis_size(mesh, axes):
                where = ".".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(
                    f"parameter {where} has {names_i}={dim}, not divisible by mesh axes {axes} of size "
                    f"{_axis_size(mesh, axes)}; change the model size, the mesh, or the rule for {names_i!r}"
                )
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def param_dict_shardings(m, mesh: Mesh, config) -> dict:
    """NamedShardings of the model's parameters as a nested dict (the form `init_params` returns)."""
    _, abstract_state = abstract(m)
    return nnx.to_pure_dict(param_shardings(abstract_state, mesh, config))


def state_shardings(config, mesh: Mesh) -> dict:
    """Shardings of the whole train state: Adam's moments are laid out like their parameters."""
    import optax

    from heft.train import optimizer

    params = param_dict_shardings(config.model, mesh, config)
    tx = optimizer.make_for(config)
    opt = optax.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_params(config.model)), params,
        transform_non_params=lambda _: replicated(mesh),
    )
    return {"step": replicated(mesh), "params": params, "opt_state": opt}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(config, mesh: Mesh) -> NamedSharding:
    """How a [batch, length] array of tokens is laid out."""
    return NamedSharding(mesh, spec(("batch", "length"), config))


def create_model(config, mesh: Mesh, seed: int | None = None) -> Decoder:
    """Initializes the model directly into its shards: no device ever holds the whole of it."""
    seed = config.train.seed if seed is None else seed
    graphdef, abstract_state = abstract(config.model)
    shardings = param_shardings(abstract_state, mesh, config)

    @jax.jit
    def init():
        state = nnx.state(Decoder(config.model, nnx.Rngs(seed)))
        return jax.lax.with_sharding_constraint(state, shardings)

    with activated(mesh, config):
        state = init()
    return nnx.merge(graphdef, state)
