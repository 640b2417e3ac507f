"""FLOPs and bytes accessed per device of a compiled step, from XLA's cost analysis, with loops counted.

XLA's HloCostAnalysis counts the body of a `while` loop once, whatever its trip count. heft's
layers run under a scan and micro-batches under another, so `compiled.cost_analysis()` undercounts
a 32-layer model about 30-fold. Here each loop body's cost is measured by XLA itself: the same
compiled module is analysed again with that body made an identity, and the difference is what one
trip costs. A body is then counted once per trip of it and of every loop around it:

    total = counted + sum over loops w of exclusive(w) * (trips(w) * trips(enclosing loops) - 1)

where `exclusive(w)` is w's body cost less the bodies of the loops directly inside it.
Trip counts come from the loop's condition (`counter < N`), the step its body adds to the counter
and the counter's first value.

Across TPU slices, XLA hands what crosses the data-center network to the host as a `send` for the
megascale runtime (one per buffer it reduces across slices, e.g. a layer's gradient shard). Their
bytes, counted once per trip of the loops around them, are the step's cross-slice traffic.

Within a slice, the step's collectives (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute) are read from the module with their bytes, their replica groups (positions in
the compile's device assignment) and the loop body they run in (`Collective`); launch/collectives.py
turns them into time on the slice's torus. The step is also cut into regions (`Region`): each loop
body's own FLOPs and bytes per trip, and what runs outside every loop, so that a collective can be
overlapped with the compute of the region it runs in.
"""

import dataclasses
import math
import re

import jax
from jax._src.lib import xla_client  # the module-text parser and cost analysis are not public API

_NAME = r"%([\w.\-]+)"  # an instruction or computation name in module text
_HEADER = re.compile(r"^(?:ENTRY )?%([^\s(]+) \(.*\{$")
_WHILE = re.compile(r"\bwhile\(%([^\s,)]+)\), condition=%([^\s,]+), body=%([^\s,]+)")
# A transfer to the megascale (DCN) runtime: "= (f32[18,8,128]{...}, u32[], token[]) send(...megascale..."
_DCN_SEND = re.compile(r"= \((\w+)\[([\d,]*)\][^ ]* .*\bsend\(.*xla_megascale_runtime")
_ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
             "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}


@dataclasses.dataclass
class Loop:
    body: str
    parent: str  # the computation holding the `while`
    trips: int | None  # None: not found, so the body stays counted once
    flops: float = 0.0  # one trip of the body, loops inside it included once
    bytes: float = 0.0
    multiplier: int = 1  # trips of this loop times those of every loop around it


@dataclasses.dataclass
class Region:
    """Part of a step that runs `trips` times: a loop body (its own work, loops inside it excluded),
    or "entry" (what runs outside every loop, once)."""

    name: str
    trips: int
    flops: float  # per trip
    bytes: float  # per trip


@dataclasses.dataclass
class Collective:
    """One collective of the compiled step, as one device runs it.

    bytes: the buffer the collective is about, per device: an all-gather's gathered result, a
    reduce-scatter's input (before scattering), an all-reduce's buffer, an all-to-all's or a
    collective-permute's operand. groups: the replica groups as positions in the device assignment
    (the mesh's devices in order); a collective-permute's are its (source, target) pairs.
    """

    kind: str  # all-gather | reduce-scatter | all-reduce | all-to-all | collective-permute
    bytes: float
    groups: list
    computation: str
    trips: int = 1  # per step: the trips of every loop around it
    region: str = "entry"  # the innermost loop body it runs in

    @property
    def group_size(self) -> int:
        return max((len(g) for g in self.groups), default=1)


@dataclasses.dataclass
class Kernel:
    """A Pallas kernel (a TPU custom call): XLA's cost analysis counts none of its work, so its FLOPs
    come from its name and operand shapes (launch/plan.py)."""

    name: str  # the kernel's name as Pallas gives it (e.g. splash_mha_fwd...)
    operands: list  # [(dtype, shape)] of its operands
    trips: int = 1
    region: str = "entry"


@dataclasses.dataclass
class Costs:
    flops: float  # per device, per step
    bytes_accessed: float
    xla_flops: float  # what compiled.cost_analysis() says (loop bodies once)
    xla_bytes_accessed: float
    loops: list[Loop]
    dcn_buffer_bytes: float = 0.0  # per device, per step: buffers reduced across slices (0 on one slice)
    regions: list = dataclasses.field(default_factory=list)  # Region: loop bodies and the entry
    collectives: list = dataclasses.field(default_factory=list)  # Collective, within the slice
    kernels: list = dataclasses.field(default_factory=list)  # Kernel: Pallas custom calls
    dcn_regions: dict = dataclasses.field(default_factory=dict)  # region -> DCN buffer bytes per trip

    @property
    def uncounted_loops(self) -> int:
        return sum(loop.trips is None for loop in self.loops)


def _computations(lines: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (header line, closing line) of every computation in a module's text."""
    found, name, start = {}, None, 0
    for i, line in enumerate(lines):
        if name is None:
            m = _HEADER.match(line)
            if m:
                name, start = m.group(1), i
        elif line.rstrip() == "}":  # not "}}, metadata=...": a Pallas kernel's config spans lines
            found[name], name = (start, i), None
    return found


def _definitions(lines: list[str], span: tuple[int, int]) -> dict[str, str]:
    """name -> the text after `=` of each instruction of a computation ("ROOT" for its root too)."""
    defs = {}
    for line in lines[span[0] + 1 : span[1]]:
        m = re.match(rf"\s*(ROOT )?{_NAME} = (.*)", line)
        if m:
            defs[m.group(2)] = m.group(3)
            if m.group(1):
                defs["ROOT"] = m.group(3)
    return defs


def _constant(defs: dict[str, str], name: str) -> int | None:
    m = re.match(r"[su](?:32|64)\[\][^ ]* constant\((-?\d+)\)", defs.get(name, ""))
    return int(m.group(1)) if m else None


def _operands(instruction: str, op: str) -> list[str]:
    """The operand names of `op(...)` in an instruction's text (comments such as /*index=5*/ dropped)."""
    args = re.sub(r"/\*.*?\*/", "", instruction).split(f" {op}(", 1)[1].split(")", 1)[0]
    return re.findall(_NAME, args)


def _trips(lines: list[str], comps: dict, cond: str, body: str, parent: str, operand: str) -> int | None:
    """Trips of a loop whose condition is `counter < N` and whose body adds a constant step to the
    counter (JAX's scans: step 1 from 0; XLA's windowed einsums: step 2). None if not that form."""
    try:
        cdefs, bdefs, pdefs = (_definitions(lines, comps[c]) for c in (cond, body, parent))
        m = re.search(rf"compare\({_NAME}, {_NAME}\).*direction=LT", cdefs["ROOT"])
        index = int(re.search(r"index=(\d+)", cdefs[m.group(1)]).group(1))
        limit = _constant(cdefs, m.group(2))
        update = bdefs[_operands(bdefs["ROOT"], "tuple")[index]]
        step = next(_constant(bdefs, a) for a in _operands(update, "add") if _constant(bdefs, a) is not None)
        init = _constant(pdefs, _operands(pdefs[operand], "tuple")[index]) if operand in pdefs else None
        init = 0 if init is None else init
        return max(-(-(limit - init) // step), 0) if limit is not None and step > 0 else None
    except (KeyError, AttributeError, IndexError, StopIteration, TypeError):
        return None


def _cost(text: str) -> dict:
    """XLA's HloCostAnalysis of a module's text. The generic analysis (through the CPU client)
    gives the TPU compiler's FLOPs exactly and its bytes within a few percent; only differences
    between two of its answers are used."""
    from jaxlib import _hlo

    try:
        client = jax.devices("cpu")[0].client
    except RuntimeError:  # JAX_PLATFORMS=tpu: a real TPU's client analyses modules too
        client = jax.devices()[0].client
    return xla_client._xla.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(text))


def analyse(compiled) -> Costs:
    """Per-device costs of a `jax.stages.Compiled`, every loop body counted by its trips."""
    return analyse_text(compiled.as_text(), compiled.cost_analysis())


def analyse_text(text: str, xla: dict) -> Costs:
    """As `analyse`, from a compiled module's text and XLA's own (loops-once) cost analysis of it."""
    lines = text.split("\n")
    comps = _computations(lines)
    loops = []
    for name, (start, end) in comps.items():
        for line in lines[start + 1 : end]:
            m = _WHILE.search(line)
            if m and m.group(2) in comps and m.group(3) in comps:
                trips = _trips(lines, comps, m.group(2), m.group(3), name, m.group(1))
                loops.append(Loop(body=m.group(3), parent=name, trips=trips))
    if not loops:
        owner = lambda name: (1, "entry")  # noqa: E731
        return Costs(xla["flops"], xla["bytes accessed"], xla["flops"], xla["bytes accessed"], [],
                     _dcn_bytes(lines, comps, lambda name: 1),
                     regions=[Region("entry", 1, xla["flops"], xla["bytes accessed"])],
                     collectives=collectives(lines, comps, owner), kernels=kernels(lines, comps, owner),
                     dcn_regions=_dcn_regions(lines, comps, owner))

    base = _cost(text)
    for loop in loops:
        start, end = comps[loop.body]
        param = next(line for line in lines[start + 1 : end] if re.search(r"\bparameter\(0\)", line))
        identity = lines[: start + 1] + ["  ROOT " + param.strip()] + lines[end:]
        without = _cost("\n".join(identity))
        loop.flops = base["flops"] - without["flops"]
        loop.bytes = base["bytes accessed"] - without["bytes accessed"]

    # Which computations each one reaches (calls, fusions, loop bodies): to find loops inside loops.
    callees = {n: {c for line in lines[s + 1 : e] for c in re.findall(_NAME, line) if c in comps and c != n}
               for n, (s, e) in comps.items()}

    def reaches(src: str, dst: str) -> bool:
        todo, seen = [src], set()
        while todo:
            n = todo.pop()
            if n == dst:
                return True
            seen.add(n)
            todo.extend(callees[n] - seen)
        return False

    n = len(loops)
    inside = [{j for j in range(n) if j != i and reaches(loops[i].body, loops[j].parent)} for i in range(n)]
    flops, nbytes = xla["flops"], xla["bytes accessed"]
    for i, w in enumerate(loops):
        w.multiplier = math.prod(loops[k].trips or 1 for k in range(n) if i in inside[k]) * (w.trips or 1)
    regions, entry_flops, entry_bytes = [], xla["flops"], xla["bytes accessed"]
    for i, w in enumerate(loops):
        direct = [j for j in inside[i] if not any(j in inside[k] for k in inside[i])]
        own_flops = w.flops - sum(loops[j].flops for j in direct)
        own_bytes = w.bytes - sum(loops[j].bytes for j in direct)
        flops += own_flops * (w.multiplier - 1)
        nbytes += own_bytes * (w.multiplier - 1)
        regions.append(Region(w.body, w.multiplier, max(own_flops, 0.0), max(own_bytes, 0.0)))
        entry_flops, entry_bytes = entry_flops - own_flops, entry_bytes - own_bytes
    regions.insert(0, Region("entry", 1, max(entry_flops, 0.0), max(entry_bytes, 0.0)))

    def owner(name: str) -> tuple[int, str]:
        """(trips, region) of a computation: those of the innermost loop body reaching it."""
        found = [w for w in loops if reaches(w.body, name)]
        if not found:
            return 1, "entry"
        w = max(found, key=lambda w: w.multiplier)
        return w.multiplier, w.body

    def trips(name: str) -> int:  # a computation runs as often as the innermost loop body reaching it
        return owner(name)[0]

    return Costs(flops, nbytes, xla["flops"], xla["bytes accessed"], loops, _dcn_bytes(lines, comps, trips),
                 regions=regions, collectives=collectives(lines, comps, owner), kernels=kernels(lines, comps, owner),
                 dcn_regions=_dcn_regions(lines, comps, owner))


def _dcn_bytes(lines: list[str], comps: dict, trips) -> float:
    """Bytes of the buffers a device hands to the megascale (DCN) runtime per step, each send counted
    `trips(computation)` times."""
    total = 0.0
    for name, (start, end) in comps.items():
        for line in lines[start + 1 : end]:
            m = _DCN_SEND.search(line)
            if m:
                count = math.prod(int(d) for d in m.group(2).split(",") if d)
                total += count * _ITEMSIZE.get(m.group(1), 4) * trips(name)
    return total


def _dcn_regions(lines: list[str], comps: dict, owner) -> dict:
    """region -> bytes handed to the megascale (DCN) runtime per trip of that region."""
    out: dict = {}
    for name, (start, end) in comps.items():
        for line in lines[start + 1 : end]:
            m = _DCN_SEND.search(line)
            if m:
                count = math.prod(int(d) for d in m.group(2).split(",") if d)
                region = owner(name)[1]
                out[region] = out.get(region, 0.0) + count * _ITEMSIZE.get(m.group(1), 4)
    return out


# A collective instruction: "%name = TYPE op(" with op one of the collectives (or its async start).
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) (all-gather|all-gather-start|reduce-scatter|all-reduce|"
                         r"all-reduce-start|all-to-all|collective-permute|collective-permute-start)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, shape)] of the arrays in an HLO type (an array or a tuple of them); tokens and
    scalars of u32 (async collectives' bookkeeping) left out."""
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        shape = tuple(int(d) for d in dims.split(",") if d)
        if dtype in _ITEMSIZE and not (dtype in ("u32", "s32") and not shape):
            out.append((dtype, shape))
    return out


def _nbytes(arrays) -> float:
    return float(sum(math.prod(shape) * _ITEMSIZE[dtype] for dtype, shape in arrays))


def _iota_groups(text: str):
    """`[G,S]<=[dims]T(perm)` (XLA's iota replica groups): G groups of S ids."""
    m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        return None
    import numpy as np

    out_shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    ids = ids.reshape(out_shape)
    return [tuple(int(i) for i in row) for row in ids.reshape(-1, out_shape[-1])]


def _mesh_groups(text: str):
    """`mesh['a'=2,'b'=4], device_ids=([dims]T(perm)) {'a'}`: groups along the named mesh axes."""
    import numpy as np

    m = re.match(r"mesh\[([^\]]*)\](?:, device_ids=\(?(\[[\d,]+\](?:T\([\d,]+\))?|\{[\d,]*\})\)?)? \{([^}]*)\}",
                 text)
    if not m:
        return None
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    ids = np.arange(math.prod(sizes))
    if m.group(2):
        if m.group(2).startswith("{"):
            ids = np.array([int(x) for x in m.group(2)[1:-1].split(",") if x])
        else:
            dm = re.match(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", m.group(2))
            dims = [int(x) for x in dm.group(1).split(",")]
            ids = ids.reshape(dims)
            if dm.group(2):
                ids = ids.transpose([int(x) for x in dm.group(2).split(",")])
    ids = ids.reshape(sizes)
    chosen = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
    rest = [i for i in range(len(names)) if i not in chosen]
    ids = ids.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen) if chosen else 1)
    return [tuple(int(i) for i in row) for row in ids]


def replica_groups(line: str, n_devices: int | None = None) -> list:
    """The replica groups of a collective's text, as tuples of device-assignment positions; [] when it
    names none (every device in one group: the caller knows how many)."""
    m = re.search(r"replica_groups=(.*)", line)
    if m:
        text = m.group(1)
        if text.startswith("{"):
            body = text[: text.index("}}") + 2] if text.startswith("{{") else "{}"
            return [tuple(int(x) for x in g.split(",") if x) for g in re.findall(r"\{([\d,]*)\}", body)
                    if g != ""] if body != "{}" else []
        return _iota_groups(text) or _mesh_groups(text) or []
    m = re.search(r"source_target_pairs=\{(\{[\d,{}]*\})\}", line)
    if m:
        return [tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1))]
    return []


def collectives(lines: list[str], comps: dict, owner) -> list:
    """Every collective of the module with its bytes, groups and the loop body it runs in.

    XLA:TPU writes a reduce-scatter as a fusion calling an `all-reduce-scatter` computation whose
    all-reduce reduces the whole input; that all-reduce is a reduce-scatter here.
    """
    out = []
    for name, (start, end) in comps.items():
        scatter = name.startswith("all-reduce-scatter")
        for line in lines[start + 1 : end]:
            m = _COLLECTIVE.match(line)
            if not m:
                continue
            kind = m.group(2).removesuffix("-start")
            arrays = _arrays(m.group(1))
            if m.group(2) == "all-gather-start" and len(arrays) > 1:
                arrays = arrays[len(arrays) // 2:]  # (operands, results): the results
            if kind == "all-reduce" and scatter:
                kind = "reduce-scatter"  # its input is the buffer reduced: the all-reduce's operand here
            elif kind == "reduce-scatter":
                arrays = _operand_arrays(line) or arrays
            trips, region = owner(name)
            out.append(Collective(kind, _nbytes(arrays), replica_groups(line), name, trips, region))
    return out


def _operand_arrays(line: str):
    """[(dtype, shape)] of an instruction's typed operands (`op(bf16[..] %a, ...)`), when written."""
    args = line.split("(", 1)[1] if "(" in line else ""
    return _arrays(args.split(")", 1)[0]) if "[" in args.split(")", 1)[0] else []


_KERNEL = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .+? custom-call\((.*?)\), custom_call_target=\"tpu_custom_call\"")


def kernels(lines: list[str], comps: dict, owner) -> list:
    """Every Pallas TPU kernel of the module (custom_call_target="tpu_custom_call"), named as the
    instruction is (Pallas names it after the kernel: splash_mha_fwd_segmented_residuals.3), with its
    operands' shapes (from their definitions in the same computation)."""
    out = []
    for name, (start, end) in comps.items():
        defs = None
        for line in lines[start + 1 : end]:
            m = _KERNEL.match(line)
            if not m:
                continue
            if defs is None:
                defs = _definitions(lines, comps[name])
            operands = []
            for arg in re.findall(_NAME, re.sub(r"/\*.*?\*/", "", m.group(2))):
                operands += _arrays(defs.get(arg, "").split(" ", 1)[0] if defs.get(arg) else "")[:1]
            trips, region = owner(name)
            out.append(Kernel(m.group(1), operands, trips, region))
    return out
