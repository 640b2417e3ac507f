"""Per-chip memory of Llama-3 8B at sequence 8192 on v5p-64 (32 chips), with XLA's attention and
with flash (Pallas splash) attention, from `heft plan`'s ahead-of-time compile on this CPU.

    python bench/bench_attention_memory.py [--batch=32] [--remat=full]

Both rows are the same config but for `model.attention`; FSDP over every chip, one sequence per
chip by default. Prints a markdown table for bench/RESULTS.md.
"""

import os
import sys
import time

from heft.configs import llama3_8b
from heft.launch import plan


def row(attention: str, batch: int, remat: str) -> str:
    c = llama3_8b.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.model.update(attention=attention, remat=remat)
    c.train.update(batch_size=batch, seq_len=8192, micro_batches=1)
    load, start = os.getloadavg()[0], time.perf_counter()
    p = plan.plan(c, "v5p:2x4x4")
    wall = time.perf_counter() - start
    gib = lambda n: f"{n / 2**30:,.2f}"  # noqa: E731
    step = "-" if p.flops is None else f"{p.step_seconds:.2f} s, MFU {p.mfu:.1%}"
    return (f"| {attention} ({p.attention}) | {batch} x 8192 | {remat} | {gib(p.params)} | {gib(p.optimizer)} | "
            f"{gib(p.temporaries)} | {gib(p.total)} / {gib(p.hbm)} | {'yes' if p.fits else 'NO'} | {step} | "
            f"{wall:.0f} s | {load:.1f} |")


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
    batch, remat = int(args.get("batch", 32)), args.get("remat", "full")
    print("| attention | batch | remat | parameters GiB | optimizer GiB | activations, temporaries GiB | "
          "total / usable GiB | fits | predicted step | wall to plan | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for attention in ("xla", "flash"):
        print(row(attention, batch, remat), flush=True)


if __name__ == "__main__":
    main(sys.argv)
