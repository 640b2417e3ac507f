"""A sweep: named points, each an ordinary heft run in its own folder, run, skipped or resumed.

A sweep is a config file under configs/sweeps/ with two functions:

    points() -> {name: {"model.width": 64, ...}}    the overrides that make each point
    get_config(point=None) -> ConfigDict           the base config, with a point's overrides applied

so every point is a config in its own right: `heft train --config=configs/sweeps/width.py:w64
--workdir=DIR/w64` is exactly what `heft sweep` runs for it, and can be rerun by hand.
A point is done once its workdir holds a sealed checkpoint at its `train.steps`; a point with an
earlier one resumes from it (a rerun of `heft sweep` picks up where a stopped one left off).
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

from etils import epath

from heft.data import paths
from heft.model.checks import ConfigError
from heft.train import manifest


def load(path: str):
    """The sweep module at `path` (a configs/sweeps/NAME.py file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--sweep={path} does not exist; pass a sweep file such as configs/sweeps/width.py")
    spec = importlib.util.spec_from_file_location(f"heft_sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("points", "get_config"):
        if not callable(getattr(module, name, None)):
            raise ConfigError(f"--sweep={path} has no {name}() function; a sweep file defines points() and "
                              "get_config(point=None) (see configs/sweeps/width.py)")
    return module


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    overrides: dict
    config: object  # the point's ConfigDict
    workdir: epath.Path

    @property
    def sealed_step(self) -> int | None:
        """The newest sealed step in this point's workdir, or None."""
        root = self.workdir / "checkpoints"
        if not root.exists():
            return None
        steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and manifest.is_sealed(p)]
        return max(steps, default=None)

    @property
    def status(self) -> str:
        step = self.sealed_step
        return "todo" if step is None else "done" if step >= self.config.train.steps else "partial"


def points(path: str, workdir: epath.PathLike) -> list[Point]:
    workdir = paths.path(workdir)
    module = load(path)
    out = []
    for name, overrides in module.points().items():
        if not name or any(c in name for c in "/: "):
            raise ConfigError(f"sweep point name {name!r} in {path} must be a non-empty name without '/', ':' or spaces")
        out.append(Point(name, dict(overrides), module.get_config(name), workdir / name))
    return out


def command(path: str, point: Point, extra: list[str] = ()) -> list[str]:
    """The `heft train` command line of one point."""
    return [sys.executable, "-m", "heft.launch.cli", "train", f"--config={path}:{point.name}",
            f"--workdir={point.workdir}", *extra]


def run(path: str, workdir: epath.PathLike, parallel: int = 1, extra: list[str] = (), note=print) -> list[str]:
    """Runs every point that is not done, `parallel` at a time; each logs to WORKDIR/NAME/train.log.

    Returns the names of the points whose runs failed (a learning rate too high diverges: its log
    says so), after every other point has run.
    """
    todo = [p for p in points(path, workdir) if p.status != "done"]
    running: list[tuple[Point, subprocess.Popen, object]] = []
    failed = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < max(parallel, 1):
            p = queue.pop(0)
            os.makedirs(p.workdir, exist_ok=True)
            log = open(os.path.join(p.workdir, "train.log"), "a")
            note(f"heft sweep: {p.name} ({p.status}): {' '.join(command(path, p, extra)[2:])}")
            running.append((p, subprocess.Popen(command(path, p, extra), stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(0.2)
        for item in list(running):
            p, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                note(f"heft sweep: {p.name} {'finished' if proc.returncode == 0 else 'FAILED'}")
                if proc.returncode != 0:
                    failed.append(p.name)
    return failed


def metrics(workdir: epath.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
