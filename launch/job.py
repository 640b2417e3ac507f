"""One launch: the `heft train` command every host runs, and the steps that get it there.

A backend (local.py, tpu_vm.py, gke.py, slurm.py) turns a Job into Steps: commands for an engine
that already exists (gcloud, kubectl, xpk, sbatch, or plain processes), with the script or manifest
they read on their standard input. `--dry_run` prints the steps as a shell script that would do the
same; a launch runs them one after the other. heft never schedules or calls hosts itself.
"""

import dataclasses
import os
import re
import shutil
import subprocess

from heft.launch import shell
from heft.model.checks import ConfigError


@dataclasses.dataclass(frozen=True)
class Job:
    config: object  # the ConfigDict, with the overrides applied: what the preflight checks
    # --config as given (a file, perhaps with a ":argument" for its get_config), kept as typed: a
    # relative path stays relative. None: not given, so every host runs its own heft's default config.
    config_file: str | None
    overrides: tuple[str, ...]  # the --config.FIELD=VALUE flags, forwarded to every host
    workdir: str
    extra: tuple[str, ...] = ()  # further `heft train` flags (after `--`)
    default_config: str = ""  # the file behind config_file=None, to read here (gke's ConfigMap)

    @property
    def config_path(self) -> str:
        """The config file to read on this machine."""
        return self.config_file.split(":", 1)[0] if self.config_file else self.default_config

    @property
    def copy_name(self) -> str:
        """The name of the config file's copies on the hosts, in plain characters: a ConfigMap's key
        takes no others, and scp's older protocol hands the remote path to the worker's shell unquoted."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(self.config_path))

    def remote_config(self, path: str) -> str:
        """--config for a copy of the file at `path` (keeping a ":argument")."""
        if not self.config_file:
            return path
        return path + self.config_file[len(self.config_path):]

    def train_argv(self, config: str | None = None) -> list[str]:
        """`heft train` with this job's config (or its copy at `config`), overrides, workdir and flags;
        without a config given, none: heft train's default is the same on every host."""
        config = config or self.config_file
        return ["heft", "train", *([f"--config={config}"] if config else []), *self.overrides,
                f"--workdir={self.workdir}", *self.extra]

    def name(self, given: str | None = None) -> str:
        """A name for the engine's job (Kubernetes, SLURM): `given`, else heft-CONFIGNAME, as a DNS
        label (lower case, digits and '-', starting with a letter, at most 40 characters so that
        pods' host names stay under 63)."""
        name = given or "heft-" + re.sub(r"[^a-z0-9-]+", "-", str(self.config.name).lower()).strip("-")
        if not re.fullmatch(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?", name):
            raise ConfigError(f"--name={name!r} is not a job name Kubernetes takes; use at most 40 lower-case "
                              "letters, digits and '-', starting with a letter")
        return name


@dataclasses.dataclass(frozen=True)
class Step:
    """One command; `stdin`, if any, is the script or manifest it reads."""

    about: str
    argv: list[str]
    stdin: str | None = None

    def shell(self) -> str:
        """The step as shell text (what --dry_run prints): the command, its input as a here-document."""
        text = f"# {shell.check('a step', self.about)}\n{shell.join(self.argv)}"
        if self.stdin is None:
            return text
        marker, body = shell.heredoc(self.stdin)
        return f"{text} <<'{marker}'\n{body}{marker}"


def script(steps: list[Step]) -> str:
    """The steps as one shell script that stops at the first failure."""
    return "\n\n".join(["#!/bin/bash\nset -euo pipefail", *(s.shell() for s in steps)]) + "\n"


INSTALL = {
    "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)",
    "kubectl": "install it with `gcloud components install kubectl` and point it at the cluster "
               "(`gcloud container clusters get-credentials CLUSTER`)",
    "xpk": "pip install xpk",
    "sbatch": "run heft launch slurm on the cluster's login node, where SLURM's commands are",
}


def require(tools) -> None:
    """A ConfigError naming the first of `tools` not on PATH, and how to get it."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise ConfigError(f"{tool} is not installed or not on PATH; {INSTALL.get(tool, 'install it')}, "
                              "or pass --dry_run to print the commands instead")


def run(steps: list[Step], note=print) -> None:
    """Runs each step in turn, stopping at the first that fails (a ConfigError naming it)."""
    require(dict.fromkeys(s.argv[0] for s in steps if s.argv[0] != "bash"))
    for s in steps:
        note(f"heft launch: {s.about}: {shell.join(s.argv)}")
        done = subprocess.run(s.argv, input=s.stdin, text=True, env=dict(os.environ))
        if done.returncode:
            raise ConfigError(f"{s.argv[0]} failed (exit {done.returncode}) at the step '{s.about}'; its output "
                              "is above")
