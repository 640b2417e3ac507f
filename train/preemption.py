"""When to stop: a preemption (SIGTERM), Ctrl-C or `--stop_after`, at a step every process agrees on.

On a pod, SIGTERM reaches hosts at different moments, and each would otherwise stop at the step it
happens to be at: the checkpoint's barrier then hangs, or hosts save different steps. With several
processes heft uses JAX's preemption sync point instead: `jax.distributed` installs a SIGTERM
notifier on every host, and `multihost_utils.reached_preemption_sync_point(step)`, asked at every
step, turns True on every process at the same step once any of them was signalled. Ctrl-C is
turned into the same signal. With one process a plain signal handler does.

JAX's sync point counts calls, not the run's steps: every process's counter starts at 0, and a notice
sets the point to the largest counter reported plus one. Were it given the run's steps, a resumed
session (steps S+1, S+2, ...) notified before its first step, while it restores or compiles, would
find every counter at 0 and the point at 1, which it never asks for: the preemption would go unheeded
until the scheduler's SIGKILL. It is given the session's own count of steps instead (1 at its first
step), the same on every process since all of them resume from the same checkpoint; and no one else
asks it (orbax's checkpoint manager would, with the run's step: train/checkpoint/trainstate.py).
"""

import os
import signal

import jax


class StopSignal:
    """`stop(step)` is True at the step where the run should checkpoint and exit (all processes agree).

    Create it after `jax.distributed.initialize`, whose notifier must keep SIGTERM.
    """

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.requested = False
        self.first: int | None = None  # the session's first step, where JAX's count of steps is 1
        self.distributed = jax.process_count() > 1
        if self.distributed:
            # SIGTERM stays with JAX's notifier; Ctrl-C reaches it as a SIGTERM to this process.
            signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        else:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def signalled(self) -> bool:
        """Whether a signal has come, before any step (while the data is prepared). One process only:
        with several, SIGTERM goes to JAX's notifier, which only answers at a step."""
        return self.requested

    def __call__(self, step: int) -> bool:
        """Asked after every step of the session, in order, on every process."""
        if self.first is None:
            self.first = step
        if self.distributed:
            from jax.experimental import multihost_utils

            try:
                counted = step - self.first + 1
                self.requested = multihost_utils.reached_preemption_sync_point(counted) or self.requested
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
                pass
        return self.requested or (self.stop_after is not None and step >= self.stop_after)
