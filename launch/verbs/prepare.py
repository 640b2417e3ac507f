"""`heft prepare --config=configs/NAME.py [--config.data.corpus=DIR_OR_GLOB] [--config.data.cache_dir=DIR]`:
train the tokenizer and write the corpus's tokens (data/prepare.py); `heft train` does it for you."""

import signal
import sys
import time

from absl import app, flags

from heft.data import prepare


def define_flags() -> None:
    from heft.launch.flags import define_config

    define_config()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from heft.data.errors import PrepareStopped

    # SIGTERM (a preemption) or Ctrl-C stops the tokenizing between batches, its partial store removed.
    signals = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: signals.append(signum))
    start = time.perf_counter()
    try:
        p = prepare.prepare(flags.FLAGS.config, stop=lambda: bool(signals))
    except PrepareStopped as e:
        sys.exit(f"heft prepare: {e} ({signal.Signals(signals[0]).name}); nothing half-written is left: run it "
                 "again to prepare the corpus")
    print(prepare.summary(p, time.perf_counter() - start))
