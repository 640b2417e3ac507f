"""`heft launch`, by dry runs (nothing here contacts a cloud): the exact gcloud commands, a JobSet that
parses and holds what JobSet needs, an sbatch script bash accepts, and one-line refusals."""

import json
import os
import shlex
import subprocess

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "launch_tpu_vm.json")


def _launch(args, **kw):
    """`heft launch ARGS` from the repository root (so configs/tiny.py is a relative path), JAX left to
    find libtpu as on a machine without a TPU."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return subprocess.run(["heft", "launch", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600, **kw)


def _bash_n(text):
    check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr + text


def _commands(script):
    """The commands of a dry run's script, each as an argv, and the here-documents they read."""
    commands, documents, lines = [], [], iter(script.splitlines())
    for line in lines:
        if not line or line.startswith("#") or line == "set -euo pipefail":
            continue
        if line.endswith(" <<'HEFT_EOF'"):
            line = line[: -len(" <<'HEFT_EOF'")]
            documents.append("\n".join(iter(lambda: next(lines), "HEFT_EOF")) + "\n")
        commands.append(shlex.split(line))
    return commands, documents


@pytest.mark.parametrize("case", list(json.load(open(GOLDEN))))
def test_tpu_vm_dry_run_prints_the_golden_gcloud_commands(case, gcs):
    """The first case runs the fit check (the TPU plan's compile for v5p:2x2x1) as a launch does."""
    golden = json.load(open(GOLDEN))[case]
    r = _launch(["tpu-vm", "--config=configs/tiny.py", f"--workdir={gcs}", "--dry_run", *golden["flags"]])
    assert r.returncode == 0, r.stderr[-3000:]
    _bash_n(r.stdout)
    commands, _ = _commands(r.stdout)
    expected = [[a.replace("{workdir}", gcs) for a in argv] for argv in golden["argv"]]
    assert commands == expected
    assert f"workdir {gcs} (bucket gs://" in r.stderr
    # Only heft's notes: no library's log lines (libtpu's, loading for the fit check on a machine
    # without a TPU, nor the GCS client's).
    assert all(line.startswith("heft launch: ") for line in r.stderr.splitlines()), r.stderr[-3000:]
    if "--nofit_check" in golden["flags"]:
        assert "fit check skipped" in r.stderr
    else:
        assert "heft launch: fits v5p:2x2x1:" in r.stderr and "GiB per chip" in r.stderr


def test_gke_dry_run_is_a_config_map_and_a_jobset_with_one_child_job_per_slice(gcs):
    r = _launch(["gke", "--config=configs/tiny.py", f"--workdir={gcs}", "--topology=v5p:2x2x2", "--slices=2",
                 "--image=us-docker.pkg.dev/my-project/heft:latest", "--nofit_check", "--dry_run",
                 "--", "--stop_after=100"])
    assert r.returncode == 0, r.stderr[-3000:]
    _bash_n(r.stdout)
    commands, documents = _commands(r.stdout)
    assert commands == [["kubectl", "apply", "-f", "-"]]
    config_map, jobset = yaml.safe_load_all(documents[0])
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] == "heft-tiny-config"
    assert config_map["data"] == {"tiny.py": open(os.path.join(ROOT, "configs", "tiny.py")).read()}

    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert jobset["metadata"]["name"] == "heft-tiny"
    assert jobset["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    (slices,) = jobset["spec"]["replicatedJobs"]
    assert slices["replicas"] == 2  # one child Job per slice
    job = slices["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 2 and job["backoffLimit"] == 0  # 8 chips: 2 VMs of 4
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x2"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["command"] == ["heft", "train", "--config=/etc/heft/tiny.py", "--config.mesh.slices=2",
                                    f"--workdir={gcs}", "--stop_after=100"]
    assert container["volumeMounts"] == [{"name": "config", "mountPath": "/etc/heft"}]
    assert pod["volumes"] == [{"name": "config", "configMap": {"name": "heft-tiny-config"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    assert env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
    names = [e["name"] for e in container["env"]]  # Kubernetes expands $(VAR) only from earlier entries
    assert names.index("JOBSET_NAME") < names.index("MEGASCALE_COORDINATOR_ADDRESS")


def test_gke_with_xpk_is_one_xpk_workload_create():
    from heft.configs import tiny
    from heft.launch import gke, topology
    from heft.launch.job import Job

    job = Job(tiny.get_config(), os.path.join(ROOT, "configs", "tiny.py"), ("--config.mesh.slices=2",), "gs://b/run")
    (step,) = gke.xpk_steps(job, "heft-tiny", "img", topology.parse("v5e:4x4"), "c1", "us-west4-a", "my-project", slices=2)
    assert step.argv == [
        "xpk", "workload", "create", "--cluster=c1", "--workload=heft-tiny", "--tpu-type=v5litepod-16",
        "--num-slices=2", "--base-docker-image=img", f"--script-dir={os.path.join(ROOT, 'configs')}",
        "--command=heft train --config=tiny.py --config.mesh.slices=2 --workdir=gs://b/run", "--max-restarts=3",
        "--zone=us-west4-a", "--project=my-project"]


def test_slurm_dry_run_is_an_sbatch_script_that_bash_accepts_with_one_task_per_gpu(gcs):
    r = _launch(["slurm", "--config=configs/tiny.py", f"--workdir={gcs}", "--nodes=2", "--gpus_per_node=4",
                 "--partition=a3", "--time=24:00:00", "--dry_run"])
    assert r.returncode == 0, r.stderr[-3000:]
    _bash_n(r.stdout)
    commands, (batch,) = _commands(r.stdout)
    assert commands == [["sbatch"]]
    _bash_n(batch)
    directives = [line.split(" ", 1)[1] for line in batch.splitlines() if line.startswith("#SBATCH ")]
    assert directives == ["--job-name=heft-tiny", "--nodes=2", "--ntasks-per-node=4", "--signal=TERM@120",
                          "--output=%x-%j.out", "--gpus-per-node=4", "--partition=a3", "--time=24:00:00"]
    (srun,) = [shlex.split(line) for line in batch.splitlines() if line.startswith("srun ")]
    # As given: the tasks start in the folder sbatch ran in, where the relative path means the same file.
    assert srun == ["srun", "heft", "train", "--config=configs/tiny.py", f"--workdir={gcs}"]


def test_a_local_workdir_for_a_multihost_backend_is_a_one_line_error_naming_the_fix():
    r = _launch(["gke", "--workdir=runs/x", "--topology=v5e:2x2", "--image=i", "--dry_run"])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("heft launch: --workdir=runs/x is on this machine (") and last.endswith(
        "filesystem), which the hosts of a gke launch cannot all reach; use a gs:// bucket, e.g. "
        "--workdir=gs://BUCKET/x")


def test_a_missing_bucket_and_a_missing_tool_are_refused_by_name(gcs, tmp_path, monkeypatch):
    from heft.launch import job as jobs
    from heft.launch import preflight
    from heft.model.checks import ConfigError

    with pytest.raises(ConfigError, match=r"bucket gs://no-such-bucket does not exist; create it"):
        preflight.check_workdir("gs://no-such-bucket/run", "gke", shared_ok=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(ConfigError, match=r"^sbatch is not installed or not on PATH; run heft launch slurm on"):
        jobs.run([jobs.Step("submit", ["sbatch"], "#!/bin/bash\n")])


def test_a_shared_filesystem_is_told_from_a_local_one_by_its_mount_type(monkeypatch, tmp_path):
    from heft.launch import preflight

    mounts = tmp_path / "mounts"
    mounts.write_text(f"server:/export {tmp_path}/shared nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(mounts if p == "/proc/mounts" else p, *a, **k))
    (tmp_path / "shared").mkdir()
    assert preflight.filesystem(str(tmp_path / "shared" / "run")) == "nfs4"
    assert "shared by the nodes" in preflight.check_workdir(str(tmp_path / "shared" / "run"), "slurm", shared_ok=True)
    assert preflight.filesystem(str(tmp_path / "elsewhere")) == "ext4"
