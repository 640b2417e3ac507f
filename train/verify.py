"""`heft verify DIR`: check a checkpoint's files against its manifest (a workdir checks every step)."""

import os
import sys

from absl import flags

from heft.train import manifest


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a checkpoint, a checkpoints/ directory or a workdir")


def targets(path: str) -> list[str]:
    """The checkpoint directories under `path` (itself, or each step of a workdir)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise manifest.CheckpointError(f"{path} does not exist or is not a directory")
    if manifest.is_checkpoint(path):
        return [path]
    steps = manifest.step_dirs(path)
    if not steps:
        raise manifest.CheckpointError(f"{path} holds no checkpoints")
    return steps


def main(argv):
    paths = argv[1:] + ([flags.FLAGS.checkpoint] if flags.FLAGS.checkpoint else [])
    if not paths:
        sys.exit("usage: heft verify DIR (a checkpoint, or a workdir to check every checkpoint in it)")
    bad = 0
    for path in paths:
        for directory in targets(path):
            try:
                m = manifest.verify(directory)
                print(f"ok       {directory}  ({len(m['files'])} files, step {m.get('step', '-')})")
            except manifest.CheckpointError as e:
                bad += 1
                print(f"FAILED   {e}")
    sys.exit(1 if bad else 0)
