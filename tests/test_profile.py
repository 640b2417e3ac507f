"""`train.profile_steps`: a jax.profiler trace of the chosen steps in WORKDIR/tensorboard, which the
profile plugin's own converter (xprof) reads; the metrics mark the traced steps; a bad range is one line."""

import glob
import json
import os
import re

import pytest
from test_train_loop import _heft, _overrides

from heft.configs import tiny
from heft.model.checks import ConfigError
from heft.train import checks, profile


def test_a_traced_step_lands_in_the_workdir_and_the_profile_plugin_reads_its_ops(tmp_path):
    workdir = tmp_path / "run"
    r = _heft(["train", f"--workdir={workdir}",
               *_overrides(tmp_path, steps=4, **{"train.profile_steps": "2:3", "train.log_every": 2})])
    assert r.returncode == 0, r.stderr[-3000:]
    traces = glob.glob(str(workdir / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1, traces
    assert f"step 2: profile of steps 2 to 2 written to {os.path.dirname(traces[0])}" in r.stdout + r.stderr
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [row["profiled_steps"] for row in rows if "profiled_steps" in row] == [[2, 3]]  # the row of steps 1-2
    assert [row["profile"] for row in rows if "profile" in row] == [os.path.dirname(traces[0])]

    from xprof.convert import raw_to_tool_data as xprof  # the profile plugin's converter (the test extra)

    data, _ = xprof.xspace_to_tool_data([traces[0]], "trace_viewer", {})
    events = json.loads(data)["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert "PjitFunction(jit(train_step))" in names, sorted(names)[:50]  # the step's dispatch...
    assert any(n.endswith("_fusion") for n in names), sorted(names)[:50]  # ...and the XLA ops it ran


@pytest.mark.parametrize("steps, hosts, says", [
    ("3", "0", "is not a range of steps; write FIRST:STOP"),
    ("5:9", "0", "holds no step of this run (steps 1 to 4)"),
    ("3:3", "0", "holds no step of this run"),
    ("2:3", "x", "train.profile_hosts='x' names no process"),
])
def test_a_bad_range_or_host_list_is_one_line(steps, hosts, says):
    c = tiny.get_config()
    c.train.update(steps=4, warmup_steps=1, profile_steps=steps, profile_hosts=hosts)
    with pytest.raises(ConfigError, match=re.escape(says)):
        checks.check_train(c)
    c.train.update(profile_steps="2:3", profile_hosts="0,1")
    checks.check_train(c)
    with pytest.raises(ConfigError, match="names no process of this run"):
        profile.parse_hosts("0,1", 1)
    assert profile.parse_hosts("all", 3) == {0, 1, 2}
