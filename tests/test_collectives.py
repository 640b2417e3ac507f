"""The communication term of `heft plan`: replica groups read from XLA's text, collectives timed on
the torus by the ring formulas, and the step's overlap of collectives with compute (no compile here)."""

import pytest

from heft.launch import collectives, pallas_flops
from heft.launch.costs import Collective, Kernel, replica_groups
from heft.launch.plan import Plan

LINK = 100e9  # bytes/s per link per direction (v5p's)


def test_replica_groups_are_read_in_each_of_xlas_spellings():
    assert replica_groups("all-gather(x), replica_groups={{0,1},{2,3}}, dimensions={0}") == [(0, 1), (2, 3)]
    assert replica_groups("all-reduce(x), replica_groups=[2,4]<=[8], to_apply=%add") == [(0, 1, 2, 3), (4, 5, 6, 7)]
    # [2,4] transposed: ids 0..7 laid [2,4], read down the columns.
    assert replica_groups("all-reduce(x), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add") == [
        (0, 4), (1, 5), (2, 6), (3, 7)]
    assert replica_groups("collective-permute(x), source_target_pairs={{0,1},{1,0}}") == [(0, 1), (1, 0)]
    assert replica_groups("all-reduce(x), replica_groups={}, to_apply=%add") == []


def _line(n):
    """n chips along the x axis of a torus, one slice: (slice, x, y, z)."""
    return [(0, x, 0, 0) for x in range(n)]


def test_ring_collectives_cost_what_the_bandwidth_term_says():
    coords, nbytes = _line(4), 8e6
    gather = Collective("all-gather", nbytes, [(0, 1, 2, 3)], "body")
    # Each chip receives 3/4 of the buffer, over two links (both directions of the ring).
    assert collectives.seconds(gather, coords, LINK, 4) == pytest.approx(0.75 * nbytes / (2 * LINK))
    scatter = Collective("reduce-scatter", nbytes, [(0, 1, 2, 3)], "body")
    assert collectives.seconds(scatter, coords, LINK, 4) == pytest.approx(0.75 * nbytes / (2 * LINK))
    reduce = Collective("all-reduce", nbytes, [(0, 1, 2, 3)], "body")
    assert collectives.seconds(reduce, coords, LINK, 4) == pytest.approx(2 * 0.75 * nbytes / (2 * LINK))
    # A 2x2 group spans two torus axes: twice the links, half the time.
    square = [(0, x, y, 0) for y in range(2) for x in range(2)]
    assert collectives.seconds(gather, square, LINK, 4) == pytest.approx(0.75 * nbytes / (4 * LINK))
    # Members two hops apart share each link with the group between them.
    apart = Collective("all-gather", nbytes, [(0, 2), (1, 3)], "body")
    assert collectives.seconds(apart, coords, LINK, 4) == pytest.approx(0.5 * nbytes / (2 * LINK / 2))
    # No group named: every device; a group of one moves nothing.
    assert collectives.seconds(Collective("all-gather", nbytes, [], "b"), coords, LINK, 4) == pytest.approx(
        collectives.seconds(gather, coords, LINK, 4))
    assert collectives.seconds(Collective("all-gather", nbytes, [(0,), (1,)], "b"), coords, LINK, 4) == 0


def test_a_summary_counts_each_collective_once_per_trip():
    coords = _line(4)
    found = [Collective("all-gather", 1e6, [(0, 1, 2, 3)], "layer", trips=32, region="layer"),
             Collective("all-reduce", 4.0, [(0, 1, 2, 3)], "main")]
    summary = collectives.summary(found, coords, LINK)
    assert summary["all-gather"]["count"] == 32 and summary["all-gather"]["bytes"] == 32e6
    assert collectives.total_seconds(found, coords, LINK) == pytest.approx(
        sum(r["seconds"] for r in summary.values()))
    assert collectives.by_region(found, coords, LINK)["layer"] == pytest.approx(0.75e6 / (2 * LINK))


def _plan(regions):
    return Plan(config="x", topology="v5p:2x2x1", chip="v5p", chips=4, mesh={}, remat="full", micro_batches=1,
                batch=8, seq_len=128, steps=10, params=0, optimizer=0, temporaries=0, total=0, hbm=1, flops=1.0,
                bytes_accessed=1.0, model_flops=459e12 * 0.5, peak_flops=459e12, hbm_bandwidth=2765e9,
                compile_seconds=0.0, regions=regions)


def test_collectives_hide_under_the_work_of_their_loop_body_and_only_the_rest_is_exposed():
    hidden = {"name": "layer", "trips": 10, "compute": 0.08, "hbm": 0.01, "ici": 0.05, "dcn": 0.0}
    exposed = {"name": "entry", "trips": 1, "compute": 0.01, "hbm": 0.02, "ici": 0.03, "dcn": 0.0}
    p = _plan([hidden, exposed])
    assert p.step_seconds == pytest.approx(10 * 0.08 + 0.03)  # each body: its slowest term
    assert p.exposed_seconds == pytest.approx(0.03 - 0.02)
    assert p.bound == "compute"
    assert _plan([dict(hidden, ici=0.5)]).bound == "ici"
    assert _plan([dict(hidden, hbm=0.2)]).bound == "memory"


def test_every_plan_says_its_error_bar_or_uncalibrated_and_why():
    import dataclasses

    from heft.train import chips

    p = _plan([{"name": "entry", "trips": 1, "compute": 0.01, "hbm": 0.02, "ici": 0.03, "dcn": 0.0}])
    cal = chips.CHIPS["v5p"].calibration  # 4 runs, fitted but no better than their mean held out
    assert p.error_bar.startswith(f"uncalibrated: leave-one-out error {cal.leave_one_out:.1f} points on average")
    assert "no better than their mean MFU" in p.error_bar and p.error_bar_short == "uncalibrated"
    assert dataclasses.replace(p, chip="v5e").error_bar == "uncalibrated: no published v5e run is fitted, so this is a ceiling"
    assert dataclasses.replace(p, chip="v6e").error_bar.endswith("too few runs to validate (bench/RESULTS.md, Calibration)")
    assert "remat=save_dot_except_mlpwi and 2 slices is outside" in dataclasses.replace(
        p, remat="save_dot_except_mlpwi", slices=2).error_bar
    good = chips.Calibration(12, leave_one_out=3.0, worst=7.5, null=6.0, remats=("full",))
    chips_v5p = dataclasses.replace(chips.CHIPS["v5p"], calibration=good)
    try:
        chips.CHIPS["v5p"] = chips_v5p
        assert p.error_bar.startswith("±3.0 points (leave-one-out error 3.0 points on average, 7.5 at worst, over 12")
        assert p.error_bar_short == "±3.0 points"
    finally:
        chips.CHIPS["v5p"] = dataclasses.replace(chips_v5p, calibration=cal)
    p = dataclasses.replace(p, mesh={"slices": 1, "data": 1, "fsdp": 4, "expert": 1, "tensor": 1})
    assert p.to_json()["error_bar"] == p.error_bar


def test_gpu_boards_are_told_apart_by_form_and_memory():
    from heft.train import chips

    got = {kind: chips.by_kind(kind) for kind in ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB",
                                                  "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL")}
    assert got["NVIDIA A100-SXM4-40GB"].hbm_bandwidth < 0.8 * got["NVIDIA A100-SXM4-80GB"].hbm_bandwidth
    assert got["NVIDIA A100-SXM4-40GB"].hbm_bytes == 40 * 10**9
    assert len({c.name for c in got.values()}) == 5 and chips.by_kind("NVIDIA A10") is None


def test_splash_kernel_flops_follow_its_matmuls_and_the_causal_blocks():
    q, k = ("bf16", (2, 8, 8192, 128)), ("bf16", (2, 1, 8192, 128))
    ids = ("s32", (2, 8192))
    one = 2 * 2 * 8 * 8192 * 8192 * 128  # one [8192, 8192] x 128 matmul per head and example
    blocks = 8192 // 512
    share = blocks * (blocks + 1) / 2 / blocks**2  # blocks on and below the diagonal
    assert pallas_flops.flops(Kernel("splash_mha_fwd_segmented_residuals.3", [q, k, k, ids])) == pytest.approx(
        2 * one * share)
    assert pallas_flops.flops(Kernel("splash_mha_dq_segmented_no_residuals.1", [q, k, k])) == pytest.approx(3 * one * share)
    assert pallas_flops.flops(Kernel("splash_mha_dkv_segmented_no_residuals.1", [q, k, k])) == pytest.approx(
        4 * one * share)
    assert pallas_flops.flops(Kernel("some_other_kernel.1", [q, k, k])) == 0
    # One sequence per chip: Pallas' batching hands the kernel [heads, length, head_dim] operands.
    q1, k1 = ("bf16", q[1][1:]), ("bf16", k[1][1:])
    assert pallas_flops.flops(Kernel("splash_mha_fwd_residuals.2", [q1, k1, k1, ("s32", (8192,))])) == pytest.approx(
        one * share)
    assert pallas_flops.flops(Kernel("splash_mha_dkv_no_residuals.2", [q1, k1, k1])) == pytest.approx(2 * one * share)
