"""`heft plan --search`: which mesh layout, remat policy and micro-batch count to book a slice with.

Every candidate is a real compile (a minute or more for a large model), so the search spends a
budget of compiles where they can pay:
- layouts (data x fsdp x tensor over the slice's chips) whose shapes do not divide the model or the
  batch are dropped, and so are those whose parameter and optimizer shards alone (known from the
  shardings, nothing compiled) exceed the HBM; the rest are tried from the least state per chip up,
  so a budget is spent first where a step can fit;
- per layout, remat policies are tried from least recompute (none) to most (full), and for each the
  fewest micro-batches that fit: more micro-batches only re-read the weights more often, and a policy
  that fits whole batches makes heavier ones pointless;
- a compile that does not fit says how far over it is; the next micro-batch count tried is the one
  that brings the activations under the HBM, not simply the next.
"""

import dataclasses
import math

from heft.launch import plan as planning
from heft.launch import topology
from heft.model.checks import ConfigError, expert_width, sparse
from heft.train import checks, sharding
from heft.train.remat import CANDIDATES as REMATS  # least recompute first

TENSOR = (1, 2, 4, 8)  # tensor parallelism beyond 8 rarely pays: its collectives sit on every matmul


@dataclasses.dataclass
class Search:
    topology: str
    config: str
    plans: list  # every compiled candidate, fitting or not
    skipped: list[str]  # candidates dropped before compiling, with the reason
    budget_left: int

    @property
    def ranked(self) -> list:
        """The candidates that fit, shortest predicted step first (compute, HBM and the collectives
        each layout's compile holds: launch/plan.py); the batch is the same for all of them."""
        return sorted((p for p in self.plans if p.fits), key=lambda p: p.step_seconds)

    def to_json(self) -> dict:
        return {"topology": self.topology, "config": self.config,
                "ranked": [p.to_json() for p in self.ranked],
                "not_fitting": [p.to_json() for p in self.plans if not p.fits],
                "skipped": self.skipped, "budget_left": self.budget_left}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(config, chips: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) splits of one slice's `chips` that the model's widths and the batch divide
    (of the chips the config's `mesh.expert` leaves: the expert axis is kept as the config sets it)."""
    m = config.model
    expert = config.mesh.get("expert", 1)
    chips //= expert
    out = []
    for tensor in TENSOR:
        widths = (m.heads, m.kv_heads, expert_width(m) if sparse(m) else m.mlp_width, m.vocab)
        if chips % tensor or any(d % tensor for d in widths):
            continue
        for fsdp in _divisors(chips // tensor):
            data = chips // tensor // fsdp
            sizes = {"slices": sharding.slices(config), "data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
            if m.width % fsdp == 0 and config.train.batch_size % checks.batch_devices(config, sizes) == 0:
                out.append((data, fsdp, tensor))
    return out


def with_overrides(config, layout=None, remat=None, micro_batches=None):
    c = config.copy_and_resolve_references()  # a locked config still takes new values for its fields
    if layout is not None:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = layout
    if remat is not None:
        c.model.remat = remat
    if micro_batches is not None:
        c.train.micro_batches = micro_batches
    return c


def _micro_counts(config, layout) -> list[int]:
    """Micro-batch counts that leave each micro-batch divisible over the batch's devices."""
    per_device = config.train.batch_size // (sharding.slices(config) * layout[0] * layout[1] * config.mesh.get("expert", 1))
    return _divisors(per_device)


def search(config, topology_name: str, remats=REMATS, budget: int = 16, progress=lambda s: None) -> Search:
    """Compiles candidates for the named slice, within `budget` compiles; see the module doc."""
    topo = topology.parse(topology_name)
    devices = topology.devices(topo, sharding.slices(config))
    result = Search(topology_name, config.name, [], [], budget)
    candidates = layouts(config, topo.chips)
    if not candidates:
        raise ConfigError(f"no data x fsdp x tensor split of {topo.chips} chips divides model.width, the heads "
                          f"and train.batch_size={config.train.batch_size}; pick a batch that is a multiple "
                          f"of {topo.chips}")
    room = []  # (state bytes per chip, layout, config, mesh) of the layouts whose state fits
    for layout in candidates:
        c = with_overrides(config, layout)
        mesh = planning.layout_mesh(c, devices)  # as heft train lays it on the torus: the ICI term depends on it
        try:
            params, opt = planning.state_bytes(c, mesh)
        except ConfigError as e:
            result.skipped.append(f"{_name(layout)}: {e}")
            continue
        if params + opt > topo.chip.hbm_bytes:
            result.skipped.append(f"{_name(layout)}: parameters and optimizer need "
                                  f"{(params + opt) / 2**30:,.1f} GiB per chip")
            continue
        room.append((params + opt, layout, c, mesh))
    # The least state per chip first: the budget goes to layouts that can fit before those that
    # cannot (a large model's data-parallel layouts fail at every remat); ties keep fewer tensor.
    ordered = sorted(room, key=lambda r: (r[0], r[1][2]))
    for i, (_, layout, c, mesh) in enumerate(ordered):
        if result.budget_left <= 0:
            result.skipped.append(f"{len(ordered) - i} layout(s) not tried, from {_name(layout)} on: budget spent; "
                                  "raise --budget to try them")
            break
        for remat in remats:
            fitted = _fewest_micro_batches(c, layout, remat, mesh, topology_name, result, progress)
            if fitted is not None and fitted.micro_batches == 1:
                break  # heavier remat would only add recompute
    return result


def _fewest_micro_batches(c, layout, remat, mesh, topology_name, result, progress):
    counts = _micro_counts(c, layout)
    i = 0
    while i < len(counts) and result.budget_left > 0:
        cand = with_overrides(c, remat=remat, micro_batches=counts[i])
        p = planning.fit_check(cand, mesh, topology_name)
        p.executable = None  # a search keeps numbers, not programs
        result.plans.append(p)
        result.budget_left -= 1
        progress(f"{_name(layout)} remat={remat} micro_batches={counts[i]}: "
                 + (f"fits, MFU {p.mfu:.1%}" if p.fits else f"short by {p.shortfall / 2**30:,.1f} GiB"))
        if p.fits:
            return p
        # Temporaries shrink about in proportion to the micro-batch: jump to the count that fits.
        room = p.hbm - (p.total - p.temporaries)
        if room <= 0:
            return None
        need = counts[i] * math.ceil(p.temporaries / room)
        i = next((j for j, n in enumerate(counts) if n >= need and j > i), len(counts))
    return None


def _name(layout) -> str:
    return "data {} x fsdp {} x tensor {}".format(*layout)


def table(s: Search) -> str:
    ranked = s.ranked
    k = s.plans[0].slices if s.plans else 1
    where = s.topology if k == 1 else f"{k} slices of {s.topology}"
    rows = [f"{s.config} on {where}: {len(ranked)} of {len(s.plans)} compiled configurations fit "
            "(predicted step: compute, HBM and collectives overlapped per loop body; shortest first)",
            f"{'#':>3} {'data':>5} {'fsdp':>5} {'tens':>5} {'remat':<13}{'micro':>6} {'GiB/chip':>9} {'HBM':>5} "
            f"{'compute':>9} {'hbm':>8} {'ici':>8} {'exposed':>8} {'ms/step':>9} {'tok/s/chip':>11} {'MFU':>6}  overrides"]
    for i, p in enumerate(ranked, 1):
        rows.append(f"{i:>3} {p.mesh['data']:>5} {p.mesh['fsdp']:>5} {p.mesh['tensor']:>5} {p.remat:<13}"
                    f"{p.micro_batches:>6} {p.total / 2**30:>9.2f} {p.total / p.hbm:>5.0%} "
                    f"{p.compute_seconds * 1e3:>9.0f} {p.memory_seconds * 1e3:>8.0f} {(p.ici_seconds or 0) * 1e3:>8.0f} "
                    f"{p.exposed_seconds * 1e3:>8.0f} "
                    f"{p.step_seconds * 1e3:>9.1f} {p.tokens_per_second_per_chip:>11,.0f} {p.mfu:>6.1%}  "
                    + " ".join(p.overrides))
    misses = [p for p in s.plans if not p.fits]
    if misses:
        rows.append("did not fit: " + "; ".join(
            f"{_name((p.mesh['data'], p.mesh['fsdp'], p.mesh['tensor']))} remat={p.remat} "
            f"micro={p.micro_batches} (+{p.shortfall / 2**30:,.1f} GiB)" for p in misses))
    rows += [f"skipped: {reason}" for reason in s.skipped]
    if ranked:
        rows.append(f"MFU's error bar (the first row's): {ranked[0].error_bar}")
    return "\n".join(rows)
