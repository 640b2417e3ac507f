"""`heft plan`: will this run fit on that TPU slice, and how fast will it go? Answered before booking it.

The real train step (`heft.train.compiled.train_step`, what `heft train` runs) is compiled by XLA
for the slice's abstract devices, on any machine with libtpu installed. From the compiled program:
memory per chip (XLA's buffer assignment) against the chip's HBM, and FLOPs and bytes per chip
(XLA's cost analysis, loop bodies counted by their trips). A roofline turns those into a step time,
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth); collectives between chips are not in it, so the
prediction is a ceiling on speed, not a forecast. MFU counts model FLOPs (`heft size`'s 6N +
attention), not XLA's, which include what remat recomputes.

Across several slices (`--slices=K`, `mesh.slices`), the step is compiled for K such slices and
what it sends over the data-center network (XLA's transfers to the megascale runtime, counted per
loop trip; `costs.py`) is charged to the chip's DCN bandwidth (train/chips.py): a third roof, the
slowest of the three setting the step time, as if the DCN transfers overlapped the compute.

    heft plan --config=configs/llama2_70b.py --topology=v5p:4x8x8 [--slices=2] [--json]
    heft plan --config=configs/llama2_70b.py --topology=v5p:4x8x8 --search   (launch/verbs/plan.py)
"""

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from heft.launch import costs, topology
from heft.model.checks import ConfigError
from heft.train import checks, chips, compiled, sharding, size


@dataclasses.dataclass
class Plan:
    """One configuration compiled for one slice. Bytes and FLOPs are per chip; times per step."""

    config: str
    topology: str  # one slice's
    chip: str
    chips: int  # over every slice
    mesh: dict  # {"slices": .., "data": .., "fsdp": .., "tensor": ..}
    remat: str
    micro_batches: int
    batch: int  # global, in sequences
    seq_len: int
    steps: int  # train.steps, for the run's length
    params: int  # bytes of this chip's parameter shards
    optimizer: int  # bytes of this chip's optimizer-state shards
    temporaries: int  # activations, gradients and other temporaries XLA allocates
    total: int  # XLA's peak: arguments + outputs - donated + temporaries + program
    hbm: int  # what XLA lets a program use (a little under the spec's HBM)
    flops: float | None  # XLA's, remat recompute included; None when it did not compile (no fit)
    bytes_accessed: float | None
    model_flops: float  # 6N + attention, per chip
    peak_flops: float
    hbm_bandwidth: float
    compile_seconds: float
    uncounted_loops: int = 0  # loops whose trip count was not found (their bodies counted once)
    slices: int = 1
    dcn_bytes: float | None = None  # sent across slices per chip per step; None when it did not compile
    dcn_bandwidth: float | None = None  # bytes/s per chip over the DCN; None where the chip table has none
    executable: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    @property
    def shortfall(self) -> int:
        """Bytes per chip beyond the HBM (0 when it fits)."""
        return max(self.total - self.hbm, 0)

    # The roofline; None for a step that did not compile.
    @property
    def compute_seconds(self) -> float | None:
        return None if self.flops is None else self.flops / self.peak_flops

    @property
    def memory_seconds(self) -> float | None:
        return None if self.bytes_accessed is None else self.bytes_accessed / self.hbm_bandwidth

    @property
    def dcn_seconds(self) -> float | None:
        """Cross-slice transfers over the DCN; 0 on one slice, None if unknown (no figure, no compile)."""
        if self.slices == 1:
            return 0.0
        if self.dcn_bytes is None or self.dcn_bandwidth is None:
            return None
        return self.dcn_bytes / self.dcn_bandwidth

    def _roofs(self) -> dict:
        return {"compute": self.compute_seconds, "memory": self.memory_seconds, "dcn": self.dcn_seconds or 0.0}

    @property
    def step_seconds(self) -> float | None:
        return None if self.flops is None else max(self._roofs().values())

    @property
    def bound(self) -> str | None:
        if self.flops is None:
            return None
        roofs = self._roofs()
        return max(roofs, key=roofs.get)

    @property
    def tokens_per_second_per_chip(self) -> float | None:
        return None if self.flops is None else self.batch * self.seq_len / self.step_seconds / self.chips

    @property
    def mfu(self) -> float | None:
        return None if self.flops is None else self.model_flops / self.step_seconds / self.peak_flops

    @property
    def overrides(self) -> list[str]:
        """The flags that select this configuration."""
        axes = sharding.AXES if self.slices > 1 else sharding.IN_SLICE
        return [f"--config.mesh.{a}={self.mesh[a]}" for a in axes] + [
            f"--config.model.remat={self.remat}", f"--config.train.micro_batches={self.micro_batches}"]

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "executable"}
        for name in ("fits", "shortfall", "compute_seconds", "memory_seconds", "dcn_seconds", "step_seconds", "bound",
                     "tokens_per_second_per_chip", "mfu", "overrides"):
            d[name] = getattr(self, name)
        return d

    def advice(self) -> str:
        """What to change when it does not fit, from where the bytes go."""
        if self.fits:
            return ""
        state = self.params + self.optimizer
        if state > self.hbm:
            return (f"parameters and optimizer state alone need {_gib(state)} per chip: shard them over "
                    "more chips (raise mesh.fsdp or mesh.tensor) or take a larger slice")
        fixes = [] if self.remat == "full" else ["set model.remat=full"]
        fixes += [f"raise train.micro_batches (now {self.micro_batches})", "shard over more chips"]
        return (f"activations and temporaries need {_gib(self.temporaries)} per chip: {', '.join(fixes)}; "
                "heft plan --search tries these")


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def state_bytes(config, mesh) -> tuple[int, int]:
    """(parameter, optimizer-state) bytes per device, from the shardings alone: nothing compiled."""
    state = compiled.abstract_state(config, mesh)
    return _shard_bytes(state["params"]), _shard_bytes(state["opt_state"])


_SIZE = r"([\d.]+)([KMGTP]?)i?B?"
# XLA:TPU's refusals of a program that cannot fit, in the two forms it words them: (needed, usable).
_OOM = re.compile(rf"required for HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)"
                  rf"|Used {_SIZE} of {_SIZE} hbm")


def _oom(error: Exception) -> tuple[int, int] | None:
    m = _OOM.search(str(error))
    if not m:
        return None
    groups = m.groups()
    sizes = groups[:4] if groups[0] is not None else groups[4:]
    return _bytes(*sizes[:2]), _bytes(*sizes[2:])


def _bytes(number: str, unit: str) -> int:
    """XLA's human-readable sizes ("15.75G") are binary: K = 2**10."""
    return int(float(number) * 1024 ** " KMGTP".index(unit or " "))


@functools.lru_cache(maxsize=None)
def _xla_hbm(device) -> int | None:
    """The HBM XLA lets a program use on an abstract chip (v5e: 15.75 of 16 GiB): asked by
    compiling a program that cannot fit and reading the limit from the refusal."""
    x = jax.ShapeDtypeStruct((2**40,), jnp.int8, sharding=SingleDeviceSharding(device))
    try:
        jax.jit(lambda x: x + 1).lower(x).compile()
    except jax.errors.JaxRuntimeError as e:
        oom = _oom(e)
        return oom[1] if oom else None
    return None


def usable_hbm(device, chip) -> int:
    """What a program may use: the runtime's limit on a real chip, XLA's on an abstract one, else the
    spec's HBM."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # abstract topology devices have no runtime to ask
        limit = None
    return int(limit or _xla_hbm(device) or chip.hbm_bytes)


def fit_check(config, mesh, topology_name: str | None = None) -> Plan:
    """Compiles `compiled.train_step(config, mesh)` for `mesh`'s devices and measures it.

    Works on real TPU devices (the loop calls it before training; stop when `not plan.fits`) and on
    a libtpu topology's abstract ones. `plan.executable` is the compiled step, callable on real
    devices with the state and batch laid out as `compiled.abstract_state/abstract_batch` say.
    A step far over the HBM fails XLA's own memory check and does not compile: such a plan has the
    total XLA asked for and no FLOPs. One that compiles is judged by its total against the usable HBM.
    """
    # This process's first device: on a pod, another host's chips cannot be asked for their HBM.
    device = next((d for d in mesh.devices.flat if d.process_index == jax.process_index()), mesh.devices.flat[0])
    chip = chips.by_kind(device.device_kind)
    if chip is None:
        raise ConfigError(f"no chip table entry for device kind {device.device_kind!r}; known: "
                          f"{', '.join(c.device_kind for c in chips.CHIPS.values())} (heft/train/chips.py)")
    checks.check(config, mesh)  # the loop's own checks: a plan stops where the run would
    n, k = mesh.devices.size, mesh.shape["slices"]
    start = time.perf_counter()
    # Shardings are built outside the mesh context: optax's state initialisation runs eagerly there
    # and would try to execute on the (abstract) devices of the active mesh.
    step = compiled.train_step(config, mesh)
    state, batch = compiled.abstract_state(config, mesh), compiled.abstract_batch(config, mesh)
    params, optimizer = _shard_bytes(state["params"]), _shard_bytes(state["opt_state"])
    common = dict(
        config=config.name, topology=topology_name or f"{n}x {device.device_kind}", chip=chip.name, chips=n,
        mesh=dict(mesh.shape), remat=config.model.remat, micro_batches=config.train.micro_batches,
        batch=config.train.batch_size, seq_len=config.train.seq_len, steps=config.train.steps,
        params=params, optimizer=optimizer,
        model_flops=size.report(config)["flops_per_step"] / n, peak_flops=chip.peak_flops,
        hbm_bandwidth=chip.hbm_bandwidth, slices=k, dcn_bandwidth=chip.dcn_bandwidth,
    )
    with sharding.activated(mesh, config):
        lowered = step.lower(state, batch)
    try:
        exe = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = _oom(e)
        if not oom:
            raise
        total, hbm = oom  # XLA's "temporaries" here are arguments, outputs and temporaries together
        return Plan(**common, temporaries=max(total - params - optimizer - _shard_bytes(batch), 0), total=total,
                    hbm=hbm, flops=None, bytes_accessed=None, compile_seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    mem = exe.memory_analysis()
    cost = costs.analyse(exe)
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    # Each buffer is reduced across the k slices: a ring sends 2 (k - 1) / k of it from every chip.
    dcn = cost.dcn_buffer_bytes * 2 * (k - 1) / k
    return Plan(**common, temporaries=mem.temp_size_in_bytes, total=total, hbm=usable_hbm(device, chip),
                flops=cost.flops, bytes_accessed=cost.bytes_accessed, compile_seconds=seconds,
                uncounted_loops=cost.uncounted_loops, dcn_bytes=dcn, executable=exe)


def mesh_for(config, topology_name: str):
    """The config's mesh laid over the named slice's abstract devices (`mesh.slices` such slices)."""
    topo = topology.parse(topology_name)
    return sharding.make_mesh(config, topology.devices(topo, sharding.slices(config)))


def plan(config, topology_name: str) -> Plan:
    """`heft plan` without the printing: the config's own layout, compiled for the named slice."""
    return fit_check(config, mesh_for(config, topology_name), topology_name)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _si(n: float, unit: str) -> str:
    for step, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= step:
            return f"{n / step:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def table(p: Plan) -> str:
    chip = chips.CHIPS[p.chip]
    mesh = " x ".join(f"{a} {p.mesh[a]}" for a in (sharding.AXES if p.slices > 1 else sharding.IN_SLICE))
    where = p.topology if p.slices == 1 else f"{p.slices} slices of {p.topology}"
    other = p.total - p.params - p.optimizer - p.temporaries
    verdict = (f"FITS, {_gib(p.hbm - p.total)} to spare ({p.total / p.hbm:.0%} of HBM)" if p.fits
               else f"DOES NOT FIT: short by {_gib(p.shortfall)} per chip")
    rows = [
        f"{p.config} on {where}: {p.chips} {p.chip} chips, mesh {mesh}, remat={p.remat}, "
        f"micro_batches={p.micro_batches}, batch {p.batch} x {p.seq_len} tokens",
        f"memory per chip (XLA's buffer assignment; compiled in {p.compile_seconds:.0f} s)",
        *(f"  {name:<26}{_gib(n):>14}" for name, n in (
            ("parameters", p.params), ("optimizer state", p.optimizer),
            ("activations, temporaries", p.temporaries), ("batch, outputs, program", other))),
        f"  {'total':<26}{_gib(p.total):>14}   of {_gib(p.hbm)} usable HBM: {verdict}",
    ]
    if not p.fits:
        rows.append(f"  -> {p.advice()}")
    if p.flops is None:
        rows.append("no FLOPs or step time: XLA stops compiling a step that cannot fit")
        return "\n".join(rows)
    rows += [
        "per chip per step",
        f"  {'FLOPs (XLA, with remat)':<26}{_si(p.flops, 'FLOP'):>14}   / {_si(chip.peak_flops, 'FLOP/s')} "
        f"= {p.compute_seconds * 1e3:,.1f} ms",
        f"  {'bytes accessed (XLA)':<26}{_si(p.bytes_accessed, 'B'):>14}   / {_si(chip.hbm_bandwidth, 'B/s')} "
        f"= {p.memory_seconds * 1e3:,.1f} ms",
        f"  {'model FLOPs (6N + attn)':<26}{_si(p.model_flops, 'FLOP'):>14}",
    ]
    if p.slices > 1:
        rows.append(
            f"  {'across slices (DCN)':<26}{_si(p.dcn_bytes, 'B'):>14}   / {_si(p.dcn_bandwidth, 'B/s')} "
            f"= {p.dcn_seconds * 1e3:,.1f} ms" if p.dcn_seconds is not None else
            f"  {'across slices (DCN)':<26}{_si(p.dcn_bytes, 'B'):>14}   (no DCN figure for {p.chip} in "
            "train/chips.py: not in the step time)")
    network = "ICI not counted" if p.slices > 1 else "no communication"
    rows += [
        f"predicted (roofline, {network}): {p.step_seconds * 1e3:,.1f} ms/step, {p.bound}-bound, "
        f"{p.tokens_per_second_per_chip:,.0f} tokens/s/chip, MFU {p.mfu:.1%}",
        f"  the config's {p.steps:,} steps: {p.steps * p.step_seconds / 3600:,.1f} hours on {'this slice' if p.slices == 1 else 'these slices'} at best",
        f"chip peaks: {chip.source}" + (f"; DCN: {chip.dcn_source}" if p.slices > 1 and chip.dcn_source else ""),
    ]
    if p.uncounted_loops:
        rows.append(f"warning: {p.uncounted_loops} loop(s) with no trip count found: their bodies counted once")
    return "\n".join(rows)


def fit_for_training(config, mesh, note=print):
    """What `heft train` runs before training on a TPU: the real step compiled and measured. Stops
    with the plan's table if it does not fit in HBM; returns the compiled step (the one the loop then
    runs: one compile, not two), or None off TPUs or on a chip the table does not know (with a note).
    """
    device = jax.devices()[0]
    if device.platform != "tpu":
        return None
    if chips.by_kind(device.device_kind) is None:
        note(f"heft: no chip table entry for TPU device kind {device.device_kind!r}: training without the "
             "memory fit check")
        return None
    p = fit_check(config, mesh)
    if not p.fits:
        raise ConfigError("this run does not fit in TPU memory:\n" + table(p))
    return p.executable
