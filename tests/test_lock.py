"""One run per workdir: a second is refused naming the holder; a dead holder's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from heft.train import lock

RACE = r"""
import sys, time
from heft.train import lock
workdir, start = sys.argv[1], float(sys.argv[2])
held = lock.WorkdirLock(workdir)
while time.time() < start:
    pass
try:
    held.acquire()
    print("won", flush=True)
    time.sleep(3)  # hold it while the others try
except lock.WorkdirInUse:
    print("refused", flush=True)
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write(workdir, record: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, lock.NAME), "w") as f:
        json.dump(record, f)


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    first = lock.WorkdirLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(lock.WorkdirInUse, match=rf"in use by another heft train \(host {socket.gethostname()}, "
                                                rf"pid {os.getpid()}, started .*\); wait for it"):
        lock.WorkdirLock(tmp_path).acquire()
    first.release()
    again = lock.WorkdirLock(tmp_path)
    assert again.acquire() is None  # released: free again
    again.release()


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    pid = _dead_pid()
    _write(tmp_path, {"host": socket.gethostname(), "pid": pid, "pid_start": "1", "started": "then", "heartbeat": time.time()})
    held = lock.WorkdirLock(tmp_path)
    warning = held.acquire()
    assert f"its process {pid} on this host is gone" in warning
    held.release()


@pytest.mark.parametrize("age, taken", [(10, False), (1000, True)])
def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path, age, taken):
    _write(tmp_path, {"host": "elsewhere", "pid": 1, "started": "then", "heartbeat": time.time() - age})
    held = lock.WorkdirLock(tmp_path)
    if taken:
        assert "heartbeat stopped" in held.acquire()
        held.release()
    else:
        with pytest.raises(lock.WorkdirInUse, match="host elsewhere"):
            held.acquire()


def test_a_run_whose_lock_was_taken_over_notices(tmp_path):
    held = lock.WorkdirLock(tmp_path, heartbeat_s=0.05)
    held.acquire()
    _write(tmp_path, {"host": "elsewhere", "pid": 1, "started": "now", "heartbeat": time.time()})
    deadline = time.time() + 10
    while not held.lost and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(lock.WorkdirInUse, match="took over"):
        held.check()
    held.release()
    assert json.load(open(tmp_path / lock.NAME))["host"] == "elsewhere"  # not deleted by the loser


def test_of_runs_starting_together_exactly_one_gets_the_lock(tmp_path):
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["refused"] * 5 + ["won"], outs


def test_the_lock_works_on_gcs(gcs):
    first = lock.WorkdirLock(gcs + "/run")
    first.acquire()
    with pytest.raises(lock.WorkdirInUse, match="in use by another heft train"):
        lock.WorkdirLock(gcs + "/run").acquire()
    first.release()
    _write_gcs = lock.kvstore(gcs + "/run")
    _write_gcs.write(lock.NAME, json.dumps({"host": "elsewhere", "pid": 1, "started": "then",
                                            "heartbeat": time.time() - 1000}).encode()).result()
    second = lock.WorkdirLock(gcs + "/run")
    assert "heartbeat stopped" in second.acquire()
    second.release()
    assert _write_gcs.read(lock.NAME).result().state == "missing"
