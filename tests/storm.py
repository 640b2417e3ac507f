"""A preemption storm: a two-process `heft train` whose hosts get SIGTERM, one host at a time, at three
moments — during a checkpoint save, during the step's compilation, at a random training step — each
followed by a restart of both processes (the compilation cache on, as heft has it by default), until
the run is done.

Each moment is reached by watching the run rather than by timing it, and checked once the signal is
sent, so that a storm which missed its moment fails instead of passing for the wrong reason:

- compilation: process 0 says "heft: compiling the train step" (or, the first time with
  model.remat=auto, that it compiles it with each policy to time them), then "... step compiled
  in"; the signal goes between the two lines (the run stops at its first step or, where JAX's notifier, which
  looks for SIGTERM once a second, sees it later, a step or two after);
- a save: a step's folder (orbax's temporary one, or the step's own without manifest.seal) appears;
  the signal goes then, the step must still be unsealed just after, and sealed and whole once the
  session has stopped at a later step;
- a step: process 0 logs step k, drawn at random; the session stops at k or a little after.

The order of the moments, the host each signal goes to and the draws within each moment come from
one seeded RNG, drawn before the storm starts: the same seed replays the same storm (the steps the
sessions stop at depend on timing, within a step or two). tests/test_storm.py runs a small storm;
bench/bench_preemption.py a long one, for goodput.
"""

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import threading
import time

from workers import free_port, xla_flags

MOMENTS = ("save", "compilation", "step")
COMPILING = "compiling the train step"  # heft's note, or remat=auto's when it compiles the step to time it
COMPILED = "step compiled in"
CAUGHT = "SIGTERM caught at"  # what JAX's preemption notifier logs when it sees the signal
_LOGGED = re.compile(r"^step (\d+): loss ")
_SAVING = re.compile(r"^(\d+)(\.orbax-checkpoint-tmp.*)?$")  # a step's folder, or orbax's while it writes


class Session:
    """Both processes of one `heft train` session (2 fake CPU devices each, gloo between them on
    127.0.0.1), their output read as it comes, each line with the time it was read."""

    def __init__(self, workdir: str, args: list[str], timeout: float):
        self.deadline = time.monotonic() + timeout
        port = free_port()
        env = dict(os.environ, XLA_FLAGS=xla_flags(2))
        self.procs = [subprocess.Popen(
            ["heft", "train", f"--workdir={workdir}", *args, f"--coordinator=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
        self.lines: list[list[tuple[float, str]]] = [[], []]
        self.readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(2)]
        for reader in self.readers:
            reader.start()

    def _read(self, i: int) -> None:
        for line in self.procs[i].stdout:
            self.lines[i].append((time.monotonic(), line.rstrip("\n")))

    def output(self, i: int) -> str:
        return "\n".join(line for _, line in list(self.lines[i]))

    def said(self, text: str, host: int = 0) -> float | None:
        """When the host's first line holding `text` was read, or None."""
        return next((t for t, line in list(self.lines[host]) if text in line), None)

    def logged(self, at_least: int) -> int | None:
        """The first step at or past `at_least` that process 0 has logged, or None."""
        for _, line in list(self.lines[0]):
            m = _LOGGED.match(line)
            if m and int(m.group(1)) >= at_least:
                return int(m.group(1))
        return None

    def wait(self, found, what: str):
        """found()'s first truthy value, polled every 5 ms; raises if a process exits or time runs out."""
        while True:
            value = found()
            if value:
                return value
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise AssertionError(f"process {i} exited ({p.returncode}) before {what}:\n"
                                         + self.output(i)[-3000:])
            if time.monotonic() > self.deadline:
                raise AssertionError(f"no {what} in time:\n" + self.output(0)[-3000:])
            time.sleep(0.005)

    def terminate(self, host: int) -> float:
        """SIGTERM to one host, as a scheduler's preemption notice; when it was sent."""
        self.procs[host].send_signal(signal.SIGTERM)
        return time.monotonic()

    def finish(self) -> list[str]:
        """Both processes' whole output, once both have exited 0."""
        for i, p in enumerate(self.procs):
            try:
                p.wait(timeout=max(self.deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"process {i} still running at the session's deadline:\n"
                                     + "\n----\n".join(self.output(j)[-3000:] for j in range(2))) from None
        for reader in self.readers:
            reader.join(timeout=10)
        outs = [self.output(i) for i in range(2)]
        for i, p in enumerate(self.procs):
            assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{outs[i][-3000:]}"
        return outs

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def sealed(directory: str, step: int) -> bool:
    from heft.train import manifest

    return os.path.exists(os.path.join(directory, str(step), manifest.SEAL))


def saving(directory: str, after: int) -> int | None:
    """A step past `after` whose save is under way (its folder without the seal), or None."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    for name in names:
        m = _SAVING.match(name)
        if m and int(m.group(1)) > after and not sealed(directory, int(m.group(1))):
            return int(m.group(1))
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """One preemption, drawn before the storm: what moment, which host, and where within the session
    (the step moment: how many steps past the session's start; the save moment: which save after it)."""

    moment: str
    host: int
    offset: int


def plan(seed: int, span: int, saves: int = 1) -> list[Plan]:
    """The three preemptions of seed `seed`: each moment once, in a drawn order; each host signalled at
    least once (the coordinator's preemption and a worker's reach the run by different paths)."""
    rng = random.Random(seed)
    moments = rng.sample(MOMENTS, len(MOMENTS))
    hosts = [0, 1, rng.randrange(2)]
    rng.shuffle(hosts)
    return [Plan(moment, host, rng.randint(1, span) if moment == "step" else rng.randint(1, saves))
            for moment, host in zip(moments, hosts)]


def _signal(session: Session, p: Plan, directory: str, start: int) -> dict:
    """Waits for the moment of `p`, signals its host there, and says what was seen when it was sent."""
    if p.moment == "compilation":
        session.wait(lambda: session.said(COMPILING), "start of compilation")
        sent = session.terminate(p.host)
        return {"sent": sent}
    if p.moment == "save":
        step = start
        for _ in range(p.offset):  # the offset-th save after the session's start
            step = session.wait(lambda after=step: saving(directory, after), f"save after step {step}")
        sent = session.terminate(p.host)
        return {"sent": sent, "save": step, "unsealed_after_signal": not sealed(directory, step)}
    step = session.wait(lambda: session.logged(start + p.offset), f"step {start + p.offset} logged")
    return {"sent": session.terminate(p.host), "step": step}


def _check(p: Plan, seen: dict, session: Session, directory: str, start: int, stopped: int, seed: int) -> None:
    """That the signal landed in the moment it was meant for, as far as the run lets one see it."""
    from heft.train import manifest

    where = f"(seed {seed}, {p.moment} moment, session from step {start})"
    if p.moment == "compilation":
        compiled = session.said(COMPILED)
        assert compiled is not None and compiled > seen["sent"], f"the step had compiled before the signal {where}"
    elif p.moment == "save":
        assert seen["unsealed_after_signal"], f"step {seen['save']} was sealed before the signal was sent {where}"
        assert stopped > seen["save"], f"stopped at {stopped}, before the save of {seen['save']} {where}"
        manifest.verify(os.path.join(directory, str(seen["save"])))  # the save cut into is sealed and whole
    else:
        assert seen["step"] <= stopped, f"stopped at {stopped}, before step {seen['step']} {where}"


def run(workdir: str, args: list[str], seed: int, steps: int, span: int = 3, saves: int = 1,
        timeout: float = 600, note=print) -> list[dict]:
    """The storm in `workdir`: three preempted sessions, then one that finishes the run's `steps`.
    Returns one record per session; raises AssertionError where a promise broke, naming the seed."""
    from heft.train import manifest

    directory = os.path.join(workdir, "checkpoints")
    records, start = [], 0
    plans = plan(seed, span, saves)
    note(f"storm seed {seed}: " + ", ".join(f"{p.moment} (host {p.host}, offset {p.offset})" for p in plans))
    for p in [*plans, None]:
        began = time.monotonic()
        session = Session(workdir, args, timeout)
        try:
            seen = _signal(session, p, directory, start) if p is not None else {}
            outs = session.finish()
        finally:
            session.kill()
        if start:
            assert f"resumed from step {start} in" in outs[0], f"(seed {seed}) not resumed from {start}:\n{outs[0][-3000:]}"
        if p is None:
            assert "done:" in outs[0], f"(seed {seed}) the last session did not finish:\n{outs[0][-3000:]}"
            result = json.loads(outs[0].strip().splitlines()[-1])  # heft train's summary, goodput over every session
            records.append({"moment": None, "start": start, "stopped": steps, "wall_s": time.monotonic() - began,
                            "goodput": result["goodput"]})
            break
        found = re.search(r"stopped at step (\d+)", outs[0])
        assert found, f"(seed {seed}) no stop after the {p.moment} signal:\n{outs[0][-3000:]}"
        stopped = int(found.group(1))
        assert stopped < steps and sealed(directory, stopped), (seed, stopped)
        manifest.verify(os.path.join(directory, str(stopped)))
        _check(p, seen, session, directory, start, stopped, seed)
        sent = seen.pop("sent")
        # How long the preemption took to be heeded: JAX's notifier seeing the signal, then the stop saved.
        caught, said_stop = session.said(CAUGHT, p.host), session.said("stopped at step")
        records.append({"moment": p.moment, "host": p.host, "start": start, "stopped": stopped, **seen,
                        "caught_s": caught - sent if caught else None, "stopped_s": said_stop - sent,
                        "wall_s": time.monotonic() - began})
        note(f"storm: {records[-1]}")
        start = stopped
    return records
