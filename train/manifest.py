"""Custody of a checkpoint: a manifest of every file's sha256, the config, and where it came from.

A checkpoint directory is complete only once its `manifest.json` exists: it is written after the
save has been committed, so a process killed mid-save leaves a checkpoint without one, which
restoring skips. A manifest whose hashes do not match the files is a tampered or damaged
checkpoint, which restoring refuses, naming the file.
"""

import hashlib
import json
import os
import subprocess

NAME = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that must not be restored; the message names the file and what to do."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != NAME:
                out.append(rel)
    return sorted(out)


def code_version() -> str:
    """The git commit of the heft source in use (with "-dirty" if it has local edits), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def write(directory: str, **facts) -> dict:
    """Hashes every file under `directory` and writes the manifest atomically beside them."""
    manifest = {
        "format": "heft-checkpoint-1",
        "files": {rel: {"sha256": sha256(os.path.join(directory, rel)),
                        "bytes": os.path.getsize(os.path.join(directory, rel))}
                  for rel in _files(directory)},
        **facts,
    }
    tmp = os.path.join(directory, NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, NAME))
    return manifest


def exists(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, NAME))


def is_checkpoint(path: str) -> bool:
    """A single checkpoint: sealed, or holding a train state or parameters (perhaps unsealed)."""
    return exists(path) or any(os.path.isdir(os.path.join(path, item)) for item in ("state", "params"))


def step_dirs(path: str) -> list[str]:
    """The step directories of a workdir or of its checkpoints/ folder, oldest first."""
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    return [os.path.join(root, d) for d in sorted((d for d in os.listdir(root) if d.isdigit()), key=int)]


def read(directory: str) -> dict:
    path = os.path.join(directory, NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} has no {NAME}: the save never completed; use an earlier checkpoint")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint cannot be trusted") from None


def verify(directory: str) -> dict:
    """Checks every file against the manifest; raises CheckpointError naming the first bad file."""
    manifest = read(directory)
    listed = manifest["files"]
    for rel, want in sorted(listed.items()):
        path = os.path.join(directory, rel)
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing from the checkpoint (listed in its manifest); "
                                  "restore an earlier checkpoint")
        if os.path.getsize(path) != want["bytes"]:
            raise CheckpointError(f"{path} has {os.path.getsize(path)} bytes, the manifest says "
                                  f"{want['bytes']}: truncated or altered; restore an earlier checkpoint")
        if sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in the manifest: altered or "
                                  "corrupt; restore an earlier checkpoint")
    extra = sorted(set(_files(directory)) - set(listed))
    if extra:
        raise CheckpointError(f"{os.path.join(directory, extra[0])} is not in the manifest: the "
                              "checkpoint was altered after it was saved")
    return manifest
