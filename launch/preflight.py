"""What `heft launch` checks before it books anything: the config, the workdir every host must reach,
and, for a TPU slice, that the step fits it (the TPU plan's compile). Each failure is one line that
names the fix; each pass is a note.

The one check that needs the network, that a gs:// workdir's bucket exists, is given a few seconds:
gcsfs retries a refused connection for over a minute, logging a traceback at each try. A dry run is
often made where GCS cannot be reached (a laptop, a sandbox), so there an unanswered check is a
warning and the script is still printed; a launch stops with one line. Either way the client
libraries' own logs are kept from the terminal: their outcome is that line.
"""

import logging
import os
import threading

from heft.data import paths
from heft.model.checks import ConfigError
from heft.train import checks, sharding

DRY_RUN_WAIT_S = 5.0  # for the bucket check of a dry run, which then only warns
LAUNCH_WAIT_S = 30.0  # for that of a launch: a first request also fetches credentials
CLIENT_LOGGERS = ("gcsfs", "fsspec", "google", "aiohttp", "asyncio", "urllib3")  # GCS's client stack

# Filesystems that several machines mount as one (/proc/mounts' type column).
SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "cephfs", "glusterfs",
                      "fuse.gcsfuse", "fuse.glusterfs", "fuse.ceph", "fuse.beegfs", "9p", "virtiofs", "wekafs", "pvfs2"}


def check_config(job, devices: int | None = None) -> str:
    """The config's own checks, and with `devices`, the mesh and the batch over that many devices."""
    checks.check_config(job.config)
    if any(a.startswith("--config") for a in job.extra):
        raise ConfigError("config overrides after `--` reach the hosts but not these checks; put them before `--`")
    if devices is None:
        return "config ok"
    shape = sharding.mesh_shape(job.config, devices)
    checks.check_batch(job.config, dict(zip(sharding.AXES, shape)), job.config.train.batch_size)
    return f"config ok on {devices} devices (mesh {dict(zip(sharding.AXES, shape))})"


def filesystem(path: str) -> str | None:
    """The type of the filesystem holding `path` (or its nearest existing parent), from /proc/mounts."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


def check_workdir(workdir: str, backend: str, shared_ok: bool, dry_run: bool = False) -> str:
    """The workdir is one place for every host: a gs:// folder whose bucket exists, or (`shared_ok`:
    SLURM's nodes) a path on a network filesystem. With `dry_run`, a bucket that cannot be reached is
    a warning (the returned note starts with "warning:")."""
    if paths.is_remote(workdir):
        return check_bucket(workdir, dry_run)
    kind = filesystem(workdir)
    if shared_ok and kind in SHARED_FILESYSTEMS:
        return f"workdir {workdir} (on {kind}, shared by the nodes)"
    where = "a path on a shared filesystem or " if shared_ok else ""
    raise ConfigError(f"--workdir={workdir} is on this machine ({kind or 'local'} filesystem), which the hosts of "
                      f"a {backend} launch cannot all reach; use {where}a gs:// bucket, e.g. "
                      f"--workdir=gs://BUCKET/{os.path.basename(os.path.normpath(workdir)) or 'run'}")


def check_bucket(workdir: str, dry_run: bool) -> str:
    bucket = workdir.split("/")[2]
    wait_s = DRY_RUN_WAIT_S if dry_run else LAUNCH_WAIT_S
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    import gcsfs  # noqa: F401  (before the clock starts: on a busy machine the import alone took seconds)

    try:
        exists = within(wait_s, lambda: paths.path(f"gs://{bucket}").exists())
    except Exception as e:  # no network, no credentials, no answer: say which
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        if dry_run:
            return (f"warning: bucket gs://{bucket} of --workdir={workdir} could not be checked ({why}); "
                    "the script below assumes it exists")
        raise ConfigError(f"--workdir={workdir}: bucket gs://{bucket} cannot be read from here ({why}); check the "
                          "network and your credentials (gcloud auth application-default login), or pass "
                          "--dry_run to print the commands anyway") from None
    if not exists:
        raise ConfigError(f"--workdir={workdir}: bucket gs://{bucket} does not exist; create it "
                          f"(gcloud storage buckets create gs://{bucket}) or fix the name")
    return f"workdir {workdir} (bucket gs://{bucket} exists)"


def within(seconds: float, fn):
    """`fn()`, or a TimeoutError if it has not returned after `seconds`. It runs in a daemon thread,
    left to finish by itself: the client's retries cannot be cut short from outside."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def check_fit(job, topology_name: str) -> str:
    """The TPU plan's fit check for `mesh.slices` slices of the named topology: the real step
    compiled for the slice's chips (launch/plan.py). Stops with the plan's table when it does not fit."""
    from heft.launch import plan, topology

    topology.parse(topology_name)
    if not topology.libtpu_available():
        raise ConfigError(f"{topology.INSTALL}, for the fit check of {topology_name}; or pass --nofit_check")
    p = plan.plan(job.config, topology_name)
    if not p.fits:
        raise ConfigError(f"this run does not fit {topology_name}:\n{plan.table(p)}")
    where = topology_name if p.slices == 1 else f"{p.slices} x {topology_name}"
    return (f"fits {where}: {p.total / 2**30:,.2f} of {p.hbm / 2**30:,.2f} GiB per chip; predicted "
            f"{p.step_seconds * 1e3:,.1f} ms/step, MFU {p.mfu:.1%}, {p.error_bar_short} (heft plan for the table)")
