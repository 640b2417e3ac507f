"""Generation speed with and without the KV cache: new tokens per second, compile time apart.

    python bench/bench_generate.py [--configs=tiny,base] [--batch=8] [--new=128] [--repeats=3]

For each config, a batch of prompts of 16..64 tokens (random ids, random-init weights: speed does
not depend on what the weights say) is continued by --new tokens, greedily, by
  - cache:      `generate` (prefill once, then one token per step against the KV cache);
  - cache, top-p: the same with temperature 0.8 and top-p 0.95 (a sort of the vocabulary per step);
  - no cache:   `full_forward_generate` (every step reruns the whole prefix).
The first call compiles (and runs); the best of --repeats later calls is the speed. The CPU is
shared, so the three take turns and the rows of one run are to be compared (ratios), not numbers
across runs.
"""

import argparse
import time

import jax
import numpy as np
from flax import nnx

from heft.configs import base, tiny
from heft.eval.generate import full_forward_generate, generate
from heft.model import build

CONFIGS = {"tiny": tiny.get_config, "base": base.get_config}


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(16, 65)).tolist() for _ in range(batch)]


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, batch: int, new: int, repeats: int) -> list[dict]:
    c = CONFIGS[name]()
    model = build.create(c.model)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ps = prompts(batch, c.model.vocab)
    runs = {
        "cache": lambda: generate(model, ps, new),
        "cache, top-p": lambda: generate(model, ps, new, temperature=0.8, top_p=0.95),
        "no cache": lambda: full_forward_generate(model, ps, new),
    }
    first = {how: seconds(fn) for how, fn in runs.items()}  # compiles, then runs
    # The ways take turns, so that a neighbour's load on the shared CPU hits all of them alike.
    best = {how: float("inf") for how in runs}
    for _ in range(repeats):
        best = {how: min(best[how], seconds(fn)) for how, fn in runs.items()}
    return [dict(config=name, params=params, how=how, first=first[how], seconds=best[how],
                 tokens_per_s=batch * new / best[how]) for how in runs]


def table(rows: list[dict], batch: int, new: int) -> str:
    lines = [f"batch {batch}, prompts 16-64 tokens, {new} new tokens each, float32",
             "",
             "| config | params | decoding | first call s | best run s | new tokens/s | vs no cache |",
             "|---|---:|---|---:|---:|---:|---:|"]
    slow = {r["config"]: r["tokens_per_s"] for r in rows if r["how"] == "no cache"}
    for r in rows:
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['how']} | {r['first']:.1f} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / slow[r['config']]:.1f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = [r for name in args.configs.split(",") for r in bench(name, args.batch, args.new, args.repeats)]
    print(table(rows, args.batch, args.new))


if __name__ == "__main__":
    main()
