"""`heft launch slurm --nodes=N --gpus_per_node=G`: an sbatch script whose `srun` starts `heft train` on
every node of the allocation. JAX reads SLURM's variables (SLURM_NTASKS, SLURM_PROCID, the node
list) and finds its peers by itself.

One task per GPU by default: JAX's SLURM detection gives each process the GPU of its local rank
(SLURM_LOCALID), so a node with G GPUs runs G tasks. SLURM sends SIGTERM 120 s before the time
limit (--signal), so every task stops at the same step and saves it (train/preemption.py); rerunning
the script resumes. The config file and the workdir must be where every node sees them: a shared
filesystem, or a gs:// workdir. The tasks start in the folder sbatch ran in (SLURM's default), so a
relative --config or --workdir means there what it meant to the user, and the script says it as given.

The #SBATCH lines are read by sbatch, not by bash, with a parser of its own: their values are checked
against SLURM's own forms (a partition's name, a time limit) rather than quoted.
"""

import re

from heft.launch import shell
from heft.launch.job import Job, Step
from heft.model.checks import ConfigError

WARNING_S = 120  # SIGTERM this long before the time limit: time to reach a common step and save it
# SLURM's names: letters, digits, '_', '.', '-'; several partitions are a comma-separated list.
PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
# sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or no limit.
TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)


def check_options(partition: str | None, time_limit: str | None) -> None:
    """--partition and --time as SLURM writes them; a one-line error naming the form otherwise."""
    if partition and not PARTITION.fullmatch(partition):
        raise ConfigError(f"--partition={partition!r} is not a SLURM partition name; use letters, digits, '_', "
                          "'.' and '-' (several: a3,a4)")
    if time_limit and not TIME.fullmatch(time_limit):
        raise ConfigError(f"--time={time_limit!r} is not a SLURM time limit; use MINUTES, HOURS:MINUTES:SECONDS "
                          "or DAYS-HOURS[:MINUTES[:SECONDS]], e.g. --time=24:00:00 or --time=2-00")


def script(job: Job, name: str, nodes: int, gpus_per_node: int, tasks_per_node: int | None = None,
           partition: str | None = None, time_limit: str | None = None) -> str:
    """The batch script `sbatch` reads; `tasks_per_node` defaults to one per GPU."""
    tasks_per_node = tasks_per_node or max(gpus_per_node, 1)
    check_options(partition, time_limit)
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
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -euo pipefail",
             f"# {nodes * tasks_per_node} processes; JAX takes their ranks and peers from SLURM's variables.",
             f"srun {shell.join(job.train_argv())}"]
    return "\n".join(lines) + "\n"


def steps(job: Job, name: str, nodes: int, gpus_per_node: int, tasks_per_node: int | None = None,
          partition: str | None = None, time_limit: str | None = None) -> list[Step]:
    tasks = tasks_per_node or max(gpus_per_node, 1)
    return [Step(f"submit {name}: {nodes} nodes x {tasks} tasks, {gpus_per_node} GPUs each", ["sbatch"],
                 script(job, name, nodes, gpus_per_node, tasks_per_node, partition, time_limit))]
