"""Scaling experiments: the fits recover known laws; a sweep runs, reports, and skips what is done."""

import json
import os
import subprocess

import numpy as np
import pytest

from heft.scaling import fit

SWEEP = '''
from heft.configs import tiny


def points():
    return {{f"w{{w}}": {{"model.width": w, "model.heads": 2, "model.kv_heads": 1, "model.mlp_width": 2 * w}}
            for w in (16, 32, 48)}}


def get_config(point=None):
    c = tiny.get_config()
    c.model.update(vocab=320, depth=1, max_len=64)
    c.data.corpus, c.data.cache_dir = {corpus!r}, {cache!r}
    c.train.update(seq_len=32, batch_size=8, steps=4, warmup_steps=1, log_every=1, eval_every=4,
                   eval_batches=1, checkpoint_every=4, peak_flops=1e11)
    if point:
        c.update_from_flattened_dict(points()[point])
    return c
'''


@pytest.mark.parametrize("E, A, alpha", [(1.7, 40.0, 0.3), (2.5, 400.0, 0.5), (0.0, 10.0, 0.1)])
def test_power_law_fit_recovers_known_parameters(E, A, alpha):
    n = np.geomspace(1e5, 1e9, 8)
    rng = np.random.default_rng(0)
    loss = (E + A * n**-alpha) * (1 + rng.normal(0, 1e-4, n.shape))  # 0.01% noise
    law = fit.power_law(n, loss, bootstrap=50)
    assert law.alpha == pytest.approx(alpha, rel=0.05)
    assert law.A == pytest.approx(A, rel=0.05)
    assert law.E == pytest.approx(E, rel=0.05, abs=0.02)
    assert law.r2 > 0.999 and law.intervals["alpha"][0] <= law.alpha <= law.intervals["alpha"][1]


def test_isoflop_finds_each_budgets_optimum_and_the_exponents():
    # Losses from a Chinchilla-shaped law L = E + A/N^a + B/D^b, D = C / (6N), at three budgets.
    E, A, a, B, b = 1.7, 400.0, 0.34, 410.0, 0.28
    points = []
    for C in (1e18, 1e19, 1e20):
        for N in np.geomspace(1e7, 1e10, 25):
            D = C / (6 * N)
            points.append({"compute": C, "params": N, "loss": E + A * N**-a + B * D**-b})
    iso = fit.isoflop(points)
    assert len(iso.budgets) == 3
    # The closed form: N_opt ∝ C^(b / (a + b)), D_opt ∝ C^(a / (a + b)).
    assert iso.n_exponent == pytest.approx(b / (a + b), abs=0.03)
    assert iso.d_exponent == pytest.approx(a / (a + b), abs=0.03)


@pytest.mark.slow
def test_a_three_point_sweep_runs_reports_and_skips_what_is_done(tmp_path):
    from test_train_loop import _corpus

    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text(SWEEP.format(corpus=_corpus(tmp_path), cache=str(tmp_path / "cache")))
    workdir = tmp_path / "runs"
    # The three points train at once (--parallel): each run is mostly one core's start-up, not its steps.
    r = subprocess.run(["heft", "sweep", f"--sweep={sweep_file}", f"--workdir={workdir}", "--parallel=3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 points" in r.stdout and "loss_vs_params" in r.stdout
    report = workdir / "report"
    for name in ("table.csv", "table.md", "fits.json", "curves.png", "loss_vs_params.png", "loss_vs_compute.png"):
        assert (report / name).stat().st_size > 0, name
    fits = json.loads((report / "fits.json").read_text())
    assert fits["loss_vs_params"]["points"] == 3
    lines = (report / "table.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("name,")
    # A rerun finds every point done: nothing is trained again.
    r = subprocess.run(["heft", "sweep", f"--sweep={sweep_file}", f"--workdir={workdir}"], capture_output=True, text=True)
    assert r.returncode == 0 and "heft sweep: w" not in r.stdout, r.stdout
    assert all(os.path.getsize(workdir / f"w{w}" / "train.log") > 0 for w in (16, 32, 48))


def test_a_sweep_file_without_points_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(point=None):\n    return None\n")
    r = subprocess.run(["heft", "sweep", f"--sweep={bad}", f"--workdir={tmp_path}"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"heft sweep: --sweep={bad} has no points() function; a sweep file defines points() " \
                               "and get_config(point=None) (see configs/sweeps/width.py)"


def test_the_best_learning_rate_of_each_width_is_the_bottom_of_its_curve():
    from heft.scaling import report

    rows = []
    for width, best in ((64, 1e-3), (256, 2.5e-4)):
        for lr in np.geomspace(1e-5, 1e-1, 9):
            rows.append({"name": f"w{width}_{lr:.0e}", "model.width": width, "train.lr": float(lr),
                         "eval_loss": 3.0 + 0.1 * np.log(lr / best) ** 2})  # a parabola in log lr
    optima = {o["model.width"]: o["lr_opt"] for o in report.lr_optima(rows)}
    assert optima[64] == pytest.approx(1e-3, rel=1e-6) and optima[256] == pytest.approx(2.5e-4, rel=1e-6)
