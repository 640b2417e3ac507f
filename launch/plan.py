"""`heft plan`: will this run fit on that TPU slice, and how fast will it go? Answered before booking it.

The real train step (`heft.train.compiled.train_step`, what `heft train` runs) is compiled by XLA
for the slice's abstract devices, on any machine with libtpu installed. From the compiled program:
memory per chip (XLA's buffer assignment) against the chip's HBM, and FLOPs and bytes per chip
(XLA's cost analysis, loop bodies counted by their trips), and every collective with its bytes and
replica groups, laid onto the slice's torus (launch/collectives.py). MFU counts model FLOPs (`heft
size`'s 6N + attention), not XLA's, which include what remat recomputes.

The predicted step time, region by region (a loop body's trip, or what runs outside every loop;
costs.py cuts the step so):

    step = sum over regions of trips * max(compute, hbm, ici, dcn)
    compute = FLOPs / (peak FLOP/s * mxu_efficiency)    hbm = bytes / HBM bandwidth (XLA's, for the whole region)
    ici = the region's collectives on the torus           dcn = what it sends across slices / DCN bandwidth

Within a region, XLA's asynchronous collectives run beside the compute they do not feed (FSDP's
all-gather of the next layer's weights during this layer's matmuls, the reduce-scatter of the last
layer's gradients during this one's backward), and the TPU streams HBM under its matmuls (XLA fuses
the elementwise work into them), so a region costs the slowest of the four; the regions run one
after another. Charging compute + HBM instead could not match MaxText's FSDP-only and its
tensor-parallel runs with one constant (bench/RESULTS.md, "Calibration"). `mxu_efficiency` is the one
calibration constant per chip generation (train/chips.py), fitted there to MaxText's published runs.
The printed columns (compute, HBM, ICI, DCN, and the communication left exposed) show which one
bounds the step.

Across several slices (`--slices=K`, `mesh.slices`), the step is compiled for K such slices and
what it sends over the data-center network (XLA's transfers to the megascale runtime, counted per
loop trip; `costs.py`) is charged to the chip's DCN bandwidth (train/chips.py).

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

from heft.launch import collectives, costs, pallas_flops, topology
from heft.model import kernels as kernel_choice
from heft.model.checks import ConfigError
from heft.train import checks, chips, compiled, remat, sharding, size
from heft.train import state as train_state


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
    mxu_efficiency: float = 1.0  # the chip generation's calibration constant (train/chips.py)
    kernel_flops: float = 0.0  # Pallas kernels' FLOPs (XLA counts none), already in `flops`
    ici_seconds: float | None = None  # every collective within a slice, one after another
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> count, bytes, seconds per step
    # Per region (costs.py): {"name", "trips", "compute", "hbm", "ici", "dcn"}, seconds per trip.
    regions: list = dataclasses.field(default_factory=list)
    attention: str = "xla"  # the attention the step compiled with (model.attention, resolved)
    executable: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    @property
    def shortfall(self) -> int:
        """Bytes per chip beyond the HBM (0 when it fits)."""
        return max(self.total - self.hbm, 0)

    # Each term on its own, whole step; None for a step that did not compile.
    @property
    def compute_seconds(self) -> float | None:
        return None if self.flops is None else self.flops / (self.peak_flops * self.mxu_efficiency)

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

    def _region_seconds(self, r: dict) -> float:
        return r["trips"] * max(r["compute"], r["hbm"], r["ici"], r["dcn"])

    @property
    def step_seconds(self) -> float | None:
        """The prediction: sum over regions of trips * max(compute, hbm, ici, dcn) (module doc)."""
        if self.flops is None:
            return None
        return math.fsum(self._region_seconds(r) for r in self.regions)

    @property
    def exposed_seconds(self) -> float | None:
        """Communication (ICI, DCN) the work (compute, HBM) of its region could not hide."""
        if self.flops is None:
            return None
        return self.step_seconds - math.fsum(r["trips"] * max(r["compute"], r["hbm"]) for r in self.regions)

    @property
    def bound(self) -> str | None:
        """What most of the step's time is spent waiting for: compute, memory (HBM), ici or dcn."""
        if self.flops is None:
            return None
        share = {"compute": 0.0, "memory": 0.0, "ici": 0.0, "dcn": 0.0}
        for r in self.regions:  # each region's time goes to its slowest term
            terms = {"compute": r["compute"], "memory": r["hbm"], "ici": r["ici"], "dcn": r["dcn"]}
            slowest = max(terms, key=terms.get)
            share[slowest] += r["trips"] * terms[slowest]
        return max(share, key=share.get)

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
        for name in ("fits", "shortfall", "compute_seconds", "memory_seconds", "dcn_seconds", "exposed_seconds",
                     "step_seconds", "bound", "tokens_per_second_per_chip", "mfu", "error_bar", "overrides"):
            d[name] = getattr(self, name)
        return d

    @property
    def error_bar(self) -> str:
        """How far the MFU can be trusted, from the chip's validation (train/chips.py): an error bar
        where the validation covers this plan, else "uncalibrated" and why."""
        cal = chips.CHIPS[self.chip].calibration if self.chip in chips.CHIPS else None
        if cal is None:
            return f"uncalibrated: no published {self.chip} run is fitted, so this is a ceiling"
        outside = [what for what, out in ((f"remat={self.remat}", self.remat not in cal.remats),
                                          (f"{self.slices} slices", self.slices > 1)) if out]
        if outside:
            return (f"uncalibrated: {' and '.join(outside)} is outside the published {self.chip} runs fitted "
                    f"(remat {'/'.join(cal.remats)}, one slice; {cal.source})")
        held_out = (f"leave-one-out error {cal.leave_one_out:.1f} points on average, {cal.worst:.1f} at worst, "
                    f"over {cal.runs} published {self.chip} runs")
        if not cal.validated:
            why = "too few runs to validate" if cal.runs < 3 else f"no better than their mean MFU ({cal.null:.1f})"
            return f"uncalibrated: {held_out}; {why} ({cal.source})"
        return f"±{cal.leave_one_out:.1f} points ({held_out}; {cal.source})"

    @property
    def error_bar_short(self) -> str:
        """`error_bar` in a word or two, for one-line notes: "±N points" or "uncalibrated"."""
        return self.error_bar.split(" (")[0] if self.error_bar.startswith("±") else "uncalibrated"

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
    state = train_state.abstract(config, mesh)
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
    state, batch = train_state.abstract(config, mesh), compiled.abstract_batch(config, mesh)
    params, optimizer = _shard_bytes(state["params"]), _shard_bytes(state["opt_state"])
    common = dict(
        config=config.name, topology=topology_name or f"{n}x {device.device_kind}", chip=chip.name, chips=n,
        mesh=dict(mesh.shape), remat=config.model.remat, micro_batches=config.train.micro_batches,
        batch=config.train.batch_size, seq_len=config.train.seq_len, steps=config.train.steps,
        params=params, optimizer=optimizer,
        model_flops=size.report(config)["flops_per_step"] / n, peak_flops=chip.peak_flops,
        hbm_bandwidth=chip.hbm_bandwidth, slices=k, dcn_bandwidth=chip.dcn_bandwidth,
        mxu_efficiency=chip.mxu_efficiency, attention=kernel_choice.resolve(config.model, "tpu", config.train.seq_len),
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
    ring = 2 * (k - 1) / k
    dcn = cost.dcn_buffer_bytes * ring
    coords = collectives.device_coords(mesh)
    link = chip.ici_link_bandwidth
    kernel = {r.name: 0.0 for r in cost.regions}
    for kern in cost.kernels:
        kernel[kern.region] = kernel.get(kern.region, 0.0) + pallas_flops.flops(kern)
    ici = collectives.by_region(cost.collectives, coords, link)
    rate = chip.peak_flops * chip.mxu_efficiency
    regions = [{"name": r.name, "trips": r.trips, "compute": (r.flops + kernel.get(r.name, 0.0)) / rate,
                "hbm": r.bytes / chip.hbm_bandwidth, "ici": ici.get(r.name, 0.0),
                "dcn": (cost.dcn_regions.get(r.name, 0.0) * ring / chip.dcn_bandwidth
                        if chip.dcn_bandwidth and k > 1 else 0.0)} for r in cost.regions]
    kernel_flops = math.fsum(pallas_flops.flops(kern) * kern.trips for kern in cost.kernels)
    return Plan(**common, temporaries=mem.temp_size_in_bytes, total=total, hbm=usable_hbm(device, chip),
                flops=cost.flops + kernel_flops, bytes_accessed=cost.bytes_accessed, compile_seconds=seconds,
                uncounted_loops=cost.uncounted_loops, dcn_bytes=dcn, kernel_flops=kernel_flops,
                ici_seconds=collectives.total_seconds(cost.collectives, coords, link),
                collectives=collectives.summary(cost.collectives, coords, link), regions=regions, executable=exe)


def mesh_for(config, topology_name: str):
    """The config's mesh laid over the named slice's abstract devices (`mesh.slices` such slices).

    One slice is laid out as `heft train` lays it on the real chips: `jax.make_mesh`, which orders the
    devices so that each mesh axis follows the torus (the ICI term depends on it)."""
    topo = topology.parse(topology_name)
    return layout_mesh(config, topology.devices(topo, sharding.slices(config)))


def layout_mesh(config, devices):
    """The config's mesh over `devices` (abstract or real), as a run on those chips would make it."""
    if sharding.slices(config) > 1:
        return sharding.make_mesh(config, devices)
    shape = sharding.mesh_shape(config, len(devices))
    try:
        return jax.make_mesh(shape, sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                             devices=list(devices))
    except (ValueError, NotImplementedError, AssertionError):  # shapes jax cannot fold onto the torus
        return sharding.make_mesh(config, devices)


def plan(config, topology_name: str, note=lambda line: None) -> Plan:
    """`heft plan` without the printing: the config's own layout, compiled for the named slice.

    model.remat=auto is chosen as `heft train` would choose it on that slice (train/remat.py): the
    least recompute that fits, said through `note`."""
    mesh = mesh_for(config, topology_name)
    if config.model.remat != "auto":
        return fit_check(config, mesh, topology_name)
    plans = {}

    def predict(c, mesh):
        plans[c.model.remat] = fit_check(c, mesh, topology_name)
        return plans[c.model.remat].step_seconds if plans[c.model.remat].fits else None

    choice = remat.by_prediction(config, mesh, predict)
    note(choice.line())
    return plans[choice.remat]


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
    comm = p.ici_seconds or 0.0
    rows += [
        "per chip per step",
        f"  {'FLOPs (XLA, with remat)':<26}{_si(p.flops, 'FLOP'):>14}   / {_si(chip.peak_flops, 'FLOP/s')} "
        f"x {p.mxu_efficiency:.2f} (calibration) = {p.compute_seconds * 1e3:,.1f} ms"
        + (f"  ({_si(p.kernel_flops, 'FLOP')} in Pallas kernels)" if p.kernel_flops else ""),
        f"  {'bytes accessed (XLA)':<26}{_si(p.bytes_accessed, 'B'):>14}   / {_si(chip.hbm_bandwidth, 'B/s')} "
        f"= {p.memory_seconds * 1e3:,.1f} ms",
        f"  {'collectives (ICI)':<26}{_si(sum(r['bytes'] for r in p.collectives.values()), 'B'):>14}   on "
        f"{chip.ici_links} links x {_si(chip.ici_link_bandwidth, 'B/s')} = {comm * 1e3:,.1f} ms",
        *(f"    {kind:<24}{r['count']:>6,} x  {_si(r['bytes'], 'B'):>11}   {r['seconds'] * 1e3:>9,.1f} ms"
          for kind, r in sorted(p.collectives.items())),
        f"  {'model FLOPs (6N + attn)':<26}{_si(p.model_flops, 'FLOP'):>14}   attention={p.attention}",
    ]
    if p.slices > 1:
        rows.append(
            f"  {'across slices (DCN)':<26}{_si(p.dcn_bytes, 'B'):>14}   / {_si(p.dcn_bandwidth, 'B/s')} "
            f"= {p.dcn_seconds * 1e3:,.1f} ms" if p.dcn_seconds is not None else
            f"  {'across slices (DCN)':<26}{_si(p.dcn_bytes, 'B'):>14}   (no DCN figure for {p.chip} in "
            "train/chips.py: not in the step time)")
    rows += [
        "predicted step = sum over loop bodies of max(compute, HBM, ICI, DCN): each overlaps the others "
        "within the body it runs in",
        f"  {'compute':>10} {'HBM':>10} {'ICI':>10} {'DCN':>10} {'exposed':>10} {'step':>10}",
        f"  {p.compute_seconds * 1e3:>8,.1f}ms {p.memory_seconds * 1e3:>8,.1f}ms {comm * 1e3:>8,.1f}ms "
        f"{(p.dcn_seconds or 0.0) * 1e3:>8,.1f}ms {p.exposed_seconds * 1e3:>8,.1f}ms {p.step_seconds * 1e3:>8,.1f}ms",
        f"predicted: {p.step_seconds * 1e3:,.1f} ms/step, {p.bound}-bound, "
        f"{p.tokens_per_second_per_chip:,.0f} tokens/s/chip, MFU {p.mfu:.1%}",
        f"  MFU's error bar: {p.error_bar}",
        f"  the config's {p.steps:,} steps: {p.steps * p.step_seconds / 3600:,.1f} hours on "
        f"{'this slice' if p.slices == 1 else 'these slices'}",
        f"chip peaks: {chip.source}; ICI: {chip.ici_source}"
        + (f"; DCN: {chip.dcn_source}" if p.slices > 1 and chip.dcn_source else ""),
    ]
    if p.uncounted_loops:
        rows.append(f"warning: {p.uncounted_loops} loop(s) with no trip count found: their bodies counted once")
    return "\n".join(rows)


class ForTraining:
    """What `heft train` compiles on a TPU before training: the real step, measured by the plan.

    `predict(config, mesh)`: the step's predicted seconds, or None if it does not fit (how
    model.remat=auto chooses there); `fit(config, mesh)`: stops with the plan's table if the step
    does not fit in HBM, else returns the compiled step (the one the loop then runs). A config
    compiles once for both. Off TPUs, or on a chip the table does not know (with a note), neither
    applies: `predict` is None and `fit` returns None.
    """

    def __init__(self, note=print):
        device = jax.devices()[0]
        self.on_tpu = device.platform == "tpu"
        if self.on_tpu and chips.by_kind(device.device_kind) is None:
            note(f"heft: no chip table entry for TPU device kind {device.device_kind!r}: training without the "
                 "memory fit check")
            self.on_tpu = False
        self.predict = self._predict if self.on_tpu else None
        self._plans = {}

    def _plan(self, config, mesh) -> Plan:
        key = config.to_json()
        if key not in self._plans:
            self._plans[key] = fit_check(config, mesh)
        return self._plans[key]

    def _predict(self, config, mesh) -> float | None:
        p = self._plan(config, mesh)
        return p.step_seconds if p.fits else None

    def fit(self, config, mesh):
        if not self.on_tpu:
            return None
        p = self._plan(config, mesh)
        if not p.fits:
            raise ConfigError("this run does not fit in TPU memory:\n" + table(p))
        self._plans.clear()  # the chosen step is returned; the candidates' executables can go
        return p.executable
