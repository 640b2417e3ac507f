"""A preemption storm survived: two hosts, SIGTERM to one of them during a save, during compilation and at
a random step, a restart after each, and the run ends as if nothing had happened (tests/storm.py)."""

import json
import os
import random

import jax
import numpy as np
import pytest
import storm
from test_train_loop import _metrics, _overrides

from heft.train import checkpoint, goodput, manifest


@pytest.mark.slow
def test_a_two_host_run_preempted_in_a_save_a_compilation_and_a_step_ends_bit_equal_to_an_undisturbed_one(tmp_path):
    seed = int(os.environ.get("HEFT_STORM_SEED") or random.randrange(2**32))
    print(f"HEFT_STORM_SEED={seed} replays this storm")
    steps = 20  # room for three stops, each a few steps after its signal (JAX polls for SIGTERM each second)
    # Parameters and optimizer state sharded over both hosts' devices, as on a pod.
    fields = {"train.eval_every": 100, "train.checkpoint_every": 4, "mesh.data": 1, "mesh.fsdp": -1}
    reference, stormed = str(tmp_path / "reference"), str(tmp_path / "storm")
    # The undisturbed run trains beside the storm's first session (their start-ups overlap), on its own
    # copy of the tokenized corpus so that the two never write one cache at once.
    undisturbed = storm.Session(reference, _overrides(tmp_path, steps, **fields, **{
        "data.cache_dir": str(tmp_path / "reference-cache")}), timeout=600)
    try:
        records = storm.run(stormed, _overrides(tmp_path, steps, **fields), seed, steps)
        out = undisturbed.finish()[0]
    finally:
        undisturbed.kill()
    assert "done:" in out, out[-3000:]

    # Every step's loss and the final parameters, bit for bit.
    a, _ = _metrics(reference)
    b, _ = _metrics(stormed)
    assert sorted(b) == sorted(a) == list(range(1, steps + 1)), (seed, sorted(b))
    assert [b[s]["loss"] for s in a] == [a[s]["loss"] for s in a], seed
    want, got = checkpoint.load(reference), checkpoint.load(stormed)
    assert int(got.directory.name) == int(want.directory.name) == steps
    # Each host wrote its own shards, and the seal covers both hosts' files.
    files = manifest.verify(str(got.directory))["files"]
    assert any("ocdbt.process_1" in f for f in files) and any("ocdbt.process_0" in f for f in files)
    assert {r["host"] for r in records if r["moment"]} == {0, 1}  # the coordinator and the worker preempted
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params), jax.device_get(want.params))

    # The goodput ledger across the four sessions, as heft summed it at the end: each session's
    # start-up and compilation lost, and no step trained twice (every stop saved the step it stopped at).
    with open(os.path.join(stormed, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "startup_s" in r] == [r["start"] for r in records], (seed, records)
    summary = records[-1]["goodput"]
    assert summary == goodput.summarize(rows)
    assert summary["sessions"] == 4 and summary["redone_steps"] == 0 and summary["redone_s"] == 0, summary
    assert min(summary[k] for k in ("train_s", "startup_s", "compile_s", "checkpoint_s")) > 0, summary
    print(goodput.text(summary))
    for r in records:
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "goodput"})
