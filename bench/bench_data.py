"""Data throughput: `heft prepare` in MB of text per second, the loader in tokens per second.

    python bench/bench_data.py [--repeats 3]

prepare is timed on the embedded corpus (6.46 MB) in a fresh cache, whole (tokenizer training +
tokenization + writing) and tokenization only (tokenizer cached, store deleted), with 1 and 2
worker processes; then the cached call that training makes on every start. The loader is timed
at the tiny config's shape (global batch 16 x seq_len 128) and at a large one, against what
training at the tiny shape can consume: 16 * 128 tokens per step at >= 0.1 s a step is at most
20,480 tokens/s, and the loader must deliver >= 50x that (1.02M tokens/s).

The machine is shared, so each number is the best of --repeats runs, reported with the load;
MB per CPU-second (this process and its tokenizing workers) is what the load barely changes.
"""

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time

from heft.configs import tiny
from heft.data import prepare

TINY_CONSUMES = 16 * 128 / 0.1  # tokens/s that the tiny config's training takes at most


def _config(cache: str, workers: int):
    c = tiny.get_config()
    c.data.cache_dir = cache
    c.data.workers = workers
    return c


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the tokenizing workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), _cpu()
    out = fn()
    return time.perf_counter() - wall, _cpu() - cpu, out


def bench_prepare(repeats: int) -> list[tuple[str, float, float, float]]:
    """(what, best wall seconds, MB/s at that wall time, MB per CPU-second) rows."""
    rows = []
    for workers in (1, 2):
        whole, tokenize_only = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as cache:
                wall, cpu, p = _timed(lambda: prepare.prepare(_config(cache, workers), progress=False))
                whole.append((wall, cpu))
                shutil.rmtree(p.store_path)
                wall, cpu, _ = _timed(lambda: prepare.prepare(_config(cache, workers), progress=False))
                tokenize_only.append((wall, cpu))
        mb = p.metadata["text_bytes"] / 1e6
        for what, runs in (("whole (train tokenizer + tokenize + write)", whole), ("tokenize + write only", tokenize_only)):
            wall, cpu = min(runs)
            rows.append((f"prepare, {what}, {workers} worker(s)", wall, mb / wall, mb / cpu))
    with tempfile.TemporaryDirectory() as cache:
        prepare.prepare(_config(cache, 2), progress=False)
        wall, cpu = min(_timed(lambda: prepare.prepare(_config(cache, 2), progress=False))[:2] for _ in range(repeats))
    rows.append(("prepare, cached (what training calls on every start)", wall, mb / wall, mb / max(cpu, 1e-9)))
    return rows


def bench_loader(repeats: int) -> list[tuple[str, float, float]]:
    # Imported only now: grain imports JAX, after which prepare's workers must be spawned rather
    # than forked, and the prepare numbers above are for `heft prepare`, which does not import JAX.
    from heft.data import loader

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        p = prepare.prepare(_config(cache, 2), progress=False)
        for name, seq_len, batch, steps in (("tiny shape 16 x 128", 128, 16, 3000), ("large shape 256 x 1024", 1024, 256, 100)):
            best = float("inf")
            for _ in range(repeats):
                ld = loader.Loader(p, "train", seq_len, batch, seed=0)
                ld.next()
                start = time.perf_counter()
                for _ in range(steps):
                    ld.next()
                best = min(best, time.perf_counter() - start)
            rows.append((f"loader, train, {name}", best / steps, steps * seq_len * batch / best))
        best = float("inf")
        n = loader.heldout_num_batches(p, 128, 16)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in loader.heldout_batches(p, 128, 16, n):
                pass
            best = min(best, time.perf_counter() - start)
        rows.append(("heldout_batches, 16 x 128, whole split", best / n, n * 16 * 128 / best))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    prep = bench_prepare(args.repeats)
    load_rows = bench_loader(args.repeats)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("\n| what | seconds | MB of text / s | MB / CPU-second |\n| --- | --- | --- | --- |")
    for name, seconds, rate, per_cpu in prep:
        print(f"| {name} | {seconds:.3f} | {rate:,.2f} | {per_cpu:,.2f} |")
    print("\n| what | ms / batch | tokens / s | x tiny training's need (20,480 tokens/s) |\n| --- | --- | --- | --- |")
    for name, seconds, rate in load_rows:
        print(f"| {name} | {seconds * 1e3:.3f} | {rate:,.0f} | {rate / TINY_CONSUMES:,.0f}x |")


if __name__ == "__main__":
    main()
