"""`heft launch slurm --nodes=N --gpus_per_node=G`: an sbatch script whose `srun` starts `heft train` on
every node of the allocation. JAX reads SLURM's variables (SLURM_NTASKS, SLURM_PROCID, the node
list) and finds its peers by itself.

One task per GPU by default: JAX's SLURM detection gives each process the GPU of its local rank
(SLURM_LOCALID), so a node with G GPUs runs G tasks. SLURM sends SIGTERM 120 s before the time
limit (--signal), so every task stops at the same step and saves it (train/preemption.py); rerunning
the script resumes. The config file and the workdir must be where every node sees them: a shared
filesystem, or a gs:// workdir.
"""

import os
import shlex

from heft.launch.job import Job, Step
from heft.model.checks import ConfigError

WARNING_S = 120  # SIGTERM this long before the time limit: time to reach a common step and save it


def script(job: Job, name: str, nodes: int, gpus_per_node: int, tasks_per_node: int | None = None,
           partition: str | None = None, time_limit: str | None = None) -> str:
    """The batch script `sbatch` reads; `tasks_per_node` defaults to one per GPU."""
    tasks_per_node = tasks_per_node or max(gpus_per_node, 1)
    if nodes < 1 or gpus_per_node < 0 or tasks_per_node < 1:
        raise ConfigError(f"--nodes={nodes}, --gpus_per_node={gpus_per_node}, --tasks_per_node={tasks_per_node}: "
                          "give at least one node and one task per node")
    directives = [f"--job-name={name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
                  f"--signal=TERM@{WARNING_S}", "--output=%x-%j.out"]
    if gpus_per_node:
        directives.append(f"--gpus-per-node={gpus_per_node}")
    if partition:
        directives.append(f"--partition={partition}")
    if time_limit:
        directives.append(f"--time={time_limit}")
    config = job.remote_config(os.path.abspath(job.config_path))  # the same path on every node (shared)
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -euo pipefail",
             f"# {nodes * tasks_per_node} processes; JAX takes their ranks and peers from SLURM's variables.",
             f"srun {shlex.join(job.train_argv(config))}"]
    return "\n".join(lines) + "\n"


def steps(job: Job, name: str, nodes: int, gpus_per_node: int, tasks_per_node: int | None = None,
          partition: str | None = None, time_limit: str | None = None) -> list[Step]:
    tasks = tasks_per_node or max(gpus_per_node, 1)
    return [Step(f"submit {name}: {nodes} nodes x {tasks} tasks, {gpus_per_node} GPUs each", ["sbatch"],
                 script(job, name, nodes, gpus_per_node, tasks_per_node, partition, time_limit))]
