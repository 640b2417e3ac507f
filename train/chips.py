"""What one accelerator chip can do: peak bf16 FLOP/s, HBM capacity and HBM bandwidth, from the vendors' spec pages.

The one place these numbers live. `heft plan` divides a step's FLOPs and bytes by them (the roofline)
and compares a step's memory with the HBM. Each row names its public source; where a page gives
"GB" for a capacity that the chip reports in GiB (v5e, v6e), the table uses GiB, what the runtime sees.

Between TPU slices, traffic goes over the data-center network (DCN) through the hosts' NICs: the
per-chip DCN figure is the one a plan across slices divides cross-slice bytes by. v5p's page states
it per chip (50 Gbps); v5e's and v6e's give NICs per host (2 x 100 and 4 x 200 Gbps for 8 chips),
divided here by the chips a host holds (and equal to their pages' "DCN bandwidth per Pod" / 256).
v4's page gives no such figure: plans across v4 slices leave the DCN out and say so.

Within a slice, chips talk over the inter-chip interconnect (ICI): `ici_links` links per chip (a 3-D
torus has six, a 2-D one four), each carrying `ici_link_bandwidth` bytes/s in each direction. The pages
give the chip's total, bidirectional: v5p 1200 GB/s over 6 links, v6e 800 GB/s over 4, v5e 400 GB/s
over 4 (so 100, 100 and 50 GB/s a link each way); v4's page gives none per chip, only the pod's
all-reduce bandwidth (1.1 PB/s over 4096 chips: 269 GB/s a chip, 45 GB/s a link each way over 6 links).
`mxu_efficiency` is the one calibration constant per generation: the share of the peak that a
step's XLA FLOPs run at, fitted by bench/bench_calibration.py to MaxText's published runs (v5p: four
runs, each then within 5 MFU points; v6e: two runs; bench/RESULTS.md,
"Calibration"). Generations with no published run fitted keep 1.0, so
their plans stay ceilings.

`calibration` records how far that constant can be trusted: bench/bench_calibration.py's validation
(each published run predicted with the constant fitted to the others: leave-one-out) and the null
baseline it must beat (the other runs' mean MFU). `heft plan` prints it as the MFU's error bar, or
"uncalibrated" where the validation does not reach (launch/plan.py, `error_bar`).
"""

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Calibration:
    """bench/bench_calibration.py's validation of a generation's `mxu_efficiency` (points of MFU)."""

    runs: int  # published runs it was fitted to
    leave_one_out: float  # mean absolute error, each run predicted from the others
    worst: float  # the largest of those errors
    null: float  # mean absolute error of predicting the other runs' mean published MFU
    remats: tuple  # the remat policies the runs were planned with
    source: str = "bench/RESULTS.md, Calibration"

    @property
    def validated(self) -> bool:
        """Whether the fit predicts held-out runs at all: three runs or more, and better than the null."""
        return self.runs >= 3 and self.leave_one_out < self.null


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the generation as libtpu's topology names spell it: v4, v5e, v5p, v6e
    device_kind: str  # what jax reports as `device.device_kind`
    peak_flops: float  # bf16 matmul FLOP/s per chip
    hbm_bytes: int  # HBM per chip
    hbm_bandwidth: float  # HBM bytes/s per chip
    cores_per_chip: int  # TensorCores: accelerator-type names (v5p-512) count these, not chips
    source: str
    dcn_bandwidth: float | None = None  # bytes/s per chip across slices (data-center network); None: unknown
    dcn_source: str = ""
    ici_links: int = 0  # chip-to-chip links per chip within a slice (0: none, or unknown)
    ici_link_bandwidth: float = 0.0  # bytes/s per link in each direction
    ici_source: str = ""
    mxu_efficiency: float = 1.0  # calibration: the share of peak_flops a step's XLA FLOPs run at
    calibration: Calibration | None = None  # its validation; None: no published run fitted
    form: str = ""  # GPUs: the board (SXM, PCIe, NVL) and memory, which set the bandwidth and peak


CHIPS = {
    c.name: c
    for c in (
        Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200e9, 2, "https://cloud.google.com/tpu/docs/v4",
             ici_links=6, ici_link_bandwidth=1.1e15 / 4096 / 6, ici_source="https://cloud.google.com/tpu/docs/v4 "
             "(all-reduce bandwidth per Pod 1.1 PB/s, 4096 chips, 3-D torus)"),
        Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, 1, "https://cloud.google.com/tpu/docs/v5e",
             dcn_bandwidth=2 * 100e9 / 8 / 8, dcn_source="https://cloud.google.com/tpu/docs/v6e (v5e column: "
             "2 x 100 Gbps NICs per 8-chip host)",
             ici_links=4, ici_link_bandwidth=400e9 / 4 / 2, ici_source="https://cloud.google.com/tpu/docs/v5e "
             "(bidirectional ICI bandwidth per chip 400 GBps, 4 ICI ports per chip)"),
        Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, 2, "https://cloud.google.com/tpu/docs/v5p",
             dcn_bandwidth=50e9 / 8, dcn_source="https://cloud.google.com/tpu/docs/v5p (DCN bandwidth per chip: "
             "50 Gbps)",
             ici_links=6, ici_link_bandwidth=1200e9 / 6 / 2, ici_source="https://cloud.google.com/tpu/docs/v5p "
             "(bidirectional ICI bandwidth per chip 1200 GBps, 3-D torus)",
             mxu_efficiency=0.858,  # fitted to MaxText's 70B, 32B, 64B, 128B runs (bench/bench_calibration.py)
             calibration=Calibration(4, leave_one_out=3.1, worst=6.2, null=2.6, remats=("full", "save_matmuls"))),
        Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1640e9, 1, "https://cloud.google.com/tpu/docs/v6e",
             dcn_bandwidth=4 * 200e9 / 8 / 8, dcn_source="https://cloud.google.com/tpu/docs/v6e (4 x 200 Gbps NICs "
             "per 8-chip host)",
             ici_links=4, ici_link_bandwidth=800e9 / 4 / 2, ici_source="https://cloud.google.com/tpu/docs/v6e "
             "(bidirectional ICI bandwidth per chip 800 GBps, 4 ICI ports per chip)",
             mxu_efficiency=0.535,  # fitted to MaxText's Llama3.1-8B and Llama2-70B v6e-256 runs
             calibration=Calibration(2, leave_one_out=0.3, worst=0.3, null=1.7, remats=("full", "save_matmuls"))),
        # GPUs: dense (not 2:4 sparse) bf16 tensor-core peaks. Each board and memory size is its own row, under
        # the device kind JAX reports for it (nvidia-smi's name): an A100 40GB has 24% less HBM bandwidth
        # than the 80GB SXM part, an H100 PCIe 40% less than the SXM one.
        Chip("a100", "NVIDIA A100-SXM4-80GB", 312e12, 80 * 10**9, 2039e9, 1,
             "https://www.nvidia.com/en-us/data-center/a100/", form="SXM4 80GB"),
        Chip("a100-40gb", "NVIDIA A100-SXM4-40GB", 312e12, 40 * 10**9, 1555e9, 1,
             "https://www.nvidia.com/en-us/data-center/a100/", form="SXM4 40GB"),
        Chip("a100-pcie", "NVIDIA A100 80GB PCIe", 312e12, 80 * 10**9, 1935e9, 1,
             "https://www.nvidia.com/en-us/data-center/a100/", form="PCIe 80GB"),
        Chip("a100-pcie-40gb", "NVIDIA A100-PCIE-40GB", 312e12, 40 * 10**9, 1555e9, 1,
             "https://www.nvidia.com/en-us/data-center/a100/", form="PCIe 40GB"),
        Chip("h100", "NVIDIA H100 80GB HBM3", 989e12, 80 * 10**9, 3350e9, 1,
             "https://www.nvidia.com/en-us/data-center/h100/", form="SXM5 80GB"),
        Chip("h100-pcie", "NVIDIA H100 PCIe", 756e12, 80 * 10**9, 2000e9, 1,
             "https://www.nvidia.com/en-us/data-center/h100/", form="PCIe 80GB"),
        Chip("h100-nvl", "NVIDIA H100 NVL", 835e12, 94 * 10**9, 3900e9, 1,
             "https://www.nvidia.com/en-us/data-center/h100/", form="NVL 94GB"),
        Chip("h200", "NVIDIA H200", 989e12, 141 * 10**9, 4800e9, 1,
             "https://www.nvidia.com/en-us/data-center/h200/", form="SXM 141GB"),
        Chip("h200-nvl", "NVIDIA H200 NVL", 835e12, 141 * 10**9, 4800e9, 1,
             "https://www.nvidia.com/en-us/data-center/h200/", form="NVL 141GB"),
    )
}


def by_kind(device_kind: str) -> Chip | None:
    """The chip whose jax `device_kind` this is (abstract topology devices and real ones agree).

    GPUs are looked up by the whole kind JAX reports ("NVIDIA H100 80GB HBM3"), then by the longest
    entry that begins it (a suffix such as "-MIG"), so a 40GB board is never taken for the 80GB one and
    a board the table lacks gets None (its peak is then measured, train/peak.py).
    """
    exact = next((c for c in CHIPS.values() if c.device_kind == device_kind), None)
    if exact is not None:
        return exact
    prefixes = [c for c in CHIPS.values() if c.device_kind.startswith("NVIDIA") and device_kind.startswith(c.device_kind)]
    return max(prefixes, key=lambda c: len(c.device_kind), default=None)
