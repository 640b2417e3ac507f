"""Joining JAX's own multi-host runtime: explicit flags, or what the environment says.

One process per host (or per local test process). `jax.distributed.initialize()` with no arguments
detects Cloud TPU pods, SLURM and Open MPI by itself; the explicit form serves local processes on
127.0.0.1 and anything else.
"""

import os

import jax

_AUTO_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _several_processes_from_env() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if any(int(os.environ.get(k, "1") or 1) > 1 for k in _AUTO_ENV + ("MEGASCALE_NUM_SLICES",)):
        return True  # several SLURM or MPI tasks; several TPU slices (each may be one host)
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts  # a multi-host TPU slice


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Starts jax.distributed when there is more than one process; a no-op on a single host."""
    if coordinator or (num_processes or 1) > 1:
        if coordinator is None or num_processes is None or process_id is None:
            raise ValueError("--coordinator, --num_processes and --process_id go together; give all three")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif _several_processes_from_env():
        jax.distributed.initialize()
