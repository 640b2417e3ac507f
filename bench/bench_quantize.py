"""What quantization costs and saves: bytes on disk and in memory, held-out loss and perplexity
against the float checkpoint, and generation speed, for float32 / bf16 / int8 / int4 (two group
sizes).

    heft train --config=configs/tiny.py --workdir=runs/tiny          # the trained model (~3 min)
    python bench/bench_quantize.py --checkpoint=runs/tiny --groups=32,16
    python bench/bench_quantize.py --llama=512,8,8,4,1408,8192 --groups=64,32   # a random Llama, speed only

--checkpoint is a trained heft checkpoint (its held-out split is evaluated, with its own tokenizer);
--llama=WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB builds a random Llama with transformers, imports it with
`heft convert` and measures bytes and speed (random weights: their loss means nothing). Every
variant is written with heft's own savers (sealed, int4 packed) to measure the disk; memory is the
bytes of the arrays (int4: half a byte, as packed on TPUs; XLA on this CPU may hold a byte each).
Generation: --batch prompts of 16 tokens continued by --new tokens, greedy with the KV cache, the
best of --repeats runs after the one that compiles. The CPU is shared: compare rows of one run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from heft.data import processes
from heft.eval import heldout
from heft.eval.generate import generate
from heft.model.build import bind as bind_float
from heft.quantize import checkpoint as qcheckpoint
from heft.quantize import model as qmodel
from heft.quantize import rules
from heft.train import checkpoint, sharding, size


def disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def variants(config, params, mesh, groups: list[int]):
    """(label, config, params, bind) for float32, bf16 and the quantized schemes."""
    yield "float32", config, params, bind_float
    bf16 = config.copy_and_resolve_references()
    bf16.model.update(param_dtype="bfloat16", compute_dtype="bfloat16")
    yield "bf16", bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), bind_float
    for weights, group in [("int8", 0)] + [("int4", g) for g in groups]:
        q = config.copy_and_resolve_references()
        q.quantize = dict(weights=weights, group_size=group, qat=False)
        rules.check(q)
        label = f"{weights}" + (f" g{group}" if group else " per-channel")
        yield label, q, qmodel.quantize(q, params, mesh), qmodel.binder(q)


def save(folder: str, config, params) -> None:
    if rules.is_quantized(config):
        qcheckpoint.save(folder, config, params)
    else:
        checkpoint.save_params(folder, config, params)


def tokens_per_s(config, params, bind, mesh, batch: int, new: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, config.model.vocab, 16).tolist() for _ in range(batch)]
    with sharding.activated(mesh, config):
        model = bind(config.model, params)
        generate(model, prompts, new)  # compiles
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            generate(model, prompts, new)
            best = min(best, time.perf_counter() - start)
    return batch * new / best


def random_llama(spec: str, folder: str) -> str:
    """A random Llama (transformers) imported with heft convert; returns the heft checkpoint."""
    import torch
    import transformers

    width, depth, heads, kv, mlp, vocab = map(int, spec.split(","))
    hf = os.path.join(folder, "hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf, safe_serialization=True)
    out = os.path.join(folder, "heft")
    subprocess.run([sys.executable, "-c", "from heft.launch.cli import main; main()", "convert", f"--from_hf={hf}",
                    f"--out={out}"], check=True, capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="a trained heft checkpoint or workdir")
    ap.add_argument("--llama", help="WIDTH,DEPTH,HEADS,KV_HEADS,MLP,VOCAB of a random Llama (speed only)")
    ap.add_argument("--groups", default="32,16", help="two int4 group sizes")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eval_batches", type=int, default=0, help="held-out batches (0: the whole split)")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        source = args.checkpoint or random_llama(args.llama, tmp)
        config, params, tokenizer = checkpoint.load_params(source)
        mesh = jax.tree.leaves(params)[0].sharding.mesh
        prepared = processes.prepare_for_processes(config, tokenizer, progress=False) if args.checkpoint else None
        rows, base_loss = [], None
        for label, c, p, bind in variants(config, params, mesh, groups):
            folder = os.path.join(tmp, label.replace(" ", "_"))
            save(folder, c, p)
            row = {"variant": label, "disk_bytes": disk_bytes(folder),
                   "memory_bytes": sum(size.bytes_by_dtype(p).values())}
            if prepared is not None:
                r = heldout.evaluate(c, p, mesh, prepared, args.eval_batches, bind=bind)
                base_loss = r["eval_loss"] if base_loss is None else base_loss
                row.update(eval_loss=r["eval_loss"], perplexity=r["perplexity"],
                           perplexity_delta=r["perplexity"] / np.exp(base_loss) - 1)
            row["tokens_per_s"] = tokens_per_s(c, p, bind, mesh, args.batch, args.new, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{config.name}: {sum(x.size for x in jax.tree.leaves(params)):,} parameters; "
          f"generation: {args.batch} prompts x {args.new} new tokens")
    print("| variant | disk | memory | held-out loss | perplexity | vs float32 | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        loss = (f"{r['eval_loss']:.4f} | {r['perplexity']:.2f} | {100 * r['perplexity_delta']:+.2f}%"
                if "eval_loss" in r else "- | - | -")
        print(f"| {r['variant']} | {r['disk_bytes'] / 2**20:.2f} MiB | {r['memory_bytes'] / 2**20:.2f} MiB | {loss} | "
              f"{r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
