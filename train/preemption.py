"""When to stop: a preemption (SIGTERM), Ctrl-C or `--stop_after`, at a step every process agrees on.

On a pod, SIGTERM reaches hosts at different moments, and each would otherwise stop at the step it
happens to be at: the checkpoint's barrier then hangs, or hosts save different steps. With several
processes heft uses JAX's preemption sync point instead: `jax.distributed` installs a SIGTERM
notifier on every host, and `multihost_utils.reached_preemption_sync_point(step)`, asked at every
step, turns True on every process at the same step once any of them was signalled. Ctrl-C is
turned into the same signal. With one process a plain signal handler does.
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
        if self.distributed:
            from jax.experimental import multihost_utils

            try:
                self.requested = multihost_utils.reached_preemption_sync_point(step) or self.requested
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
                pass
        return self.requested or (self.stop_after is not None and step >= self.stop_after)
