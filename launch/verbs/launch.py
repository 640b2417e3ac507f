"""`heft launch BACKEND --config=... --workdir=... [--dry_run] [-- more heft train flags]`: the same
`heft train` on every host of a run, through the engine the hosts already have.

    local    N processes on this machine (fake CPU devices split among them), run and watched here
    tpu-vm   gcloud: every worker of a Cloud TPU VM slice (or of a multislice queued resource)
    gke      kubectl: a JobSet on a GKE cluster's TPU node pools (--xpk: the xpk command instead)
    slurm    sbatch: srun on every node of an allocation

Before anything is booked: the config's checks, the workdir every host must reach (gs://, or for
SLURM a shared filesystem), and for a TPU slice the plan's fit check (launch/preflight.py).
--dry_run prints what would run or be submitted, as a shell script, and exits 0; it needs no network
(a bucket it cannot reach is a warning). Paths appear in it as they were given.

Every string given (flags, overrides, the arguments after `--`) is checked once here: one holding a
newline or another control character is refused (launch/shell.py), before any script is written.
"""

import sys

from absl import flags

from heft.model.checks import ConfigError

BACKENDS = ("local", "tpu-vm", "gke", "slurm")


def define_flags():
    from heft.launch.flags import define_config

    define_config()
    flags.DEFINE_string("workdir", None, "the run's workdir; gs://BUCKET/... for every backend but local")
    flags.DEFINE_bool("dry_run", False, "print the commands, script or manifest, and exit")
    flags.DEFINE_bool("fit_check", True, "compile the step for --topology before a TPU launch (heft plan)")
    flags.DEFINE_integer("slices", None, "TPU slices (sets mesh.slices; tpu-vm through a queued resource)")
    flags.DEFINE_string("topology", None, "the TPU slice, as heft plan names it: v5p:2x2x2, v5e:4x4, v6e:4x4")
    # local
    flags.DEFINE_integer("processes", 2, "local: how many processes")
    flags.DEFINE_integer("devices", None, "local: fake CPU devices in all (default: this process's XLA_FLAGS "
                         "count, else one per process)")
    # tpu-vm
    flags.DEFINE_string("tpu", None, "tpu-vm: the TPU VM (or queued resource) name")
    flags.DEFINE_string("zone", None, "tpu-vm, gke --xpk: the zone")
    flags.DEFINE_string("project", None, "tpu-vm, gke --xpk: the Google Cloud project")
    flags.DEFINE_bool("queued", False, "tpu-vm: first request the slice as a queued resource and wait for it")
    flags.DEFINE_string("runtime_version", None, "tpu-vm --queued: the TPU software version (default by generation)")
    flags.DEFINE_string("setup", None, "tpu-vm: a shell command every worker runs first (e.g. pip install ...)")
    # gke
    flags.DEFINE_string("image", None, "gke: a container image with heft installed")
    flags.DEFINE_string("name", None, "gke, slurm: the job's name (default heft-CONFIGNAME)")
    flags.DEFINE_integer("max_restarts", 3, "gke: restarts of the whole JobSet after a failure")
    flags.DEFINE_bool("xpk", False, "gke: print or run `xpk workload create` instead of a JobSet manifest")
    flags.DEFINE_string("cluster", None, "gke --xpk: the GKE cluster")
    # slurm
    flags.DEFINE_integer("nodes", 1, "slurm: nodes")
    flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node")
    flags.DEFINE_integer("tasks_per_node", None, "slurm: processes per node (default one per GPU)")
    flags.DEFINE_string("partition", None, "slurm: the partition")
    flags.DEFINE_string("time", None, "slurm: the time limit (SLURM's format, e.g. 24:00:00)")


def overrides(argv: list[str]) -> list[str]:
    """The --config.FIELD=VALUE flags given (before `--`), as absl parsed them, in the order given."""
    f = flags.FLAGS
    before = argv[: argv.index("--")] if "--" in argv else argv
    names = [a[2:].split("=", 1)[0] for a in before if a.startswith("--config.")]
    return [f[n].serialize() for n in dict.fromkeys(names) if n in f and f[n].present]


def main(argv):
    from heft.launch import job as jobs

    f = flags.FLAGS
    backend, extra = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if backend not in BACKENDS:
        raise ConfigError(f"a backend comes first: one of {', '.join(BACKENDS)} "
                          f"(e.g. heft launch local --processes=2 --workdir=runs/x); got {backend!r}")
    if not f.workdir:
        raise ConfigError("--workdir is required: where the run's checkpoints and metrics go (gs://BUCKET/... "
                          "for every backend but local)")
    from ml_collections import config_flags

    given = overrides(sys.argv)
    if f.slices is not None:
        if f.slices < 1:
            raise ConfigError(f"--slices={f.slices} must be a positive number of slices")
        f.config.mesh.slices = f.slices
        given = [o for o in given if not o.startswith("--config.mesh.slices=")] + [f"--config.mesh.slices={f.slices}"]
    check_given(f, given, extra)
    config_file = config_flags.get_config_filename(f["config"])
    job = jobs.Job(f.config, config_file if f["config"].present else None, tuple(given), f.workdir, tuple(extra),
                   default_config=config_file)
    steps, text = plan_launch(backend, job, f)
    if f.dry_run:
        print(text, end="")
        return
    if backend == "local":
        from heft.launch import local

        code = local.run(steps)
        sys.exit(code if code >= 0 else 128 - code)  # a process killed by signal N: 128 + N, as shells say
    jobs.run(steps, note=lambda s: print(s, file=sys.stderr, flush=True))


def check_given(f, given: list[str], extra: list[str]) -> None:
    """Refuses, in one line naming it, any string given that a launch script could not carry."""
    from ml_collections import config_flags

    from heft.launch import shell

    values = [(f"--{flag.name}", flag.value) for flag in f.flags_by_module_dict()[__name__]
              if isinstance(flag.value, str)]
    values.append(("--config", config_flags.get_config_filename(f["config"])))
    values += [(override.split("=", 1)[0], override) for override in given]
    values += [("an argument after --", a) for a in extra]
    for what, value in values:
        shell.check(what, value)


def plan_launch(backend: str, job, f) -> tuple[list, str]:
    """The preflight (notes on stderr), then the backend's steps and their shell text."""
    from heft.launch import job as jobs
    from heft.launch import preflight, topology

    def note(text):
        print(f"heft launch: {text}", file=sys.stderr, flush=True)

    topo = None
    if backend in ("tpu-vm", "gke"):
        if not f.topology:
            raise ConfigError(f"{backend} needs --topology: the TPU slice, e.g. --topology=v5p:2x2x2 "
                              "(it sets the fit check, the accelerator type and the hosts)")
        topo = topology.parse(f.topology)
    # The flags' own mistakes before the slower checks (the compile, the network).
    name = job.name(f.name) if backend in ("gke", "slurm") else None
    if backend == "slurm":
        from heft.launch import slurm

        slurm.check_options(f.partition, f.time)
    elif backend == "tpu-vm":
        from heft.launch import tpu_vm

        tpu_vm.check_names(f.tpu, f.zone, f.project)
    elif backend == "gke" and f.xpk:
        from heft.launch import gke

        gke.check_xpk(f.image, f.cluster, f.zone, f.project)
    slices = job.config.mesh.slices
    if backend == "local":
        from heft.launch import local

        devices = f.devices or local.default_devices(f.processes)
        note(preflight.check_config(job, devices))
        steps = local.steps(job, f.processes, devices)
        return steps, local.dry_run_text(steps)
    devices = topo.chips * slices if topo else f.nodes * max(f.gpus_per_node, 1)
    note(preflight.check_config(job, devices))
    note(preflight.check_workdir(job.workdir, backend, shared_ok=backend == "slurm", dry_run=f.dry_run))
    if topo is not None:
        note(preflight.check_fit(job, f.topology) if f.fit_check else "fit check skipped (--nofit_check)")
    if backend == "tpu-vm":
        from heft.launch import tpu_vm

        steps = tpu_vm.steps(job, f.tpu, f.zone, f.project, topo, slices, f.queued, f.runtime_version, f.setup)
    elif backend == "gke":
        from heft.launch import gke

        steps = (gke.xpk_steps(job, name, f.image, topo, f.cluster, f.zone, f.project, slices, f.max_restarts)
                 if f.xpk else gke.steps(job, name, f.image, topo, slices, f.max_restarts))
    else:
        steps = slurm.steps(job, name, f.nodes, f.gpus_per_node, f.tasks_per_node, f.partition, f.time)
    return steps, jobs.script(steps)
