"""From logical axis names to mesh axes: the rules table, read in one place.

`model/` names every parameter's and activation's axes (`embed`, `heads`, `batch`, ...);
`config.mesh.rules` (configs/base.py) maps each name to mesh axes (`slices`, `data`, `fsdp`, `expert`,
`tensor`, or none). Everything that asks where a named axis lives asks here: the parameters' and the
train state's shardings (sharding.py, state.py), the batch's, the experts' shard_map
(experts.py), the quantized weights' (heft.quantize), the config checks (checks.py).
"""

import math

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from heft.model.checks import ConfigError


def table(config) -> tuple:
    """`config.mesh.rules` as the tuple of (logical name, mesh axes) pairs flax reads."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)


def spec(names, config) -> PartitionSpec:
    """The mesh PartitionSpec for a tuple of logical axis names."""
    return nn.logical_to_mesh_axes(names, table(config))


def axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, a mesh axis, or a tuple of them) as a tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def size(axis_sizes, entry) -> int:
    """How many devices one PartitionSpec entry splits a dimension over; `axis_sizes` is a mesh's
    `shape` (or any {axis: size}; an axis it leaves out has size 1)."""
    return math.prod(axis_sizes.get(a, 1) for a in axes(entry))


def entries(pspec: PartitionSpec, ndim: int) -> tuple:
    """`pspec`'s entries padded with None to `ndim` dimensions."""
    return tuple(pspec) + (None,) * (ndim - len(tuple(pspec)))


def fitted(shape, pspec: PartitionSpec, mesh: Mesh) -> NamedSharding:
    """`pspec` for an array of `shape`, with the mesh axes of every dimension they do not divide dropped
    (a quantized weight's few scale groups, a packed last axis): that dimension is whole on every device."""
    kept = [entry if dim % size(mesh.shape, entry) == 0 else None
            for dim, entry in zip(shape, entries(pspec, len(shape)))]
    return NamedSharding(mesh, PartitionSpec(*kept))


def names_of(var: nnx.Variable) -> tuple:
    """A variable's logical axis names (its `out_sharding` metadata; all None when it has none)."""
    return var.get_metadata().get("out_sharding") or (None,) * len(var.shape)


def shardings(abstract_state, mesh: Mesh, config, fit: bool = False):
    """NamedShardings for an (abstract) nnx.State whose variables carry logical axis names.

    Raises ConfigError naming the parameter when a dimension is not divisible by its mesh axes; with
    `fit`, such a dimension is left whole instead (`fitted`).
    """

    def one(path, var):
        names = names_of(var)
        pspec = spec(names, config)
        if fit:
            return fitted(var.shape, pspec, mesh)
        for dim, name, entry in zip(var.shape, names, entries(pspec, len(var.shape))):
            if dim % size(mesh.shape, entry):
                where = ".".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(
                    f"parameter {where} has {name}={dim}, not divisible by mesh axes {entry} of size "
                    f"{size(mesh.shape, entry)}; change the model size, the mesh, or the rule for {name!r}"
                )
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
