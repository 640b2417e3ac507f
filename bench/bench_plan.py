"""How long `heft plan` takes on this CPU, and what it predicts for Llama-2 70B on v5p-512.

    python bench/bench_plan.py            # all rows (each a full XLA compile: minutes apiece)
    python bench/bench_plan.py --quick    # the MaxText comparison only

Prints a markdown table for bench/RESULTS.md. The comparison row uses MaxText's published setup
for Llama-2 70B on v5p-512 (256 chips): FSDP over every chip, 4 sequences of 4,096 tokens per chip
(a 4M-token batch), bf16 compute; MaxText reports 65.4% MFU and ~692 tokens/s/chip for it.
heft's remat policies differ from MaxText's `save_dot_except_mlpwi`, so both of heft's are shown,
each with the fewest micro-batches that fit.
"""

import os
import sys
import time

from heft.configs import llama2_7b, llama2_70b
from heft.launch import plan

MAXTEXT_MFU = 0.654  # maxtext.readthedocs.io/en/latest/reference/models/tiering.html (v5p, Gold)
MAXTEXT_TOKENS = 692


def config(module, batch: int, remat: str | None = None, micro_batches: int = 1):
    c = module.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.batch_size = batch
    c.train.micro_batches = micro_batches
    if remat:
        c.model.remat = remat
    return c


def row(name: str, c, topology: str) -> str:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    p = plan.plan(c, topology)
    wall = time.perf_counter() - start
    mfu = "-" if p.mfu is None else f"{p.mfu:.1%}"
    tokens = "-" if p.mfu is None else f"{p.tokens_per_second_per_chip:,.0f}"
    step = "-" if p.mfu is None else f"{p.step_seconds:.2f} s ({p.bound})"
    line = (f"| {name} | {topology} ({p.chips} chips) | {p.batch} x {p.seq_len} | {p.remat}, "
            f"{p.micro_batches} micro | "
            f"{p.total / 2**30:,.1f} / {p.hbm / 2**30:,.1f} | {'yes' if p.fits else 'NO'} | {step} | "
            f"{tokens} | {mfu} | {wall:,.0f} s | {load:.1f} |")
    print(line, flush=True)
    return line


def main(argv):
    print("| model | slice | batch | remat, micro-batches | GiB/chip used / usable | fits | predicted step | "
          "tokens/s/chip | predicted MFU | wall time to plan | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    if "--quick" not in argv:
        for name, module in (("Llama-2 7B", llama2_7b), ("Llama-2 70B", llama2_70b)):
            row(name, config(module, 256), "v5p:4x4x4")
            row(name, config(module, 512), "v5p:8x8x8")
    # MaxText's batch does not fit heft's step whole (heft keeps the residual stream in float32):
    # the rows that do split it into micro-batches.
    for remat, micro in (("full", 1), ("full", 2), ("save_matmuls", 4)):
        row("Llama-2 70B", config(llama2_70b, 1024, remat, micro), "v5p:4x8x8")
    print(f"\nMaxText, Llama-2 70B on v5p-512 (256 chips): MFU {MAXTEXT_MFU:.1%}, ~{MAXTEXT_TOKENS} tokens/s/chip")


if __name__ == "__main__":
    main(sys.argv[1:])
