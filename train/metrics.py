"""Where training metrics go: JSON lines and TensorBoard in the workdir, and the terminal."""

import json
import resource
import sys
import threading
import time

import jax
from etils import epath

from heft.data import paths
from heft.train import goodput


def memory_in_use_bytes() -> int:
    """Device memory in use on the first local device; on CPU, this process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _summary_writer_class(remote: bool):
    """tensorboardX's SummaryWriter, imported without what heft does not use.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors (heft logs
    Python floats), and google-cloud-storage, only to write event files to gs://; together they cost
    a few seconds of every run's start-up. torch is hidden while tensorboardX loads, and so is
    google-cloud-storage for a local (not `remote`) event directory, unless this process has
    imported them already. A gs:// writer later in the same process gets google-cloud-storage back.
    """
    names = ["torch"] + ([] if remote else ["google.cloud.storage"])
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import NAME` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter, record_writer
    finally:
        for name in hidden:
            del sys.modules[name]
    if remote and not record_writer.GCS_ENABLED:  # loaded earlier in this process for a local directory
        from google.cloud import storage

        record_writer.storage, record_writer.GCS_ENABLED = storage, True
    return SummaryWriter


class Writer:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors it to
    TensorBoard (WORKDIR/tensorboard). Only process 0 writes.

    On resume from step S, rows of later steps (written before a crash, then redone) are dropped,
    and a row {"step": S, "resumed": true, "redone_steps": N, "redone_s": T, ...} records the lost
    work: the dropped rows' training time as `redone_s`, their other timings as they were
    (train/goodput.py). A gs:// workdir
    cannot be appended to, so there the file is rewritten whole, at most every `flush_s` seconds
    and at close.
    """

    def __init__(self, workdir: epath.PathLike, start_step: int = 0, flush_s: float = 30.0):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        workdir = paths.path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.remote = paths.is_remote(self.path)
        self.flush_s, self._flushed = flush_s, time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if _step_of(line) <= start_step]
        self.lines = kept
        if len(kept) != len(lines) or self.remote:
            paths.write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        self.jsonl = None if self.remote else open(self.path, "a")
        if start_step or len(kept) != len(lines):
            redone = max((_step_of(line) for line in lines), default=start_step) - start_step
            dropped = [_row(line) for line in lines if _step_of(line) > start_step]
            self._append(json.dumps({"step": start_step, "resumed": True, "redone_steps": max(redone, 0),
                                     **goodput.lost(dropped)}))
        SummaryWriter = _summary_writer_class(self.remote)
        # tensorboardX writes from a thread through a bounded queue: if that thread dies (a full disk),
        # every later add blocks forever. An unbounded queue never blocks, and `_check_tensorboard`
        # turns the thread's death into the error it died of.
        self.tb = SummaryWriter(str(workdir / "tensorboard"), max_queue=0)
        self._tb_error = None
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_failed

    def _append(self, line: str) -> None:
        if self.remote:
            self.lines.append(line)
            if time.monotonic() - self._flushed > self.flush_s:
                self.flush()
        else:
            self.jsonl.write(line + "\n")
            self.jsonl.flush()

    def rows(self) -> list[dict]:
        """Every object in metrics.jsonl so far, earlier sessions' and this one's (process 0; [] elsewhere)."""
        if not self.active:
            return []
        lines = self.lines if self.remote else self.path.read_text().splitlines()
        return [row for row in map(_row, lines) if row]

    def flush(self) -> None:
        if self.active and self.remote:
            paths.write_bytes(self.path, "".join(line + "\n" for line in self.lines).encode())
            self._flushed = time.monotonic()

    def _worker(self):
        return getattr(getattr(getattr(self.tb, "file_writer", None), "event_writer", None), "_worker", None)

    def _thread_failed(self, args) -> None:
        if args.thread is not None and args.thread is self._worker():
            self._tb_error = args.exc_value  # raised in the training thread by the next write
        else:
            self._previous_hook(args)

    def _check_tensorboard(self) -> None:
        worker = self._worker()
        if worker is not None and not worker.is_alive() and self._tb_error is not None:
            raise self._tb_error

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self._check_tensorboard()
        self._append(json.dumps({"step": step, **metrics}))
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.active:
            threading.excepthook = self._previous_hook
            try:
                self.flush()
                if self.jsonl is not None:
                    self.jsonl.close()
            finally:
                self.tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def _row(line: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError:
        return {}
    return row if isinstance(row, dict) else {}


class Progress:
    """A live bar with loss and tokens/s in a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int):
        self.live = sys.stderr.isatty() and jax.process_index() == 0
        self.bar = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict) -> None:
        text = (f"loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:,.0f} tok/s  "
                f"mfu {100 * metrics['mfu']:.1f}%")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text)
        elif jax.process_index() == 0:
            print(f"step {step}: {text}  lr {metrics['lr']:.2e}  grad_norm {metrics['grad_norm']:.3f}",
                  flush=True)

    def note(self, text: str) -> None:
        if jax.process_index() != 0:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
