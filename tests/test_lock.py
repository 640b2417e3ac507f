"""One run per workdir: a second is refused naming the holder; a dead holder's lock is taken over at once,
and one that may be alive elsewhere (another host, boot or PID namespace) once its heartbeat is seen still."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from heft.data import paths
from heft.train import lock

RACE = r"""
import sys, time
from heft.data import paths
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


PERIOD = 0.5  # the heartbeat period a still record claims: it is watched for 1.5 of them
BEATING = 2.0  # a live holder's period here: its beats must not be late by half of one on a busy machine


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _here(pid: int, **changes) -> dict:
    """A lock record naming process `pid` of this host, boot and PID namespace, read from /proc here."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        start = "1"
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    return {"host": socket.gethostname(), "boot_id": boot_id, "pid_ns": os.readlink("/proc/self/ns/pid"),
            "pid": pid, "pid_start": start, "heartbeat_s": PERIOD, "started": "then", "heartbeat": time.time(),
            **changes}


def _write(workdir, record: dict) -> None:
    lock.kvstore(paths.path(workdir)).write(lock.NAME, json.dumps(record).encode()).result()


def _holder(workdir) -> dict:
    return json.loads(lock.kvstore(paths.path(workdir)).read(lock.NAME).result().value)


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
    return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("gcs") + "/run"


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


def test_the_record_names_the_holder_beyond_its_pid(tmp_path):
    held = lock.WorkdirLock(tmp_path, heartbeat_s=7.0)
    held.acquire()
    record = _holder(tmp_path)
    held.release()
    assert {k: record[k] for k in ("host", "boot_id", "pid_ns", "pid", "pid_start", "heartbeat_s")} == \
        {k: v for k, v in _here(os.getpid(), heartbeat_s=7.0).items() if k not in ("started", "heartbeat")}


def test_the_lock_of_a_dead_process_is_taken_over_at_once_with_a_warning(tmp_path):
    pid = _dead_pid()
    _write(tmp_path, _here(pid))
    lines = []
    warning = lock.WorkdirLock(tmp_path).acquire(note=lines.append)
    assert f"its process {pid} on this host is gone" in warning and lines == []
    assert _holder(tmp_path)["pid"] == os.getpid()


def _stat_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_zombie_holder_does_not_block_the_lock(tmp_path):
    child = subprocess.Popen(["sleep", "60"])
    try:
        _write(tmp_path, _here(child.pid))
        child.send_signal(signal.SIGKILL)  # and not reaped: it stays a zombie until child.wait()
        deadline = time.time() + 10
        while _stat_state(child.pid) != "Z" and time.time() < deadline:
            time.sleep(0.01)
        assert _stat_state(child.pid) == "Z"
        lines = []
        warning = lock.WorkdirLock(tmp_path).acquire(note=lines.append)
        assert f"its process {child.pid} on this host was killed (a zombie, not yet reaped)" in warning, warning
        assert lines == [] and _holder(tmp_path)["pid"] == os.getpid()
    finally:
        child.kill()
        child.wait()


def test_a_recycled_pid_counts_as_dead(tmp_path):
    _write(tmp_path, _here(os.getpid(), pid_start="1"))  # this pid runs, but started later than the holder
    lines = []
    warning = lock.WorkdirLock(tmp_path).acquire(note=lines.append)
    assert f"its pid {os.getpid()} on this host now belongs to another process" in warning and lines == []


def test_a_holder_elsewhere_whose_heartbeat_moves_is_refused_within_one_period(workdir):
    holder = lock.WorkdirLock(workdir, heartbeat_s=BEATING)
    holder.record["host"] = "elsewhere"
    holder.acquire()
    lines = []
    began = time.monotonic()
    with pytest.raises(lock.WorkdirInUse) as refused:
        lock.WorkdirLock(workdir).acquire(note=lines.append)
    took = time.monotonic() - began
    holder.release()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        f"{workdir} is in use by another heft train (host elsewhere, pid {os.getpid()}, started "), message
    assert message.endswith("s ago): its heartbeat moved while this run watched it; wait for it to finish or stop "
                            "it, or choose another --workdir"), message
    assert took < 1.5 * BEATING + 1.0, took
    assert len(lines) == 1 and "may still be alive on another host (host elsewhere" in lines[0], lines
    assert "watching its heartbeat for 3 s: this run stops if it beats, and takes the lock over if not" in lines[0]


def test_a_holder_elsewhere_whose_heartbeat_stopped_is_taken_over_after_one_period(workdir):
    _write(workdir, _here(1, host="elsewhere", heartbeat=time.time() - 5))  # crashed 5 s ago: not stale by age
    lines = []
    began = time.monotonic()
    warning = lock.WorkdirLock(workdir).acquire(note=lines.append)
    took = time.monotonic() - began
    assert took >= 1.5 * PERIOD, took
    assert len(lines) == 1 and "may still be alive on another host" in lines[0] and "for 0.75 s" in lines[0], lines
    assert warning.startswith("took over the lock of a run that is no longer running (its heartbeat did not move "
                              "in 0.75 s): host elsewhere, pid 1"), warning
    assert _holder(workdir)["pid"] == os.getpid()


@pytest.mark.parametrize("field, where", [("pid_ns", "in another PID namespace (another container) on this host"),
                                          ("boot_id", "on another boot of this host")])
def test_a_holder_in_another_namespace_or_boot_is_watched_not_looked_up(tmp_path, field, where):
    # This very pid runs here and started when the record says: looked up, it would count as alive.
    _write(tmp_path, _here(os.getpid(), **{field: "elsewhere"}))
    lines = []
    warning = lock.WorkdirLock(tmp_path).acquire(note=lines.append)
    assert len(lines) == 1 and f"may still be alive {where}" in lines[0], lines
    assert "its heartbeat did not move in 0.75 s" in warning


def test_a_lock_of_an_older_heft_is_still_read(tmp_path):
    """Records of before boot ids and namespaces: a live pid here is refused at once; a dead one may
    be a pid of another namespace, so it is watched for this run's own heartbeat period."""
    old = {"host": socket.gethostname(), "started": "then", "heartbeat": time.time()}
    _write(tmp_path, {**old, "pid": os.getpid(), "pid_start": _here(os.getpid())["pid_start"]})
    with pytest.raises(lock.WorkdirInUse, match=rf"in use by another heft train \(host .*, pid {os.getpid()},"):
        lock.WorkdirLock(tmp_path).acquire(note=pytest.fail)
    _write(tmp_path, {**old, "pid": _dead_pid(), "pid_start": "1"})
    lines = []
    warning = lock.WorkdirLock(tmp_path, heartbeat_s=PERIOD).acquire(note=lines.append)
    assert len(lines) == 1 and "perhaps in another PID namespace (a lock of an older heft)" in lines[0], lines
    assert "its heartbeat did not move in 0.75 s" in warning


def test_heft_train_says_it_waits_and_takes_over(tmp_path):
    from heft.train import loop

    _write(tmp_path, _here(1, host="elsewhere"))
    lines = []
    held = loop.take_workdir(tmp_path, note=lines.append)
    held.release()
    assert len(lines) == 2 and lines[0].startswith(f"heft: {tmp_path} is locked by a run that may still be alive "
                                                   "on another host"), lines
    assert lines[1].startswith("heft: took over the lock of a run that is no longer running"), lines


def test_a_failed_heartbeat_is_retried_well_within_a_period(tmp_path):
    held = lock.WorkdirLock(tmp_path, heartbeat_s=1.0)
    held.acquire()
    attempts = []

    class Flaky:  # the store fails the first beat, as GCS may
        def __init__(self, kv):
            self.kv = kv

        def write(self, *args, **kwargs):
            attempts.append(time.monotonic())
            if len(attempts) == 1:
                raise OSError("503 Service Unavailable")
            return self.kv.write(*args, **kwargs)

    held._kv = Flaky(held._kv)
    deadline = time.time() + 10
    while len(attempts) < 2 and time.time() < deadline:
        time.sleep(0.02)
    held.release()
    assert len(attempts) >= 2 and attempts[1] - attempts[0] < 0.5, attempts  # not a whole period later
    assert not held.lost


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
    assert _holder(tmp_path)["host"] == "elsewhere"  # not deleted by the loser


def test_of_runs_starting_together_exactly_one_gets_the_lock(tmp_path):
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["refused"] * 5 + ["won"], outs


def test_a_second_run_is_refused_on_gcs_and_a_released_lock_is_gone(gcs):
    first = lock.WorkdirLock(gcs + "/run")
    first.acquire()
    with pytest.raises(lock.WorkdirInUse, match="in use by another heft train"):
        lock.WorkdirLock(gcs + "/run").acquire()
    first.release()
    assert lock.kvstore(paths.path(gcs + "/run")).read(lock.NAME).result().state == "missing"
