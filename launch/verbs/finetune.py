"""`heft finetune --config=configs/NAME.py --base=CHECKPOINT --workdir=DIR`: train on top of a frozen base
checkpoint, heft's own or one imported with `heft convert --from_hf`, by `finetune.method`: full,
lora, adapter, prefix or prompt (adapt/). The model is the base's; the config says how and on what.

As `heft train`: resumes from DIR's newest checkpoint; SIGTERM, Ctrl-C or --stop_after saves a
checkpoint and exits 0; several processes take --coordinator --num_processes --process_id.
"""


from absl import flags


def define_flags():
    from heft.launch.flags import define_config, define_verify_key

    define_config("milton.py")
    define_verify_key()
    flags.DEFINE_string("base", None, "the checkpoint to fine-tune: a workdir (its newest step), a step directory "
                        "or a parameters-only checkpoint (e.g. from heft convert --from_hf)")
    flags.DEFINE_string("workdir", None, "where the fine-tune's checkpoints, metrics and TensorBoard logs go")
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for several processes")
    flags.DEFINE_integer("num_processes", None, "how many processes take part")
    flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")
    flags.DEFINE_integer("stop_after", None, "checkpoint and exit after this step, as a preemption would")


def summary_text(s: dict) -> str:
    share = 100 * s["trainable_params"] / s["params"]
    return (f"done: {s['method']} fine-tune of {s['base']}: {s['trainable_params']:,} trained parameters "
            f"({share:.2f}% of {s['params']:,}), {s['steps']} steps, {s['tokens_seen']:,} tokens seen; "
            f"train loss {s['train_loss']:.4f}, held-out loss {s['eval_loss']:.4f} "
            f"(unigram baseline {s['unigram_loss']:.4f}); {s['tokens_per_s']:,.0f} tokens/s")


def main(argv):
    del argv
    f = flags.FLAGS
    from heft.model.checks import ConfigError

    if not f.base or not f.workdir:
        raise ConfigError("heft finetune needs --base=CHECKPOINT (what to fine-tune) and --workdir=DIR (where to)")
    if f.verify_key:
        f.config.checkpoint.verify_key = f.verify_key  # the fine-tune's own resumes check it too
    from heft.quantize import qat

    qat.check(f.config)  # quantize.weights without quantize.qat, or the reverse, stops here
    from heft.launch import distributed

    distributed.initialize(f.coordinator, f.num_processes, f.process_id)
    import jax

    from heft.adapt import finetune
    from heft.train import hosts, loop, preemption

    try:
        # quantize.qat: the steps see the weights fake-quantized as heft quantize will write them.
        result = finetune.finetune(f.config, f.base, f.workdir, stop_requested=preemption.StopSignal(f.stop_after),
                                   bind=qat.binder(f.config))
    except loop.NonFiniteLoss as e:
        raise SystemExit(f"heft finetune: {e}") from None
    except hosts.PeerLost as e:
        from heft.launch.verbs.train import exit_now

        exit_now("finetune", e)
    if jax.process_index() == 0:
        from heft.launch.verbs.train import report

        report("finetune", f.workdir, result, summary_text)
