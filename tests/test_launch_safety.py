"""`heft launch`'s scripts are safe by construction: each generated script runs under bash with stub
gcloud/kubectl/xpk/sbatch/srun/heft executables that record their arguments, given hostile values
(quotes, `$(...)`, backticks, `;`, `&`, `|`, `#`, the here-document's end marker). Nothing but the
stubs runs (no PWNED file appears), and each stub receives each value intact, as one argument. A
newline or another control character in any flag is refused in one line. Dry runs need no network,
and print paths as they were given. Everything here runs in this process but the offline dry run."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# Every shell metacharacter that could start a command, on one line; and the here-document's marker.
HOSTILE = "it's \"$(touch PWNED)\" `touch PWNED`; touch PWNED & echo HEFT_EOF | touch PWNED # $HOME"

# Records its name and arguments (NUL-separated, one file per call, named to sort in call order), and
# its standard input for the commands that read one; `describe` answers as an ACTIVE queued resource.
STUB = r"""#!/bin/bash
f=$(mktemp -p "$STUB_LOG" "$(date +%s%N)-XXXX")
printf '%s\0' "${0##*/}" "$@" > "$f"
case "${0##*/}" in kubectl|sbatch) cat > "$f.in" ;; esac
case " $* " in *" describe "*) echo ACTIVE ;; esac
"""


def _stubs(tmp_path):
    folder = tmp_path / "stubs"
    folder.mkdir(exist_ok=True)
    for name in ("gcloud", "kubectl", "xpk", "sbatch", "srun", "heft"):
        (folder / name).write_text(STUB)
        (folder / name).chmod(0o755)
    return folder


def _run(script, tmp_path, command=False):
    """Runs `script` with bash in `tmp_path` (as `bash -c SCRIPT` with `command`: what a remote shell
    does with a --command), only the stubs and the system's tools on PATH; returns each stub call as
    (argv, stdin or None), in call order."""
    log = tmp_path / "calls"
    shutil.rmtree(log, ignore_errors=True)
    log.mkdir()
    env = {"PATH": f"{_stubs(tmp_path)}:/usr/bin:/bin", "STUB_LOG": str(log), "HOME": str(tmp_path)}
    argv, script_in = (["bash", "-c", script], None) if command else (["bash"], script)
    r = subprocess.run(argv, input=script_in, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr + script
    assert not (tmp_path / "PWNED").exists(), script
    calls = []
    for name in sorted(n for n in os.listdir(log) if not n.endswith(".in")):
        argv = (log / name).read_bytes().split(b"\0")[:-1]
        stdin = log / (name + ".in")
        calls.append(([a.decode() for a in argv], stdin.read_text() if stdin.exists() else None))
    return calls


@pytest.fixture
def hostile_job(tmp_path, monkeypatch):
    """A Job whose config file, override, workdir and train flags all hold HOSTILE, the config given as a
    relative path from `tmp_path` (the current folder)."""
    from heft.configs import tiny
    from heft.launch.job import Job

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my configs").mkdir()
    config = f"my configs/{HOSTILE}.py"
    shutil.copy(TINY, tmp_path / config)

    def make(workdir_root):
        return Job(tiny.get_config(), config, (f"--config.name={HOSTILE}",), f"{workdir_root}/{HOSTILE}",
                   (f"--note={HOSTILE}", HOSTILE))
    return make


def _train_argv(job, config):
    """What every host's `heft train` must receive, written out from the job's fields."""
    return ["heft", "train", f"--config={config}", f"--config.name={HOSTILE}", f"--workdir={job.workdir}",
            f"--note={HOSTILE}", HOSTILE]


def test_shell_check_refuses_control_characters_and_passes_metacharacters():
    from heft.launch import shell
    from heft.model.checks import ConfigError

    for bad, says in [("a\nb", "a newline"), ("a\rb", "a carriage return"), ("a\x00b", "a control character"),
                      ("a\x1b[2Jb", "a control character"), ("a\u2028b", "a line separator"),
                      ("a\u202eb", "an invisible format character"), ("a\x85b", "a control character")]:
        with pytest.raises(ConfigError) as e:
            shell.check("--partition", bad)
        assert str(e.value).startswith(f"--partition holds {says}") and "\n" not in str(e.value), str(e.value)
    for fine in (HOSTILE, "naïve-é", ""):
        assert shell.check("--x", fine) == fine
        assert subprocess.run(["bash", "-c", f"printf %s {shell.quote(fine)}"], capture_output=True,
                              text=True).stdout == fine


def test_a_here_document_is_never_ended_early_by_its_own_text(tmp_path):
    """A line of the text equal to the usual marker (with a command after it) stays text: the marker
    is chosen so that no line of the text equals it, and no assert is what guards it."""
    from heft.launch import job as jobs

    text = "first\nHEFT_EOF\ntouch PWNED\nHEFT_EOF_1\nlast\n"
    script = jobs.script([jobs.Step("submit", ["sbatch"], text)])
    ((argv, stdin),) = _run(script, tmp_path)
    assert argv == ["sbatch"] and stdin == text


def test_local_script_passes_hostile_values_intact_and_runs_nothing_else(hostile_job, tmp_path):
    from heft.launch import local

    job = hostile_job("runs")
    calls = _run(local.dry_run_text(local.steps(job, processes=2, devices=2, port=12345)), tmp_path)
    want = _train_argv(job, job.config_file)
    assert sorted(argv for argv, _ in calls) == [
        [*want, "--coordinator=127.0.0.1:12345", "--num_processes=2", f"--process_id={i}"] for i in (0, 1)]


def test_tpu_vm_script_and_the_workers_command_pass_hostile_values_intact(hostile_job, tmp_path):
    """Queued, two slices, a setup command: the script as gcloud sees it, and the `--command` as a
    worker's shell runs it."""
    from heft.launch import topology, tpu_vm
    from heft.launch.job import script

    job, tpu = hostile_job("gs://bkt"), "heft-v5p"  # a TPU's name has Google Cloud's form (below)
    setup = "pip install 'heft[tpu]' && echo \"$(hostname)\""  # a shell command by design, for the worker
    steps = tpu_vm.steps(job, tpu, "us-east5-a", "my-project", topology.parse("v5p:2x2x2"), slices=2, queued=True,
                         setup=setup)
    calls = [argv for argv, _ in _run(script(steps), tmp_path)]
    group, where = ["gcloud", "compute", "tpus", "queued-resources"], ["--zone=us-east5-a", "--project=my-project"]
    copy = calls[2][6].split(":", 1)[1]  # scp's older protocol gives the remote name to a shell: plain characters
    assert re.fullmatch(r"heft-[A-Za-z0-9._-]+\.py", copy), copy
    assert calls[:4] == [
        [*group, "create", tpu, *where, "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
         "--node-count=2", f"--node-prefix={tpu}"],
        [*group, "describe", tpu, *where, "--format=value(state.state)"],
        [*group, "scp", job.config_file, f"{tpu}:{copy}", *where, "--node=all", "--worker=all"],
        [*group, "ssh", tpu, *where, "--node=all", "--worker=all", f"--command={setup}"]]
    *ssh, command = calls[4]
    assert ssh == [*group, "ssh", tpu, *where, "--node=all", "--worker=all"] and command.startswith("--command=")
    ((worker, _),) = _run(command[len("--command="):], tmp_path, command=True)  # each worker's shell
    assert worker == _train_argv(job, copy)


def test_gke_manifest_and_xpk_command_carry_hostile_values_intact(hostile_job, tmp_path):
    from heft.launch import gke, topology
    from heft.launch.job import script

    job, image = hostile_job("gs://bkt"), f"us-docker.pkg.dev/p/heft:{HOSTILE}"
    ((argv, manifest),) = _run(script(gke.steps(job, "heft-tiny", image, topology.parse("v5p:2x2x2"))), tmp_path)
    assert argv == ["kubectl", "apply", "-f", "-"]
    config_map, jobset = yaml.safe_load_all(manifest)
    (key,) = config_map["data"]
    assert config_map["data"][key] == open(TINY).read() and key.endswith(".py") and "$" not in key
    (container,) = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image
    assert container["command"] == _train_argv(job, f"/etc/heft/{key}")  # run by the container, no shell

    steps = gke.xpk_steps(job, "heft-tiny", image, topology.parse("v5e:4x4"), "c1", "us-west4-a", "my-project")
    ((argv, _),) = _run(script(steps), tmp_path)
    assert argv[:3] == ["xpk", "workload", "create"] and "--script-dir=my configs" in argv  # as given
    (command,) = [a for a in argv if a.startswith("--command=")]
    ((pod, _),) = _run(command[len("--command="):], tmp_path, command=True)
    assert pod == _train_argv(job, f"{HOSTILE}.py")


def test_slurm_batch_script_carries_hostile_values_intact_and_the_marker_as_a_partition(hostile_job, tmp_path):
    from heft.launch import slurm
    from heft.launch.job import script

    job = hostile_job("gs://bkt")
    steps = slurm.steps(job, "heft-tiny", nodes=2, gpus_per_node=4, partition="HEFT_EOF", time_limit="1-00:00")
    ((argv, batch),) = _run(script(steps), tmp_path)
    assert argv == ["sbatch"]
    assert "#SBATCH --partition=HEFT_EOF\n#SBATCH --time=1-00:00\n" in batch
    ((srun, _),) = _run(batch, tmp_path)  # what the allocation's first node runs
    assert srun == ["srun", *_train_argv(job, job.config_file)]  # relative, as given: tasks start where sbatch ran


@pytest.mark.parametrize("partition,time_limit,says", [
    ("a3 --wrap=touch", None, "--partition='a3 --wrap=touch' is not a SLURM partition name"),
    ("a3;touch PWNED", None, "--partition='a3;touch PWNED' is not a SLURM partition name"),
    (None, "24:00:00 x", "--time='24:00:00 x' is not a SLURM time limit"),
    (None, "1-", "--time='1-' is not a SLURM time limit"),
])
def test_slurm_options_are_checked_against_slurms_forms(partition, time_limit, says):
    from heft.launch import slurm
    from heft.model.checks import ConfigError

    with pytest.raises(ConfigError, match="^" + says.replace("[", r"\[")):
        slurm.check_options(partition, time_limit)
    for fine in (("a3", "30"), ("a3,a4", "2-12"), ("gpu.big_1", "1:30:00"), (None, "UNLIMITED")):
        slurm.check_options(*fine)


@pytest.fixture
def heft_here(capsys, monkeypatch):
    """Runs `heft ARGS` in this process: (exit status, stdout, stderr). The flags the verb defined are
    removed after each call, so the next can define its own (absl's own flags, defined on import, stay)."""
    from absl import app, flags  # noqa: F401

    from heft.launch import cli

    def run(*args):
        before = set(flags.FLAGS)
        monkeypatch.setattr(sys, "argv", ["heft", *args])
        try:
            cli.main(["heft", *args])
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            for name in set(flags.FLAGS) - before:
                if name in flags.FLAGS:
                    delattr(flags.FLAGS, name)
        out, err = capsys.readouterr()
        if isinstance(code, str):  # sys.exit("heft VERB: ..."): the one line a terminal shows
            return 1, out, err + code + "\n"
        return code or 0, out, err
    return run


NEWLINE = "x\ntouch PWNED\nHEFT_EOF\ntouch PWNED"
REFUSED = {  # the flag the line names: the command line
    "--workdir": ["local", f"--workdir=runs/{NEWLINE}"],
    "an argument after --": ["local", "--workdir=runs/x", "--", f"--note={NEWLINE}"],
    "--config.name": ["local", "--workdir=runs/x", f"--config.name={NEWLINE}"],
    "--config": ["local", "--workdir=runs/x", "--config={config}"],
    "--tpu": ["tpu-vm", "--workdir=gs://b/r", f"--tpu={NEWLINE}", "--queued", "--topology=v5p:2x2x1"],
    "--setup": ["tpu-vm", "--workdir=gs://b/r", "--tpu=t", f"--setup={NEWLINE}", "--topology=v5p:2x2x1"],
    "--image": ["gke", "--workdir=gs://b/r", f"--image={NEWLINE}", "--topology=v5p:2x2x1"],
    "--partition": ["slurm", "--workdir=gs://b/r", f"--partition={NEWLINE}"],
    "--time": ["slurm", "--workdir=gs://b/r", "--time", "24:00:00\ttouch PWNED"],
}


@pytest.mark.parametrize("flag", list(REFUSED))
def test_a_control_character_in_any_flag_is_refused_in_one_line_before_any_script(flag, heft_here, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / f"my\n{HOSTILE}.py"
    shutil.copy(TINY, config)
    backend, *args = [a.replace("{config}", str(config)) for a in REFUSED[flag]]
    code, out, err = heft_here("launch", backend, "--dry_run", *args)
    assert code == 1 and out == "" and not (tmp_path / "PWNED").exists()
    (line,) = err.strip().splitlines()[-1:]
    holds = "a tab" if flag == "--time" else "a newline"
    assert line.startswith(f"heft launch: {flag} holds {holds}, which a launch script cannot carry"), err


def test_a_local_dry_run_prints_paths_as_given_and_no_config_when_none_was(heft_here, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(os.path.join(ROOT, "configs"))
    code, out, err = heft_here("launch", "local", "--processes=2", "--devices=2", "--workdir=runs/x", "--dry_run")
    assert code == 0, err
    assert "--config" not in out and str(tmp_path) not in out and ROOT not in out  # the hosts' heft default
    assert out.count(" heft train --workdir=runs/x --coordinator=127.0.0.1:") == 2, out
    code, out, err = heft_here("launch", "local", "--config=configs/tiny.py", "--devices=2", "--workdir=runs/x",
                               "--dry_run")
    assert code == 0 and out.count(" heft train --config=configs/tiny.py --workdir=runs/x ") == 2, err + out


def test_tpu_vm_without_a_config_copies_nothing_and_names_none():
    from heft.configs import tiny
    from heft.launch import topology, tpu_vm
    from heft.launch.job import Job

    job = Job(tiny.get_config(), None, (), "gs://b/run", default_config=TINY)
    (step,) = tpu_vm.steps(job, "t", "us-east5-a", "my-project", topology.parse("v5p:2x2x1"))
    assert step.argv[-1] == "--command=heft train --workdir=gs://b/run"


@pytest.mark.parametrize("flag,value", [("tpu", "--help"), ("tpu", "-t"), ("tpu", "My_TPU"), ("zone", "--zone"),
                                        ("project", "--impersonate-service-account=x@y.com"), ("cluster", "-c")])
def test_a_cloud_name_that_could_reach_gcloud_or_xpk_as_a_flag_is_refused_in_one_line(flag, value):
    from heft.configs import tiny
    from heft.launch import gke, topology, tpu_vm
    from heft.launch.job import Job
    from heft.model.checks import ConfigError

    job = Job(tiny.get_config(), None, (), "gs://b/run", default_config=TINY)
    names = {"tpu": "t", "zone": "us-east5-a", "project": "my-project", "cluster": "c1", flag: value}
    with pytest.raises(ConfigError, match=f"^--{flag}={re.escape(repr(value))} is not a") as e:
        if flag == "cluster":
            gke.xpk_steps(job, "heft-tiny", "img", topology.parse("v5e:4x4"), names["cluster"], names["zone"],
                          names["project"])
        else:
            tpu_vm.steps(job, names["tpu"], names["zone"], names["project"], topology.parse("v5p:2x2x1"))
    assert "\n" not in str(e.value)


def test_a_config_file_named_like_an_option_reaches_scp_as_a_path(tmp_path, monkeypatch):
    from heft.configs import tiny
    from heft.launch import topology, tpu_vm
    from heft.launch.job import Job

    monkeypatch.chdir(tmp_path)
    shutil.copy(TINY, tmp_path / "-r.py")
    job = Job(tiny.get_config(), "-r.py", (), "gs://b/run")
    copy, _ = tpu_vm.steps(job, "t", "us-east5-a", "my-project", topology.parse("v5p:2x2x1"))
    assert copy.argv[5:7] == ["./-r.py", "t:heft--r.py"], copy.argv


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dry_run_where_gcs_cannot_be_reached_warns_in_one_line_and_prints_the_script(tmp_path):
    """GCS's client pointed at a closed port on this machine: gcsfs would retry for over a minute,
    logging a traceback each time; the check gives up after a few seconds, and nothing else shows."""
    from heft.launch import preflight

    env = {k: v for k, v in os.environ.items() if k not in ("TENSORSTORE_GCS_HTTP_URL",)}
    env.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{_closed_port()}", GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    start = time.monotonic()
    p = subprocess.Popen(["heft", "launch", "slurm", "--config=configs/tiny.py", "--workdir=gs://my-bucket/run",
                          "--nodes=2", "--dry_run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = [(time.monotonic(), line.rstrip("\n")) for line in p.stderr]  # each note as it comes
    out = p.stdout.read()
    assert p.wait(timeout=120) == 0, [line for _, line in lines]
    assert time.monotonic() - start < 60
    assert all(line.startswith("heft launch: ") for _, line in lines), [line for _, line in lines]
    (config_ok, _), (warned, warning) = lines
    assert warning == ("heft launch: warning: bucket gs://my-bucket of --workdir=gs://my-bucket/run could not be "
                       f"checked (TimeoutError: no answer in {preflight.DRY_RUN_WAIT_S:g} s); the script below "
                       "assumes it exists")
    # The check's own time (its client's import and its wait), not the start-up's; gcsfs's retries
    # alone would take over 30 s.
    assert warned - config_ok < preflight.DRY_RUN_WAIT_S + 10
    assert "sbatch <<'HEFT_EOF'" in out and "srun heft train --config=configs/tiny.py --workdir=gs://my-bucket/run" \
        in out


def test_a_launch_where_gcs_cannot_be_reached_stops_in_one_line_within_its_wait(monkeypatch):
    import gcsfs

    from heft.launch import preflight
    from heft.model.checks import ConfigError

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "dummy")
    monkeypatch.setattr(preflight, "LAUNCH_WAIT_S", 1.0)
    gcsfs.GCSFileSystem.clear_instance_cache()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^--workdir=gs://b/run: bucket gs://b cannot be read from here "
                                          r"\(TimeoutError: no answer in 1 s\); check the network"):
        preflight.check_workdir("gs://b/run", "gke", shared_ok=False)
    assert time.monotonic() - start < 3
    gcsfs.GCSFileSystem.clear_instance_cache()
