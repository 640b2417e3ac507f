"""MFU's denominator: the chip table by device kind on accelerators, a warning for unknown kinds."""

import dataclasses

import pytest

from heft.train import peak


@dataclasses.dataclass
class Device:
    device_kind: str


@pytest.mark.parametrize("kind, flops", [("TPU v5", 459e12), ("TPU v5 lite", 197e12), ("TPU v6 lite", 918e12),
                                         ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                         ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_known_accelerators_take_their_spec_peak(kind, flops):
    assert peak.device_peak(Device(kind), warn=pytest.fail) == flops


def test_an_unknown_device_kind_warns_and_measures(monkeypatch):
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda **kw: 123e12)
    warnings = []
    assert peak.device_peak(Device("TPU v9 ultra"), warn=warnings.append) == 123e12
    assert len(warnings) == 1 and "'TPU v9 ultra'" in warnings[0] and "train.peak_flops" in warnings[0]


def test_a_cpu_peak_a_step_beats_is_measured_again_and_mfu_never_passes_100_percent(monkeypatch):
    from heft.configs import tiny

    c = tiny.get_config()
    readings = iter([300e9, 120e9])
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda **kw: next(readings))
    assert peak.remeasured(c, 100e9, 90e9) == 100e9  # below the peak: nothing measured
    assert peak.remeasured(c, 100e9, 150e9) == 300e9  # measured under load at start; quiet now
    assert peak.remeasured(c, 100e9, 150e9) == 150e9  # still busy: at least what the step did
    c.train.peak_flops = 100e9  # a configured peak is the user's: exceeding it is left to be seen
    assert peak.remeasured(c, 100e9, 150e9) == 100e9
