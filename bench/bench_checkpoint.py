"""Checkpoint save and restore throughput, next to this disk's raw write speed, and what a save
costs the training loop: the time `save` blocks it, and how much a stand-in step slows while orbax
writes and custody hashes and seals in the background.

    python bench/bench_checkpoint.py [--width 1024] [--dir /tmp/heft-bench-ckpt]

The train state (params + Adam's two moments, float32) of a 4-layer model of the given width,
random values (zeros would compress to nothing), saved with the same Checkpointer `heft train` uses.
"""

import argparse
import json
import os
import shutil
import time

import jax
import numpy as np

from heft.configs import base
from heft.train import checkpoint, custody, sharding
from heft.train import state as train_state


def disk_write_mb_s(directory: str, mb: int = 512) -> float:
    """Raw sequential write speed, fsync'd, in MB/s."""
    path = os.path.join(directory, "raw.bin")
    block = np.random.default_rng(0).bytes(1 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return mb / seconds


def state_of(width: int):
    c = base.get_config()
    c.model.update(vocab=32000, width=width, depth=4, heads=8, kv_heads=8, mlp_width=4 * width)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.keep = 10
    mesh = sharding.make_mesh(c)
    state = train_state.init(c, mesh)
    keys = iter(jax.random.split(jax.random.key(0), 10000))
    state["opt_state"] = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape, x.dtype) if x.ndim else x, state["opt_state"])
    return c, mesh, state


def _step_times(fn, until, at_least: int = 3) -> list[float]:
    """Runs `fn` (a stand-in training step) until `until()` is true; returns each call's seconds."""
    times = []
    while not until() or len(times) < at_least:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--dir", default="/tmp/heft-bench-ckpt")
    a = p.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    c, mesh, state = state_of(a.width)
    jax.block_until_ready(state)
    mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
    raw = disk_write_mb_s(a.dir)

    # A stand-in training step (a jitted matmul chain), timed alone and while a save is sealed.
    x = jax.numpy.ones((1024, 1024))
    step = jax.jit(lambda x: (x @ x) / 1024.0)
    run = lambda: step(x).block_until_ready()
    run()
    alone = float(np.median(_step_times(run, lambda: True, at_least=20)))

    ckpt = checkpoint.Checkpointer(a.dir, c, note=lambda text: None)
    step_dir = ckpt.step_dir(1)
    start = time.perf_counter()
    ckpt.save(1, state, {"rows_consumed": 0})
    blocked = time.perf_counter() - start  # the loop waits only this long
    writing = _step_times(run, lambda: checkpoint.committed(step_dir), at_least=1)
    committed = time.perf_counter() - start  # orbax has written it
    hashing = _step_times(run, lambda: 1 in ckpt.custodian.sealed, at_least=1)
    sealed = time.perf_counter() - start  # custody has hashed and sealed it
    slowed = lambda times: sum(times) - alone * len(times)

    # What the loop used to wait for: process 0 hashing the whole checkpoint in the training thread.
    start = time.perf_counter()
    custody.hash_share(step_dir, 0, 1)
    hash_all = time.perf_counter() - start
    # A restore's verification on 2 hosts: each checks its share (timed here one after the other).
    times = []
    for i in range(2):
        start = time.perf_counter()
        custody.verify(step_dir, i, 2, gather=lambda x: [x])
        times.append(time.perf_counter() - start)

    abstract = train_state.abstract(c, mesh)
    start = time.perf_counter()
    restored, _ = checkpoint.Checkpointer(a.dir, c).restore_latest(abstract)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    c.checkpoint.verify = False
    start = time.perf_counter()
    restored, _ = checkpoint.Checkpointer(a.dir, c).restore_latest(abstract)
    jax.block_until_ready(restored)
    restore_unverified_s = time.perf_counter() - start
    ckpt.close()
    print(json.dumps({
        "state_mb": round(mb, 1), "devices": len(jax.devices()), "raw_disk_write_mb_s": round(raw),
        "loop_blocked_in_save_s": round(blocked, 3), "committed_s": round(committed, 2), "sealed_s": round(sealed, 2),
        "step_alone_ms": round(1e3 * alone, 1),
        "steps_slowed_while_orbax_writes_s": round(slowed(writing), 2),
        "steps_slowed_while_custody_hashes_s": round(slowed(hashing), 2),
        "hash_whole_checkpoint_in_loop_s_before": round(hash_all, 2),
        "verify_on_1_host_s": round(hash_all, 2), "verify_each_of_2_hosts_s": [round(t, 2) for t in times],
        "restore_verified_mb_s": round(mb / restore_s), "restore_unverified_mb_s": round(mb / restore_unverified_s),
    }))
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
