"""Training throughput at the fixed bench shape, as a ratio to this machine's matmul peak.

    python bench/bench_train.py [--width 256] [--steps 10] [--profile DIR]

Width 256 (and 1024), 4 layers, 4 heads, MLP 1024, vocab 8192, length 256, batch 8, float32, one
device. Synthetic tokens: this measures the model step, not the data (bench_data.py does that).
The matmul peak is measured in the same run, because this CPU is shared and swings by 2x.
"""

import argparse
import json
import time

import jax
import numpy as np

from heft.configs import base
from heft.train import size
from heft.train import compiled, peak, sharding


def bench_config(width: int, activation: str):
    c = base.get_config()
    c.model.update(vocab=8192, width=width, depth=4, heads=4, kv_heads=4, mlp_width=1024,
                   activation=activation, max_len=256)
    c.train.update(batch_size=8, seq_len=256, warmup_steps=1, steps=1000)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def run(width: int, activation: str, steps: int, profile: str | None) -> dict:
    c = bench_config(width, activation)
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    rng = np.random.default_rng(0)
    B, T = 8, 256
    toks = rng.integers(0, c.model.vocab, (B, T + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
             "segment_ids": np.ones((B, T), np.int32), "weights": np.ones((B, T), np.float32)}
    with sharding.activated(mesh, c):
        state = compiled.init_state(c, mesh)
        start = time.perf_counter()
        fn = compiled.train_step(c, mesh).lower(compiled.abstract_state(c, mesh),
                                                compiled.abstract_batch(c, mesh)).compile()
        compile_s = time.perf_counter() - start
        batch = jax.device_put(batch, sharding.batch_sharding(c, mesh))
        for _ in range(2):
            state, m = fn(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, m = fn(state, batch)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - start)
        if profile:
            with jax.profiler.trace(profile):
                for _ in range(3):
                    state, m = fn(state, batch)
                jax.block_until_ready(state)
    matmul_peak = peak.measure_matmul_flops()
    r = size.report(c, B, T)
    step_s = float(np.median(times))
    return {"width": width, "activation": activation, "params": r["total_params"],
            "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
            "tokens_per_s": round(B * T / step_s), "model_gflops_per_s": round(r["flops_per_step"] / step_s / 1e9, 1),
            "matmul_peak_gflops_per_s": round(matmul_peak / 1e9, 1),
            "mfu": round(r["flops_per_step"] / step_s / matmul_peak, 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--activation", default="gelu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", default=None)
    a = p.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    for w in a.width:
        print(json.dumps(run(w, a.activation, a.steps, a.profile if w == a.width[0] else None)))


if __name__ == "__main__":
    main()
