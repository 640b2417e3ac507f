"""metrics.jsonl and TensorBoard: a resume drops the redone steps; a dead TensorBoard thread raises, never hangs."""

import errno
import json
import threading
import time

from heft.train import metrics


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_drops_the_rows_of_redone_steps_and_says_how_many(tmp_path):
    w = metrics.Writer(tmp_path)
    for step in range(1, 8):
        w.write(step, {"loss": float(step)})
    w.close()
    w = metrics.Writer(tmp_path, start_step=5)  # the checkpoint was at 5; steps 6 and 7 are redone
    w.write(6, {"loss": 6.5})
    w.close()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5, 6]
    assert rows[5] == {"step": 5, "resumed": True, "redone_steps": 2} and rows[6]["loss"] == 6.5


def test_a_resume_counts_the_training_time_of_redone_steps_as_lost_and_keeps_a_cut_short_save(tmp_path):
    w = metrics.Writer(tmp_path)
    for step in range(1, 8):
        w.write(step, {"loss": float(step), "train_s": 0.25 * step})
    w.write(7, {"checkpoint_s": 3.0})  # a save that never committed
    w.close()
    w = metrics.Writer(tmp_path, start_step=5)
    w.close()
    assert _rows(tmp_path)[-1] == {"step": 5, "resumed": True, "redone_steps": 2, "redone_s": 0.25 * (6 + 7),
                                   "checkpoint_s": 3.0}


def test_a_tensorboard_thread_that_dies_of_a_full_disk_raises_in_the_next_write_instead_of_hanging(tmp_path, capsys):
    w = metrics.Writer(tmp_path)
    w.write(1, {"loss": 1.0})
    worker = w._worker()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    worker._record_writer.write_event = full  # the thread's next event fails as on a full disk
    done = threading.Event()
    errors = []

    def keep_writing():
        try:
            for step in range(2, 200):  # far more than tensorboardX's default queue of 10
                w.write(step, {"loss": float(step)})
                time.sleep(0.005)
        except OSError as e:
            errors.append(e)
        done.set()

    threading.Thread(target=keep_writing, daemon=True).start()
    assert done.wait(60), "writing metrics hung after TensorBoard's thread died"
    assert errors and errors[0].errno == errno.ENOSPC
    assert "Traceback" not in capsys.readouterr().err  # reported once, by the training thread
    w.close()



def test_tensorboard_loads_without_torch_or_gcs_for_a_local_run_and_gets_gcs_back_for_a_gs_one(monkeypatch):
    """Start-up: a local run's tensorboardX comes without torch and google-cloud-storage (seconds of
    imports heft does not use there). A gs:// writer later in the same process can still write."""
    import subprocess
    import sys

    probe = ("import sys; from heft.train import metrics; metrics._summary_writer_class(False); "
             "print(sorted(m for m in ('torch', 'google.cloud.storage') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

    from google.cloud import storage
    from tensorboardX import record_writer

    monkeypatch.setattr(record_writer, "GCS_ENABLED", False)  # as if loaded for a local run first
    monkeypatch.delattr(record_writer, "storage", raising=False)
    metrics._summary_writer_class(True)
    assert record_writer.GCS_ENABLED and record_writer.storage is storage
