"""Checkpoint save and restore throughput, next to this disk's raw write speed, and how long an
async save blocks the training loop.

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
from heft.train import checkpoint, compiled, sharding


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
    state = compiled.init_state(c, mesh)
    keys = iter(jax.random.split(jax.random.key(0), 10000))
    state["opt_state"] = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape, x.dtype) if x.ndim else x, state["opt_state"])
    return c, mesh, state


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

    ckpt = checkpoint.Checkpointer(a.dir, c)
    start = time.perf_counter()
    ckpt.save(1, state, {"rows_consumed": 0})
    blocked = time.perf_counter() - start  # the loop waits only this long
    ckpt.manager.wait_until_finished()
    saved = time.perf_counter() - start
    ckpt.tick()
    sealed = time.perf_counter() - start  # + sha256 manifest

    abstract = compiled.abstract_state(c, mesh)
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
        "save_mb_s": round(mb / saved), "loop_blocked_s": round(blocked, 3), "save_s": round(saved, 2),
        "save_and_manifest_s": round(sealed, 2), "restore_verified_mb_s": round(mb / restore_s),
        "restore_unverified_mb_s": round(mb / restore_unverified_s),
    }))
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
