"""Goodput through a preemption storm: a two-host `heft train` long enough that three preemptions are
realistic, SIGTERM to one host during a save, during compilation and at a random step (tests/storm.py,
the same storm tests/test_storm.py runs small), each followed by a restart of both hosts.

    python bench/bench_preemption.py [--steps 500] [--seed N] [--workdir /tmp/heft-bench-preemption]

Two local processes with 2 fake CPU devices each (gloo between them), parameters sharded over all
four (mesh.data=1, mesh.fsdp=-1), configs/tiny.py otherwise as it is (remat=auto included). heft's
cache (tokenizer, token store, remat choice) and JAX's compilation cache start empty in a scratch
folder beside the workdir, as on a new pod; the restarts read them back. Prints each session, the
goodput ledger per session (metrics.jsonl) and heft's own summary over all of them.
"""

import argparse
import json
import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

KINDS = ("train_s", "startup_s", "compile_s", "checkpoint_s", "redone_s", "eval_s")


def per_session(rows: list[dict]) -> list[dict]:
    """The ledger (train/goodput.py) split by session: each begins at its start-up row; a resume's row
    (redone steps), written just before it, counts against the session whose steps were lost."""
    sessions = []
    for row in rows:
        if "startup_s" in row:
            sessions.append({"from": row["step"], "steps_to": row["step"], **{k: 0.0 for k in KINDS}})
        if not sessions:
            continue
        for kind in KINDS:
            if isinstance(row.get(kind), (int, float)):
                sessions[-1][kind] += row[kind]
        if "loss" in row:
            sessions[-1]["steps_to"] = row["step"]
    return sessions


def table(sessions: list[dict], records: list[dict]) -> str:
    lines = ["| session | preempted | from step | to step | start-up | compilation | training | checkpoints | "
             "held-out eval | stopped after the signal | wall (bench's clock) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, (s, r) in enumerate(zip(sessions, records)):
        what = ("not (ran to the end)" if r["moment"] is None else
                f"{r['moment']} ({'save of step ' + str(r['save']) if r['moment'] == 'save' else ''}"
                f"{'after step ' + str(r['step']) + ' was logged' if r['moment'] == 'step' else ''}"
                f"{'while compiling' if r['moment'] == 'compilation' else ''}; host {r['host']})")
        lines.append(f"| {i + 1} | {what} | {r['start']} | {r['stopped']} | {s['startup_s']:.1f} s | "
                     f"{s['compile_s']:.1f} s | {s['train_s']:.1f} s | {s['checkpoint_s']:.1f} s | "
                     f"{s['eval_s']:.1f} s | {_heeded(r)} | {r['wall_s']:.1f} s |")
    return "\n".join(lines)


def _heeded(r: dict) -> str:
    if r["moment"] is None:
        return ""
    caught = f"JAX saw it in {r['caught_s']:.1f} s, " if r.get("caught_s") is not None else ""
    return f"{caught}saved and stopped in {r['stopped_s']:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--checkpoint_every", type=int, default=100)
    parser.add_argument("--warmup_steps", type=int, default=50, help="configs/tiny.py's; below --steps")
    parser.add_argument("--span", type=int, default=150, help="the step moment falls 1..span steps into its session")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", default="/tmp/heft-bench-preemption")
    a = parser.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(2**32)
    cache = a.workdir + "-cache"
    for d in (a.workdir, cache):
        shutil.rmtree(d, ignore_errors=True)
    os.environ.update(HEFT_CACHE=cache, JAX_COMPILATION_CACHE_DIR=os.path.join(cache, "compile"),
                      JAX_PLATFORMS="cpu")
    import jax
    import storm

    from heft.train import goodput

    args = [f"--config={ROOT}/configs/tiny.py", f"--config.train.steps={a.steps}",
            f"--config.train.warmup_steps={a.warmup_steps}", "--config.train.log_every=10",
            f"--config.train.checkpoint_every={a.checkpoint_every}", f"--config.train.eval_every={a.steps}",
            "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    print(f"$ {' '.join(sys.argv)}  (seed {seed})")
    print(f"machine: {os.cpu_count()} cores, {_cpu()}, load average {os.getloadavg()[0]:.1f} at the start; "
          f"jax {jax.__version__}, flax {_version('flax')}, orbax-checkpoint {_version('orbax-checkpoint')}")
    print("heft train " + " ".join(args) + " --coordinator=127.0.0.1:PORT --num_processes=2 --process_id=I")
    start = time.time()
    records = storm.run(a.workdir, args, seed, a.steps, span=a.span, timeout=3600)
    wall = time.time() - start
    with open(os.path.join(a.workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    summary = records[-1]["goodput"]
    print()
    print(table(per_session(rows), records))
    print()
    print(goodput.text(summary))
    print(f"storm wall time {wall:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    print(json.dumps({"seed": seed, "records": records, "goodput": summary}))


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


if __name__ == "__main__":
    main()
