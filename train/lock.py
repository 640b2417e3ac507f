"""One run per workdir: a lock file taken atomically on a local disk, a shared filesystem or GCS.

`WORKDIR/heft.lock` holds who runs there (host, pid, start time) and a heartbeat the holder
refreshes every `heartbeat_s`. It is written with tensorstore's conditional writes (the key must be
absent, or still at the generation last read), which are atomic on the `file` driver (local and
shared filesystems) and on GCS (`ifGenerationMatch`), so of two runs starting together exactly one
gets it. A second run is refused in one line naming the holder. A lock whose holder is dead is
taken over with a warning: on the same host when its pid no longer runs (or runs another
program), on another host when its heartbeat is older than `stale_after_s`.
"""

import datetime
import json
import os
import socket
import threading
import time

import tensorstore as ts

from heft.data import paths as data_paths
from heft.train import storage
from heft.train.manifest import CheckpointError

NAME = "heft.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0


class WorkdirInUse(CheckpointError):
    """Another live run holds the workdir."""


def kvstore(directory) -> ts.KvStore:
    """A tensorstore key-value store rooted at `directory` (a local path or gs://bucket/prefix)."""
    directory = str(storage.path(directory))
    if storage.is_remote(directory) and not directory.startswith("gs://"):
        raise CheckpointError(f"{directory}: heft's workdir lock supports local paths and gs:// only")
    spec = data_paths.kvstore(directory)
    spec["path"] = spec["path"].rstrip("/") + "/"
    return ts.KvStore.open(spec).result()


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (to tell a live holder from a reused pid); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(holder: dict) -> bool:
    start = _process_start(int(holder.get("pid", -1)))
    return start is not None and start == holder.get("pid_start")


def describe(holder: dict) -> str:
    started = holder.get("started", "?")
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}, last heartbeat {age:.0f} s ago"


class WorkdirLock:
    """Held by process 0 of a run from start to exit; `lost` turns True if another run took it over."""

    def __init__(self, workdir, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.workdir = storage.path(workdir)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.lost = False
        self._kv = None
        self._generation = None
        self._stop = threading.Event()
        self._thread = None
        pid = os.getpid()
        self.record = {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

    def _payload(self) -> bytes:
        return json.dumps({**self.record, "heartbeat": time.time()}).encode()

    def _stale(self, holder: dict) -> str | None:
        """Why `holder` is dead, or None if it may be alive."""
        if holder.get("host") == self.record["host"]:
            if not _alive_here(holder):
                return f"its process {holder.get('pid')} on this host is gone"
            return None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its heartbeat stopped {age:.0f} s ago"
        return None

    def acquire(self) -> str | None:
        """Takes the lock; returns a warning if a dead run's lock was taken over. Raises WorkdirInUse."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._kv = kvstore(self.workdir)
        for _ in range(5):
            current = self._kv.read(NAME).result()
            warning = None
            if current.state == "value":
                try:
                    holder = json.loads(current.value)
                except json.JSONDecodeError:
                    holder = {}
                why = self._stale(holder) if holder else "it is unreadable"
                if why is None:
                    raise WorkdirInUse(
                        f"{self.workdir} is in use by another heft train ({describe(holder)}); wait for it to "
                        "finish or stop it, or choose another --workdir")
                warning = f"took over the lock of a run that is no longer running ({why}): {describe(holder)}"
            written = self._kv.write(NAME, self._payload(), if_equal=current.stamp.generation).result()
            if written.generation:  # an empty generation: the condition failed, someone else wrote first
                self._generation = written.generation
                self._thread = threading.Thread(target=self._beat, name="heft-lock", daemon=True)
                self._thread.start()
                return warning
        raise WorkdirInUse(f"{self.workdir}: could not take {NAME} (another run keeps changing it); retry")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                written = self._kv.write(NAME, self._payload(), if_equal=self._generation).result()
            except Exception:  # a storage hiccup: try again at the next beat
                continue
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
