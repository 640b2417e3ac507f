"""The training loop: data in, jitted steps over the mesh, metrics, held-out loss, checkpoints.

`train(config, workdir)` is what `heft train` runs and what tests call. Every process runs the same
loop on its own slice of the batch; only process 0 writes metrics. What it trains is a `Trainee`:
pretraining's is the whole model (`pretraining()`); a fine-tune's (heft.adapt) is a few weights
beside a frozen base. Data, steps, metrics, held-out loss, checkpoints, preemption and resume are
this one loop for both.
"""

import dataclasses
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from heft.data import loader as data_loader
from heft.data import processes as data_processes
from heft.data.errors import PrepareStopped
from heft.train import checkpoint, checks, compiled, goodput, hosts, lock, metrics, peak, remat, sharding, size, storage
from heft.train import state as train_state


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Program:
    """A trainee placed on the mesh: its train state and the jitted steps over it."""

    abstract_state: dict  # ShapeDtypeStructs with shardings: what a restore reads into, what compiles
    init_state: Callable[[], dict]  # a fresh state, made in its shards
    train_step: Callable  # jitted (state, *frozen, batch) -> (state, metrics), the state donated
    eval_step: Callable  # jitted (state["params"], *frozen, batch) -> (loss sum, weight sum)
    frozen: tuple = ()  # arrays every step reads and none changes (a fine-tune's base); never saved
    trainable: int | None = None  # parameters trained, when not all of them


@dataclasses.dataclass(frozen=True)
class Trainee:
    """What the loop trains: `make(config, mesh)` builds its Program once the workdir is taken and
    the run is not already done. `facts` go into every checkpoint's manifest; `check(resume)` raises
    CheckpointError for a checkpoint this trainee must not continue; the data is tokenized with
    `tokenizer_path` when given (a fine-tune's base's), else with the corpus's own."""

    make: Callable[..., Program]
    facts: dict = dataclasses.field(default_factory=dict)
    check: Callable = lambda resume: None
    tokenizer_path: str | None = None
    plain_step: bool = False  # its step is compiled.train_step's, which remat=auto may have compiled already


def pretraining() -> Trainee:
    """`heft train`'s trainee: every parameter of the model, from a fresh init."""
    return Trainee(lambda config, mesh: Program(
        abstract_state=train_state.abstract(config, mesh), init_state=lambda: train_state.init(config, mesh),
        train_step=compiled.train_step(config, mesh), eval_step=compiled.eval_step(config, mesh)), plain_step=True)


def prepare_data(config, tokenizer_path=None, stop=lambda: False):
    """The tokenizer and token store, the same on every process (data/processes.py); a progress bar
    only where someone watches a terminal."""
    return data_processes.prepare_for_processes(config, tokenizer_path, progress=sys.stderr.isatty(), stop=stop)


def make_loader(config, prepared):
    return data_loader.Loader(
        prepared, split="train", seq_len=config.train.seq_len, global_batch=config.train.batch_size,
        seed=config.data.seed, process_index=jax.process_index(), process_count=jax.process_count(),
    )


def heldout_loss(config, mesh, eval_fn, params, prepared) -> float:
    """Mean next-token loss over `train.eval_batches` fixed held-out batches."""
    total = count = 0.0
    batches = data_loader.heldout_batches(
        prepared, config.train.seq_len, config.train.batch_size, config.train.eval_batches,
        jax.process_index(), jax.process_count(),
    )
    for local in batches:
        batch = data_loader.global_batch(local, sharding.batch_sharding(config, mesh))
        loss_sum, weight_sum = eval_fn(params, batch)
        total, count = total + float(loss_sum), count + float(weight_sum)
    return total / max(count, 1.0)


def take_workdir(workdir, note=print):
    """Process 0 takes the workdir's lock; every process raises WorkdirInUse if it could not."""
    held, error = None, ""
    if jax.process_index() == 0:
        held = lock.WorkdirLock(workdir)
        try:
            warning = held.acquire()
            if warning:
                note(f"heft: {warning}")
        except checkpoint.CheckpointError as e:
            held, error = None, str(e)
    error = hosts.broadcast_json(error)
    if error:
        raise lock.WorkdirInUse(error)
    return held


def train(config, workdir: str, stop_requested=lambda step: False, compile_checked=None,
          trainee: Trainee | None = None, predict_step=None) -> dict:
    """Trains `config` in `workdir` (resuming from its newest sealed checkpoint); returns a summary dict.

    `stop_requested(step)` is asked after every step; True saves a checkpoint there and returns
    {"stopped_at": step} (a preemption signal, or a planned stop). A workdir whose newest checkpoint
    is already at `train.steps` returns {"already_done": step}. One run at a time holds the workdir.
    `compile_checked(config, mesh)`, if given, compiles the step and checks it fits the devices
    before any state is made (`heft train` passes the TPU plan's fit check); it returns the compiled
    step, which the loop then runs, or None to let the loop compile it. `trainee` defaults to
    `pretraining()`. `model.remat=auto` is chosen before anything compiles (train/remat.py), by
    `predict_step(config, mesh) -> seconds or None` where given (the TPU plan's), else by timing.
    """
    mesh = sharding.make_mesh(config)
    checks.check(config, mesh)
    compiled.use_compilation_cache(config)
    held = take_workdir(workdir)
    try:
        return _train(config, workdir, mesh, stop_requested, held, compile_checked, trainee or pretraining(),
                      predict_step)
    finally:
        if held is not None:
            held.release()


def _note(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def _train(config, workdir, mesh, stop_requested, held, compile_checked, trainee, predict_step) -> dict:
    t = config.train
    ckpt = checkpoint.Checkpointer(workdir, config, note=_note, facts=trainee.facts)
    resume = ckpt.latest()
    if resume is not None:
        trainee.check(resume)
        for change in ckpt.check_config(resume):
            _note(f"heft: resuming with a changed setting: {change}")
        if resume.step >= t.steps:
            ckpt.close()
            return {"already_done": resume.step, "steps": t.steps}
    # A preemption while a large corpus is tokenized stops it there (its partial store removed) rather
    # than after it, past the grace period; `stop_requested.signalled` where the caller's stop has one.
    stop = getattr(stop_requested, "signalled", lambda: False)
    try:
        prepared = prepare_data(config, trainee.tokenizer_path, stop=stop)
        new_corpus = False
        if resume is not None and ckpt.check_data(resume, prepared) == "retokenize":
            new_corpus = (resume.manifest.get("data", {}).get("corpus_sha256")
                          != checkpoint.data_facts(prepared)["corpus_sha256"])
            _note(f"heft: tokenizing {'the new corpus' if new_corpus else 'the corpus'} with the checkpoint's own "
                  "tokenizer")
            prepared = prepare_data(config, tokenizer_path=resume.tokenizer_path, stop=stop)
    except PrepareStopped:
        ckpt.close()
        return {"stopped_preparing": resume.step if resume is not None else 0}
    ckpt.prepared = prepared

    # The checkpoint keeps remat=auto (what the user asked for); the step runs what auto chose.
    checked_start = time.perf_counter()  # choosing and the TPU fit check compile the step: compilation time
    chosen = remat.resolve(config, mesh, predict_step, note=_note)
    config = remat.with_remat(config, chosen.remat) if chosen is not None else config
    program = trainee.make(config, mesh)
    abstract, frozen = program.abstract_state, program.frozen
    step_fn = compile_checked(config, mesh) if compile_checked is not None else None
    if step_fn is None and chosen is not None and trainee.plain_step:
        step_fn = chosen.executable  # timed here, so already compiled (None when cached or predicted)
    checked_s = time.perf_counter() - checked_start
    loader_state = None
    if resume is None:
        state = program.init_state()
    else:
        state, loader_state = ckpt.restore(resume, abstract)
        if new_corpus:
            _note("heft: the corpus changed (checkpoint.allow_data_change): reading it from its start")
            loader_state = None
    start = int(state["step"])

    report = size.report(config, t.batch_size, t.seq_len)
    flops_per_step = report["flops_per_step"]
    tokens_per_step = t.batch_size * t.seq_len
    peak_flops = peak.machine_peak(config)
    batch_sharding = sharding.batch_sharding(config, mesh)

    with sharding.activated(mesh, config):
        compile_start = time.perf_counter()
        if step_fn is None:
            step_fn = program.train_step.lower(abstract, *frozen, compiled.abstract_batch(config, mesh)).compile()
        compile_s = time.perf_counter() - compile_start + checked_s

    def eval_fn(params, batch):
        return program.eval_step(params, *frozen, batch)

    loader = make_loader(config, prepared)
    if loader_state is not None:
        loader.restore(loader_state)
    writer = metrics.Writer(workdir, start)
    writer.write(start, goodput.startup_row(compile_s))
    progress = metrics.Progress(t.steps, start)
    if resume is not None:
        progress.note(f"resumed from step {start} in {ckpt.directory}")
    trained = f" ({program.trainable:,} trained)" if program.trainable is not None else ""
    progress.note(f"{report['total_params']:,} parameters{trained} on mesh {dict(mesh.shape)}; "
                  f"step compiled in {compile_s:.1f} s")

    losses, eval_loss, skipped = [], None, 0
    interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0  # paused: evals and saves
    step = start
    last = {}
    pending = None  # the previous step's metrics: checked one step late so dispatch stays ahead
    try:
        while step < t.steps:
            batch = data_loader.global_batch(loader.next(), batch_sharding)
            state, step_metrics = step_fn(state, *frozen, batch)
            step += 1
            interval_steps += 1
            if pending is not None:
                skipped += _check_finite(pending, t, progress)
            pending = (step, step_metrics)
            if step % t.log_every == 0 or step == t.steps:
                skipped += _check_finite(pending, t, progress)
                pending = None
                if held is not None:
                    held.check()
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "finite"}
                elapsed = time.perf_counter() - interval_start - paused
                step_time = elapsed / interval_steps
                peak_flops = peak.remeasured(config, peak_flops, flops_per_step / step_time)
                values.update(
                    tokens_per_s=tokens_per_step / step_time,
                    step_time_s=step_time,
                    mfu=flops_per_step / step_time / peak_flops,
                    memory_gb=metrics.memory_in_use_bytes() / 2**30,
                    tokens_seen=step * tokens_per_step,
                    train_s=elapsed,  # goodput: seconds in steps since the previous row
                )
                losses.append(values["loss"])
                writer.write(step, values)
                progress.update(step, values)
                last = values
                interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0
            if step % t.eval_every == 0 or step == t.steps:
                eval_loss, eval_s = goodput.timed(
                    state, lambda: heldout_loss(config, mesh, eval_fn, state["params"], prepared))
                writer.write(step, {"eval_loss": eval_loss, "eval_s": eval_s})
                progress.note(f"step {step}: held-out loss {eval_loss:.4f}")
                paused += eval_s  # eval time is not step time
            if stop_requested(step) and step < t.steps:
                _, save_s = goodput.timed(state, lambda: (ckpt.save(step, state, loader.state()), ckpt.close()))
                writer.write(step, {"checkpoint_s": save_s})
                progress.note(f"stopped at step {step}: checkpoint saved in {ckpt.directory}")
                return {"stopped_at": step, "goodput": goodput.summarize(writer.rows())}
            if step % t.checkpoint_every == 0 or step == t.steps:
                _, save_s = goodput.timed(state, lambda: ckpt.save(step, state, loader.state()))
                writer.write(step, {"checkpoint_s": save_s})
                paused += save_s
        if pending is not None:
            skipped += _check_finite(pending, t, progress)
        _, close_s = goodput.timed(state, ckpt.close)  # the last save, finishing in the background
        writer.write(step, {"checkpoint_s": close_s})
        run_goodput = goodput.summarize(writer.rows())
    except Exception as e:
        if storage.no_space(e):
            raise ckpt.out_of_space(e, writer_path=getattr(writer, "path", None)) from None
        if hosts.peer_lost(e):
            newest = ckpt.newest_complete()
            raise hosts.PeerLost(f"lost another process of the run near step {step} ({str(e).splitlines()[0]}); "
                                 f"the newest complete checkpoint is {newest}: start every process again with the "
                                 "same command to resume from it") from None
        raise
    finally:
        loader.close()
        progress.close()
        try:
            writer.close()
        except OSError:  # a full disk is reported above; metrics are not worth a second error
            pass
    from heft.data.stats import unigram_cross_entropy

    return {
        "params": report["total_params"],
        "trainable_params": program.trainable if program.trainable is not None else report["total_params"],
        "unigram_loss": unigram_cross_entropy(prepared),
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "train_loss": float(np.mean(losses[-3:])) if losses else None,
        "eval_loss": eval_loss,
        "tokens_per_s": last.get("tokens_per_s"),
        "mfu": last.get("mfu"),
        "compile_s": compile_s,
        "skipped_steps": skipped,
        "peak_flops": peak_flops,
        "goodput": run_goodput,
    }


def _check_finite(pending, t, progress) -> int:
    """0 if the step's loss was finite; else stops the run or counts a skipped step, by config."""
    step, step_metrics = pending
    if bool(step_metrics["finite"]):
        return 0
    if t.on_nonfinite == "stop":
        raise NonFiniteLoss(
            f"loss or gradient became NaN/Inf at step {step}; the update was not applied. Lower "
            "train.lr, raise train.warmup_steps, keep train.grad_clip on, or set "
            "train.on_nonfinite=skip to skip such steps"
        )
    progress.note(f"step {step}: non-finite loss, update skipped")
    return 1
