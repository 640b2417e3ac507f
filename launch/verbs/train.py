"""`heft train --config=configs/tiny.py --workdir=DIR`: train, resuming from DIR's newest checkpoint.

SIGTERM or SIGINT (a preemption, a Ctrl-C) saves a checkpoint at a step every process agrees on
and exits 0 (train/preemption.py).
"""

import json

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
    if f.config.quantize.qat or f.config.quantize.weights != "none":
        from heft.model.checks import ConfigError

        raise ConfigError("heft train trains float weights; quantization-aware training is heft finetune's "
                          "quantize.qat=true, and heft quantize converts a trained checkpoint")
    from heft.launch import distributed

    distributed.initialize(f.coordinator, f.num_processes, f.process_id)
    import jax

    from heft.launch import plan
    from heft.train import hosts, loop, preemption

    stop = preemption.StopSignal(f.stop_after)
    try:
        tpu = plan.ForTraining()
        result = loop.train(f.config, f.workdir, stop_requested=stop, compile_checked=tpu.fit, predict_step=tpu.predict)
    except loop.NonFiniteLoss as e:
        raise SystemExit(f"heft train: {e}") from None
    except hosts.PeerLost as e:
        exit_now("train", e)
    if jax.process_index() == 0:
        report("train", f.workdir, result, summary_text)


def exit_now(verb: str, error: Exception) -> None:
    """One line and exit 1 at once, skipping JAX's shutdown: after another process is lost, it would wait
    for that process at a barrier until the heartbeat timeout (100 s), then abort with a stack dump."""
    import os
    import sys

    sys.stdout.flush()
    print(f"heft {verb}: {error}", file=sys.stderr, flush=True)
    os._exit(1)


def report(verb: str, workdir: str, result: dict, summary) -> None:
    """What `heft train` and `heft finetune` print at the end (process 0): stopped with a checkpoint,
    already done, or the summary (`summary(result)`), goodput and the result as JSON."""
    from heft.train import goodput

    if "stopped_at" in result:
        print(f"heft {verb}: stopped at step {result['stopped_at']} with a checkpoint; rerun the same command to "
              "resume")
        print(goodput.text(result["goodput"]))
    elif "stopped_preparing" in result:
        print(f"heft {verb}: stopped while tokenizing the corpus, before step {result['stopped_preparing'] + 1}; "
              "nothing half-written is left: rerun the same command to prepare it and train")
    elif "already_done" in result:
        print(f"heft {verb}: {workdir} is already done: its newest checkpoint is step {result['already_done']} "
              f"and train.steps={result['steps']}; raise train.steps to train further")
    else:
        print(summary(result))
        print(goodput.text(result["goodput"]))
        print(json.dumps(result))
