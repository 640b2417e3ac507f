"""Data throughput: `heft prepare` in MB of text per second; the loader in tokens per second and peak memory.

    python bench/bench_data.py [--repeats 3] [--stores 20e6,60e6,200e6] [--skip_prepare]

prepare is timed on the embedded corpus (6.46 MB) in a fresh cache, whole (tokenizer training +
tokenization + writing) and tokenization only (tokenizer cached, store deleted), with 1 and 2
worker processes; then the cached call that training makes on every start.

The loader is timed on synthetic token stores written straight through store.Writer (no
tokenizer): documents of geometric length (mean 600 tokens) of Zipf-distributed ids over a
32K vocabulary, so chunks compress as text's ids do. Each store (--stores: 20M, 60M and 200M
tokens) is read in a fresh process, which reports its peak RSS: the loader holds the rows it
serves and at most store.READ_CACHE_BYTES (16 MiB) of decoded chunks, so the peak stops growing
once a store's decoded size passes that bound; each is read again with the cache off, which
leaves only what does not depend on the cache. Throughput is that of `next()`
itself (prefetch=0), at the tiny config's shape (16 x 128) and at 256 x 1024, against what
training at the tiny shape can consume: 16 * 128 tokens per step at >= 0.1 s a step is at most
20,480 tokens/s. Then, with a simulated 20 ms step between batches, the time the step waits in
`next()` without and with the prefetch thread. Last, the layout choice: random 1024-token rows
from 4K-token chunks in 4M-token shards (heft's) against 128K-token chunks, one a file (format
1's), on the smallest store, with tensorstore's chunk cache off (what a store far larger than
the cache sees) and at 64 MiB (which holds most of that store).

The machine is shared, so each number is the best of --repeats runs, reported with the load.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from heft.configs import tiny
from heft.data import paths, prepare, store

TINY_CONSUMES = 16 * 128 / 0.1  # tokens/s that the tiny config's training takes at most
VOCAB = 32000
EOS, BOS = 3, 2


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


def write_synthetic(path: str, tokens: int, seed: int = 0) -> dict:
    """A store of about `tokens` ids at `path`, documents from the last 1% of tokens held out; returns its meta."""
    rng = np.random.default_rng(seed)
    writer = store.Writer(path, store.token_dtype(VOCAB), EOS)
    block = 1 << 22  # ids generated at a time, so that writing a large store takes little memory
    heldout_start, documents, train_documents = None, 0, 0
    while writer.num_tokens < tokens:
        ids = np.minimum(rng.zipf(1.1, size=block) + 3, VOCAB - 1).astype(np.uint16)  # never pad/unk/bos/eos
        ends = np.cumsum(rng.geometric(1 / 600, size=block // 100))
        ends = ends[ends < block]
        for a, b in zip(np.r_[0, ends], np.r_[ends, block]):
            if writer.num_tokens >= tokens:
                break
            start = writer.add(ids[a:b])
            if heldout_start is None and start >= 0.99 * tokens:
                heldout_start, train_documents = start, documents
            documents += 1
    n_tokens = writer.num_tokens + 1
    meta = {"corpus": "synthetic", "documents": documents, "tokens": n_tokens,
            "tokenizer": {"sha256": "synthetic", "vocab_size": VOCAB, "bos_id": BOS, "eos_id": EOS, "pad_id": 0},
            "split": {"heldout_fraction": 0.01, "train_documents": train_documents,
                      "heldout_documents": documents - train_documents, "heldout_start": heldout_start}}
    return writer.close(meta)


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in MB. Not ru_maxrss:
    across fork and exec that keeps the parent's peak, which here is the store writer's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def measure(store_path: str, repeats: int, cache_mb: int | None = None) -> dict:
    """In this (fresh) process: the loader's throughput on the store, and this process's memory."""
    if cache_mb is not None:
        store.READ_CACHE_BYTES = cache_mb << 20
    # Imported only here: grain imports JAX, after which prepare's workers must be spawned rather
    # than forked, and the prepare numbers are for `heft prepare`, which does not import JAX.
    from heft.data import loader
    from heft.data.prepare import Prepared

    p = Prepared(store_path, "", store.read_meta(paths.path(store_path)))
    out = {"rss_before_mb": _rss_mb()}  # with grain and JAX imported: what the loader itself adds comes after
    for name, seq_len, batch, steps in (("16 x 128", 128, 16, 2000), ("256 x 1024", 1024, 256, 40)):
        best = float("inf")
        for r in range(repeats):
            with loader.Loader(p, "train", seq_len, batch, seed=r, prefetch=0) as ld:
                ld.next()
                start = time.perf_counter()
                for _ in range(steps):
                    ld.next()
                best = min(best, time.perf_counter() - start)
        out[name] = {"ms_per_batch": best / steps * 1e3, "tokens_per_s": steps * seq_len * batch / best}
    for prefetch in (0, loader.PREFETCH):  # the step's wait in next() when a step takes 20 ms
        with loader.Loader(p, "train", 1024, 64, seed=0, prefetch=prefetch) as ld:
            ld.next()
            waited = 0.0
            for _ in range(50):
                time.sleep(0.02)
                start = time.perf_counter()
                ld.next()
                waited += time.perf_counter() - start
        out[f"wait_prefetch_{prefetch}_ms"] = waited / 50 * 1e3
    out["rss_after_mb"] = _rss_mb()
    out["peak_rss_mb"] = _rss_mb("VmHWM")
    return out


def _measure_in_fresh_process(store_path: str, repeats: int, cache_mb: int | None = None) -> dict:
    cache = [] if cache_mb is None else ["--cache_mb", str(cache_mb)]
    run = subprocess.run([sys.executable, __file__, "--measure", store_path, "--repeats", str(repeats)] + cache,
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.splitlines()[-1])


def layouts(root: str, tokens: int) -> list[tuple[str, float, float]]:
    """(layout and cache, tokens/s, ms per batch) for random 1024-token rows, batch 64."""
    rows = []
    for name, chunk, shard in (("4K chunks in 4M shards (heft)", 1 << 12, 1 << 22), ("128K chunks, one a file (format 1)", 1 << 17, 1 << 17)):
        store.CHUNK, store.SHARD = chunk, shard
        path = os.path.join(root, f"layout-{chunk}")
        meta = write_synthetic(path, tokens)
        size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6
        for cache in (0, 64 << 20):
            s = store.open_store(path, cache_bytes=cache)
            rng = np.random.default_rng(0)
            starts = rng.integers(0, meta["tokens"] - 1025, size=(40, 64))
            t = time.perf_counter()
            for batch in starts:
                s.windows(batch, 1025)
            dt = time.perf_counter() - t
            rows.append((f"{name}, {size_mb:.0f} MB; cache {cache >> 20} MiB", starts.size * 1024 / dt, dt / 40 * 1e3))
    store.CHUNK, store.SHARD = 1 << 12, 1 << 22
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stores", default="20e6,60e6,200e6", help="tokens in each synthetic store")
    parser.add_argument("--skip_prepare", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--cache_mb", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.repeats, args.cache_mb)))
        return
    load_before = os.getloadavg()[0]
    prep = [] if args.skip_prepare else bench_prepare(args.repeats)
    root = tempfile.mkdtemp(prefix="heft-bench-data-")
    try:
        stores = {}
        sizes = [int(float(s)) for s in args.stores.split(",")]
        for n in sizes:
            label = f"{n / 1e6:,.0f} M"
            path = os.path.join(root, label.replace(" ", ""))
            wall = time.perf_counter()
            meta = write_synthetic(path, n)
            wall = time.perf_counter() - wall
            disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            stores[label] = (path, meta["tokens"], wall, disk)
        measured = {label: _measure_in_fresh_process(path, args.repeats) for label, (path, *_) in stores.items()}
        uncached = {label: _measure_in_fresh_process(path, 1, cache_mb=0) for label, (path, *_) in stores.items()}
        layout_rows = layouts(root, min(sizes))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("tensorstore", "grain", "numpy", "sentencepiece"))
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {versions}; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    if prep:
        print("\n| what | seconds | MB of text / s | MB / CPU-second |\n| --- | --- | --- | --- |")
        for name, seconds, rate, per_cpu in prep:
            print(f"| {name} | {seconds:.3f} | {rate:,.2f} | {per_cpu:,.2f} |")
    print("\n| synthetic store, tokens | write s | MB on disk | peak RSS MB (before loading) | same, chunk cache off "
          "| 16 x 128 tokens/s | 256 x 1024 tokens/s | x tiny's need | 16 x 128 tokens/s, cache off |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, (_, tokens, wall, disk) in stores.items():
        m, u = measured[label], uncached[label]
        print(f"| {tokens / 1e6:,.1f} M | {wall:.1f} | {disk / 1e6:,.0f} | {m['peak_rss_mb']:,.0f} ({m['rss_before_mb']:,.0f}) "
              f"| {u['peak_rss_mb']:,.0f} ({u['rss_before_mb']:,.0f}) "
              f"| {m['16 x 128']['tokens_per_s']:,.0f} | {m['256 x 1024']['tokens_per_s']:,.0f} "
              f"| {m['16 x 128']['tokens_per_s'] / TINY_CONSUMES:,.0f}x | {u['16 x 128']['tokens_per_s']:,.0f} |")
    from heft.data.loader import PREFETCH

    print("\n| store | ms / batch 16 x 128 | ms / batch 256 x 1024 | wait in next(), 20 ms step, 64 x 1024: no prefetch | with prefetch |")
    print("| --- | --- | --- | --- | --- |")
    for label, m in measured.items():
        print(f"| {label} | {m['16 x 128']['ms_per_batch']:.3f} | {m['256 x 1024']['ms_per_batch']:.1f} "
              f"| {m['wait_prefetch_0_ms']:.2f} ms | {m[f'wait_prefetch_{PREFETCH}_ms']:.3f} ms |")
    print("\n| layout (random 1024-token rows, batch 64) | tokens / s | ms / batch |\n| --- | --- | --- |")
    for name, rate, ms in layout_rows:
        print(f"| {name} | {rate:,.0f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
