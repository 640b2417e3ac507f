"""`heft launch tpu-vm --tpu=NAME --zone=Z --project=P --topology=v5p:2x2x2`: the same `heft train` on
every worker of a Cloud TPU VM slice, through gcloud.

Steps: (with --queued) request the slice as a queued resource and wait until it is ACTIVE; copy the
config file to every worker (`scp --worker=all`); run --setup on every worker, if given; run
`heft train` on every worker at once (`ssh --worker=all`). On the workers JAX finds its peers from
the TPU metadata, and several slices (a queued resource of --slices nodes, which multislice needs)
from the MEGASCALE variables the TPU runtime sets: no flags to pass.
"""

from heft.launch import shell
from heft.launch.job import Job, Step
from heft.model.checks import ConfigError

# The TPU VM software each generation runs JAX on (cloud.google.com/tpu/docs/runtimes).
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


def accelerator_type(topo) -> str:
    """The accelerator type gcloud takes for a slice: v5e's counts chips (v5litepod-16), v4's and
    v5p's count TensorCores (v5p-16 is 8 chips), v6e's chips."""
    if topo.chip.name == "v5e":
        return f"v5litepod-{topo.chips}"
    return f"{topo.chip.name}-{topo.chips * topo.chip.cores_per_chip}"


def remote_config_name(job: Job) -> str:
    """Where the config lands in each worker's home directory."""
    return "heft-" + job.copy_name


def check_names(tpu: str, zone: str, project: str) -> None:
    """Each given, in Google Cloud's form (none can reach gcloud as a flag)."""
    for flag, value in (("tpu", tpu), ("zone", zone), ("project", project)):
        if not value:
            raise ConfigError(f"tpu-vm needs --{flag}: the TPU's name, zone and project")
        shell.resource(flag, value)


def steps(job: Job, tpu: str, zone: str, project: str, topo, slices: int = 1, queued: bool = False,
          runtime_version: str | None = None, setup: str | None = None) -> list[Step]:
    check_names(tpu, zone, project)
    where = [f"--zone={zone}", f"--project={project}"]
    # One slice is a TPU VM; several are the nodes of one queued resource, reached through it.
    group = (["gcloud", "compute", "tpus", "tpu-vm"], ["--worker=all"]) if slices == 1 else \
        (["gcloud", "compute", "tpus", "queued-resources"], ["--node=all", "--worker=all"])
    out = []
    if queued:
        nodes = [f"--node-id={tpu}"] if slices == 1 else [f"--node-count={slices}", f"--node-prefix={tpu}"]
        out.append(Step(f"request {slices} x {topo.name} as queued resource {tpu}", [
            "gcloud", "compute", "tpus", "queued-resources", "create", tpu, *where,
            f"--accelerator-type={accelerator_type(topo)}",
            f"--runtime-version={runtime_version or RUNTIME[topo.chip.name]}", *nodes]))
        state = shell.join(["gcloud", "compute", "tpus", "queued-resources", "describe", tpu, *where,
                            "--format=value(state.state)"])
        out.append(Step(f"wait until queued resource {tpu} is ACTIVE", [
            "bash", "-c", f'until [ "$({state})" = ACTIVE ]; do sleep 30; done']))
    remote = None
    if job.config_file:  # else every worker's heft has the default config already
        remote = remote_config_name(job)
        out.append(Step("copy the config file to every worker", [
            *group[0], "scp", shell.local_path(job.config_path), f"{tpu}:{remote}", *where, *group[1]]))
    if setup:  # a shell command by design: the worker's shell runs it as given
        out.append(Step("set up every worker", [*group[0], "ssh", tpu, *where, *group[1], f"--command={setup}"]))
    train = job.train_argv(job.remote_config(remote) if remote else None)
    out.append(Step("run heft train on every worker", [
        *group[0], "ssh", tpu, *where, *group[1], f"--command={shell.join(train)}"]))
    return out
