"""The training loop: data in, jitted steps over the mesh, metrics, held-out loss, checkpoints.

`train(config, workdir)` is what `heft train` runs and what tests call. Every process runs the same
loop on its own slice of the batch; only process 0 writes metrics. What it trains is a `Trainee`:
pretraining's is the whole model (`pretraining()`); a fine-tune's (heft.adapt) is a few weights
beside a frozen base. Data, steps, metrics, held-out loss, checkpoints, preemption and resume are
this one loop for both.

`_train` reads as the run's phases, each its own function:

    _resume    the newest sealed checkpoint, checked against this trainee and config
    _prepare   the tokenized data (again, with the checkpoint's tokenizer, where it must be)
    _build     remat chosen, the program made, the state restored, the step compiled, a `_Session`
    _run       the steps; at each one `_step`, and where due `_log`, `_evaluate`, `_stop`, `_save`
    _summary   the dict `train` returns

The split follows what each phase may end in. The first two can end the run before anything
compiles (`already_done`, `stopped_preparing`: `_train` closes the checkpointer and returns), so
they stay cheap. `_build` is everything paid once per session (start-up and compile time, the
session's first goodput row). `_run` is the steps, and every way out of them closes the loader,
writer and progress bar; `_failure` turns what a run can meet there (a full disk, a lost peer) into
one line. What `_build` fixes is a `_Session`; what the steps add up (step, losses, the interval a
metrics row times) is a `_Tally`, the one thing `_run`'s phases change, and `_summary` reads it.
"""

import dataclasses
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from heft.data import loader as data_loader
from heft.data import paths
from heft.data import processes as data_processes
from heft.data.errors import PrepareStopped
from heft.train import checkpoint, checks, compiled, goodput, hosts, lock, metrics, peak, profile, remat, sharding, size
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


def take_workdir(workdir, note=lambda line: print(line, flush=True)):
    """Process 0 takes the workdir's lock (perhaps after watching a holder elsewhere for one heartbeat
    period, while the others wait here); every process raises WorkdirInUse if it could not."""
    held, error = None, ""
    if jax.process_index() == 0:
        held = lock.WorkdirLock(workdir)
        try:
            warning = held.acquire(note=lambda line: note(f"heft: {line}"))
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


@dataclasses.dataclass(frozen=True)
class _Session:
    """What one session's steps read, fixed once `_build` has compiled the step."""

    config: object  # with remat=auto resolved to what the step runs
    mesh: object
    program: Program
    step_fn: Callable  # compiled: (state, *program.frozen, batch) -> (state, metrics)
    prepared: object  # the tokenized data (data/processes.py)
    ckpt: checkpoint.Checkpointer
    held: lock.WorkdirLock | None  # process 0's lock on the workdir; None elsewhere
    loader: data_loader.Loader
    writer: metrics.Writer
    progress: metrics.Progress
    batch_sharding: object  # how a [batch, length] token array is laid out on the mesh
    report: dict  # size.report: parameters and FLOPs per step
    machine_peak: float  # FLOP/s of all devices, before the run remeasures it
    compile_s: float
    start: int  # the step this session starts from
    profiler: profile.Profiler  # train.profile_steps

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.batch_size * self.config.train.seq_len


@dataclasses.dataclass
class _Tally:
    """What the steps of one session add up; the summary is made from it."""

    step: int
    peak_flops: float  # remeasured at each log step (peak.remeasured)
    losses: list = dataclasses.field(default_factory=list)  # training loss at each log step
    eval_loss: float | None = None  # the latest held-out loss
    skipped: int = 0  # steps whose non-finite update was skipped
    last: dict = dataclasses.field(default_factory=dict)  # the latest metrics row
    pending: tuple | None = None  # (step, metrics) not yet checked finite: one step late, so dispatch stays ahead
    stopped_at: int | None = None  # where a requested stop saved
    goodput: dict | None = None  # goodput.summarize over every session, once the run ends or stops
    # The interval since the last metrics row: its start, its steps, and the time in it spent on
    # evaluations and saves rather than steps.
    interval_start: float = dataclasses.field(default_factory=time.perf_counter)
    interval_steps: int = 0
    paused: float = 0.0


def _train(config, workdir, mesh, stop_requested, held, compile_checked, trainee, predict_step) -> dict:
    """`train` once the workdir is held: the run's phases in order (the module docstring says why these)."""
    ckpt = checkpoint.Checkpointer(workdir, config, note=_note, facts=trainee.facts)
    resume = _resume(ckpt, trainee)
    if resume is not None and resume.step >= config.train.steps:
        ckpt.close()
        return {"already_done": resume.step, "steps": config.train.steps}
    try:
        prepared, new_corpus = _prepare(config, ckpt, resume, trainee.tokenizer_path, stop_requested)
    except PrepareStopped:
        ckpt.close()
        return {"stopped_preparing": resume.step if resume is not None else 0}
    ckpt.prepared = prepared
    session, state = _build(config, mesh, workdir, ckpt, resume, prepared, new_corpus, held, trainee,
                            compile_checked, predict_step)
    tally = _run(session, state, stop_requested)
    if tally.stopped_at is not None:
        return {"stopped_at": tally.stopped_at, "goodput": tally.goodput}
    return _summary(session, tally)


def _resume(ckpt, trainee):
    """The newest sealed checkpoint (a `checkpoint.Resume`), or None for a fresh run. Raises
    CheckpointError where the trainee must not continue it; notes each setting changed since."""
    resume = ckpt.latest()
    if resume is not None:
        trainee.check(resume)
        for change in ckpt.check_config(resume):
            _note(f"heft: resuming with a changed setting: {change}")
    return resume


def _prepare(config, ckpt, resume, tokenizer_path, stop_requested) -> tuple:
    """(prepared data, whether the corpus is new since `resume`). Data tokenized otherwise than the
    checkpoint's is tokenized again with the checkpoint's own tokenizer. Raises PrepareStopped."""
    # A preemption while a large corpus is tokenized stops it there (its partial store removed) rather
    # than after it, past the grace period; `stop_requested.signalled` where the caller's stop has one.
    stop = getattr(stop_requested, "signalled", lambda: False)
    prepared = prepare_data(config, tokenizer_path, stop=stop)
    if resume is None or ckpt.check_data(resume, prepared) != "retokenize":
        return prepared, False
    new_corpus = (resume.manifest.get("data", {}).get("corpus_sha256")
                  != checkpoint.data_facts(prepared)["corpus_sha256"])
    _note(f"heft: tokenizing {'the new corpus' if new_corpus else 'the corpus'} with the checkpoint's own "
          "tokenizer")
    return prepare_data(config, tokenizer_path=resume.tokenizer_path, stop=stop), new_corpus


def _build(config, mesh, workdir, ckpt, resume, prepared, new_corpus, held, trainee, compile_checked,
           predict_step) -> tuple:
    """(`_Session`, train state): the step compiled, the state made or restored, the loader at the
    checkpoint's position, and the session's first ledger row (start-up and compile time) written."""
    config, program, step_fn, checked_s = _program(config, mesh, trainee, compile_checked, predict_step)
    state, loader_state = _restore(ckpt, resume, program, new_corpus)
    start = int(state["step"])
    if resume is not None:
        _note(f"resumed from step {start} in {ckpt.directory}")
    t = config.train
    report = size.report(config, t.batch_size, t.seq_len)
    machine_peak = peak.machine_peak(config)
    batch_sharding = sharding.batch_sharding(config, mesh)
    step_fn, compile_s = _compile(config, mesh, program, step_fn, checked_s)
    # Said as soon as the step is compiled: with "compiling the train step" before it, the two lines
    # bracket the compilation (a preemption test sends its signal between them).
    trained = f" ({program.trainable:,} trained)" if program.trainable is not None else ""
    _note(f"{report['total_params']:,} parameters{trained} on mesh {dict(mesh.shape)}; "
          f"step compiled in {compile_s:.1f} s")
    loader = make_loader(config, prepared)
    if loader_state is not None:
        loader.restore(loader_state)
    writer = metrics.Writer(workdir, start)
    writer.write(start, goodput.startup_row(compile_s))
    progress = metrics.Progress(t.steps, start)
    profiler = profile.Profiler(config, workdir, jax.process_index(), jax.process_count(), start)
    session = _Session(config, mesh, program, step_fn, prepared, ckpt, held, loader, writer, progress,
                       batch_sharding, report, machine_peak, compile_s, start, profiler)
    return session, state


def _program(config, mesh, trainee, compile_checked, predict_step) -> tuple:
    """(config with remat chosen, Program, the compiled step or None, seconds spent compiling so far)."""
    # The checkpoint keeps remat=auto (what the user asked for); the step runs what auto chose.
    checked_start = time.perf_counter()  # choosing and the TPU fit check compile the step: compilation time
    chosen = remat.resolve(config, mesh, predict_step, note=_note)
    config = remat.with_remat(config, chosen.remat) if chosen is not None else config
    program = trainee.make(config, mesh)
    step_fn = compile_checked(config, mesh) if compile_checked is not None else None
    if step_fn is None and chosen is not None and trainee.plain_step:
        step_fn = chosen.executable  # timed here, so already compiled (None when cached or predicted)
    return config, program, step_fn, time.perf_counter() - checked_start


def _restore(ckpt, resume, program, new_corpus) -> tuple:
    """(train state, the loader's saved position or None to read from the start)."""
    if resume is None:
        return program.init_state(), None
    state, loader_state = ckpt.restore(resume, program.abstract_state)
    if new_corpus:
        _note("heft: the corpus changed (checkpoint.allow_data_change): reading it from its start")
        loader_state = None
    return state, loader_state


def _compile(config, mesh, program, step_fn, checked_s) -> tuple:
    """(compiled step, compile seconds including `checked_s`), compiling it unless `step_fn` already is."""
    with sharding.activated(mesh, config):
        compile_start = time.perf_counter()
        if step_fn is None:
            # A compile can take minutes on a pod (seconds when the compilation cache holds it): said,
            # so that the wait is not taken for a hang.
            _note("heft: compiling the train step")
            step_fn = program.train_step.lower(program.abstract_state, *program.frozen,
                                               compiled.abstract_batch(config, mesh)).compile()
        return step_fn, time.perf_counter() - compile_start + checked_s


def _run(s: _Session, state, stop_requested) -> _Tally:
    """Steps from `s.start` to `train.steps`, or to a requested stop (`tally.stopped_at`). Every exit
    closes the loader, progress bar and metrics; a full disk or a lost peer is raised as one line."""
    t = s.config.train
    tally = _Tally(step=s.start, peak_flops=s.machine_peak)
    try:
        while tally.step < t.steps:
            state, step_metrics = _step(s, tally, state)
            if _due(tally.step, t.log_every, t.steps):
                _log(s, tally, step_metrics)
            if _due(tally.step, t.eval_every, t.steps):
                _evaluate(s, tally, state)
            if stop_requested(tally.step) and tally.step < t.steps:
                _stop(s, tally, state)
                return tally
            if _due(tally.step, t.checkpoint_every, t.steps):
                _save(s, tally, state)
        _finish(s, tally, state)
    except Exception as e:
        failure = _failure(e, s.ckpt, s.writer, tally.step)
        if failure is None:
            raise
        raise failure from None
    finally:
        _close(s)
    return tally


def _due(step: int, every: int, steps: int) -> bool:
    """Whether what is done every `every` steps, and at the last, is done at `step`."""
    return step % every == 0 or step == steps


def _step(s: _Session, tally: _Tally, state) -> tuple:
    """(state, metrics) after one step, dispatched; the step before it checked finite."""
    batch = data_loader.global_batch(s.loader.next(), s.batch_sharding)
    s.profiler.before(tally.step + 1)
    state, step_metrics = s.step_fn(state, *s.program.frozen, batch)
    tally.step += 1
    tally.interval_steps += 1
    _settle(tally, s.config.train, s.progress)
    tally.pending = (tally.step, step_metrics)
    if s.profiler.stops_after(tally.step):
        traced, trace_s = goodput.timed(state, s.profiler.save)  # the trace's steps finish first
        s.writer.write(tally.step, {"profile": traced})
        s.progress.note(f"step {tally.step}: profile of steps {s.profiler.range[0]} to {tally.step} written to {traced}")
        tally.paused += trace_s  # writing the trace out is not step time
    return state, step_metrics


def _log(s: _Session, tally: _Tally, step_metrics: dict) -> None:
    """A metrics row: the step's metrics, its throughput over the interval since the last row, and
    that interval's step time for goodput (`train_s`). Waits for the step; checks the lock is ours."""
    _settle(tally, s.config.train, s.progress)
    if s.held is not None:
        s.held.check()
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "finite"}
    elapsed = time.perf_counter() - tally.interval_start - tally.paused
    step_time = elapsed / tally.interval_steps
    flops_per_step = s.report["flops_per_step"]
    tally.peak_flops = peak.remeasured(s.config, tally.peak_flops, flops_per_step / step_time)
    values.update(
        tokens_per_s=s.tokens_per_step / step_time,
        step_time_s=step_time,
        mfu=flops_per_step / step_time / tally.peak_flops,
        memory_gb=metrics.memory_in_use_bytes() / 2**30,
        tokens_seen=tally.step * s.tokens_per_step,
        train_s=elapsed,  # goodput: seconds in steps since the previous row
    )
    if profiled := s.profiler.covers(tally.step - tally.interval_steps + 1, tally.step):
        values["profiled_steps"] = profiled  # traced steps run slower: not a regression
    tally.losses.append(values["loss"])
    s.writer.write(tally.step, values)
    s.progress.update(tally.step, values)
    tally.last = values
    tally.interval_start, tally.interval_steps, tally.paused = time.perf_counter(), 0, 0.0


def _settle(tally: _Tally, t, progress) -> None:
    """Checks the pending step's loss was finite: a non-finite one stops the run (NonFiniteLoss) or
    counts a skipped step, by `train.on_nonfinite`."""
    if tally.pending is None:
        return
    step, step_metrics = tally.pending
    tally.pending = None
    if bool(step_metrics["finite"]):
        return
    if t.on_nonfinite == "stop":
        raise NonFiniteLoss(
            f"loss or gradient became NaN/Inf at step {step}; the update was not applied. Lower "
            "train.lr, raise train.warmup_steps, keep train.grad_clip on, or set "
            "train.on_nonfinite=skip to skip such steps"
        )
    progress.note(f"step {step}: non-finite loss, update skipped")
    tally.skipped += 1


def _evaluate(s: _Session, tally: _Tally, state) -> None:
    """The held-out loss, written with its time (not step time: it is taken out of the interval)."""
    def eval_fn(params, batch):
        return s.program.eval_step(params, *s.program.frozen, batch)

    eval_loss, eval_s = goodput.timed(
        state, lambda: heldout_loss(s.config, s.mesh, eval_fn, state["params"], s.prepared))
    s.writer.write(tally.step, {"eval_loss": eval_loss, "eval_s": eval_s})
    s.progress.note(f"step {tally.step}: held-out loss {eval_loss:.4f}")
    tally.eval_loss = eval_loss
    tally.paused += eval_s


def _stop(s: _Session, tally: _Tally, state) -> None:
    """A requested stop: saves the step, waits for the save to finish, and sums the goodput so far.
    The steps since the last metrics row are timed too (`train_s`), or the ledger would lose them."""
    step = tally.step
    jax.block_until_ready(state)
    trained = {"train_s": time.perf_counter() - tally.interval_start - tally.paused} if tally.interval_steps else {}
    _, save_s = goodput.timed(state, lambda: (s.ckpt.save(step, state, s.loader.state()), s.ckpt.close()))
    s.writer.write(step, {**trained, "checkpoint_s": save_s})
    s.progress.note(f"stopped at step {step}: checkpoint saved in {s.ckpt.directory}")
    tally.stopped_at, tally.goodput = step, goodput.summarize(s.writer.rows())


def _save(s: _Session, tally: _Tally, state) -> None:
    """A scheduled save, which finishes in the background; the wait for it is not step time."""
    _, save_s = goodput.timed(state, lambda: s.ckpt.save(tally.step, state, s.loader.state()))
    s.writer.write(tally.step, {"checkpoint_s": save_s})
    tally.paused += save_s


def _finish(s: _Session, tally: _Tally, state) -> None:
    """After the last step: its finite check, the wait for the last save, the run's goodput."""
    _settle(tally, s.config.train, s.progress)
    _, close_s = goodput.timed(state, s.ckpt.close)  # the last save, finishing in the background
    s.writer.write(tally.step, {"checkpoint_s": close_s})
    tally.goodput = goodput.summarize(s.writer.rows())


def _failure(e: Exception, ckpt, writer, step: int) -> Exception | None:
    """The one-line error to raise instead of `e` from inside the run, or None to raise `e` as it is."""
    if paths.no_space(e):
        return ckpt.out_of_space(e, writer_path=getattr(writer, "path", None))
    if hosts.peer_lost(e):
        newest = ckpt.newest_complete()
        return hosts.PeerLost(f"lost another process of the run near step {step} ({str(e).splitlines()[0]}); "
                              f"the newest complete checkpoint is {newest}: start every process again with the "
                              "same command to resume from it")
    return None


def _close(s: _Session) -> None:
    s.profiler.close()
    s.loader.close()
    s.progress.close()
    try:
        s.writer.close()
    except OSError:  # a full disk is reported by `_failure`; metrics are not worth a second error
        pass


def _summary(s: _Session, tally: _Tally) -> dict:
    from heft.data.stats import unigram_cross_entropy

    params = s.report["total_params"]
    return {
        "params": params,
        "trainable_params": s.program.trainable if s.program.trainable is not None else params,
        "unigram_loss": unigram_cross_entropy(s.prepared),
        "steps": tally.step,
        "tokens_seen": tally.step * s.tokens_per_step,
        "train_loss": float(np.mean(tally.losses[-3:])) if tally.losses else None,
        "eval_loss": tally.eval_loss,
        "tokens_per_s": tally.last.get("tokens_per_s"),
        "mfu": tally.last.get("mfu"),
        "compile_s": s.compile_s,
        "skipped_steps": tally.skipped,
        "peak_flops": tally.peak_flops,
        "goodput": tally.goodput,
    }
