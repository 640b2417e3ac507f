"""Quantized checkpoints: parameters-only checkpoints (train/checkpoint.py's `save_params`, sealed
with a manifest like any other) whose config's `quantize` section says what the arrays are.

int8 values are stored as they are. int4 values are packed two to a byte before saving — orbax
would give each its own byte — along the last axis: byte j of a row holds values 2j (low nibble)
and 2j + 1 (high nibble), the row padded with a zero to an even length. Scales keep their dtype.
"""

import jax
import jax.numpy as jnp

from heft.quantize import model, rules
from heft.train import checkpoint, sharding


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
            return jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=model.fitted(shape, sh.spec, mesh))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    return jax.tree.map(one, model.abstract_params(config), shardings)


def _convert(tree, to_shardings, fn, like=None):
    """`fn` over every leaf of `tree` (or, with `like`, unpacking each leaf whose counterpart in
    `like` is int4), jitted into `to_shardings`."""
    if like is None:
        return jax.jit(lambda t: jax.tree.map(fn, t), out_shardings=to_shardings)(tree)
    return jax.jit(lambda t: jax.tree.map(lambda b, x: unpack(b, x.shape[-1]) if _is_int4(x) else b, t, like),
                   out_shardings=to_shardings)(tree)


def save(directory: str, config, qparams: dict, tokenizer_path: str | None = None, **facts) -> None:
    """A sealed parameters-only checkpoint of quantized parameters (int4 packed)."""
    mesh = jax.tree.leaves(qparams)[0].sharding.mesh
    stored = jax.tree.map(lambda s: s.sharding, _stored_abstract(config, mesh))
    with sharding.activated(mesh, config):
        packed = _convert(qparams, stored, lambda x: pack(x) if _is_int4(x) else x)
    checkpoint.save_params(directory, config, packed, tokenizer_path, quantized=rules.describe(config), **facts)


def load(directory, mesh=None, verify: bool = True, config=None):
    """(config, quantized params, tokenizer path or None) of a quantized checkpoint, placed on `mesh`
    (default: the serving mesh); `config` as in `checkpoint.load_params`."""
    config, packed, tokenizer = checkpoint.load_params(directory, mesh, verify, config, target=_stored_abstract)
    mesh = jax.tree.leaves(packed)[0].sharding.mesh
    abstract = model.abstract_params(config)
    with sharding.activated(mesh, config):
        qparams = _convert(packed, model.shardings(config, mesh), None, abstract)
    return config, qparams, tokenizer


def load_any(directory, mesh=None, verify: bool = True, config=None):
    """(config, params, tokenizer path or None, binder) of any checkpoint, float or quantized:
    `binder(config.model, params)` is the model to call."""
    resolved = checkpoint.resolve(directory)
    saved = config if config is not None else checkpoint.read_config(resolved)
    if rules.is_quantized(saved):
        config, params, tokenizer = load(resolved, mesh, verify, config)
    else:
        config, params, tokenizer = checkpoint.load_params(resolved, mesh, verify, config)
    return config, params, tokenizer, model.binder(config)
