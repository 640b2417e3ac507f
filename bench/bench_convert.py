"""Peak host memory of importing a Hugging Face Llama checkpoint, against the weights' size.

    python bench/bench_convert.py [--width=1024] [--depth=16] [--vocab=32000] [--shard_mb=256]

Writes a random Llama-shaped folder (float32 safetensors, sharded with an index; GQA, untied) and
then, each in a fresh process so one's peak cannot hide another's:
  - streamed, 1 device:  `import_hf(dir)`, every parameter on one CPU device;
  - streamed, fsdp x8:   `import_hf(dir, mesh)` onto 8 fake CPU devices split by fsdp;
  - naive, 1 device:     `safetensors.numpy.load_file` of every shard, then `jax.device_put`
                         (what streaming avoids: the whole model twice on the host).
On CPU the devices' memory is host memory, so the placed model itself counts in the process's
RSS: the ideal is baseline + model + about one tensor. Peak RSS is the kernel's high-water mark
(ru_maxrss); RssAnon (anonymous memory, excluding page cache mapped from the files) is sampled
every 2 ms.
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
import threading
import time

MiB = 1024**2


def llama_config(a) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab,
            "hidden_size": a.width, "intermediate_size": a.mlp, "num_hidden_layers": a.depth,
            "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}


def write_checkpoint(a, folder: str) -> dict:
    """A random float32 Llama folder; returns its total and largest tensor bytes."""
    import numpy as np

    from heft.convert import llama
    from heft.convert.hf import heft_config
    from heft.convert.safetensors_io import plan_shards, shard_names, write_index, write_shard
    from heft.data import paths

    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(llama_config(a), f)
    plan = llama.tensors(heft_config(folder).model)
    sizes = {t.hf: int(np.prod(t.shape)) * 4 for t in plan}
    shapes = {t.hf: t.shape for t in plan}
    shards = plan_shards(sizes, a.shard_mb * MiB)
    files = shard_names(len(shards))
    rng = np.random.default_rng(0)
    out = paths.path(folder)  # write_shard and write_index take an epath
    for file, names in zip(files, shards):
        write_shard(out, file, {n: rng.standard_normal(shapes[n], np.float32) * 0.02 for n in names})
    write_index(out, {n: f for f, names in zip(files, shards) for n in names}, sum(sizes.values()))
    return {"bytes": sum(sizes.values()), "largest": max(sizes.values()), "tensors": len(sizes), "files": len(files)}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(mode: str, folder: str) -> dict:
    """Runs one import in this (fresh) process; returns its memory numbers in bytes."""
    if mode == "fsdp8":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import numpy as np
    from flax import nnx

    from heft.convert.hf import heft_config, import_hf
    from heft.train import sharding

    jax.devices()
    config = heft_config(folder)
    baseline = _status("VmRSS")
    anon = {"peak": _status("RssAnon"), "run": True}

    def sample():
        while anon["run"]:
            anon["peak"] = max(anon["peak"], _status("RssAnon"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    if mode == "naive":
        from safetensors.numpy import load_file

        index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
        tensors = {}
        for file in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(os.path.join(folder, file)))
        arrays = {k: jax.device_put(v) for k, v in tensors.items()}
        jax.block_until_ready(arrays)
        placed = sum(x.nbytes for x in arrays.values())
    else:
        mesh = None
        if mode == "fsdp8":
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1
            mesh = sharding.make_mesh(config)
        _, params = import_hf(folder, mesh)
        leaves = [v[...] for _, v in nnx.to_flat_state(params)]
        jax.block_until_ready(leaves)
        placed = sum(x.nbytes for x in leaves)
        assert all(np.isfinite(np.asarray(leaves[0][:1])).ravel())
    seconds = time.perf_counter() - start
    anon["run"] = False
    thread.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "seconds": seconds, "baseline_rss": baseline, "peak_rss": peak,
            "peak_anon": anon["peak"], "final_rss": _status("VmRSS"), "placed": placed}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard_mb", type=int, default=256)
    p.add_argument("--modes", default="streamed,fsdp8,naive")
    p.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    folder = tempfile.mkdtemp(prefix="heft_bench_convert_")
    try:
        start = time.perf_counter()
        sizes = write_checkpoint(a, folder)
        print(f"wrote {sizes['tensors']} tensors, {sizes['bytes'] / MiB:,.0f} MiB float32 in {sizes['files']} "
              f"files (largest tensor {sizes['largest'] / MiB:,.0f} MiB) in {time.perf_counter() - start:.0f} s")
        import jax

        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
              f"{platform.python_version()}, jax {jax.__version__}")
        print(f"{'mode':<10} {'seconds':>8} {'baseline':>9} {'peak RSS':>9} {'peak-base':>10} {'peak anon':>10} "
              f"{'placed':>8} {'(peak-base)/weights':>20}   (MiB)")
        for mode in a.modes.split(","):
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            env.pop("XLA_FLAGS", None)
            out = subprocess.run([sys.executable, __file__, "--child", mode, folder], capture_output=True,
                                 text=True, env=env)
            if out.returncode:
                print(f"{mode}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            grow = r["peak_rss"] - r["baseline_rss"]
            print(f"{mode:<10} {r['seconds']:>8.1f} {r['baseline_rss'] / MiB:>9,.0f} {r['peak_rss'] / MiB:>9,.0f} "
                  f"{grow / MiB:>10,.0f} {r['peak_anon'] / MiB:>10,.0f} {r['placed'] / MiB:>8,.0f} "
                  f"{grow / sizes['bytes']:>20.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
