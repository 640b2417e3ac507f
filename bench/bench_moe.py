"""The tiny mixture of experts against the dense tiny model of equal active parameters.

    python bench/bench_moe.py [--steps 600] [--rounds 10] [--timing_steps 5] [--skip_training]

1. Training: `heft train`'s loop (the embedded corpus, tiny's 600 steps of 16 x 128 tokens,
   held-out loss every 200 steps) for configs/tiny.py (dense, MLP 384), configs/tiny_moe.py
   (8 experts of 192, 2 per token: the same 384 active hidden units; capacity factor 1.25) and the
   same MoE dropless. Prints each run's held-out losses, final train loss and router losses.
2. Speed: the three train steps compiled side by side and timed in alternating rounds on synthetic
   batches, so that a busy shared CPU slows all alike. Prints the median step time and tokens/s of
   each, and the median of the rounds' ratios to the dense step.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from heft.configs import tiny, tiny_moe
from heft.train import compiled, loop, sharding
from heft.train import state as train_state


def configs(steps: int) -> dict:
    dense, capacity, dropless = tiny.get_config(), tiny_moe.get_config(), tiny_moe.get_config()
    dropless.model.moe.capacity_factor = 0.0
    out = {"dense": dense, "moe capacity 1.25": capacity, "moe dropless": dropless}
    for c in out.values():
        c.train.steps = steps
        c.train.checkpoint_every = steps
        c.mesh.data = 1  # one CPU device
    return out


def train(name: str, c, workdir: str) -> dict:
    evals = []
    summary = loop.train(c, os.path.join(workdir, name.replace(" ", "_")))
    with open(os.path.join(workdir, name.replace(" ", "_"), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [(r["step"], round(r["eval_loss"], 4)) for r in rows if "eval_loss" in r]
    last = [r for r in rows if "balance_loss" in r][-1:] or [{}]
    return {"run": name, "params": summary["params"], "heldout": evals, "train_loss": round(summary["train_loss"], 4),
            "tokens_per_s (loop)": round(summary["tokens_per_s"]), "balance_loss": last[0].get("balance_loss"),
            "z_loss": last[0].get("z_loss")}


def batch(c, seed: int = 0) -> dict:
    B, T = c.train.batch_size, c.train.seq_len
    tokens = np.random.default_rng(seed).integers(0, c.model.vocab, (B, T + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "segment_ids": np.ones((B, T), np.int32), "weights": np.ones((B, T), np.float32)}


def timing(runs: dict, rounds: int, steps: int) -> None:
    prepared = {}
    for name, c in runs.items():
        mesh = sharding.make_mesh(c)
        with sharding.activated(mesh, c):
            fn = compiled.train_step(c, mesh)
            b = jax.device_put(batch(c), sharding.batch_sharding(c, mesh))
            state = train_state.init(c, mesh)
            state, _ = fn(state, b)  # compile and warm up
            jax.block_until_ready(state)
        prepared[name] = {"config": c, "mesh": mesh, "fn": fn, "batch": b, "state": state, "times": []}
    for _ in range(rounds):
        for r in prepared.values():
            with sharding.activated(r["mesh"], r["config"]):
                start = time.perf_counter()
                for _ in range(steps):
                    r["state"], _ = r["fn"](r["state"], r["batch"])
                jax.block_until_ready(r["state"])
            r["times"].append((time.perf_counter() - start) / steps)
    dense = prepared["dense"]["times"]
    for name, r in prepared.items():
        c = r["config"]
        step = statistics.median(r["times"])
        ratios = [t / d for t, d in zip(r["times"], dense)]  # same round, same load
        print(f"{name}: {step * 1e3:.1f} ms/step, {c.train.batch_size * c.train.seq_len / step:,.0f} tokens/s "
              f"(median of {rounds} rounds of {steps}); step time / dense {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--timing_steps", type=int, default=5)
    parser.add_argument("--skip_training", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    runs = configs(args.steps)
    timing(runs, args.rounds, args.timing_steps)
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as workdir:
            for name, c in runs.items():
                start = time.perf_counter()
                result = train(name, c, workdir)
                result["wall_s"] = round(time.perf_counter() - start)
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
