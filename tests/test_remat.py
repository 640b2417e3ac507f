"""model.remat=auto: every policy timed once per config and machine, the fastest kept and cached, what
does not fit skipped, the TPU's choice from the plan's prediction, and one choice for every process."""

import json
import os
import textwrap

import pytest
import workers

from heft.configs import tiny
from heft.model.checks import ConfigError
from heft.train import loop, remat, sharding


def _config(**model):
    c = tiny.get_config()
    c.model.update(**{**dict(vocab=256, width=32, depth=2, heads=2, kv_heads=2, mlp_width=64, max_len=32), **model})
    c.train.update(batch_size=8, seq_len=32)
    return c


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """auto as a user gets it: no $HEFT_REMAT_AUTO, and a cache of this test's own."""
    monkeypatch.delenv("HEFT_REMAT_AUTO", raising=False)
    monkeypatch.setenv("HEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "remat"


def test_auto_times_every_policy_keeps_the_fastest_and_the_next_run_reads_it_back(measuring, monkeypatch):
    c = _config()
    mesh = sharding.make_mesh(c)
    said = []
    first = remat.resolve(c, mesh, note=said.append)
    assert set(first.seconds) == set(remat.CANDIDATES) and all(s > 0 for s in first.seconds.values())
    assert first.remat == min(first.seconds, key=first.seconds.get)
    assert first.executable is not None  # the loop runs the step it timed: no second compile
    # Said before the compiles (a silent minute otherwise), then the choice.
    assert said[0].startswith("heft: compiling the train step with each remat policy to time them")
    assert said[1:] == [first.line()] and said[1].startswith(f"heft: model.remat=auto chose {first.remat} (")
    assert "timed on this machine" in said[1]
    (record,) = measuring.iterdir()
    saved = json.loads(record.read_text())
    assert saved["remat"] == first.remat and saved["machine"]["platform"] == "cpu" and saved["batch"][:2] == [8, 32]

    monkeypatch.setattr(remat.compiled, "train_step", lambda *a: pytest.fail("a cached choice compiled a step"))
    again = remat.resolve(c, mesh, note=said.append)
    assert again.remat == first.remat and again.executable is None and "cached: timed on this machine" in said[2]
    assert len(said) == 3  # read back: nothing compiles, nothing said of compiling


def test_a_gs_cache_keeps_the_choice_for_the_next_run(gcs, monkeypatch):
    """$HEFT_CACHE on gs:// (a pod's shared cache, which survives a preemption) holds the choice too."""
    monkeypatch.delenv("HEFT_REMAT_AUTO", raising=False)
    monkeypatch.setenv("HEFT_CACHE", gcs)
    timed = remat.Choice("full", {"none": 3.0, "save_matmuls": 2.0, "full": 1.0}, "timed on this machine")
    monkeypatch.setattr(remat, "_time", lambda config, mesh: timed)
    c = _config()
    mesh = sharding.make_mesh(c)
    assert remat.resolve(c, mesh, note=lambda line: None) is timed
    assert str(remat.cache_file(remat.cache_key(c, mesh)[0])).startswith(gcs + "/remat/")
    monkeypatch.setattr(remat, "_time", lambda config, mesh: pytest.fail("the gs:// cache was not read"))
    again = remat.resolve(c, mesh, note=lambda line: None)
    assert again.remat == "full" and again.seconds == timed.seconds and again.how.startswith("cached: timed")


def test_the_cache_is_keyed_by_model_batch_mesh_and_machine_but_not_by_remat(monkeypatch):
    c = _config()
    mesh = sharding.make_mesh(c)
    key = remat.cache_key(c, mesh)[0]
    assert remat.cache_key(remat.with_remat(c, "full"), mesh)[0] == key
    wider = _config(width=64)
    assert remat.cache_key(wider, mesh)[0] != key
    bigger = _config()
    bigger.train.batch_size = 16
    assert remat.cache_key(bigger, mesh)[0] != key
    assert remat.cache_key(c, sharding.make_mesh(c, remat.jax.devices()[:4]))[0] != key
    monkeypatch.setattr(remat, "_cpu_model", lambda: "AMD EPYC / 26 / 2 / 0")  # the next CI machine, a Zen 5
    assert remat.cache_key(c, mesh)[0] != key


def test_a_policy_that_does_not_fit_is_not_run_and_with_none_fitting_auto_takes_full(measuring, monkeypatch):
    c = _config()
    monkeypatch.setattr(remat, "_device_bytes", lambda mesh: 1)  # every step needs more than a byte
    monkeypatch.setattr(remat, "_median_step", lambda *a: pytest.fail("ran a step that does not fit"))
    said = []
    choice = remat.resolve(c, sharding.make_mesh(c), note=said.append)
    assert choice.remat == "full" and choice.seconds == {r: None for r in remat.CANDIDATES}
    assert "none does not fit; save_matmuls does not fit" in said[-1]


def test_on_a_tpu_the_plan_predicts_and_the_least_recompute_that_fits_is_taken(measuring):
    asked = []

    def predict(config, mesh):  # none is over the HBM; save_matmuls fits
        asked.append(config.model.remat)
        return None if config.model.remat == "none" else 2.5

    c = _config()
    said = []
    choice = remat.resolve(c, sharding.make_mesh(c), predict=predict, note=said.append)
    assert choice.remat == "save_matmuls" and asked == ["none", "save_matmuls"]  # full never compiled
    assert said == ["heft: model.remat=auto chose save_matmuls (2.5 s per step; none does not fit; predicted by the plan)"]


def test_a_set_policy_is_left_alone_and_heft_remat_auto_is_checked(measuring, monkeypatch):
    c = _config(remat="full")
    assert remat.resolve(c, sharding.make_mesh(c)) is None
    monkeypatch.setenv("HEFT_REMAT_AUTO", "ful")
    with pytest.raises(ConfigError, match=r"\$HEFT_REMAT_AUTO='ful' is not a remat policy; set one of none, "
                                          "save_matmuls, full"):
        remat.resolve(_config(), sharding.make_mesh(c))
    monkeypatch.setenv("HEFT_REMAT_AUTO", "none")
    said = []
    assert remat.resolve(_config(), sharding.make_mesh(c), note=said.append).remat == "none"
    assert said == ["heft: model.remat=auto runs none (set by $HEFT_REMAT_AUTO)"]


def test_the_run_trains_with_the_choice_and_its_checkpoint_keeps_auto(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEFT_REMAT_AUTO", "full")
    c = _config(vocab=512)  # what the embedded corpus's tokenizer needs at least
    c.train.update(steps=4, warmup_steps=1, checkpoint_every=4, eval_every=4, log_every=2)
    c.data.heldout_fraction = 0.1
    loop.train(c, str(tmp_path / "run"))
    assert "heft: model.remat=auto runs full (set by $HEFT_REMAT_AUTO)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "4" / "manifest.json").read_text())
    assert manifest["config"]["model"]["remat"] == "auto"  # what was asked; a resume does not see a change
    c.train.steps = 6
    monkeypatch.setenv("HEFT_REMAT_AUTO", "none")  # another machine's choice: the same run goes on
    loop.train(c, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "changed setting: model.remat" not in out and "heft: model.remat=auto runs none" in out


_WORKER = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + os.environ.get("XLA_FLAGS", "")
    import jax
    port, pid, seeded = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    from test_remat import _config
    from heft.train import remat, sharding

    c = _config()
    mesh = sharding.make_mesh(c)
    if seeded == "timed":  # nothing cached anywhere: both processes time every policy together
        choice = remat.resolve(c, mesh, note=lambda line: None)
        print("OUT", choice.remat, json.dumps(choice.seconds), choice.executable is not None, flush=True)
        sys.exit(0)
    if pid == "0":  # process 0 measured full fastest on an earlier run; process 1's cache is empty
        key, identity = remat.cache_key(c, mesh)
        remat._write(remat.cache_file(key),
                     {"remat": "full", "seconds": {"none": 3.0, "save_matmuls": 2.0, "full": 1.0},
                      "how": "timed on this machine", "when": "2026-11-29", **identity})
    remat._time = lambda *a: sys.exit("process " + pid + " timed the policies")
    print("OUT", remat.resolve(c, mesh, note=lambda line: None).remat, flush=True)
    """
)


def _two_processes(tmp_path, seeded: str) -> list[str]:
    outs = workers.run(tmp_path, _WORKER, args=(seeded,), env=lambda i: {"HEFT_CACHE": str(tmp_path / f"cache{i}"),
                                                                          "HEFT_REMAT_AUTO": None})
    return [next(x for x in o.splitlines() if x.startswith("OUT ")) for o in outs]


def test_every_process_takes_process_0s_choice_whatever_its_own_cache_holds(tmp_path):
    assert _two_processes(tmp_path, "cached") == ["OUT full"] * 2


def test_two_processes_time_the_policies_together_and_agree(tmp_path):
    zero, one = (line.split(" ", 2)[1:] for line in _two_processes(tmp_path, "timed"))
    assert zero == one  # the same policy and the same (slowest process's) seconds on both
    seconds, compiled = zero[1].rsplit(" ", 1)
    assert zero[0] == min(json.loads(seconds), key=json.loads(seconds).get) and compiled == "True"
    assert len(list((tmp_path / "cache0" / "remat").iterdir())) == 1  # process 0 keeps the choice
    assert not (tmp_path / "cache1" / "remat").exists()


def test_heft_train_times_once_and_the_next_run_of_the_shape_starts_from_the_cache(tmp_path):
    """From the command line, as a user meets it: the first run measures, the resumed one reads it back."""
    import subprocess

    from test_train_loop import _overrides

    env = {k: v for k, v in os.environ.items() if k != "HEFT_REMAT_AUTO"}
    env["HEFT_CACHE"] = str(tmp_path / "heft_cache")
    outs = []
    for steps in (3, 5):
        r = subprocess.run(["heft", "train", f"--workdir={tmp_path / 'run'}", *_overrides(tmp_path, steps=steps)],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(next(x for x in r.stdout.splitlines() if x.startswith("heft: model.remat=auto")))
    assert outs[0].startswith("heft: model.remat=auto chose ") and outs[0].endswith("; timed on this machine)")
    assert outs[1].split(" (")[0] == outs[0].split(" (")[0] and "cached: timed on this machine" in outs[1]
    assert len(list((tmp_path / "heft_cache" / "remat").iterdir())) == 1
