"""Which checkpoint a path names: a workdir (its newest sealed step), a checkpoints/ folder, a step
directory or a parameters-only checkpoint."""

import json

import ml_collections
from etils import epath

from heft.data import paths
from heft.train import manifest
from heft.train.checkpoint.facts import config_from_json
from heft.train.manifest import CheckpointError


def _step_dirs(path: epath.Path) -> list[epath.Path]:
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return [root / d for d in sorted((p.name for p in root.iterdir() if p.name.isdigit()), key=int)]


def is_checkpoint(path: epath.Path) -> bool:
    """A single checkpoint: sealed, or holding a train state or parameters (perhaps unsealed)."""
    return manifest.is_sealed(path) or any((path / item).is_dir() for item in ("state", "params"))


def checkpoints_in(path: epath.PathLike) -> list[epath.Path]:
    """The checkpoint directories `path` names: itself, or each step of a workdir / checkpoints folder."""
    path = paths.path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a workdir, a step directory "
                              "or a parameters-only checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint; pass a workdir, a step directory "
                              "or a parameters-only checkpoint directory")
    return [path] if is_checkpoint(path) else _step_dirs(path)


def resolve(path: epath.PathLike) -> epath.Path:
    """A checkpoint directory from a workdir, a checkpoints/ dir, a step dir or a params-only dir:
    for a workdir, its newest sealed step."""
    path = paths.path(path)
    candidates = checkpoints_in(path)
    for candidate in reversed(candidates):
        if manifest.is_sealed(candidate):
            return candidate
        if len(candidates) > 1 or candidate != path:
            print(f"heft: skipping incomplete checkpoint {candidate}", flush=True)
    if candidates == [path]:
        raise CheckpointError(f"{path} has no {manifest.SEAL}: its save never completed; use an earlier checkpoint")
    raise CheckpointError(f"{path} holds no complete checkpoint; train first or pass another directory")


def read_config(directory: epath.PathLike) -> ml_collections.ConfigDict:
    """The config a checkpoint was saved with (from its manifest)."""
    return config_from_json(json.dumps(manifest.read(resolve(directory))["config"]))
