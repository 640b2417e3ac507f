"""What the processes of a run agree on, over JAX's own multi-host runtime (one process: no-ops).

Each is a collective: every process must call it, in the same order.
"""

import json

import jax
import numpy as np


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"heft: {name}")


def broadcast_json(obj, size: int = 1 << 16):
    """Process 0's `obj` (JSON-serialisable, at most `size` bytes encoded) on every process."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    buf = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        raw = json.dumps(obj).encode()
        if len(raw) > size:
            raise ValueError(f"broadcast_json: {len(raw)} bytes exceed {size}")
        buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(bytes(out[out != 0].tolist()).decode())


def gather_ints():
    """An allgather of one integer per process: `gather(x) -> [x of process 0, x of process 1, ...]`."""
    return _gather(np.int64, int)


def gather_floats():
    """An allgather of one float per process, like `gather_ints`."""
    return _gather(np.float64, float)


def _gather(array_type, value_type):
    if jax.process_count() == 1:
        return lambda x: [x]
    from jax.experimental import multihost_utils

    return lambda x: [value_type(v) for v in np.asarray(multihost_utils.process_allgather(array_type(x))).ravel()]


class PeerLost(Exception):
    """Another process of the run is gone (killed, its host down): a collective with it failed.

    What the caller does: say so in one line and exit at once. Waiting is useless (nothing that needs
    every process can finish) and JAX's own shutdown would wait for the lost process at a barrier
    until its heartbeat timeout, then abort with a stack dump."""


# How a collective with a process that has gone fails (gloo on CPU, NCCL on GPU, JAX's coordination
# service anywhere); lower case.
_LOST = ("gloo", "connection reset by peer", "connection closed by peer", "broken pipe", "socket closed",
         "unhealthy", "stopped sending heartbeats", "nccl")


def peer_lost(e: BaseException) -> bool:
    """Whether `e`, raised in a run of several processes, is a collective failing because one is gone."""
    return (jax.process_count() > 1 and isinstance(e, jax.errors.JaxRuntimeError)
            and any(s in str(e).lower() for s in _LOST))
