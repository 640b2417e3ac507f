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
