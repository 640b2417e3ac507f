"""The mesh, and arrays placed on it: parameters, batches, abstract arrays with their shardings.

`model/` names every parameter's and activation's axes (`embed`, `heads`, `batch`, ...);
`config.mesh.rules` maps each name to mesh axes (`slices`, `data`, `fsdp`, `expert`, `tensor`), read
in one place (rules.py). This module builds the mesh and places things on it; the train state's
shardings are state.py's. The mesh uses Auto axis types (classic GSPMD propagation between the
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

from heft.model import build, moe
from heft.model.checks import ConfigError, sparse
from heft.train import experts, rules

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


@contextlib.contextmanager
def activated(mesh: Mesh, config):
    """Within it, the model's activation constraints resolve against `mesh` and the rules, and a
    mixture of experts runs its experts over the mesh (train/experts.py)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.table(config)), contextlib.ExitStack() as stack:
        if sparse(config.model):
            stack.enter_context(moe.experts_by(experts.parallel(mesh, config)))
        yield


def placed(shapes, shardings):
    """`shapes` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs carrying `shardings` (a tree of the
    same structure): what a restore reads into and an ahead-of-time compile takes."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def param_dict_shardings(m, mesh: Mesh, config) -> dict:
    """NamedShardings of the model's parameters as a nested dict (the form `build.init_params` returns).

    Raises ConfigError naming the parameter when a dimension is not divisible by its mesh axes."""
    _, abstract_state = build.abstract(m)
    return nnx.to_pure_dict(rules.shardings(abstract_state, mesh, config))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(config, mesh: Mesh) -> NamedSharding:
    """How a [batch, length] array of tokens is laid out."""
    return NamedSharding(mesh, rules.spec(("batch", "length"), config))


def create_model(config, mesh: Mesh, seed: int | None = None):
    """Initializes the model directly into its shards: no device ever holds the whole of it."""
    seed = config.train.seed if seed is None else seed
    graphdef, abstract_state = build.abstract(config.model)
    shardings = rules.shardings(abstract_state, mesh, config)

    @jax.jit
    def init():
        return jax.lax.with_sharding_constraint(nnx.state(build.create(config.model, seed)), shardings)

    with activated(mesh, config):
        state = init()
    return nnx.merge(graphdef, state)
