"""What `model.document_mask` costs per train step: both settings compiled side by side and timed in
alternating rounds, so that a busy shared CPU slows both alike.

    python bench/bench_document_mask.py [--config configs/tiny.py] [--rounds 12] [--steps 10]

Batches are synthetic packed rows (documents of random lengths, positions restarting at each): the
mask is computed whole whatever the boundaries, so its cost does not depend on where they fall.
Prints the median seconds per step of each setting over the rounds, and the median of the rounds'
ratios (each round times both settings within seconds of each other).
"""

import argparse
import os
import runpy
import statistics
import time

import jax
import numpy as np

from heft.train import compiled, sharding
from heft.train import state as train_state


def packed_batch(config, seed: int = 0) -> dict:
    B, T, V = config.train.batch_size, config.train.seq_len, config.model.vocab
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    segment_ids, positions = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for row in range(B):
        start, segment = 0, 1
        while start < T:
            n = int(rng.integers(8, T // 2))
            segment_ids[row, start:start + n], positions[row, start:start + n] = segment, np.arange(min(n, T - start))
            start, segment = start + n, segment + 1
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": segment_ids, "weights": np.ones((B, T), np.float32)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="steps per setting per round")
    args = parser.parse_args()
    runs = {}
    for mask in (False, True):
        c = runpy.run_path(args.config)["get_config"]()
        c.model.document_mask = mask
        mesh = sharding.make_mesh(c)
        with sharding.activated(mesh, c):
            fn = compiled.train_step(c, mesh)
            batch = jax.device_put(packed_batch(c), sharding.batch_sharding(c, mesh))
            state = train_state.init(c, mesh)
            state, _ = fn(state, batch)  # compile and warm up
            jax.block_until_ready(state)
        runs[mask] = {"config": c, "mesh": mesh, "fn": fn, "batch": batch, "state": state, "times": []}
    for _ in range(args.rounds):
        for mask, r in runs.items():
            with sharding.activated(r["mesh"], r["config"]):
                start = time.perf_counter()
                for _ in range(args.steps):
                    r["state"], metrics = r["fn"](r["state"], r["batch"])
                jax.block_until_ready(r["state"])
            r["times"].append((time.perf_counter() - start) / args.steps)
    c = runs[False]["config"]
    tokens = c.train.batch_size * c.train.seq_len
    for mask, r in runs.items():
        step = statistics.median(r["times"])
        print(f"document_mask={mask}: {step * 1e3:.1f} ms/step (median of {args.rounds} rounds of {args.steps}), "
              f"{tokens / step:,.0f} tokens/s")
    ratios = [t / f for t, f in zip(runs[True]["times"], runs[False]["times"])]  # same round, same load
    print(f"masked / unmasked step time: {statistics.median(ratios):.3f} (median of the rounds' ratios; "
          f"range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
