"""The matmul peak of this machine's devices, measured: MFU's denominator when the config gives none."""

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


def machine_peak(config) -> float:
    """Peak FLOP/s of all devices together (`train.peak_flops` is per device).

    On CPU the fake devices share the same cores, so one device's measured matmul is the whole
    machine's peak.
    """
    devices = jax.devices()
    if config.train.peak_flops > 0:
        return config.train.peak_flops * len(devices)
    if devices[0].platform == "cpu":
        return measure_matmul_flops()
    return measure_matmul_flops(dtype=jnp.bfloat16) * len(devices)
