"""What a step's collectives cost on a TPU slice's inter-chip interconnect (ICI).

Each collective of the compiled step (launch/costs.py reads them from XLA's module: kind, bytes,
replica groups) is laid onto the slice: a group's members are mesh positions, the mesh's devices
carry their torus coordinates, so a group spans some axes of the torus, `extent` chips along each,
`stride` hops apart. The time is the bandwidth term of the ring algorithms, with every link of the
axes the group spans carrying data in both directions:

    all-gather, reduce-scatter:  (n - 1) / n * bytes / bandwidth
    all-reduce:                  2 (n - 1) / n * bytes / bandwidth     (a reduce-scatter, then an all-gather)
    all-to-all:                  (n - 1) / n * bytes * max(1, extent / 4) / bandwidth   (a ring's bisection)
    collective-permute:          bytes / (one link, one direction)
    bandwidth = sum over the spanned axes of 2 * link bandwidth / stride

`bytes` is the collective's buffer per chip (the gathered result, the input reduced). A stride > 1 (a
group whose members are not neighbours) shares each link with the groups between them. Wraparound
links do not change this bandwidth term (the middle link of a line carries half the data each way, as
every link of a ring does), so slices without them are charged the same; latency (about a microsecond
a hop) is left out: a step's few thousand collectives cost milliseconds of it, against seconds of work.
"""

import math

from heft.launch.costs import Collective


def _spans(group: tuple, coords: list) -> list[tuple[int, int]]:
    """(extent, stride) along each torus axis the group's members differ on (a coordinate's first entry,
    the slice, is not an ICI axis)."""
    out = []
    points = [coords[i] for i in group]
    for axis in range(1, len(points[0])):
        values = sorted({p[axis] for p in points})
        if len(values) > 1:
            stride = max(1, (values[-1] - values[0]) // (len(values) - 1))
            out.append((len(values), stride))
    return out


def seconds(c: Collective, coords: list, link_bandwidth: float, n_devices: int) -> float:
    """Time of one run of collective `c` on one chip. coords: each mesh position's torus coordinates
    (tuples); link_bandwidth: bytes/s per link per direction."""
    if c.bytes <= 0 or link_bandwidth <= 0:
        return 0.0
    groups = c.groups or [tuple(range(n_devices))]
    if c.kind == "collective-permute":
        return c.bytes / link_bandwidth
    group = max(groups, key=len)
    group = tuple(i for i in group if coords[i][0] == coords[group[0]][0])  # across slices: the DCN's part
    n = len(group)
    if n <= 1:
        return 0.0
    spans = _spans(group, coords)
    if not spans:  # one chip's cores (megacore) or a group inside a chip: no link crossed
        return 0.0
    bandwidth = sum(2 * link_bandwidth / stride for _, stride in spans)
    share = (n - 1) / n * c.bytes
    if c.kind == "all-reduce":
        share *= 2
    elif c.kind == "all-to-all":
        share *= max(1.0, max(extent for extent, _ in spans) / 4)
    return share / bandwidth


def device_coords(mesh) -> list[tuple]:
    """(slice, torus coordinates...) of each mesh position, in the order XLA numbers them (the mesh's
    devices, flattened); devices without coordinates (CPU, GPU) are laid on a line."""
    devices = list(mesh.devices.flat)
    if all(getattr(d, "coords", None) is not None for d in devices):
        return [(getattr(d, "slice_index", 0) or 0, *d.coords) for d in devices]
    return [(0, i) for i in range(len(devices))]


def by_region(collectives: list, coords: list, link_bandwidth: float) -> dict:
    """region -> ICI seconds per trip of that region (every collective in it, one after another)."""
    out: dict = {}
    for c in collectives:
        out[c.region] = out.get(c.region, 0.0) + seconds(c, coords, link_bandwidth, len(coords))
    return out


def summary(collectives: list, coords: list, link_bandwidth: float) -> dict:
    """kind -> {"count", "bytes", "seconds"} per step (each collective counted by its trips)."""
    out: dict = {}
    for c in collectives:
        row = out.setdefault(c.kind, {"count": 0, "bytes": 0.0, "seconds": 0.0})
        row["count"] += c.trips
        row["bytes"] += c.bytes * c.trips
        row["seconds"] += seconds(c, coords, link_bandwidth, len(coords)) * c.trips
    return out


def total_seconds(collectives: list, coords: list, link_bandwidth: float) -> float:
    return math.fsum(seconds(c, coords, link_bandwidth, len(coords)) * c.trips for c in collectives)
