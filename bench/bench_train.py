"""Training throughput at the fixed bench shape, as a ratio to this machine's matmul peak, and
against MaxText at the same shape in the same run.

    python bench/bench_train.py [--width 256 1024] [--steps 10] [--remat auto none full save_matmuls]
        [--scan | --no-scan] [--activation swiglu] [--maxtext PYTHON] [--profile DIR]

The bench shape is MaxText's default decoder cut down: width 256 (and 1024), 4 layers, 4 heads of
64, MLP 1024 SwiGLU, vocab 8192, length 256, batch 8, float32, one device, synthetic tokens (this
measures the model step, not the data: bench_data.py does that). Each `--remat` value is a row;
`auto` is heft's default and prints the policy it chose. The matmul peak is measured in the same
run, because the CPU under this project changes between sessions and is shared.

`--maxtext PYTHON` also trains MaxText at the same shape with that interpreter (MaxText 0.2.5 needs
Python >= 3.12: `python3.12 -m venv mt && mt/bin/pip install maxtext==0.2.5`) and prints heft's
tokens/s as a multiple of MaxText's, each the median of the same number of steps after warm-up.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from heft.configs import base
from heft.train import compiled, peak, remat, sharding, size
from heft.train import state as train_state

BATCH, LENGTH = 8, 256


def bench_config(width: int, activation: str, remat: str, scan: bool):
    c = base.get_config()
    c.model.update(vocab=8192, width=width, depth=4, heads=4, kv_heads=4, head_dim=64, mlp_width=1024,
                   activation=activation, max_len=LENGTH, remat=remat, scan_layers=scan)
    c.train.update(batch_size=BATCH, seq_len=LENGTH, warmup_steps=1, steps=1000)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def synthetic_batch(vocab: int) -> dict:
    toks = np.random.default_rng(0).integers(0, vocab, (BATCH, LENGTH + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy(),
            "segment_ids": np.ones((BATCH, LENGTH), np.int32), "weights": np.ones((BATCH, LENGTH), np.float32)}


def run(c, steps: int, profile: str | None) -> dict:
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    chosen = c.model.remat
    if chosen == "auto":
        start = time.perf_counter()
        chosen = remat.resolve(c, mesh, note=lambda s: print(s, file=sys.stderr)).remat
        choose_s = time.perf_counter() - start
        c.model.remat = chosen
    else:
        choose_s = 0.0
    with sharding.activated(mesh, c):
        state = train_state.init(c, mesh)
        start = time.perf_counter()
        fn = compiled.train_step(c, mesh).lower(train_state.abstract(c, mesh),
                                                compiled.abstract_batch(c, mesh)).compile()
        compile_s = time.perf_counter() - start
        batch = jax.device_put(synthetic_batch(c.model.vocab), sharding.batch_sharding(c, mesh))
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
    r = size.report(c, BATCH, LENGTH)
    step_s = float(np.median(times))
    return {"width": c.model.width, "activation": c.model.activation, "remat": chosen,
            "scan": c.model.scan_layers, "params": r["total_params"], "choose_s": round(choose_s, 1),
            "compile_s": round(compile_s, 2), "step_s": round(step_s, 4), "tokens_per_s": round(BATCH * LENGTH / step_s),
            "model_gflops_per_s": round(r["flops_per_step"] / step_s / 1e9, 1), "flops_per_step": r["flops_per_step"]}


def _maxtext_env() -> dict:
    """This environment without heft's PYTHONPATH and XLA flags: MaxText runs its own Python and JAX."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}


def maxtext_install(python: str) -> dict:
    """Where MaxText's package lies under `python`, and its and JAX's versions."""
    probe = ("import json, os, jax, maxtext; from importlib.metadata import version; print(json.dumps("
             "{'base': os.path.dirname(maxtext.__file__), 'version': f'maxtext {version(\"maxtext\")}, jax {jax.__version__}'}))")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=_maxtext_env())
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"bench_train: no MaxText under {python}: {tail[0]}; install it with "
                         "`python3.12 -m venv mt && mt/bin/pip install maxtext==0.2.5`")
    return json.loads(out.stdout.strip().splitlines()[-1])


def maxtext_command(python: str, base: str, width: int, steps: int, workdir: str) -> list[str]:
    """MaxText 0.2.5's trainer at the bench shape: its defaults are Llama-2 blocks (RMSNorm, RoPE,
    SwiGLU, untied readout), AdamW, full remat and scanned layers."""
    return [python, "-m", "maxtext.trainers.pre_train.train", os.path.join(base, "configs", "base.yml"),
            "run_name=bench", f"base_output_directory={workdir}", "hardware=cpu", "skip_jax_distributed_system=true",
            "dataset_type=synthetic", "enable_checkpointing=false", f"base_emb_dim={width}",
            "base_num_decoder_layers=4", "base_num_query_heads=4", "base_num_kv_heads=4", "base_mlp_dim=1024",
            "head_dim=64", "vocab_size=8192", f"max_target_length={LENGTH}", f"per_device_batch_size={BATCH}",
            "dtype=float32", "weight_dtype=float32", f"steps={steps + 3}"]


def run_maxtext(python: str, width: int, steps: int) -> dict:
    """Median step seconds of MaxText's own per-step log, after its compile and first steps."""
    install = maxtext_install(python)
    with tempfile.TemporaryDirectory() as workdir:
        out = subprocess.run(maxtext_command(python, install["base"], width, steps, workdir), capture_output=True,
                             text=True, env=_maxtext_env(), cwd=workdir)
    seconds = [float(s) for s in re.findall(r"completed step: \d+, seconds: ([0-9.]+)", out.stderr + out.stdout)]
    if out.returncode != 0 or len(seconds) < steps:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"bench_train: MaxText did not run ({python}, exit {out.returncode}): {tail[0]}")
    step_s = float(np.median(seconds[-steps:]))
    return {"maxtext": install["version"], "width": width, "step_s": round(step_s, 4),
            "tokens_per_s": round(BATCH * LENGTH / step_s)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--activation", default="swiglu")
    p.add_argument("--remat", nargs="+", default=["auto"], help="one row each: auto none full save_matmuls")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--maxtext", default=None, metavar="PYTHON", help="a Python with maxtext==0.2.5 installed")
    p.add_argument("--profile", default=None)
    a = p.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    for w in a.width:
        rows = []
        if a.maxtext:
            mt = run_maxtext(a.maxtext, w, a.steps)
            print(json.dumps(mt))
        for i, policy in enumerate(a.remat):
            c = bench_config(w, a.activation, policy, a.scan)
            row = run(c, a.steps, a.profile if (w, i) == (a.width[0], 0) else None)
            rows.append(row)
            if a.maxtext:
                row["vs_maxtext"] = round(row["tokens_per_s"] / mt["tokens_per_s"], 2)
        matmul_peak = peak.measure_matmul_flops()
        for row in rows:
            row["matmul_peak_gflops_per_s"] = round(matmul_peak / 1e9, 1)
            row["mfu"] = round(row.pop("flops_per_step") / row["step_s"] / matmul_peak, 3)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
