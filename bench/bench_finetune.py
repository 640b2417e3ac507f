"""Fine-tuning methods side by side on the embedded task (configs/milton.py), same base, same steps.

    heft train --config=configs/tiny.py --workdir=runs/tiny
    python bench/bench_finetune.py --base=runs/tiny [--steps 300] [--methods full,lora,...] [--out DIR]
    python bench/bench_finetune.py --base=runs/tiny --shape small --steps 3   # the small config's costs

For each method: trainable parameters (and their share of the base's), the optimizer state's bytes
(read from the saved checkpoint), the train step's compiled temporaries (XLA's memory analysis: what
LoRA's fold of A @ B into its weights costs), step time and tokens/s (the loop's last interval), the
task's held-out loss (prompt/completion, the completion's tokens) before and after, and the base's
own held-out loss after (what the fine-tune forgot). `--shape small` fine-tunes a `small`-shaped
base made here (untrained: only the costs mean anything) for a few steps.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp

from heft.adapt import config as adapt_config
from heft.adapt import finetune, trainable
from heft.configs import milton, small
from heft.data import processes
from heft.eval.heldout import evaluate
from heft.model import build
from heft.train import checkpoint, compiled, sharding


def heldout(run, params, tokenizer, corpus=None, form=None) -> float:
    run = run.copy_and_resolve_references()
    if corpus:
        run.data.corpus, run.data.format = corpus, form
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return evaluate(run, params, mesh, processes.prepare_for_processes(run, tokenizer, progress=False))["eval_loss"]


def saved_bytes(step_dir, item: str) -> int:
    tree = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata[item]
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def step_temp_bytes(run, base_dir) -> int:
    """The train step's temporary bytes on one device, from XLA's compiled memory analysis."""
    mesh = sharding.make_mesh(run)
    program = finetune.program(run, mesh, base_dir)
    with sharding.activated(mesh, run):
        step = program.train_step.lower(program.abstract_state, *program.frozen, compiled.abstract_batch(run, mesh))
        return step.compile().memory_analysis().temp_size_in_bytes


def small_base(tokenizer_of: str, out: str) -> str:
    """A parameters-only checkpoint of the small config's shape (random weights: costs only) carrying
    the tokenizer of the checkpoint `tokenizer_of`."""
    c = small.get_config()
    tokenizer = checkpoint.load_params(tokenizer_of)[2]
    c.model.vocab = checkpoint.read_config(tokenizer_of).model.vocab
    mesh = checkpoint.serving_mesh(c)
    params = jax.jit(lambda: build.init_params(c.model, 0),
                     out_shardings=sharding.param_dict_shardings(c.model, mesh, c))()
    checkpoint.save_params(out, c, params, tokenizer)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="the base: a workdir or checkpoint (runs/tiny)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", default=",".join(adapt_config.METHODS))
    p.add_argument("--shape", choices=["base", "small"], default="base",
                   help="small: a small-shaped untrained base with the given base's tokenizer (costs only)")
    p.add_argument("--out", default="/tmp/heft-bench-finetune")
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    base_dir = small_base(a.base, os.path.join(a.out, "small_base")) if a.shape == "small" else a.base
    base_run, base_params, tokenizer = checkpoint.load_params(base_dir)
    base_count = trainable.count(base_params)
    rows = []
    for method in a.methods.split(","):
        config = milton.get_config(method)
        config.train.update(steps=a.steps, warmup_steps=min(30, a.steps // 10), eval_every=a.steps,
                            checkpoint_every=a.steps, log_every=min(25, a.steps))
        if a.shape == "small":
            config.train.update(seq_len=512, batch_size=32)
        run = adapt_config.run_config(config, base_run)
        before = heldout(adapt_config.base_view(run), base_params, tokenizer) if a.shape == "base" else None
        workdir = os.path.join(a.out, method)
        summary = finetune.finetune(config, base_dir, workdir)
        step_dir = os.path.join(workdir, "checkpoints", str(a.steps))
        row = {"method": method, "trainable": summary["trainable_params"],
               "share": summary["trainable_params"] / base_count,
               "opt_state_bytes": saved_bytes(step_dir, "opt_state"),
               "step_temp_bytes": step_temp_bytes(run, base_dir),
               "step_s": config.train.batch_size * config.train.seq_len / summary["tokens_per_s"],
               "tokens_per_s": summary["tokens_per_s"]}
        if a.shape == "base":
            tuned = checkpoint.load(workdir)
            tuned_run, tuned = tuned.config, tuned.params
            row.update(target_before=before, target_after=heldout(tuned_run, tuned, tokenizer),
                       source_after=heldout(tuned_run, tuned, tokenizer, base_run.data.corpus, "text"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.shape == "base":
        rows.append({"method": "(base)", "source_after": heldout(base_run, base_params, tokenizer)})
    model = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"\n{datetime.date.today()}, {model.split(':', 1)[-1].strip()}, {len(jax.devices())} CPU device(s), "
          f"jax {jax.__version__}, python {platform.python_version()}, {a.steps} steps of "
          f"{config.train.batch_size} x {config.train.seq_len}")
    print("| method | trained | of base | optimizer state | step temporaries | step | tokens/s | task loss before -> after "
          "| base held-out loss after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "(base)":
            print(f"| base, untuned | | | | | | | | {r['source_after']:.4f} |")
            continue
        task = f"{r['target_before']:.4f} -> {r['target_after']:.4f}" if "target_after" in r else "-"
        source = f"{r['source_after']:.4f}" if "source_after" in r else "-"
        print(f"| {r['method']} | {r['trainable']:,} | {100 * r['share']:.2f}% | {r['opt_state_bytes'] / 2**20:,.2f} MiB "
              f"| {r['step_temp_bytes'] / 2**20:,.1f} MiB | {r['step_s']:.3f} s | {r['tokens_per_s']:,.0f} | {task} "
              f"| {source} |")


if __name__ == "__main__":
    main()
