"""Which checkpoint a path names: a workdir (its newest sealed step), a checkpoints/ folder, a step
directory or a parameters-only checkpoint."""

import json

import ml_collections

from heft.train import manifest, storage
from heft.train.checkpoint.facts import config_from_json
from heft.train.manifest import CheckpointError


def _step_dirs(path) -> list:
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return [root / d for d in sorted((p.name for p in root.iterdir() if p.name.isdigit()), key=int)]


def is_checkpoint(path) -> bool:
    """A single checkpoint: sealed, or holding a train state or parameters (perhaps unsealed)."""
    path = storage.path(path)
    return manifest.is_sealed(path) or any((path / item).is_dir() for item in ("state", "params"))


def checkpoints_in(path) -> list:
    """The checkpoint directories `path` names: itself, or each step of a workdir / checkpoints folder."""
    path = storage.path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a workdir, a step directory "
                              "or a parameters-only checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint; pass a workdir, a step directory "
                              "or a parameters-only checkpoint directory")
    return [path] if is_checkpoint(path) else _step_dirs(path)


def resolve(path: str):
    """A checkpoint directory from a workdir, a checkpoints/ dir, a step dir or a params-only dir:
    for a workdir, its newest sealed step."""
    candidates = checkpoints_in(path)
    for candidate in reversed(candidates):
        if manifest.is_sealed(candidate):
            return candidate
        if len(candidates) > 1 or candidate != storage.path(path):
            print(f"heft: skipping incomplete checkpoint {candidate}", flush=True)
    if len(candidates) == 1 and candidates[0] == storage.path(path):
        raise CheckpointError(f"{path} has no {manifest.SEAL}: its save never completed; use an earlier checkpoint")
    raise CheckpointError(f"{storage.path(path)} holds no complete checkpoint; train first or pass another directory")


def read_config(directory) -> ml_collections.ConfigDict:
    """The config a checkpoint was saved with (from its manifest)."""
    return config_from_json(json.dumps(manifest.read(resolve(directory))["config"]))
