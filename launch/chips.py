"""What one TPU chip can do: peak bf16 FLOP/s, HBM capacity and HBM bandwidth, from Google's spec pages.

The one place these numbers live. `heft plan` divides a step's FLOPs and bytes by them (the roofline)
and compares a step's memory with the HBM. Each row names its public source; where a page gives
"GB" for a capacity that the chip reports in GiB (v5e, v6e), the table uses GiB, what the runtime sees.
"""

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the generation as libtpu's topology names spell it: v4, v5e, v5p, v6e
    device_kind: str  # what jax reports as `device.device_kind`
    peak_flops: float  # bf16 matmul FLOP/s per chip
    hbm_bytes: int  # HBM per chip
    hbm_bandwidth: float  # HBM bytes/s per chip
    cores_per_chip: int  # TensorCores: accelerator-type names (v5p-512) count these, not chips
    source: str


CHIPS = {
    c.name: c
    for c in (
        Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200e9, 2, "https://cloud.google.com/tpu/docs/v4"),
        Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, 1, "https://cloud.google.com/tpu/docs/v5e"),
        Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, 2, "https://cloud.google.com/tpu/docs/v5p"),
        Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1640e9, 1, "https://cloud.google.com/tpu/docs/v6e"),
    )
}


def by_kind(device_kind: str) -> Chip | None:
    """The chip whose jax `device_kind` this is (abstract topology devices and real ones agree)."""
    return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)
