"""`heft plan`: the real train step compiled for abstract TPU slices (needs the `tpu` extra).

Parameter bytes are checked against the closed-form count, FLOPs against a batch doubled and against
the same model unrolled (XLA's own count with no loops to miss), fit against HBM both ways.
"""

import functools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="heft plan needs the tpu extra: pip install -e '.[tpu]'")

from heft.configs import llama2_70b, tiny  # noqa: E402
from heft.launch import plan, search, topology  # noqa: E402
from heft.model.checks import ConfigError  # noqa: E402
from heft.train import size  # noqa: E402

GiB = 2**30


@pytest.fixture(autouse=True, scope="module")
def _no_persistent_compilation_cache():
    """Keeps this module's compiles out of the session's compilation cache (conftest.py): an executable
    compiled for an abstract TPU slice cannot be read back without a TPU (JAX warns and compiles again),
    so writing it would be wasted time."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used; ask again
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def _tiny(**overrides):
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # every parameter has an embed axis: all split
    for key, value in overrides.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


@functools.lru_cache(maxsize=None)
def _plan(topology_name: str, **overrides) -> plan.Plan:
    """One compile per distinct (slice, overrides), shared by the tests that need it."""
    c = _tiny(**overrides)
    return plan.fit_check(c, plan.mesh_for(c, topology_name), topology_name)


@pytest.mark.parametrize("topology_name, overrides, nbytes",
                         [("v5e:2x2", {}, 4), ("v5p:2x2x2", {"model__param_dtype": "bfloat16"}, 2)])
def test_tiny_compiles_and_parameter_bytes_per_chip_match_closed_form(topology_name, overrides, nbytes):
    p = _plan(topology_name, **overrides)
    chips = topology.parse(topology_name).chips
    count = size.report(_tiny())["total_params"]
    assert p.chips == chips and p.mesh == {"slices": 1, "data": 1, "fsdp": chips, "expert": 1, "tensor": 1}
    assert p.params == pytest.approx(count * nbytes / chips, rel=0.01)
    assert p.optimizer == pytest.approx(2 * count * nbytes / chips, rel=0.01)  # Adam's two moments
    assert p.fits and p.params + p.optimizer <= p.total <= p.hbm
    assert p.executable is not None and p.flops > 0 and p.bytes_accessed > 0 and 0 < p.mfu < 1


def test_doubling_the_batch_doubles_flops_per_step():
    one, two = _plan("v5e:2x2"), _plan("v5e:2x2", train__batch_size=2 * tiny.get_config().train.batch_size)
    assert two.flops / one.flops == pytest.approx(2.0, rel=0.1)
    assert two.model_flops / one.model_flops == pytest.approx(2.0, rel=0.01)


def test_loop_bodies_are_counted_once_per_trip():
    """Layers under a scan inside a micro-batch scan cost what the same model unrolled costs,
    whose count XLA gets right with no loops to miss."""
    scanned, micro = _plan("v5e:2x2"), _plan("v5e:2x2", train__micro_batches=2)
    unrolled = _plan("v5e:2x2", model__scan_layers=False)
    assert not scanned.uncounted_loops and not micro.uncounted_loops
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.03)  # layers: one loop level
    assert micro.flops == pytest.approx(unrolled.flops, rel=0.03)  # layers inside micro-batches: two
    # XLA's raw count would have missed most of it.
    assert plan.costs.analyse(micro.executable).xla_flops < 0.5 * micro.flops


def test_70b_with_unsharded_parameters_does_not_fit_on_v5e_2x2_and_says_by_how_much():
    c = llama2_70b.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1  # parameters replicated on every chip
    c.train.batch_size, c.model.remat = 4, "save_matmuls"
    p = plan.plan(c, "v5e:2x2")
    count = size.report(c)["total_params"]
    assert p.params == pytest.approx(4 * count, rel=0.01)
    assert not p.fits
    assert p.hbm == pytest.approx(15.75 * GiB, rel=0.001)  # XLA's usable share of v5e's 16 GiB
    # Shortfall: at least fp32 parameters and Adam's two moments (12 bytes each) beyond the HBM.
    assert p.shortfall == p.total - p.hbm and p.shortfall > 12 * count - p.hbm
    assert "mesh.fsdp" in p.advice()
    assert "DOES NOT FIT: short by" in plan.table(p)


@pytest.mark.slow  # ~40 s; the compile's time grows with the chips (64: ~60 s at 256 tokens, ~120 s at 4096)
def test_70b_fits_with_fsdp_over_a_large_enough_slice():
    c = llama2_70b.get_config()  # data 1 x fsdp -1: parameters and Adam split over every chip
    c.train.batch_size, c.train.seq_len = 16, 256  # one short sequence per chip: the weights and Adam dominate
    c.model.remat = "save_matmuls"
    p = plan.plan(c, "v5p:2x2x4")
    assert p.mesh == {"slices": 1, "data": 1, "fsdp": 16, "expert": 1, "tensor": 1}
    assert p.fits and p.shortfall == 0
    count = size.report(c)["total_params"]
    assert p.params == pytest.approx(4 * count / 16, rel=0.01)
    assert p.params + p.optimizer >= 12 * count / 16 * 0.99  # float32 weights and Adam's two moments per chip
    assert 0 < p.mfu < 1 and p.step_seconds > 0


def test_unknown_topology_names_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown TPU generation 'v9'"):
        topology.parse("v9:2x2")
    with pytest.raises(ConfigError, match="accelerator type .256 chips.*v5p:4x8x8"):
        topology.parse("v5p-512")
    with pytest.raises(ConfigError, match="3-D grid"):
        topology.parse("v5p:4x4")
    with pytest.raises(ConfigError, match="libtpu refuses it"):
        topology.devices(topology.parse("v5e:3x3"))


def test_mesh_that_does_not_match_the_slice_is_a_clear_error():
    c = _tiny()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
    with pytest.raises(ConfigError, match="= 8 but there are 4 devices"):
        plan.plan(c, "v5e:2x2")


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
        plan.plan(_tiny(), "v5e:2x2")


def test_search_ranks_fitting_layouts_by_predicted_step_time_with_the_overrides_that_select_them():
    result = search.search(_tiny(), "v5e:2x2", remats=("none",), budget=2)
    assert len(result.plans) == 2 and result.ranked
    steps = [p.step_seconds for p in result.ranked]
    assert steps == sorted(steps)
    best = result.ranked[0]
    c = search.with_overrides(_tiny(), (best.mesh["data"], best.mesh["fsdp"], best.mesh["tensor"]))
    assert f"--config.mesh.fsdp={c.mesh.fsdp}" in best.overrides
    assert "budget spent" in search.table(result)


def test_cli_plans_two_v5p_slices_charging_the_gradients_to_dcn_and_errors_in_one_line():
    """`heft plan --slices=2` compiles for two v5p slices; the bytes XLA sends across them per chip lie
    between each chip's gradient shard (every gradient must cross once) and the whole gradient, and
    take the chip table's DCN bandwidth."""
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=600)
    bad = run([sys.executable, "-c", "from heft.launch.cli import main; main()", "plan", "--topology=v9:2x2"])
    assert bad.returncode != 0 and "heft plan: --topology=v9:2x2: unknown TPU generation" in bad.stderr
    # As on a fresh machine without a TPU: `heft` itself keeps JAX on the CPU (quieting libtpu),
    # and the plan still loads libtpu for the slice's abstract devices.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    ok = run([sys.executable, "-c", "from heft.launch.cli import main; main()", "plan", "--topology=v5p:2x2x1",
              "--slices=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.train.batch_size=8",
              "--json"], env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = json.loads(ok.stdout.strip().splitlines()[-1])
    assert out["fits"] and out["chips"] == 8 and out["batch"] == 8 and out["mfu"] > 0
    assert out["mesh"] == {"slices": 2, "data": 1, "fsdp": 4, "expert": 1, "tensor": 1} and "--config.mesh.slices=2" in out["overrides"]
    gradient = 4 * size.report(_tiny())["total_params"]  # float32 gradients, whole
    assert gradient / 4 <= out["dcn_bytes"] <= gradient  # at least this chip's fsdp shard of them
    assert out["dcn_bandwidth"] == 50e9 / 8  # v5p: 50 Gbps per chip
    assert out["dcn_seconds"] == pytest.approx(out["dcn_bytes"] / out["dcn_bandwidth"])
    # Each loop body costs the slowest of its terms; the DCN's bytes are all in some body.
    regions = out["regions"]
    assert sum(r["trips"] * r["dcn"] for r in regions) == pytest.approx(out["dcn_seconds"])
    assert out["step_seconds"] == pytest.approx(
        sum(r["trips"] * max(r["compute"], r["hbm"], r["ici"], r["dcn"]) for r in regions))
    assert out["step_seconds"] >= max(out["dcn_seconds"], out["compute_seconds"], out["memory_seconds"]) * (1 - 1e-9)


def test_fsdp_collectives_gather_the_parameters_and_scatter_their_gradients():
    """Over 4 chips with every parameter split by fsdp, the compiled step all-gathers the whole
    parameters (forward, and again where the backward needs them) and reduces a gradient of each:
    bytes per chip against the closed-form parameter count, time against the ring formula."""
    p = _plan("v5e:2x2")
    whole = 4 * size.report(_tiny())["total_params"]  # float32 parameters and gradients
    gathered, scattered = p.collectives["all-gather"]["bytes"], p.collectives["reduce-scatter"]["bytes"]
    assert whole * 0.9 <= gathered <= whole * 3.1
    # Each gradient is reduced once: scattered to its shards, or (XLA's choice for some) all-reduced.
    assert scattered + p.collectives["all-reduce"]["bytes"] == pytest.approx(whole, rel=0.1)
    # v5e's 4 chips are a 2x2 torus: each collective over all four spans both axes (4 links each way).
    link = 400e9 / 4 / 2
    assert p.ici_seconds >= 0.75 * (gathered + scattered) / (4 * link) * 0.99
    assert p.step_seconds >= max(p.compute_seconds, p.memory_seconds, p.ici_seconds) * (1 - 1e-9)
    text = plan.table(p)  # each term in its own column, and the collectives by kind
    assert "collectives (ICI)" in text and "all-gather" in text and "reduce-scatter" in text
    assert "exposed" in text and f"MFU {p.mfu:.1%}" in text and "attention=xla" in text


@pytest.mark.slow
def test_a_flash_attention_step_compiles_for_a_tpu_and_its_kernels_flops_are_counted():
    """Mosaic's splash kernels lower and compile for an abstract v5p slice on this CPU. XLA counts
    none of their work: the plan adds it, here 11 matmul units of 2·T·T·d per head and example
    (forward 2, its recompute under full remat 2, dq 3, dk/dv 4), one 256-token block each. One
    sequence per chip, as in the largest runs: the kernels then see [heads, length, head_dim]."""
    c = _tiny(model__width=256, model__heads=2, model__kv_heads=1, model__depth=1, model__max_len=256,
              model__attention="flash", model__remat="full", train__seq_len=256, train__batch_size=4)
    p = plan.plan(c, "v5p:2x2x1")
    assert p.attention == "flash" and p.fits
    per_chip = c.train.batch_size // p.chips
    assert p.kernel_flops == pytest.approx(11 * 2 * per_chip * 2 * 256 * 256 * 128)
    assert p.flops > p.kernel_flops and 0 < p.mfu < 1


def test_remat_auto_plans_the_least_recompute_that_fits_and_says_so():
    said = []
    p = plan.plan(_tiny(), "v5e:2x2", note=said.append)  # tiny keeps everything with room to spare
    assert p.remat == "none" and p.fits
    assert said == [f"heft: model.remat=auto chose none ({p.step_seconds:.3g} s per step; predicted by the plan)"]
    off_tpu = plan.ForTraining()  # this CPU: heft train times the policies instead, and checks no fit
    assert off_tpu.predict is None and off_tpu.fit(_tiny(), None) is None
