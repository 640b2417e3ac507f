"""One run per workdir: a lock file taken atomically on a local disk, a shared filesystem or GCS.

`WORKDIR/heft.lock` holds who runs there and a heartbeat the holder refreshes every `heartbeat_s`.
It is written with tensorstore's conditional writes (the key must be absent, or still at the
generation last read), which are atomic on the `file` driver (local and shared filesystems) and on
GCS (`ifGenerationMatch`), so of two runs starting together exactly one gets it.

A lock must never block the restart of a dead run (a scheduler's retries are few), nor let a live
run's lock be taken. So the holder records what tells its process apart from every other: host,
boot id, PID namespace, pid and the pid's start time. A holder that this run can look up (same
host, boot and namespace) is judged at once: refused if its process runs, taken over if it is gone,
a zombie (killed, not yet reaped) or its pid now names another process. A holder that may run
elsewhere (another host, boot or container) cannot be looked up, so its record is watched for one
heartbeat period plus half of one, on this run's own clock (hosts' clocks disagree): refused if it
changes, taken over if not. One line says what is watched and for how long.
"""

import datetime
import json
import math
import os
import socket
import threading
import time

import tensorstore as ts
from etils import epath

from heft.data import paths
from heft.train.manifest import CheckpointError

NAME = "heft.lock"
HEARTBEAT_S = 30.0
# A watcher waits this many of the holder's periods: a live holder beats once in one, and the other
# half covers a slow write and the quick retries after a failed one (`_beat`).
WATCH_PERIODS = 1.5
# A damaged record must not make a restart wait for ever.
LONGEST_PERIOD_S = 600.0


class WorkdirInUse(CheckpointError):
    """Another live run holds the workdir."""


def kvstore(directory: epath.Path) -> ts.KvStore:
    """A tensorstore key-value store rooted at `directory` (a local path or gs://bucket/prefix)."""
    if paths.is_remote(directory) and not paths.is_gcs(directory):
        raise CheckpointError(f"{directory}: heft's workdir lock supports local paths and gs:// only")
    spec = paths.kvstore(directory)
    spec["path"] = spec["path"].rstrip("/") + "/"
    return ts.KvStore.open(spec).result()


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of `pid` in this PID namespace, from /proc/PID/stat; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _read(path: str, link: bool = False) -> str | None:
    try:
        if link:
            return os.readlink(path)
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def identity(pid: int) -> dict:
    """What tells process `pid` (of this namespace) from any other: a pid alone repeats across hosts,
    boots, PID namespaces (containers, which may share a hostname) and time (pids are reused)."""
    stat = _stat(pid)
    return {"host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _read("/proc/self/ns/pid", link=True), "pid": pid, "pid_start": stat and stat[1]}


def _verdict(holder: dict, mine: dict) -> tuple[str, str]:
    """("alive", ""), ("dead", why), or ("elsewhere", where) when `holder`'s process cannot be looked
    up from here (`mine` is this process's `identity`)."""
    if holder.get("host") != mine["host"]:
        return "elsewhere", "on another host"
    old = "boot_id" not in holder and "pid_ns" not in holder  # written by a heft that did not record them
    if not old:
        if not holder.get("boot_id") or holder["boot_id"] != mine["boot_id"]:
            return "elsewhere", "on another boot of this host, or another machine of the same name"
        if not holder.get("pid_ns") or holder["pid_ns"] != mine["pid_ns"]:
            return "elsewhere", "in another PID namespace (another container) on this host"
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not holder.get("pid_start") or not mine["pid_start"]:
        return "elsewhere", "with no process this host can look up"
    stat = _stat(pid)
    if stat is None:
        why = f"its process {pid} on this host is gone"
    elif stat[1] != holder["pid_start"]:
        why = f"its pid {pid} on this host now belongs to another process"
    elif stat[0] == "Z":
        why = f"its process {pid} on this host was killed (a zombie, not yet reaped)"
    else:
        return "alive", ""
    if old:  # its pid may belong to another namespace on this host: not proof of death
        return "elsewhere", "on this host, perhaps in another PID namespace (a lock of an older heft)"
    return "dead", why


def _period(holder: dict, default: float) -> float:
    """The holder's heartbeat period as it recorded it (`default` for a record of an older heft)."""
    try:
        period = float(holder.get("heartbeat_s", default))
    except (TypeError, ValueError):
        return default
    return period if math.isfinite(period) and 0 < period <= LONGEST_PERIOD_S else default


def _same_run(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "heartbeat"} == {k: v for k, v in b.items() if k != "heartbeat"}


def describe(holder: dict) -> str:
    try:
        beat = f"last heartbeat {time.time() - float(holder.get('heartbeat', 0)):.0f} s ago"
    except (TypeError, ValueError):
        beat = "heartbeat unreadable"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started', '?')}, {beat}"


class WorkdirLock:
    """Held by process 0 of a run from start to exit; `lost` turns True if another run took it over."""

    def __init__(self, workdir: epath.PathLike, heartbeat_s: float = HEARTBEAT_S):
        self.workdir = paths.path(workdir)
        self.heartbeat_s = heartbeat_s
        self.lost = False
        self._kv = None
        self._generation = None
        self._stop = threading.Event()
        self._thread = None
        self.record = {**identity(os.getpid()), "heartbeat_s": heartbeat_s,
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

    def _payload(self) -> bytes:
        return json.dumps({**self.record, "heartbeat": time.time()}).encode()

    def _in_use(self, holder: dict, seen: str = "") -> WorkdirInUse:
        return WorkdirInUse(f"{self.workdir} is in use by another heft train ({describe(holder)}){seen}; wait for "
                            "it to finish or stop it, or choose another --workdir")

    def _unchanged(self, current, holder: dict, where: str, note) -> tuple[bool, float]:
        """Whether the lock stays as `current` for the holder's watch period (which it returns too)."""
        period = _period(holder, self.heartbeat_s)
        window = WATCH_PERIODS * period
        note(f"{self.workdir} is locked by a run that may still be alive {where} ({describe(holder)}); watching "
             f"its heartbeat for {window:g} s: this run stops if it beats, and takes the lock over if not")
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(period / 10, left))
            if self._kv.read(NAME).result().stamp.generation != current.stamp.generation:
                return False, window
        return True, window

    def acquire(self, note=lambda line: print(line, flush=True)) -> str | None:
        """Takes the lock; returns a warning if a dead run's lock was taken over. Raises WorkdirInUse.
        `note(line)` is told when this waits to see whether a holder elsewhere is alive."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._kv = kvstore(self.workdir)
        watched = None  # the holder last watched, as it was then
        for _ in range(5):
            current = self._kv.read(NAME).result()
            warning = None
            if current.state == "value":
                try:
                    holder = json.loads(current.value)
                except json.JSONDecodeError:
                    holder = None
                if not isinstance(holder, dict):
                    warning = "took over an unreadable lock"
                else:
                    if watched is not None and _same_run(holder, watched) and holder != watched:
                        raise self._in_use(holder, ": its heartbeat moved while this run watched it")
                    verdict, why = _verdict(holder, self.record)
                    if verdict == "alive":
                        raise self._in_use(holder)
                    if verdict == "elsewhere":
                        watched = holder
                        unchanged, window = self._unchanged(current, holder, why, note)
                        if not unchanged:
                            continue  # it beat, was released or changed hands: look again
                        why = f"its heartbeat did not move in {window:g} s"
                    warning = f"took over the lock of a run that is no longer running ({why}): {describe(holder)}"
            written = self._kv.write(NAME, self._payload(), if_equal=current.stamp.generation).result()
            if written.generation:  # an empty generation: the condition failed, someone else wrote first
                self._generation = written.generation
                self._thread = threading.Thread(target=self._beat, name="heft-lock", daemon=True)
                self._thread.start()
                return warning
        raise WorkdirInUse(f"{self.workdir}: could not take {NAME} (another run keeps changing it); retry")

    def _beat(self) -> None:
        wait = self.heartbeat_s
        while not self._stop.wait(wait):
            try:
                written = self._kv.write(NAME, self._payload(), if_equal=self._generation).result()
            except Exception:  # a storage hiccup: retry soon, inside the half period watchers allow
                wait = self.heartbeat_s / 10
                continue
            wait = self.heartbeat_s
            if not written.generation:
                self.lost = True
                return
            self._generation = written.generation

    def check(self) -> None:
        if self.lost:
            raise WorkdirInUse(f"another run took over {self.workdir / NAME} (this run's heartbeat lapsed); "
                               "this run stops so the two do not overwrite each other")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._kv is not None and self._generation is not None and not self.lost:
            try:
                self._kv.write(NAME, None, if_equal=self._generation).result()
            except Exception:  # the lock expires by itself; never fail an exit over it
                pass
            self._generation = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
