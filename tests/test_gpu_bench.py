"""bench/gpu.sh, the script that benchmarks heft on a GPU, runs end to end at its tiny CPU shape: the
versions, the install step (skipped when heft is importable), the matmul peak, the training rows and
a bit-equal save/restore."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_runs_its_tiny_cpu_shape_and_restores_the_state_bit_for_bit():
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--cpu"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "== versions" in out and "jax 0." in out and "heft already importable" in out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    facts, trained, checkpoint = rows[0], rows[1], rows[-1]["save_restore"]
    assert facts["platform"] == "cpu" and facts["measured_peak_tflops"] > 0
    assert trained["attention"] == "xla" and trained["tokens_per_second"] > 0 and 0 < trained["mfu_measured"] < 1
    assert math.isclose(trained["first_loss"], math.log(512), abs_tol=1.0)  # a fresh model on 512 tokens
    assert checkpoint["bit_equal"] and checkpoint["bytes"] > 0
    assert "| xla |" in out and "bit-equal: True" in out
