"""`model.remat=auto`: which remat policy a run trains with, chosen by what fits and what is fastest
on the machine at hand.

Which policy is fastest depends on the machine, not only the model: at the bench shape one Zen 5
CPU ran `full` 19% faster than `save_matmuls`, the Zen 4 before it the reverse (bench/RESULTS.md).
So auto measures, once per config and machine:
- on a TPU, `predict(config, mesh)` (the plan's compiled step, passed in by `heft train`) says what
  fits and its predicted step time; no step runs. Recompute only adds FLOPs there, so the policies
  are tried from least recompute up and the first that fits is taken (as `heft plan --search` does);
- elsewhere (CPU, GPU) each policy is compiled, skipped if its memory does not fit the device, and
  timed for a few steps on a throwaway state. The step timed is the model's full training step: a
  fine-tune's own differs in which weights the optimizer updates, not in what the blocks recompute,
  and the full step's memory is the larger, so what fits it fits the fine-tune.
The choice is cached in $HEFT_CACHE/remat (else ~/.cache/heft/remat; local or gs://), keyed by the
model, the batch, the mesh and the machine, so the next run of the same shape starts at once. Every process of a run
takes process 0's choice: the policy must be the same program everywhere.

$HEFT_REMAT_AUTO=POLICY makes auto run POLICY without measuring: for a test suite or a CI job that
starts many short runs of different shapes, where three compiles each would cost more than they save.
"""

import dataclasses
import datetime
import hashlib
import json
import os
import platform as host_platform
import time
from typing import Callable

import jax
import numpy as np
from etils import epath

from heft.data import prepare
from heft.model.checks import ConfigError
from heft.train import compiled, hosts, sharding, storage
from heft.train import state as train_state

CANDIDATES = ("none", "save_matmuls", "full")  # least recompute first: ties go to the first
STEPS = 3  # timed steps per candidate, after one untimed (its first run pays for allocation)


@dataclasses.dataclass
class Choice:
    remat: str
    seconds: dict  # candidate -> median step seconds (or predicted), None where it did not fit
    how: str  # how it was chosen, as the log line says it
    executable: object = None  # the chosen step, compiled, when it was timed here (the loop reuses it)

    def line(self) -> str:
        if not self.seconds:
            return f"heft: model.remat=auto runs {self.remat} ({self.how})"
        others = "".join(f"{k} {'does not fit' if v is None else f'{v:.3g} s'}; "
                         for k, v in self.seconds.items() if k != self.remat)
        best = self.seconds.get(self.remat)
        step = f"{best:.3g} s per step" if best is not None else "the only one that may fit"
        return f"heft: model.remat=auto chose {self.remat} ({step}; {others}{self.how})"


def resolve(config, mesh, predict: Callable | None = None, note=print) -> Choice | None:
    """The policy `config.model.remat=auto` stands for on `mesh`, or None when it is not auto.

    `predict(config, mesh) -> step seconds, or None if it does not fit` replaces timing (the TPU
    plan's). Every process must call this (it agrees on process 0's choice)."""
    if config.model.remat != "auto":
        return None
    fixed = _fixed()  # on every process: a bad value stops them all, not process 0 alone
    key, identity = cache_key(config, mesh)
    path = cache_file(key)
    cached = hosts.broadcast_json((fixed or _read(path)) if jax.process_index() == 0 else None)
    if cached is not None and not cached["seconds"]:
        choice = Choice(cached["remat"], {}, cached["how"])
    elif cached is not None:
        choice = Choice(cached["remat"], cached["seconds"], f"cached: {cached['how']} {cached['when']}")
    else:
        if predict is None:  # minutes of silence otherwise, before a run's first step
            note(f"heft: compiling the train step with each remat policy to time them ({', '.join(CANDIDATES)}; "
                 "model.remat=auto, once for this shape and machine)")
        choice = by_prediction(config, mesh, predict) if predict is not None else _time(config, mesh)
        agreed = hosts.broadcast_json({"remat": choice.remat, "seconds": choice.seconds})
        if agreed["remat"] != choice.remat:
            choice = Choice(agreed["remat"], agreed["seconds"], choice.how + " on process 0")
        if jax.process_index() == 0:
            _write(path, {"remat": choice.remat, "seconds": choice.seconds, "how": choice.how,
                          "when": datetime.date.today().isoformat(), **identity})
    note(choice.line())
    return choice


def _fixed() -> dict | None:
    """$HEFT_REMAT_AUTO's policy, as a choice already made."""
    fixed = os.environ.get("HEFT_REMAT_AUTO")
    if not fixed:
        return None
    if fixed not in CANDIDATES:
        raise ConfigError(f"$HEFT_REMAT_AUTO={fixed!r} is not a remat policy; set one of "
                          f"{', '.join(CANDIDATES)}, or unset it to let model.remat=auto measure")
    return {"remat": fixed, "seconds": {}, "how": "set by $HEFT_REMAT_AUTO"}


def with_remat(config, remat: str):
    """A copy of `config` with model.remat set (the caller's config keeps auto)."""
    c = config.copy_and_resolve_references()
    c.model.remat = remat
    return c


def by_prediction(config, mesh, predict) -> Choice:
    """The least recompute whose `predict(config, mesh)` is not None (it fits), tried in order."""
    seconds = {}
    for remat in CANDIDATES:
        seconds[remat] = predict(with_remat(config, remat), mesh)
        if seconds[remat] is not None:
            break  # more recompute would only add FLOPs
    return Choice(fastest(seconds), seconds, "predicted by the plan")


def _time(config, mesh) -> Choice:
    """Compiles each candidate, and times those whose memory fits on a fresh state and a batch of
    token 0 (the policy changes what is kept, not what is computed)."""
    seconds, executables = {}, {}
    budget = _device_bytes(mesh)
    for remat in CANDIDATES:
        c = with_remat(config, remat)
        with sharding.activated(mesh, c):
            try:
                fn = compiled.train_step(c, mesh).lower(train_state.abstract(c, mesh),
                                                        compiled.abstract_batch(c, mesh)).compile()
            except Exception as e:  # noqa: BLE001  (XLA's out-of-memory has no type of its own)
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                seconds[remat] = None
                continue
            fits = budget is None or _needs(fn) <= budget
            if not all(hosts.gather_ints()(int(fits))):  # one process short of memory: none may run it
                seconds[remat] = None
                continue
            seconds[remat] = _median_step(c, mesh, fn)
            executables[remat] = fn
    best = fastest(seconds)
    return Choice(best, seconds, "timed on this machine", executables.get(best))


def _median_step(config, mesh, fn) -> float:
    state = train_state.init(config, mesh)
    batch = jax.device_put(_zeros_batch(config, mesh), sharding.batch_sharding(config, mesh))
    times = []
    for i in range(1 + STEPS):
        start = time.perf_counter()
        state, metrics = fn(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - start)
    # Every process's own median, then the slowest: the step is as fast as its slowest process.
    return max(hosts.gather_floats()(float(np.median(times))))


def _zeros_batch(config, mesh) -> dict:
    """Token 0 everywhere, one document per row: any valid batch takes the same time."""
    out = {}
    for k, s in compiled.abstract_batch(config, mesh).items():
        value = np.ones(s.shape, s.dtype) if k.endswith(("segment_ids", "weights")) else np.zeros(s.shape, s.dtype)
        if k.endswith("positions"):
            value = np.broadcast_to(np.arange(s.shape[1], dtype=s.dtype), s.shape).copy()
        out[k] = value
    return out


def fastest(seconds: dict) -> str:
    fitting = {k: v for k, v in seconds.items() if v is not None}
    if not fitting:
        return CANDIDATES[-1]  # nothing fits: the least memory, and the fit check says why
    return min(fitting, key=lambda k: (fitting[k], CANDIDATES.index(k)))


def _needs(executable) -> int:
    m = executable.memory_analysis()
    if m is None:
        return 0
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def _device_bytes(mesh) -> int | None:
    """What one device may hold: the accelerator's own limit, or on the CPU the memory available now
    shared by the host's fake devices."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
        return available // max(1, len(jax.local_devices()))
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def cache_key(config, mesh) -> tuple[str, dict]:
    """(a file name, what it stands for): the model without its remat, the batch, the mesh, the machine."""
    model = config.model.to_dict()
    model.pop("remat", None)
    t = config.train
    identity = {
        "model": model, "batch": [t.batch_size, t.seq_len, t.get("micro_batches", 1)],
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "machine": machine(mesh),
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], json.loads(text)


def machine(mesh) -> dict:
    """What makes one machine's timings another's: the devices, the processes, the software, and on
    the CPU the processor model and the cores this process may use."""
    device = mesh.devices.flat[0]
    out = {"platform": device.platform, "kind": device.device_kind, "devices": int(mesh.devices.size),
           "processes": jax.process_count(), "jax": jax.__version__}
    if device.platform == "cpu":
        out["cpu"] = _cpu_model()
        out["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return out


def _cpu_model() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "cpu family", "model", "stepping") and k not in fields:
                    fields[k] = v.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        return host_platform.processor() or host_platform.machine()
    return " / ".join(fields.get(k, "?") for k in ("model name", "cpu family", "model", "stepping"))


def cache_file(key: str) -> epath.Path:
    """Where the choice for `cache_key`'s key is kept: under heft's cache ($HEFT_CACHE, local or gs://)."""
    return prepare.cache_dir("") / "remat" / f"{key}.json"


def _read(path: epath.Path) -> dict | None:
    try:
        found = storage.read_json(path)
        return found if found.get("remat") in CANDIDATES else None
    except (OSError, ValueError, AttributeError):
        return None  # none yet, or a foreign file: measure again


def _write(path: epath.Path, record: dict) -> None:
    try:
        storage.write_json(path, record)  # whole or not at all: a reader never sees half a choice
    except OSError:
        pass  # a read-only or full cache costs the next run a measurement, not this run
