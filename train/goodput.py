"""Goodput: how much of a run's time trained the model, across every restart of its workdir.

Each session (one `heft train` process) times its phases and writes them into WORKDIR/metrics.jsonl,
beside the metrics, so that every restart of the same workdir adds to one ledger:

    {"step": S, "startup_s": .., "compile_s": ..}   once a session is ready to train (S: its first step);
                                                    start-up runs from the process's own start
    "train_s" on each metrics row                   seconds in steps since the row before (and on
                                                    a stop's checkpoint row, for the steps since)
    "eval_s" on each held-out row                   seconds of held-out evaluation
    {"step": S, "checkpoint_s": ..}                 seconds the loop waited on a save
    {"step": S, "resumed": true, "redone_steps": N, "redone_s": ..}
                                                    on resume: the steps past the checkpoint that the
                                                    last session trained and this one trains again

`summarize(rows)` adds them up: goodput is the training time kept over all the time timed. What is
not timed: the wait between a crash and the rerun (a scheduler's queue, or a person's night), and
the steps a crashed session ran after its last metrics row (at most `train.log_every`).

Why not `ml-goodput-measurement` (Google's package, the same categories): it records to and reads
back from Google Cloud Logging (a `google.cloud.logging.Client` on every host), so it needs a GCP
project and network even to compute a number, and pulls in the Cloud Logging and Monitoring
clients. heft already times each phase, and its workdir (local or gs://) is the one place every
restart can read.
"""

import json
import os
import time

import jax

# What a session's time is spent on: training kept, what the run loses, and evaluation (not training,
# but asked for: counted in the total, not as lost).
LOST = {"startup_s": "start-up", "compile_s": "compilation", "checkpoint_s": "checkpoints",
        "redone_s": "redone steps"}
KINDS = ("train_s", *LOST, "eval_s")

_IMPORTED = time.time()


def process_start() -> float:
    """When this process started (wall clock): the kernel's record on Linux, so that importing JAX and
    joining the other hosts count as start-up; elsewhere, when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def startup_row(compile_s: float) -> dict:
    """The session's first ledger row, written when it is ready to train."""
    return {"startup_s": max(time.time() - process_start() - compile_s, 0.0), "compile_s": compile_s}


def timed(state, fn):
    """(fn(), seconds it took), after the steps already dispatched on `state` finish: a save or an
    evaluation waits for them anyway, and their time is the steps', not the save's."""
    jax.block_until_ready(state)
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def lost(rows: list[dict]) -> dict:
    """The time in rows of steps about to be redone: their training becomes `redone_s`, and the rest
    (a save cut short, an evaluation) stays what it was."""
    out = {}
    for row in rows:
        for kind in KINDS:
            if isinstance(row.get(kind), (int, float)):
                key = "redone_s" if kind == "train_s" else kind
                out[key] = out.get(key, 0.0) + row[kind]
    return out


def summarize(rows: list[dict]) -> dict:
    """Seconds per kind over every session in `rows` (metrics.jsonl's objects), sessions, redone
    steps and goodput (training kept / all time timed)."""
    total = {kind: 0.0 for kind in KINDS}
    sessions = redone_steps = 0
    for row in rows:
        for kind in KINDS:
            if isinstance(row.get(kind), (int, float)):
                total[kind] += row[kind]
        sessions += "startup_s" in row
        redone_steps += int(row.get("redone_steps", 0) or 0)
    timed_s = sum(total.values())
    return {**total, "total_s": timed_s, "sessions": sessions, "redone_steps": redone_steps,
            "goodput": total["train_s"] / timed_s if timed_s else None}


def read_rows(path) -> list[dict]:
    """metrics.jsonl's objects (an `epath`-like path), skipping any line that does not parse."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def text(s: dict) -> str:
    """One line: `goodput 81.2% of 52.3 s over 2 sessions: training 42.5 s; lost: ...; evaluation ...`."""
    parts = []
    for kind, name in LOST.items():
        if s[kind] > 0:
            extra = f" ({s['redone_steps']} steps)" if kind == "redone_s" else ""
            parts.append(f"{name} {s[kind]:,.1f} s{extra}")
    share = "n/a" if s["goodput"] is None else f"{100 * s['goodput']:.1f}%"
    plural = "s" if s["sessions"] != 1 else ""
    return (f"goodput {share} of {s['total_s']:,.1f} s over {s['sessions']} session{plural}: training "
            f"{s['train_s']:,.1f} s; lost: {', '.join(parts) or 'nothing'}; held-out evaluation {s['eval_s']:,.1f} s")
