"""The loop end to end on a tiny corpus: metrics, resume bit for bit, preemption, two processes."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(tmp_path):
    """A small corpus of 60 documents of English-like text."""
    rng = np.random.default_rng(0)
    words = ("the king and queen of denmark walk in the garden while a ghost speaks of murder most foul "
             "to be or not to be that is the question whether tis nobler in the mind to suffer").split()
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(60):
        text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(40))
        (d / f"doc{i:03d}.txt").write_text(text)
    return str(d)


def _overrides(tmp_path, steps=10, **extra):
    fields = {
        "data.corpus": _corpus(tmp_path) if not (tmp_path / "corpus").exists() else str(tmp_path / "corpus"),
        "data.cache_dir": str(tmp_path / "cache"), "data.workers": 1, "model.vocab": 320, "model.width": 64, "model.depth": 2,
        "model.heads": 4, "model.kv_heads": 2, "model.mlp_width": 128, "train.seq_len": 64,
        "train.batch_size": 8, "train.steps": steps, "train.warmup_steps": 2, "train.log_every": 1,
        "train.eval_every": 5, "train.eval_batches": 2, "train.checkpoint_every": 5,
        "checkpoint.async_save": True,
        "train.peak_flops": 1e11,  # MFU's denominator given, not a timed matmul per run (tests/test_peak.py times it)
        **extra,
    }
    return [f"--config.{k}={v}" for k, v in fields.items()]


def _heft(args, env=None, **kw):
    env = dict(os.environ, **(env or {}))
    return subprocess.run(["heft", *args],
                          capture_output=True, text=True, env=env, **kw)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "loss" in r}, [r for r in rows if "eval_loss" in r]


def test_train_writes_metrics_and_resumes_bit_for_bit(tmp_path, tiny_run):
    straight, r = tiny_run  # `heft train` of _overrides(steps=10), run once for the session (conftest.py)
    split = str(tmp_path / "split")
    assert "held-out loss" in r.stdout and "tokens/s" in r.stdout
    rows, evals = _metrics(straight)
    assert sorted(rows) == list(range(1, 11))
    for key in ("loss", "tokens_per_s", "mfu", "grad_norm", "lr", "step_time_s", "memory_gb"):
        assert np.isfinite(rows[10][key]), key
    assert [e["step"] for e in evals] == [5, 10]

    # Evaluation restores the 8-device checkpoint onto 1 device and onto a 2x2 mesh (below): the two
    # evaluations run while the split run trains, each start-up overlapping the others'.
    pool = concurrent.futures.ThreadPoolExecutor()
    evaluations = [pool.submit(_heft, ["eval", f"--checkpoint={straight}", f"--mesh={mesh}", "--json"],
                               env={"XLA_FLAGS": workers.xla_flags(devices)})
                   for devices, mesh in [(1, "1,1,1"), (4, "1,2,2")]]
    pool.shutdown(wait=False)

    r = _heft(["train", f"--workdir={split}", *_overrides(tmp_path, steps=10), "--stop_after=5"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped at step 5" in r.stdout
    r = _heft(["train", f"--workdir={split}", *_overrides(tmp_path, steps=10)])  # a new process
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 5" in r.stdout + r.stderr
    resumed, _ = _metrics(split)
    assert [resumed[s]["loss"] for s in range(1, 11)] == [rows[s]["loss"] for s in range(1, 11)]

    from heft.train import checkpoint

    # ... with the same loss on both meshes.
    losses = []
    for evaluation in evaluations:
        r = evaluation.result()
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["bits_per_byte"] > 0 and result["perplexity"] > 1
        losses.append(result["eval_loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)

    _, a, _ = checkpoint.load_params(straight)
    _, b, _ = checkpoint.load_params(split)
    import jax

    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))

    # Resuming the finished run with another width: refused in one line naming the field.
    r = _heft(["train", f"--workdir={split}", *_overrides(tmp_path, steps=20), "--config.model.width=128"])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("heft train: the model differs from the checkpoint's (step 10 "), r.stderr
    assert "model.width=64 in the checkpoint but 128 now" in r.stderr


def test_sigterm_saves_at_the_current_step_and_exits_zero_and_a_second_run_is_refused_meanwhile(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["heft", "train", f"--workdir={workdir}",
            *_overrides(tmp_path, steps=100000, **{"train.checkpoint_every": 100000, "train.eval_every": 100000})]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(os.path.join(workdir, "metrics.jsonl"))
                                          and len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) >= 3):
        time.sleep(0.5)
    second = _heft(args[1:])  # a second run on the same workdir is refused, naming the first
    assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"heft train: {workdir} is in use by another heft train (host {socket.gethostname()}, pid {proc.pid}"), second.stderr
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out
    step = int(out.split("stopped at step ")[-1].split()[0])
    steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert steps == [step]
    assert _heft(["verify", workdir]).returncode == 0


def test_nan_loss_stops_with_the_step_and_a_hint(tmp_path):
    r = _heft(["train", f"--workdir={tmp_path / 'run'}", *_overrides(tmp_path, steps=5, **{"train.lr": 1e30})])
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("heft train: loss or gradient became NaN/Inf at step") and "train.lr" in last


def _two_processes(workdir, args, port, extra=()):
    return [subprocess.Popen(
        ["heft", "train", f"--workdir={workdir}", *args, f"--coordinator=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, XLA_FLAGS=workers.xla_flags(2))) for i in range(2)]


def test_two_processes_with_the_parameters_sharded_over_both_equal_one_process(tmp_path):
    """Two local processes (2 CPU devices each, gloo collectives), parameters and Adam's moments sharded
    over both hosts (fsdp) as a pod's are, train as one process with 4 devices does; each host writes
    its own shards, and the seal covers both. A preemption notice reaching one host of such a run is
    tests/test_storm.py's: both stop at one step, and the resumed run is bit-equal to an undisturbed one."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = _overrides(tmp_path, steps=12, **{"train.eval_every": 100, "train.checkpoint_every": 12,
                                             "mesh.data": 1, "mesh.fsdp": -1})
    port = 20000 + os.getpid() % 20000
    procs = _two_processes(two, args, port)
    # Meanwhile, on its own copy of the tokenized corpus (two runs never prepare one cache at once).
    r = _heft(["train", f"--workdir={one}", *args, f"--config.data.cache_dir={tmp_path / 'one-cache'}"],
              env={"XLA_FLAGS": workers.xla_flags(4)})
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    a, _ = _metrics(one)
    b, _ = _metrics(two)
    np.testing.assert_allclose([b[s]["loss"] for s in range(1, 13)], [a[s]["loss"] for s in range(1, 13)], rtol=1e-5)
    from heft.train import manifest

    files = manifest.verify(os.path.join(two, "checkpoints", "12"))["files"]
    assert any("ocdbt.process_1" in f for f in files) and any("ocdbt.process_0" in f for f in files)


def test_a_collective_that_failed_for_a_lost_process_is_told_apart(monkeypatch):
    """What `heft train` turns into one line and an immediate exit (hosts.PeerLost, launch/verbs/train.py
    `exit_now`) rather than a traceback, then 90 s at JAX's shutdown barrier and an abort. Measured with
    two processes and a SIGKILL to one (closing note): gloo's all-reduce fails at once most of the time;
    when it hangs instead, JAX's heartbeat timeout aborts the process after 100 s, as before."""
    import jax

    from heft.train import hosts

    lost = jax.errors.JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/"
                                      "pair.cc:538] Read error [127.0.0.1]:4263: Connection reset by peer")
    other = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1024 bytes")
    assert not hosts.peer_lost(lost)  # one process: nothing to lose
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert hosts.peer_lost(lost) and not hosts.peer_lost(other) and not hosts.peer_lost(ValueError("gloo"))
