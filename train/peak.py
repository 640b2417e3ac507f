"""MFU's denominator: the peak FLOP/s of the devices a run uses.

`train.peak_flops` (per device) wins when set. On TPUs and GPUs the peak comes from the chip table
by `device_kind` (train/chips.py, the vendors' spec numbers): a timed matmul there measures
dispatch more than the chip (a 2048² bf16 matmul takes microseconds). A device kind the table does
not know gets a warning and a measured peak from a large bf16 matmul. On CPU the peak is measured,
since CPUs differ between machines far more than their names say.
"""

import time

import jax
import jax.numpy as jnp


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Best FLOP/s of a jitted [n, n] @ [n, n] matmul on one device."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak(device, warn=print) -> float:
    """Peak FLOP/s of one accelerator from the chip table, or measured if its kind is unknown."""
    from heft.train import chips

    chip = chips.by_kind(device.device_kind)
    if chip is not None:
        return chip.peak_flops
    warn(f"heft: no chip table entry for device kind {device.device_kind!r} (train/chips.py): MFU is against a "
         "measured bf16 matmul; set train.peak_flops to the spec peak for a comparable figure")
    return measure_matmul_flops(n=8192, repeats=3, dtype=jnp.bfloat16)


def machine_peak(config, warn=print) -> float:
    """Peak FLOP/s of all devices together (`train.peak_flops` is per device).

    On CPU the fake devices share the same cores, so one device's measured matmul is the whole
    machine's peak.
    """
    devices = jax.devices()
    if config.train.peak_flops > 0:
        return config.train.peak_flops * len(devices)
    if devices[0].platform == "cpu":
        return measure_matmul_flops()
    return device_peak(devices[0], warn) * len(devices)


def remeasured(config, peak_flops: float, achieved: float) -> float:
    """The peak to divide by once a run has achieved `achieved` FLOP/s against `peak_flops`.

    A CPU peak measured while other work held the cores reads low, and MFU then passes 100%: when a
    step beats the peak, measure again and keep the larger, never below what the step achieved. A
    chip table's or a configured peak is left alone (exceeding it is a FLOP count's error to see).
    """
    if achieved <= peak_flops or config.train.peak_flops > 0 or jax.devices()[0].platform != "cpu":
        return peak_flops
    return max(peak_flops, machine_peak(config), achieved)
