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
class Costs:
    flops: float  # per device, per step
    bytes_accessed: float
    xla_flops: float  # what compiled.cost_analysis() says (loop bodies once)
    xla_bytes_accessed: float
    loops: list[Loop]
    dcn_buffer_bytes: float = 0.0  # per device, per step: buffers reduced across slices (0 on one slice)

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
        elif line.startswith("}"):
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
        return Costs(xla["flops"], xla["bytes accessed"], xla["flops"], xla["bytes accessed"], [],
                     _dcn_bytes(lines, comps, lambda name: 1))

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
    for i, w in enumerate(loops):
        direct = [j for j in inside[i] if not any(j in inside[k] for k in inside[i])]
        flops += (w.flops - sum(loops[j].flops for j in direct)) * (w.multiplier - 1)
        nbytes += (w.bytes - sum(loops[j].bytes for j in direct)) * (w.multiplier - 1)

    def trips(name: str) -> int:  # a computation runs as often as the innermost loop body reaching it
        return max((w.multiplier for w in loops if reaches(w.body, name)), default=1)

    return Costs(flops, nbytes, xla["flops"], xla["bytes accessed"], loops, _dcn_bytes(lines, comps, trips))


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
