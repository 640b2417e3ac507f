"""`heft prepare --config=configs/NAME.py [--config.data.corpus=DIR_OR_GLOB] [--config.data.cache_dir=DIR]`:
train the tokenizer and write the corpus's tokens (data/prepare.py); `heft train` does it for you."""

import time

from absl import app, flags

from heft.data import prepare


def define_flags() -> None:
    from heft.launch.flags import define_config

    define_config()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start = time.perf_counter()
    p = prepare.prepare(flags.FLAGS.config)
    print(prepare.summary(p, time.perf_counter() - start))
