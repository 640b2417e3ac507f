"""From logical axis names to devices: the mesh, the rules table, and placed parameters.

`model/` names every parameter's and activation's axes (`embed`, `heads`, `batch`, ...);
`config.mesh.rules` maps each name to mesh axes (`slices`, `data`, `fsdp`, `expert`, `tensor`). This
module is the only place the two meet (with train/experts.py, which runs a mixture of experts' layers
over the mesh). The mesh uses Auto axis types (classic GSPMD propagation between the
named constraints), which is what logical axis rules expect.

`slices` is the outermost level, the one that crosses the data-center network (DCN) between TPU
slices, as MaxText's `dcn_*_parallelism`: the rules put only the batch on it (data parallelism across
slices), so every parameter is whole within a slice and only its gradient crosses the DCN, once a
step. `data`, `fsdp`, `expert` and `tensor` stay within a slice, on its chip-to-chip links (ICI).
`expert` (expert parallelism) splits a mixture of experts' experts, and the batch with them; it is
1, and changes nothing, for dense models and for configs saved before it existed.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from heft.model import moe
from heft.model.checks import ConfigError, sparse
from heft.model.decoder import Decoder, abstract, abstract_params
from heft.train import experts

AXES = ("slices", "data", "fsdp", "expert", "tensor")
IN_SLICE = AXES[1:]


def slices(config) -> int:
    """`mesh.slices`; 1 for configs saved before the field existed (a checkpoint's manifest)."""
    return config.mesh.get("slices", 1)


def mesh_shape(config, n_devices: int) -> tuple[int, ...]:
    """The (slices, data, fsdp, expert, tensor) sizes for `n_devices`, with one -1 filling the rest of a slice."""
    k = slices(config)
    if n_devices % k:
        raise ConfigError(f"mesh.slices={k} does not divide the {n_devices} devices; set it to the number of "
                          "slices the run spans")
    n, where = n_devices // k, "" if k == 1 else f" in each of the {k} slices"
    sizes = [config.mesh.get(a, 1) for a in IN_SLICE]  # expert: 1 in configs saved before it existed
    named = dict(zip(IN_SLICE, sizes))
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {named} has more than one -1; at most one axis can fill")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {named} has a size below 1; use positive sizes or -1")
    if -1 in sizes:
        if n % fixed:
            raise ConfigError(
                f"mesh {named} cannot fill {n} devices{where}: {fixed} does not "
                f"divide {n}; pick sizes whose product divides the device count"
            )
        sizes[sizes.index(-1)] = n // fixed
    if math.prod(sizes) != n:
        raise ConfigError(
            f"mesh {'*'.join(IN_SLICE)} = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but there are "
            f"{n} devices{where}; make the product equal the device count or set one axis to -1"
        )
    return (k, *sizes)


def make_mesh(config, devices=None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) shaped by `config.mesh`."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(config, len(devices))
    auto = (AxisType.Auto,) * len(AXES)
    found = {getattr(d, "slice_index", 0) for d in devices}
    if len(found) > 1 and len(found) != shape[0]:
        raise ConfigError(f"the devices form {len(found)} TPU slices but mesh.slices={shape[0]}; set "
                          f"--config.mesh.slices={len(found)}")
    if shape[0] > 1:
        return Mesh(_slice_grid(shape, devices, len(found) > 1), AXES, axis_types=auto)
    if devices == jax.devices():
        return jax.make_mesh(shape, AXES, axis_types=auto)
    return Mesh(np.array(devices).reshape(shape), AXES, axis_types=auto)


def _slice_grid(shape, devices, by_slice_index: bool) -> np.ndarray:
    """Devices laid out as [slices, data, fsdp, expert, tensor], each slice whole on one index of the first axis.

    TPU devices say which slice they are on (`slice_index`): JAX's hybrid mesh groups them by it and
    orders each slice for its torus. Devices that do not (CPU, GPU) are cut into equal consecutive
    blocks: whole processes when the process count divides by the slices (jax.devices() lists them
    process by process), as a multi-node GPU run's DCN is its nodes' network.
    """
    if by_slice_index:
        return mesh_utils.create_hybrid_device_mesh((1,) + tuple(shape[1:]), (shape[0],) + (1,) * (len(shape) - 1), devices,
                                                    allow_split_physical_axes=True)
    if devices[0].platform == "tpu":
        raise ConfigError(f"mesh.slices={shape[0]} but these TPU devices are one slice; set --config.mesh.slices=1 "
                          "or run on that many slices")
    return np.array(devices).reshape(shape)


def rules(config) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)


def spec(names, config) -> PartitionSpec:
    """The mesh PartitionSpec for a tuple of logical axis names."""
    return nn.logical_to_mesh_axes(names, rules(config))


@contextlib.contextmanager
def activated(mesh: Mesh, config):
    """Within it, the model's activation constraints resolve against `mesh` and the rules, and a
    mixture of experts runs its experts over the mesh (train/experts.py)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules(config)), contextlib.ExitStack() as stack:
        if sparse(config.model):
            stack.enter_context(moe.experts_by(experts.parallel(mesh, config)))
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
    # Under optax.multi_transform (μP's per-width groups) each group's state holds a MaskedNode where
    # a parameter belongs to another group: it stays one, having no array to place.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_map_params(
        tx, lambda state, sharding: state if masked(state) else sharding,
        jax.eval_shape(tx.init, abstract_params(config.model)), params,
        transform_non_params=lambda _: replicated(mesh), is_leaf=masked,
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
