"""How orbax writes a jax.Array: replicated shards split between their replicas only when the
pieces are large enough to be worth it.

Orbax's default (replica-parallel saving) cuts every replicated shard into one slice per replica,
so that each replica writes a part. A slice is an eager device op, dispatched once per replica
and array: for the small arrays of a model (norm scales, biases, a small model's every weight) it
costs more than the bytes it spreads, and a train state of a few hundred arrays over 8 replicas
spends seconds a save slicing. Pieces under `MIN_SLICE_BYTES` are written whole by one replica;
large shards (a 70B model's fsdp shards, replicated over the data axis) are still split across
hosts. The bytes on disk are the same either way: only who writes which part changes.
"""

import logging

import jax
import orbax.checkpoint as ocp

MIN_SLICE_BYTES = 4 * 2**20


def register() -> None:
    """Make heft's array handler orbax's handler for jax.Array in this process (idempotent)."""
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES)
    # orbax warns of every override on stderr, where a verb's one-line error must stand alone.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl.setLevel(level)
