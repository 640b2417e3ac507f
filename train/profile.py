"""`train.profile_steps`: a `jax.profiler` trace of chosen steps, where TensorBoard's profile plugin
and XProf look for it.

`profile_steps = "10:13"` traces steps 10, 11 and 12 (a Python range of the loop's step numbers,
which start at 1) on the hosts `profile_hosts` names ("0", "0,3" or "all"). Skipping the first steps
keeps compilation and the loader's warm-up out of the trace; a few steps are enough, since a trace
costs host memory and slows the steps it covers (the run's metrics rows for those steps say
`profiled_steps`, so a slow row is not mistaken for a regression).

The trace is written to a local scratch folder and then copied to
`WORKDIR/tensorboard/plugins/profile/RUN/` (RUN: the time the trace started), so a gs:// workdir
works as a local one: `tensorboard --logdir=WORKDIR/tensorboard` (with `tensorboard-plugin-profile`)
or `xprof WORKDIR/tensorboard` shows it.
"""

import os
import re
import shutil
import tempfile

import jax

from heft.data import paths
from heft.model.checks import ConfigError

_RANGE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_steps(spec: str, steps: int) -> tuple[int, int] | None:
    """(first, stop) of `train.profile_steps` ("" for none), checked against `train.steps`."""
    if not spec:
        return None
    m = _RANGE.fullmatch(str(spec))
    if m is None:
        raise ConfigError(f"train.profile_steps={spec!r} is not a range of steps; write FIRST:STOP, e.g. "
                          "\"10:13\" for steps 10, 11 and 12, or \"\" for no trace")
    first, stop = int(m.group(1)), int(m.group(2))
    if not 1 <= first < stop <= steps + 1:
        raise ConfigError(f"train.profile_steps={spec!r} holds no step of this run (steps 1 to {steps}); give "
                          f"1 <= FIRST < STOP <= {steps + 1}, e.g. \"{min(2, steps)}:{min(2, steps) + 1}\"")
    return first, stop


def parse_hosts(spec: str, process_count: int) -> set[int]:
    """The processes `train.profile_hosts` names: "all", or process indices separated by commas."""
    text = str(spec).strip()
    if text == "all":
        return set(range(process_count))
    try:
        hosts = {int(x) for x in text.split(",")}
    except ValueError:
        hosts = set()
    if not hosts or any(not 0 <= h < process_count for h in hosts):
        raise ConfigError(f"train.profile_hosts={spec!r} names no process of this run (0 to {process_count - 1}); "
                          "give \"all\" or process indices such as \"0\" or \"0,1\"")
    return hosts


def check(config) -> None:
    """The fields' one-line errors that the config alone shows (the hosts need the run's processes)."""
    t = config.train
    parse_steps(t.get("profile_steps", ""), t.steps)
    if str(t.get("profile_hosts", "0")).strip() != "all":
        parse_hosts(t.get("profile_hosts", "0"), 1 + max((int(x) for x in str(t.profile_hosts).split(",")
                                                            if x.strip().isdigit()), default=0))


class Profiler:
    """Starts the trace before step `first` runs (`before`) and stops it once step `stop - 1` has
    finished (`stops_after`, then `save`)."""

    def __init__(self, config, workdir, process_index: int, process_count: int, start: int):
        t = config.train
        self.range = parse_steps(t.get("profile_steps", ""), t.steps)
        self.here = self.range is not None and process_index in parse_hosts(t.get("profile_hosts", "0"), process_count)
        self.target = paths.path(workdir) / "tensorboard"
        self.process_index = process_index
        self.scratch: str | None = None
        if self.range is not None and start >= self.range[1] - 1:  # a resumed run past the range
            self.range = None
        self.written: list[str] = []

    def covers(self, first: int, last: int) -> list[int] | None:
        """[first, stop) of the profiled steps if any of steps first..last were profiled, else None."""
        if self.range is None or last < self.range[0] or first >= self.range[1]:
            return None
        return list(self.range)

    def before(self, step: int) -> None:
        """Called before step `step` is dispatched."""
        if self.here and self.scratch is None and self.range and self.range[0] <= step < self.range[1]:
            self.scratch = tempfile.mkdtemp(prefix="heft-profile-")
            jax.profiler.start_trace(self.scratch)

    def stops_after(self, step: int) -> bool:
        """Whether the trace ends with step `step` (then `save` once it has finished)."""
        return self.scratch is not None and step >= self.range[1] - 1

    def save(self) -> str:
        """Stops the trace and copies it into the workdir; returns the folder it went to."""
        return self._save()

    def close(self) -> None:
        """A run that ends inside the range (a stop, an error) keeps what was traced."""
        if self.scratch is not None:
            try:
                self._save()
            except Exception:  # the run's own error, if any, is the one to report
                pass

    def _save(self) -> str:
        scratch, self.scratch = self.scratch, None
        try:
            jax.profiler.stop_trace()
            written = []
            for here, _, names in os.walk(scratch):
                for name in names:
                    rel = os.path.relpath(os.path.join(here, name), scratch)
                    (self.target / rel).parent.mkdir(parents=True, exist_ok=True)
                    with open(os.path.join(here, name), "rb") as f, (self.target / rel).open("wb") as out:
                        shutil.copyfileobj(f, out, 8 << 20)  # a pod's trace can be large: streamed
                    written.append(str(self.target / rel))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.written += written
        return os.path.dirname(written[0]) if written else str(self.target)
