"""T5's relative position bias: a learned scalar per head for each bucket of key - query distance.

Every attention score of a stack gets `table[bucket(key_position - query_position), head]` added
before the softmax; one table per stack (encoder, decoder), shared by all its layers, and none in
cross-attention. Buckets: the encoder's are split by direction (half for keys before the query,
half for keys after), the decoder's cover only the past. Within a direction, the first half of the
buckets are the exact distances 0, 1, 2, ...; the rest are log-spaced up to
`model.relative_max_distance`, from which on all distances share the last bucket. This is
Mesh TensorFlow's `_relative_position_bucket`, as Hugging Face's T5 computes it.
"""

import math

import jax.numpy as jnp
from flax import nnx

from heft.model import init, precision


def bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """relative_position: int [...] (key position - query position) -> bucket ids int32 [...] in
    [0, num_buckets)."""
    relative_position = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)  # a later key (not seen by a causal query) counts as 0
    exact = num_buckets // 2
    # log(distance / exact) for distance >= exact, truncated towards zero as T5's int cast does; the
    # max() keeps the log finite where the exact branch is taken anyway.
    scaled = jnp.log(jnp.maximum(distance, exact).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    large = exact + (scaled * (num_buckets - exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < exact, distance, large)


class RelativeBias(nnx.Module):
    """One stack's table [relative_buckets, heads]; calling it gives the bias its attention adds."""

    def __init__(self, m, bidirectional: bool, rngs: nnx.Rngs):
        self.m, self.bidirectional = m, bidirectional
        # T5 draws the table with std width**-0.5 (init.matrix's fan-in scale for a fan-in of width).
        self.table = init.param(rngs, init.matrix(m, m.width), (m.relative_buckets, m.heads),
                                ("relative_buckets", "heads"), m)

    def __call__(self, query_positions, key_positions):
        """query_positions: [batch or 1, queries], key_positions: [batch or 1, keys] int ->
        bias [batch or 1, heads, queries, keys] float32. Rows that share their positions (training:
        0..length-1 in every row) pass one row, and the bias is made once for the whole batch."""
        m = self.m
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # [batch, queries, keys]
        ids = bucket(relative, self.bidirectional, m.relative_buckets, m.relative_max_distance)
        bias = jnp.take(self.table[...].astype(precision.STATS), ids, axis=0)  # [batch, queries, keys, heads]
        return jnp.transpose(bias, (0, 3, 1, 2))
