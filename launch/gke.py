"""`heft launch gke --topology=v5p:2x2x2 --image=IMAGE`: a JobSet on a GKE cluster's TPU node pools, one
child Job per slice and one pod per TPU VM, each running the same `heft train`.

The manifest (applied with `kubectl apply -f -`) holds a ConfigMap with the config file, mounted at
/etc/heft in every pod, and the JobSet: its exclusive-topology annotation puts each slice's pods on
one node pool (one ICI domain); GKE's TPU webhook gives each pod TPU_WORKER_ID and
TPU_WORKER_HOSTNAMES, from which JAX finds the slice's peers. Across slices the pods also get the
MEGASCALE variables, pointing at the first pod of the first slice, as xpk's templates set them.
`--xpk` prints the equivalent `xpk workload create` instead (the image then built from the config's
folder on --image, as xpk's --script-dir does).
"""

import os

import yaml

from heft.launch import shell
from heft.launch.job import Job, Step
from heft.launch.tpu_vm import accelerator_type
from heft.model.checks import ConfigError

# GKE's node label for each generation's TPU slices.
ACCELERATOR = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice", "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}
CHIPS_PER_VM = 4  # multi-host TPU node pools' machines hold 4 chips (ct4p/ct5lp/ct5p-hightpu-4t, ct6e-standard-4t)
CONFIG_DIR = "/etc/heft"
GRACE_S = 300  # between SIGTERM and SIGKILL: time for every host to reach the same step and save it


def hosts(topo) -> tuple[int, int]:
    """(TPU VMs per slice, chips per VM)."""
    per_vm = min(CHIPS_PER_VM, topo.chips)
    return topo.chips // per_vm, per_vm


def _annotation(key: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}}


def environment(slices: int) -> list[dict]:
    """What the pods need beyond GKE's TPU variables: across slices, how to reach each other."""
    if slices == 1:
        return []
    return [
        {"name": "JOBSET_NAME", **_annotation("jobset.sigs.k8s.io/jobset-name")},
        {"name": "REPLICATED_JOB_NAME", **_annotation("jobset.sigs.k8s.io/replicatedjob-name")},
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
        {"name": "MEGASCALE_SLICE_ID", **_annotation("jobset.sigs.k8s.io/job-index")},
    ]


def manifest(job: Job, name: str, image: str, topo, slices: int = 1, max_restarts: int = 3) -> str:
    """The ConfigMap and the JobSet, as one YAML stream."""
    if not image:
        raise ConfigError("gke needs --image: a container image with heft installed "
                          "(e.g. pip install 'heft[tpu]' on a JAX TPU image)")
    vms, chips = hosts(topo)
    file = job.copy_name
    with open(job.config_path) as f:
        config_text = f.read()
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config"},
                  "data": {file: config_text}}
    container = {
        "name": "heft",
        "image": image,
        "command": job.train_argv(job.remote_config(f"{CONFIG_DIR}/{file}")),
        "env": environment(slices),
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],  # TPU runtime; megascale (DCN)
        "securityContext": {"privileged": True},  # TPU device access on GKE versions before 1.28
        "resources": {"limits": {"google.com/tpu": chips}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR}],
    }
    if not container["env"]:
        del container["env"]
    pod = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": GRACE_S,
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": ACCELERATOR[topo.chip.name],
                         "cloud.google.com/gke-tpu-topology": "x".join(map(str, topo.grid))},
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": f"{name}-config"}}],
    }
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            # A failed pod restarts the whole JobSet: every host resumes from the newest sealed checkpoint.
            "failurePolicy": {"maxRestarts": max_restarts},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": slices,
                "template": {"spec": {"parallelism": vms, "completions": vms, "backoffLimit": 0,
                                      "template": {"spec": pod}}},
            }],
        },
    }
    return yaml.dump_all([config_map, jobset], Dumper=_Dumper, sort_keys=False, width=100)


class _Dumper(yaml.SafeDumper):
    """Writes text of several lines (the config file) as a literal block, as a person would."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def steps(job: Job, name: str, image: str, topo, slices: int = 1, max_restarts: int = 3) -> list[Step]:
    return [Step(f"submit JobSet {name}: {slices} x {topo.name}, {hosts(topo)[0]} pods per slice",
                 ["kubectl", "apply", "-f", "-"], manifest(job, name, image, topo, slices, max_restarts))]


def check_xpk(image: str, cluster: str, zone: str, project: str) -> None:
    """Each of xpk's flags given, the cloud names in Google Cloud's form (none can reach xpk as a flag)."""
    for flag, value in (("image", image), ("cluster", cluster), ("zone", zone), ("project", project)):
        if not value:
            raise ConfigError(f"gke --xpk needs --{flag}")
    for flag, value in (("cluster", cluster), ("zone", zone), ("project", project)):
        shell.resource(flag, value)


def xpk_steps(job: Job, name: str, image: str, topo, cluster: str, zone: str, project: str, slices: int = 1,
              max_restarts: int = 3) -> list[Step]:
    """The same workload through xpk, which writes its own JobSet."""
    check_xpk(image, cluster, zone, project)
    # xpk builds --script-dir into the image at /app, the command's working directory. The folder is
    # named as the user named the config (relative stays relative); without --config, the image's
    # heft has the default and nothing is built in.
    script_dir, config = [], None
    if job.config_file:
        script_dir = [f"--script-dir={os.path.dirname(job.config_path) or '.'}"]
        config = job.remote_config(os.path.basename(job.config_path))
    return [Step(f"create xpk workload {name}: {slices} x {topo.name}", [
        "xpk", "workload", "create", f"--cluster={cluster}", f"--workload={name}",
        f"--tpu-type={accelerator_type(topo)}", f"--num-slices={slices}", f"--base-docker-image={image}",
        *script_dir, f"--command={shell.join(job.train_argv(config))}", f"--max-restarts={max_restarts}",
        f"--zone={zone}", f"--project={project}"])]
