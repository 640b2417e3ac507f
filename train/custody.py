"""Sealing and verifying a checkpoint with every host doing a share, off the training thread.

A 70B train state is ~840 GB: one host hashing it all takes minutes while the others wait at the
next collective. So each process hashes its share of the files and writes what it found to
`STEP/custody/process_I.json`; process 0 merges the shares, hashes whatever no share covered (files
it wrote itself, such as the tokenizer), and writes the manifest and then the seal (manifest.py).
Hosts coordinate through those files on the shared storage (a bucket or a shared filesystem), never
through collectives, so sealing can run in a background thread while the steps go on.

A file's owner is the process that wrote it where orbax says so (`ocdbt.process_I/` holds process
I's shards, which may still be in its page cache); any other file goes to a process chosen by a
hash of its path. Restoring verifies in parallel too (`verify`), with the files split by bytes
from the manifest, since the restoring processes need not be the ones that wrote.

What a seal is worth (an unkeyed digest against accidents, or a signed statement of run, step,
config and parent against tampering) is manifest.py's to say; `verify` is the one check every
reader goes through (heft.train.checkpoint.load's `verified`), on one host or many.
"""

import queue
import re
import threading
import time
import zlib

from etils import epath

from heft.data import paths
from heft.train import manifest, storage
from heft.train.manifest import CheckpointError

_WRITER = re.compile(r"ocdbt\.process_(\d+)")
MERGE_TIMEOUT_S = 3600.0  # how long process 0 waits for the other hosts' shares


def owner(rel: str, process_count: int) -> int:
    """Which process hashes (and on restore, verifies) the file at `rel`."""
    m = _WRITER.search(rel)
    if m:
        return int(m.group(1)) % process_count
    return zlib.crc32(rel.encode()) % process_count


def hash_share(directory: epath.Path, process_index: int, process_count: int) -> dict:
    """{rel: {"sha256", "bytes"}} for this process's share of the checkpoint's files.

    A file that vanishes between the listing and its hashing is left out: process 0 writes files
    (the tokenizer) through a temporary name while the others list, and it hashes whatever the
    final listing holds that no share covered.
    """
    share = {}
    for rel in manifest.content_files(directory):
        if owner(rel, process_count) == process_index:
            try:
                share[rel] = dict(zip(("sha256", "bytes"), manifest.sha256_file(directory / rel)))
            except FileNotFoundError:
                continue
    return share


def _partial(directory: epath.Path, i: int) -> epath.Path:
    return directory / manifest.SCRATCH / f"process_{i}.json"


def _report(directory: epath.Path, i: int, report: dict) -> None:
    (directory / manifest.SCRATCH).mkdir(parents=True, exist_ok=True)
    storage.write_json(_partial(directory, i), report)


def _wait_for_partials(directory: epath.Path, process_count: int, timeout: float, cancelled) -> dict:
    found: dict = {}
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        for i in range(1, process_count):
            if i not in found and _partial(directory, i).exists():
                found[i] = storage.read_json(_partial(directory, i))
                if "error" in found[i]:  # that host failed: say so now rather than at the timeout
                    raise CheckpointError(f"process {i} could not hash its share of {directory} ({found[i]['error']}); "
                                          "the checkpoint stays unsealed and the next start seals or removes it")
        if len(found) == process_count - 1:
            return found
        if cancelled():
            raise CheckpointError(f"sealing {directory} was cancelled")
        if time.monotonic() > deadline:
            missing = sorted(set(range(1, process_count)) - set(found))
            raise CheckpointError(f"process(es) {missing} never reported their hashes of {directory}; "
                                  "the checkpoint stays unsealed and the next start seals or removes it")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def seal(directory: epath.Path, facts: dict, process_index: int, process_count: int, *, extra_files: dict | None = None,
         signing_key: str | None = None, timeout: float = MERGE_TIMEOUT_S, cancelled=lambda: False) -> dict | None:
    """Seals a checkpoint whose data is complete on the storage. Every process calls it.

    `extra_files` ({rel: bytes}) are written first by process 0 (the tokenizer). Returns the
    manifest on process 0, None elsewhere.
    """
    if process_index == 0:
        for rel, data in (extra_files or {}).items():
            paths.write_bytes(directory / rel, data)
    if process_index != 0:
        # Process 0 waits for this report, so a failure is reported too, in place of the hashes.
        try:
            report = {"files": hash_share(directory, process_index, process_count)}
        except Exception as e:
            _report(directory, process_index, {"error": (str(e).strip().splitlines() or [type(e).__name__])[0][:300]})
            raise
        _report(directory, process_index, report)
        return None
    reported = hash_share(directory, process_index, process_count)
    for share in _wait_for_partials(directory, process_count, timeout, cancelled).values():
        reported.update(share["files"])
    # The listing now is the truth: a share may name a file that was only transient, and files
    # process 0 wrote after another host listed (the tokenizer) are in no share.
    files = {}
    for rel in manifest.content_files(directory):
        entry = reported.get(rel)
        if entry is None:
            digest, size = manifest.sha256_file(directory / rel)
            entry = {"sha256": digest, "bytes": size}
        files[rel] = entry
    # Scratch goes before the seal: a sealed step holds nothing its manifest does not list, and a crash
    # in between leaves an unsealed step, which the next start seals again from scratch.
    (directory / manifest.SCRATCH).rmtree(missing_ok=True)
    return manifest.write(directory, files, facts, signing_key)


def balanced_shares(files: dict, process_count: int) -> dict[str, int]:
    """{file: process} splitting the manifest's files by bytes, largest first to the least loaded
    process: the same on every process (it depends on the manifest alone), whoever wrote the files."""
    load = [0] * process_count
    out = {}
    for rel in sorted(files, key=lambda r: (-files[r]["bytes"], r)):
        i = min(range(process_count), key=lambda p: (load[p], p))
        out[rel] = i
        load[i] += files[rel]["bytes"]
    return out


def verify(directory: epath.Path, process_index: int, process_count: int, verify_key: str | None = None,
           gather=None) -> dict:
    """Checks a checkpoint with each process reading only its share; every process raises the same
    CheckpointError (naming the first bad file) if any share is bad.

    `gather(int) -> list[int]` collects one integer from every process (default: this process
    alone); training passes a JAX allgather.
    """
    m = manifest.read(directory, verify_key)
    listed = sorted(m["files"])
    shares = balanced_shares(m["files"], process_count)  # a restore may run on another process count
    problems = {}
    for i, rel in enumerate(listed):
        if shares[rel] == process_index:
            if problem := manifest.check_file(directory, rel, m["files"][rel]):
                problems[i] = problem
                break
    if process_index == 0 and (problem := manifest.check_extra(directory, m)):
        problems[len(listed)] = problem
    first = min(problems, default=-1)
    everyone = (gather or (lambda x: [x]))(first)
    bad = [x for x in everyone if x >= 0]
    if bad:
        worst = min(bad)
        if worst in problems:
            raise CheckpointError(problems[worst])
        what = listed[worst] if worst < len(listed) else "a file not in the manifest"
        raise CheckpointError(f"{directory / what} failed verification on another host; "
                              "restore an earlier checkpoint")
    return m


class Custodian:
    """Seals saved steps in a background thread, in order, as soon as orbax has committed each.

    `add(step, directory, facts, extra_files)` queues a step right after its save starts;
    `after_seal(step)` runs on process 0 once a step is sealed (retention). Errors are kept and
    raised in the training thread by `raise_error()` (called at each save and at close).
    """

    def __init__(self, process_index: int, process_count: int, committed, after_seal=lambda step: None,
                 signing_key: str | None = None):
        self.process_index, self.process_count = process_index, process_count
        self.committed = committed  # (directory) -> bool: orbax finished writing it
        self.after_seal = after_seal
        self.signing_key = signing_key
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.sealed: list[int] = []
        self._abandoned: set[int] = set()
        self.thread = threading.Thread(target=self._run, name="heft-custody", daemon=True)
        self.thread.start()

    def add(self, step: int, directory: epath.Path, facts: dict, extra_files: dict | None = None) -> None:
        self.queue.put((step, directory, facts, extra_files))

    def abandon(self, step: int) -> None:
        """The save of `step` failed: stop waiting for it to commit."""
        self._abandoned.add(step)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            step, directory, facts, extra = item
            try:
                delay = 0.02
                while not self.committed(directory):
                    if step in self._abandoned:
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                else:
                    seal(directory, facts, self.process_index, self.process_count, extra_files=extra,
                         signing_key=self.signing_key, cancelled=lambda: step in self._abandoned)
                    self.sealed.append(step)
                    if self.process_index == 0:
                        self.after_seal(step)
            except BaseException as e:  # kept for the training thread, which decides what to say
                self.error = e

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        """Waits for every queued step to be sealed (or abandoned), then stops the thread."""
        self.queue.put(None)
        self.thread.join()
        self.raise_error()
