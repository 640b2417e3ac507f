"""Quantized checkpoints: parameters-only checkpoints (train/checkpoint/params.py's `save_params`, sealed
with a manifest like any other) whose config's `quantize` section says what the arrays are.

int8 values are stored as they are. int4 values are packed two to a byte before saving — orbax
would give each its own byte — along the last axis: byte j of a row holds values 2j (low nibble)
and 2j + 1 (high nibble), the row padded with a zero to an even length. Scales keep their dtype.

Importing this module registers the `quantized` kind with heft.train.checkpoint's one loader:
`checkpoint.load` then reads a quantized checkpoint like any other, with the `bind` that runs it.
"""

import jax
import jax.numpy as jnp
from etils import epath

from heft.quantize import model, rules
from heft.train import checkpoint, sharding
from heft.train import rules as mesh_rules


def _is_int4(x) -> bool:
    return jnp.dtype(x.dtype) == jnp.dtype(jnp.int4)


def packed_shape(shape: tuple) -> tuple:
    """The uint8 shape an int4 array of `shape` is stored in."""
    return tuple(shape[:-1]) + (-(-shape[-1] // 2),)


def pack(x):
    """int4 [..., n] -> uint8 [..., ceil(n / 2)], two values per byte."""
    if x.shape[-1] % 2:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 1)])
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jax.lax.bitcast_convert_type(pairs, jnp.uint8)


def unpack(b, n: int):
    """uint8 [..., m] -> int4 [..., n]: `pack`'s inverse (n is the unpacked length, 2m or 2m - 1)."""
    pairs = jax.lax.bitcast_convert_type(b, jnp.int4)  # [..., m, 2]
    return pairs.reshape(*b.shape[:-1], 2 * b.shape[-1])[..., :n]


def _stored_abstract(config, mesh) -> dict:
    """What a quantized checkpoint holds, as ShapeDtypeStructs with their shardings on `mesh`."""
    shardings = model.shardings(config, mesh)

    def one(x, sh):
        if _is_int4(x):
            shape = packed_shape(x.shape)
            return jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=mesh_rules.fitted(shape, sh.spec, mesh))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    return jax.tree.map(one, model.abstract_params(config), shardings)


def _convert(tree, to_shardings, fn, like=None):
    """`fn` over every leaf of `tree` (or, with `like`, unpacking each leaf whose counterpart in
    `like` is int4), jitted into `to_shardings`."""
    if like is None:
        return jax.jit(lambda t: jax.tree.map(fn, t), out_shardings=to_shardings)(tree)
    return jax.jit(lambda t: jax.tree.map(lambda b, x: unpack(b, x.shape[-1]) if _is_int4(x) else b, t, like),
                   out_shardings=to_shardings)(tree)


def save(directory: epath.PathLike, config, qparams: dict, tokenizer_path: epath.PathLike | None = None,
         **facts) -> None:
    """A sealed parameters-only checkpoint of quantized parameters (int4 packed)."""
    mesh = jax.tree.leaves(qparams)[0].sharding.mesh
    stored = jax.tree.map(lambda s: s.sharding, _stored_abstract(config, mesh))
    with sharding.activated(mesh, config):
        packed = _convert(qparams, stored, lambda x: pack(x) if _is_int4(x) else x)
    checkpoint.save_params(directory, config, packed, tokenizer_path, quantized=rules.describe(config), **facts)


def _load(directory: epath.Path, facts: dict, config, mesh, verify: bool) -> checkpoint.Loaded:
    """Reads a quantized checkpoint (already verified by `checkpoint.load`): int4 values unpacked, each
    array in `model.shardings`; the model it binds runs on the integers and scales."""
    packed = checkpoint.read_params(directory, _stored_abstract(config, mesh))
    with sharding.activated(mesh, config):
        qparams = _convert(packed, model.shardings(config, mesh), None, model.abstract_params(config))
    return checkpoint.Loaded(config, qparams, checkpoint.tokenizer_in(directory, facts["files"]), directory, facts,
                             KIND, bind=model.binder(config))


KIND = "quantized"
checkpoint.register(checkpoint.Kind(KIND, lambda facts, config: rules.is_quantized(config), _load))
