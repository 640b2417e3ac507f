"""`heft train --config=configs/tiny.py --workdir=DIR`: train, resuming from DIR's newest checkpoint.

SIGTERM or SIGINT (a preemption, a Ctrl-C) saves a checkpoint at the current step and exits 0.
"""

import json
import signal

from absl import flags


def define_flags():
    from heft.launch.flags import define_config

    define_config()
    flags.DEFINE_string("workdir", "runs/tiny", "where checkpoints, metrics and TensorBoard logs go")
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for several processes")
    flags.DEFINE_integer("num_processes", None, "how many processes take part")
    flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")
    flags.DEFINE_integer("stop_after", None, "checkpoint and exit after this step, as a preemption would "
                         "(a job with a time limit; rerun the same command to continue)")


def summary_text(s: dict) -> str:
    return (f"done: {s['params']:,} parameters, {s['steps']} steps, {s['tokens_seen']:,} tokens seen; "
            f"train loss {s['train_loss']:.4f}, held-out loss {s['eval_loss']:.4f} "
            f"(unigram baseline {s['unigram_loss']:.4f}); "
            f"{s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.1f}% "
            f"(of {s['peak_flops'] / 1e9:,.0f} GFLOP/s peak)")


def main(argv):
    del argv
    f = flags.FLAGS
    from heft.launch import distributed

    distributed.initialize(f.coordinator, f.num_processes, f.process_id)
    import jax

    from heft.train import loop

    stop = {"requested": False}

    def request_stop(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        result = loop.train(f.config, f.workdir, stop_requested=lambda step: stop["requested"] or (
            f.stop_after is not None and step >= f.stop_after))
    except loop.NonFiniteLoss as e:
        raise SystemExit(f"heft train: {e}") from None
    if jax.process_index() == 0:
        if "stopped_at" in result:
            print(f"heft train: stopped at step {result['stopped_at']} with a checkpoint; rerun the same command to resume")
        else:
            print(summary_text(result))
            print(json.dumps(result))
