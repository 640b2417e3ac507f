"""TPU slices by the names libtpu takes (`v5e:2x2`, `v5p:4x8x8`): parsed, checked, and turned into
abstract devices that XLA can compile for on any machine, with no TPU present.

Needs the optional `libtpu` package (`pip install -e '.[tpu]'`); nothing else in heft does.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import tempfile

from heft.model.checks import ConfigError
from heft.train.chips import CHIPS, Chip

INSTALL = "heft plan needs libtpu: pip install -e '.[tpu]'"
DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}  # the chip grid is a 3-D torus or a 2-D one
# Accelerator-type names count TensorCores (v5p-512 is 256 chips); v5litepod is v5e's.
ACCELERATOR_TYPE = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5p:4x8x8"
    chip: Chip
    grid: tuple[int, ...]  # chips along each axis of the torus

    @property
    def chips(self) -> int:
        return math.prod(self.grid)


def parse(name: str) -> Topology:
    """`v5p:4x8x8` -> Topology; a ConfigError naming the fix for anything libtpu would not take."""
    known = ", ".join(f"{g}:{'x'.join(['A'] * d)}" for g, d in DIMS.items())
    m = re.fullmatch(r"(\w+):(\d+(?:x\d+)*)", name or "")
    if not m:
        a = ACCELERATOR_TYPE.fullmatch(name or "")
        if a:
            gen = "v5e" if a.group(1) == "v5litepod" else a.group(1)
            chips = int(a.group(2)) // CHIPS[gen].cores_per_chip
            raise ConfigError(
                f"--topology={name} is an accelerator type ({chips} chips); pass the chip grid "
                f"instead, e.g. --topology={gen}:{grid_for(gen, chips)}"
            )
        raise ConfigError(f"--topology={name!r} is not a TPU topology name; use one of {known} (chips per axis)")
    gen, grid = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
    if gen not in DIMS:
        raise ConfigError(f"--topology={name}: unknown TPU generation {gen!r}; choose one of {', '.join(DIMS)}")
    if len(grid) != DIMS[gen] or min(grid) < 1:
        raise ConfigError(
            f"--topology={name}: a {gen} slice is a {DIMS[gen]}-D grid of chips, e.g. {gen}:{grid_for(gen, 64)}"
        )
    return Topology(name, CHIPS[gen], grid)


def grid_for(gen: str, chips: int) -> str:
    """The near-cubic (or near-square) grid of `chips`, as Google's slice shapes are: 256 -> 4x8x8."""
    grid = [1] * DIMS[gen]
    while chips % 2 == 0 and chips > 1:
        grid[grid.index(min(grid))] *= 2
        chips //= 2
    grid[grid.index(min(grid))] *= chips
    grid = sorted(g for g in grid if g > 1) + [g for g in grid if g == 1]  # 2x2x1, as Google writes it
    return "x".join(map(str, grid))


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def devices(topology: Topology, slices: int = 1) -> tuple:
    """The slice's abstract devices, one per chip, in libtpu's order (the torus's coordinates); with
    `slices` > 1, that many such slices joined by the data-center network, each device carrying its
    `slice_index` as on a real multislice run."""
    if not libtpu_available():
        raise ConfigError(INSTALL)
    return _devices(topology, slices)


@functools.lru_cache(maxsize=None)
def _devices(topology: Topology, slices: int = 1) -> tuple:
    # Compiling never touches a chip, so libtpu's one-process-per-host lock only gets in the way
    # (two plans at once, or a plan beside a test run). Set before libtpu first loads.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax.experimental import topologies

    # Megacore: v4's and v5p's two TensorCores act as one device, as they do when training.
    kwargs = {"chip_config_name": "megacore"} if topology.chip.cores_per_chip == 2 else {}
    if slices > 1:
        kwargs["num_slices"] = slices
    try:
        with _libtpu_quiet():
            desc = topologies.get_topology_desc(topology_name=topology.name, platform="tpu", **kwargs)
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"--topology={topology.name}: libtpu refuses it: {str(e).splitlines()[0]}") from e
    found = tuple(desc.devices)
    if len(found) != topology.chips * slices:
        raise ConfigError(f"--topology={topology.name}: libtpu gave {len(found)} devices for "
                          f"{topology.chips * slices} chips")
    return found


@contextlib.contextmanager
def _libtpu_quiet():
    """Keeps what libtpu writes straight to the process's stderr while it first loads (on a machine
    without a TPU: "could not determine TPU accelerator type", an INVALID_ARGUMENT about worker host
    names and a source trace, none of which matter to an abstract topology) from the terminal; a
    refusal still reaches the caller as an exception."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
