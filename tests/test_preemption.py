"""A preemption notice reaches every process of a run, whenever it comes: train/preemption.py over JAX's
own sync point (two local processes, gloo on CPU, no model), which heft alone asks."""

import jax.numpy as jnp
import workers
from jax.experimental import multihost_utils

from heft.configs import tiny
from heft.train import checkpoint

# A session resumed from step 40 whose process 1 is signalled before its first step (as while it
# restores or compiles), then steps 41.. with a collective each, asking StopSignal after every one.
WORKER = r'''
import os, signal, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 " + os.environ.get("XLA_FLAGS", "")
import jax
from jax._src import distributed
from jax.experimental import multihost_utils

jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from heft.train import preemption

stop = preemption.StopSignal()
if jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)
# Wait until JAX's sync protocol has run on both processes: each reports its count of calls (here
# none yet) under this key while it holds the lock that the first call below then waits on, so the
# sync point is set before any step asks for it. (JAX's internal key: the test fails, not passes,
# if it changes.)
client, deadline = distributed.global_state.client, time.time() + 60
while len(client.key_value_dir_get("PREEMPTION_CURRENT_COUNTER/")) < 2:
    assert time.time() < deadline, "JAX's preemption sync protocol never ran"
    time.sleep(0.05)
for step in range(41, 61):
    multihost_utils.sync_global_devices(f"step {step}")  # the step's collectives keep the processes together
    if stop(step):
        print("stopped at", step, flush=True)
        break
else:
    print("never stopped", flush=True)
'''


def test_a_notice_before_a_resumed_sessions_first_step_stops_every_process_at_that_step(tmp_path):
    """JAX's sync point counts calls from 0 in every process: a notice before the first call sets it to
    1, which a session resumed from step 40 would never ask for if it were given the run's steps."""
    outs = workers.run(tmp_path, WORKER, timeout=180)
    said = [[line for line in out.splitlines() if "stopped" in line] for out in outs]  # gloo prints here too
    assert said == [["stopped at 41"]] * 2, outs


def test_checkpoint_saves_leave_jaxs_preemption_sync_point_to_heft(tmp_path, monkeypatch):
    """orbax's manager asks JAX's sync point at every save, with the run's step: JAX's one count of calls
    per process would jump from the session's steps (what StopSignal counts) to the run's, and a notice
    then would set a sync point the resumed session reaches only that many steps late."""
    asked = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step) or False)
    ckpt = checkpoint.Checkpointer(str(tmp_path), tiny.get_config())
    ckpt.save(3, {"step": jnp.int32(3), "params": {"w": jnp.ones((4, 4))}}, {"consumed": 3})
    ckpt.close()
    assert ckpt.sealed_steps() == [3]
    assert asked == []
