"""heft on one accelerator (bench/gpu.sh runs it): the matmul peak, a Llama-shaped model trained with
XLA's and with the fused (cuDNN) attention, and a save/restore of the trained state.

    python bench/bench_gpu.py            # the GPU shape: ~1.06B parameters, bf16 compute, seq 2048
    python bench/bench_gpu.py --cpu      # a tiny shape on the CPU (CI): attention xla only

The model: Llama's blocks (RMSNorm, RoPE, SwiGLU) at width 2048, 18 layers, 16 heads of 128, MLP
5632, vocab 32000, untied: 1.06B parameters, float32 weights and AdamW state, bfloat16 compute, one
document per row (no packing: cuDNN's kernel then takes the plain causal mask). Each attention
runs `--steps` steps on synthetic tokens after `--warmup` untimed ones (the compile among them).
MFU = model FLOPs (heft size's 6N + 12·L·T·d per token) / time / peak, against both the spec peak
(train/chips.py: H200 989 dense bf16 TFLOP/s) and the matmul peak measured in the same run.
Prints one JSON line per measurement and a markdown table at the end.
"""

import json
import os
import platform
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from heft.configs import base
from heft.train import chips, compiled, peak, sharding, size
from heft.train import state as train_state


def config(cpu: bool, attention: str, batch: int | None = None):
    c = base.get_config()
    c.name = "bench_gpu_tiny" if cpu else "bench_gpu_1b"
    m = c.model
    if cpu:
        m.update(vocab=512, width=64, depth=1, heads=4, kv_heads=4, mlp_width=172, max_len=128)
        c.train.update(batch_size=batch or 4, seq_len=128)
    else:
        m.update(vocab=32000, width=2048, depth=18, heads=16, kv_heads=16, mlp_width=5632, max_len=2048)
        c.train.update(batch_size=batch or 16, seq_len=2048)
    m.update(param_dtype="float32", compute_dtype="float32" if cpu else "bfloat16", activation="swiglu",
             tied_embeddings=False, attention=attention, document_mask=False, remat="none")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.train.update(micro_batches=1, warmup_steps=2, steps=100)
    return c


def synthetic_batch(c, mesh, seed: int) -> dict:
    B, T = c.train.batch_size, c.train.seq_len
    tokens = np.random.default_rng(seed).integers(0, c.model.vocab, (B, T + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
            "segment_ids": np.ones((B, T), np.int32), "weights": np.ones((B, T), np.float32)}
    return jax.device_put(host, sharding.batch_sharding(c, mesh))


def peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def train(c, steps: int, warmup: int, spec_peak: float | None, measured_peak: float) -> tuple[dict, dict, object]:
    """Trains `steps` timed steps; returns (row, state, mesh)."""
    mesh = sharding.make_mesh(c, jax.local_devices()[:1])  # one device (a CPU with fake devices too)
    step = compiled.train_step(c, mesh)
    with sharding.activated(mesh, c):
        state = train_state.init(c, mesh)
        batch = synthetic_batch(c, mesh, 0)
        start = time.perf_counter()
        for _ in range(warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        compile_and_warmup = time.perf_counter() - start
        losses = []
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
        jax.block_until_ready(state)
        seconds = (time.perf_counter() - start) / steps
    report = size.report(c)
    tokens = c.train.batch_size * c.train.seq_len
    flops = report["flops_per_step"]
    row = {"attention": c.model.attention, "params": report["total_params"], "batch": c.train.batch_size,
           "seq_len": c.train.seq_len, "steps": steps, "step_seconds": seconds,
           "tokens_per_second": tokens / seconds, "model_tflops_per_second": flops / seconds / 1e12,
           "mfu_spec": None if spec_peak is None else flops / seconds / spec_peak,
           "mfu_measured": flops / seconds / measured_peak, "peak_bytes": peak_bytes(),
           "first_loss": float(losses[0]), "last_loss": float(losses[-1]),
           "warmup_seconds": compile_and_warmup}
    return row, state, mesh


def save_restore(c, state, mesh) -> dict:
    """Saves the trained state with orbax and restores it onto the same shardings: timings, and
    whether every leaf came back bit for bit."""
    folder = tempfile.mkdtemp(prefix="heft-gpu-bench-")
    try:
        path = os.path.join(folder, "state")
        checkpointer = ocp.StandardCheckpointer()
        start = time.perf_counter()
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
        saved = time.perf_counter() - start
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        start = time.perf_counter()
        restored = checkpointer.restore(path, train_state.abstract(c, mesh))
        jax.block_until_ready(restored)
        loaded = time.perf_counter() - start
        equal = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
        return {"bytes": nbytes, "save_seconds": saved, "restore_seconds": loaded, "bit_equal": equal}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv):
    cpu = "--cpu" in argv
    args = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
    steps, warmup = int(args.get("steps", 2 if cpu else 30)), int(args.get("warmup", 1 if cpu else 3))
    batch = int(args["batch"]) if "batch" in args else None
    device = jax.local_devices()[0]
    if not cpu and device.platform != "gpu":
        raise SystemExit(f"bench_gpu: no GPU here (JAX sees {device.platform}); run with --cpu for the tiny shape")
    chip = chips.by_kind(device.device_kind)
    spec_peak = None if cpu or chip is None else chip.peak_flops
    measured = (peak.measure_matmul_flops(256, 3, jnp.float32) if cpu
                else peak.measure_matmul_flops(8192, 10, jnp.bfloat16))
    facts = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
             "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "spec_peak_tflops": None if spec_peak is None else spec_peak / 1e12, "measured_peak_tflops": measured / 1e12}
    print(json.dumps(facts), flush=True)
    rows, trained = [], None
    for attention in (("xla",) if cpu else ("xla", "flash")):
        try:
            row, state, mesh = train(config(cpu, attention, batch), steps, warmup, spec_peak, measured)
        except Exception as e:  # one attention failing still reports the other
            row, state = {"attention": attention, "error": f"{type(e).__name__}: {str(e)[:300]}"}, None
        print(json.dumps(row), flush=True)
        rows.append(row)
        if state is not None:
            trained = (config(cpu, attention, batch), state, mesh)
    checkpoint = save_restore(*trained) if trained else {"error": "no state trained"}
    print(json.dumps({"save_restore": checkpoint}), flush=True)
    print(table(facts, rows, checkpoint))
    ok = trained is not None and checkpoint.get("bit_equal") and all("error" not in r for r in rows)
    return 0 if ok else 1


def table(facts: dict, rows: list, checkpoint: dict) -> str:
    gib = lambda n: "n/a" if n is None else f"{n / 2**30:.1f} GiB"  # noqa: E731
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    lines = [f"{facts['device']} ({facts['platform']}), jax {facts['jax']}, {facts['date']}: matmul peak measured "
             f"{facts['measured_peak_tflops']:.1f} TFLOP/s" + (f" (spec {facts['spec_peak_tflops']:.0f})"
                                                               if facts["spec_peak_tflops"] else ""),
             "| attention | params | batch x seq | ms/step | tokens/s | model TFLOP/s | MFU (spec) | MFU (measured) | "
             "peak memory | loss first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['attention']} | failed: {r['error']} |")
            continue
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.2f}M"
        lines.append(f"| {r['attention']} | {params} | {r['batch']} x {r['seq_len']} | "
                     f"{r['step_seconds'] * 1e3:.1f} | {r['tokens_per_second']:,.0f} | "
                     f"{r['model_tflops_per_second']:.1f} | {pct(r['mfu_spec'])} | {pct(r['mfu_measured'])} | "
                     f"{gib(r['peak_bytes'])} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    if "error" in checkpoint:
        lines.append(f"save/restore: {checkpoint['error']}")
    else:
        lines.append(f"save/restore of the trained state ({gib(checkpoint['bytes'])}): save "
                     f"{checkpoint['save_seconds']:.2f} s, restore {checkpoint['restore_seconds']:.2f} s, "
                     f"bit-equal: {checkpoint['bit_equal']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
