"""The train state's checkpoints: async sharded saves, sealed in the background; resume from the newest sealed.

A training checkpoint is WORKDIR/checkpoints/STEP/ with three orbax items: `state` (step, params,
optimizer state: sharded arrays, no pickle), `data` (the loader's position) and `facts` (facts.py).
Once orbax has committed a save, the hosts hash it and process 0 writes the manifest and the seal
(custody.py, manifest.py) — in a background thread, while training goes on. Only sealed steps are
restored.

What each failure leaves, and what the next start does:
- killed while orbax writes a step: the step is uncommitted, and is removed;
- killed after the commit, before the seal: the step is complete, and is sealed then;
- the disk fills up: the run stops in one line naming the step and the newest complete one;
- retention deletes old steps only after a newer one is sealed, seal first, so a half-deleted step
  is never taken for a complete one.
"""

import base64
import dataclasses
import datetime
import re
import uuid

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import path as ocp_path

from heft.data import paths
from heft.train import custody, hosts, manifest, quiet
from heft.train.checkpoint.facts import (
    TOKENIZER,
    config_dict,
    data_facts,
    described,
    differences,
    model_differences,
    read_facts,
    saved_config,
    seal_facts,
    tokenizer_bytes,
    tokenizer_in,
)
from heft.train.checkpoint.load import verified
from heft.train.manifest import CheckpointError

ITEMS = ("state", "data", "facts")
_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class _Manager(ocp.CheckpointManager):
    """orbax's manager, kept off JAX's preemption sync point. train/preemption.py asks it after every
    step, counting the session's steps; orbax asks it too, at every save and when the save finishes
    (only to log and to time), with the run's step, which would move JAX's count of calls (one per
    process) off heft's: a notice would then set the sync point in the run's steps, a resumed
    session would reach it only that many steps late, and a preemption would go unheeded."""

    def reached_preemption(self, step: int) -> bool:
        return False


def committed(directory: epath.Path) -> bool:
    """Whether orbax finished writing the step at `directory` (renamed into place / commit file written)."""
    return directory.exists() and ocp_path.step.is_checkpoint_finalized(directory)


@dataclasses.dataclass(frozen=True)
class Resume:
    """The newest sealed step of a workdir and its manifest."""

    step: int
    directory: epath.Path
    manifest: dict

    @property
    def tokenizer_path(self) -> str | None:
        return tokenizer_in(self.directory, self.manifest["files"])


class Checkpointer:
    """Async sharded saves of the train state, sealed in the background; resume from the newest sealed.

    Creating one (every process, at start) makes the workdir consistent first: a committed but
    unsealed newest step is sealed, cut-short and superseded ones are removed, each said in a line.
    The state saved may be any tree of arrays (a fine-tune saves its trainable weights alone);
    `facts` are added to every manifest (a fine-tune's base).
    """

    def __init__(self, workdir: epath.PathLike, config, prepared=None, note=print, facts: dict | None = None):
        self.config, self.prepared, self.note = config, prepared, note
        self.facts = dict(facts or {})
        self.directory = paths.path(workdir) / "checkpoints"
        k = config.checkpoint
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        quiet.failed_save_echoes()  # a full disk is reported once, by `out_of_space`
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is heft's (`_retain`): orbax cannot tell sealed steps from unsealed
            enable_async_checkpointing=k.async_save, create=True, cleanup_tmp_directories=False,
        )
        if self.process_index == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._check_signing()
        self.manager = _Manager(self.directory, options=options, item_names=ITEMS)
        self.custodian = custody.Custodian(self.process_index, self.process_count, committed,
                                           after_seal=self._retain, signing_key=k.get("signing_key") or None)
        self.started: list[int] = []  # steps this run began to save
        self._tokenizer_of, self._tokenizer_b64 = object(), None  # the prepared data it was read from

    # The workdir's steps.

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _listing(self) -> tuple[list[int], list]:
        """(steps, tmp directories) under checkpoints/."""
        steps, tmp = [], []
        if not self.directory.exists():
            return steps, tmp
        for p in self.directory.iterdir():
            if p.name.isdigit():
                steps.append(int(p.name))
            elif _TMP.match(p.name):
                tmp.append(p)
        return sorted(steps), tmp

    def sealed_steps(self) -> list[int]:
        return [s for s in self._listing()[0] if manifest.is_sealed(self.step_dir(s))]

    def _remove(self, p: epath.Path) -> None:
        """Deletes a step directory, its seal first, so that a half-deleted step never looks complete."""
        (p / manifest.SEAL).unlink(missing_ok=True)
        p.rmtree(missing_ok=True)

    def _plan_recovery(self) -> dict:
        """What to do with the steps a stopped run left: decided by process 0 alone, from one listing."""
        steps, tmp = self._listing()
        sealed = [s for s in steps if manifest.is_sealed(self.step_dir(s))]
        newest = max(sealed, default=None)
        plan = {"seal": None, "remove": [], "tmp": [p.name for p in tmp], "newest": newest}
        for step in sorted((s for s in steps if s not in sealed), reverse=True):
            if plan["seal"] is None and (newest is None or step > newest) and self._sealable(step):
                plan["seal"] = step
            else:
                why = (f"older than sealed step {newest}; a deletion or a save was cut short"
                       if newest is not None and step < newest else "its save was cut short")
                plan["remove"].append([step, why])
        if plan["seal"] is not None:
            # A seal cut short leaves the hosts' reports (an error, say); the new seal starts without them,
            # removed before the plan reaches the other processes and they begin to report.
            (self.step_dir(plan["seal"]) / manifest.SCRATCH).rmtree(missing_ok=True)
        plan["run_id"] = self._run_id(plan["seal"] if plan["seal"] is not None else newest)
        return plan

    def _run_id(self, newest: int | None) -> str:
        """The run's id: the one its newest step was saved under, or a new one for a fresh run (or for
        one saved before run ids)."""
        if newest is not None:
            try:
                run_id = read_facts(self.step_dir(newest)).get("run_id")
            except (OSError, ValueError, AttributeError):
                run_id = None
            if isinstance(run_id, str) and run_id:
                return run_id
        return uuid.uuid4().hex

    def _recover(self) -> None:
        """Seals the newest committed-but-unsealed step, removes what cannot be trusted, applies retention.

        Process 0 decides and every process follows, so that all of them take part in the same seal.
        """
        plan = hosts.broadcast_json(self._plan_recovery() if self.process_index == 0 else None)
        newest = plan["newest"]
        if plan["seal"] is not None:
            step = plan["seal"]
            self._seal(step)
            self.note(f"heft: sealed step {step} in {self.directory}: its save had completed but the run "
                      "stopped before sealing it")
            newest = step
        # Every statement names the run and the step before it (manifest.py), kept across resumes.
        self.run_id, self.parent = plan["run_id"], newest
        if self.process_index == 0:
            for step, why in plan["remove"]:
                self._remove(self.step_dir(step))
                self.note(f"heft: removed unsealed step {step} from {self.directory} ({why})")
            for name in plan["tmp"]:
                (self.directory / name).rmtree(missing_ok=True)
                self.note(f"heft: removed the unfinished save of step {_TMP.match(name).group(1)} from {self.directory}")
            if newest is not None:
                self._retain(newest)
        hosts.barrier("checkpoints recovered")

    def _check_signing(self) -> None:
        """A run whose steps are signed goes on signing: an unsigned step among them would be refused on
        resume and by every reader (manifest.py), so that is said now rather than at the next start."""
        sealed = self.sealed_steps()
        if sealed and not self.config.checkpoint.get("signing_key") and manifest.is_signed(self.step_dir(sealed[-1])):
            raise CheckpointError(f"the steps in {self.directory} are signed (step {sealed[-1]}) but "
                                  "checkpoint.signing_key is not set; set it to the run's key, since an unsigned step "
                                  "among signed ones is refused, or train in a new --workdir")

    def _sealable(self, step: int) -> bool:
        """Whether `step`'s save committed whole (orbax's mark, and the facts sealing needs)."""
        if not committed(self.step_dir(step)):
            return False
        try:
            read_facts(self.step_dir(step))
            return True
        except (OSError, ValueError):
            return False

    def _seal(self, step: int) -> None:
        """Seals a committed step from its saved facts (every process calls it: the seal is collective)."""
        facts, extra = seal_facts(read_facts(self.step_dir(step)))
        custody.seal(self.step_dir(step), facts, self.process_index, self.process_count, extra_files=extra,
                     signing_key=self.config.checkpoint.get("signing_key") or None)

    def _retain(self, newest: int) -> None:
        """After `newest` is sealed: keep the `checkpoint.keep` newest sealed steps and every
        `keep_every`-th; remove older sealed steps and unsealed leftovers below `newest`."""
        k = self.config.checkpoint
        steps, _ = self._listing()
        sealed = [s for s in steps if s <= newest and manifest.is_sealed(self.step_dir(s))]
        keep = set(sealed[-max(k.keep, 1):]) | {newest}
        if k.keep_every:
            keep |= {s for s in sealed if s % k.keep_every == 0}
        for s in steps:
            if s < newest and s not in keep:
                self._remove(self.step_dir(s))

    def latest(self) -> Resume | None:
        """The newest sealed step with its manifest (seal checked), or None for a fresh workdir."""
        sealed = self.sealed_steps()
        if not sealed:
            return None
        directory = self.step_dir(sealed[-1])
        return Resume(sealed[-1], directory, verified(directory, verify=False, verify_key=self._verify_key()))

    def _verify_key(self) -> str | None:
        return self.config.checkpoint.get("verify_key") or None

    # Resuming under the same config and data.

    def check_config(self, resume: Resume) -> list[str]:
        """Raises CheckpointError if the model differs from the checkpoint's; returns notes on other changes."""
        saved = resume.manifest.get("config", {})
        model = model_differences(saved, self.config)
        if model:
            raise CheckpointError(
                f"the model differs from the checkpoint's (step {resume.step} in {self.directory}): {described(model)}; "
                "resume with the checkpoint's model config or train in a new --workdir")
        diffs = differences(saved_config(saved), config_dict(self.config))
        return [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs if not k.startswith("data.") and k != "name"]

    def check_data(self, resume: Resume, prepared) -> str | None:
        """Whether the prepared data is the checkpoint's. Raises CheckpointError if the corpus changed
        and `checkpoint.allow_data_change` is off; returns "retokenize" when the data must be
        prepared again with the checkpoint's own tokenizer, else None."""
        saved, now = resume.manifest.get("data") or {}, data_facts(prepared)
        corpus_changed = saved.get("corpus_sha256") and saved["corpus_sha256"] != now.get("corpus_sha256")
        if corpus_changed and not self.config.checkpoint.allow_data_change:
            what = (f"data.corpus={now.get('corpus')!r} holds other text than" if saved.get("corpus") == now.get("corpus")
                    else f"data.corpus={now.get('corpus')!r} is not data.corpus={saved.get('corpus')!r}, the corpus of")
            raise CheckpointError(
                f"the corpus differs: {what} step {resume.step} in {self.directory}; restore that corpus, or pass "
                "--config.checkpoint.allow_data_change=true to continue on the new text with the checkpoint's "
                "tokenizer")
        if saved.get("tokenizer_sha256") and saved["tokenizer_sha256"] != now.get("tokenizer_sha256"):
            if resume.tokenizer_path is None:
                raise CheckpointError(f"step {resume.step} in {self.directory} holds no {TOKENIZER} and this "
                                      "run's tokenizer differs from its own; restore the original corpus and cache")
            return "retokenize"
        return None

    def restore(self, resume: Resume, abstract_state: dict):
        """(state, loader state) of `resume`, read into `abstract_state`'s shardings.

        The step is trusted as every reader trusts one (`load.verified`: the seal, its statement and
        signature, and with `checkpoint.verify` every host's share of the files); a mismatch stops the
        run with CheckpointError naming the file.
        """
        verified(resume.directory, self.config.checkpoint.verify, self._verify_key())
        try:
            restored = self.manager.restore(resume.step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"step {resume.step} in {self.directory} does not fit this run's train state "
                                  f"({first}); resume with the config it was saved with") from None
        return restored.state, restored.data

    def restore_latest(self, abstract_state: dict):
        """(state, loader state) from the newest sealed checkpoint, or None if there is none."""
        resume = self.latest()
        return None if resume is None else self.restore(resume, abstract_state)

    # Saving.

    def _facts(self, step: int) -> dict:
        t = self.config.train
        facts = {
            "config": config_dict(self.config),
            "code_version": manifest.code_version(),
            "data": data_facts(self.prepared),
            "step": step,
            "tokens_seen": step * t.batch_size * t.seq_len,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "processes": self.process_count,
            "run_id": self.run_id,
            "parent_step": self.parent,
            **self.facts,
        }
        if self._tokenizer_of is not self.prepared:  # read once per data, not at every save
            tokenizer = tokenizer_bytes(self.prepared)
            self._tokenizer_b64 = base64.b64encode(tokenizer).decode() if tokenizer is not None else None
            self._tokenizer_of = self.prepared
        if self._tokenizer_b64 is not None:
            facts["tokenizer_base64"] = self._tokenizer_b64
        return facts

    def save(self, step: int, state: dict, loader_state: dict) -> None:
        """Starts an async save of `step` (returns once the arrays are copied off the devices)."""
        self.custodian.raise_error()
        if step in self.manager.all_steps():
            return
        facts = self._facts(step)
        self.started.append(step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(loader_state),
            facts=ocp.args.JsonSave(facts)), force=True)
        self.custodian.add(step, self.step_dir(step), *seal_facts(facts))
        self.parent = step
        if not self.config.checkpoint.async_save:
            self.wait()

    def wait(self) -> None:
        """Blocks until every save has committed (not necessarily sealed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for every save to commit and be sealed."""
        try:
            self.manager.wait_until_finished()
        except BaseException:
            for step in self.manager.all_steps():
                self.custodian.abandon(step)
            self.custodian.close()
            raise
        finally:
            self.manager.close()
        self.custodian.close()

    def abort(self) -> None:
        """After a failed save: stop waiting for it, remove what it left uncommitted, keep the rest.

        Steps that committed stay (the next start seals them if it can); sealed ones are untouched.
        """
        uncommitted = [s for s in self.started if not committed(self.step_dir(s))]
        for step in uncommitted:
            self.custodian.abandon(step)
        for close in (self.custodian.close, self.manager.close):
            try:
                close()
            except BaseException:  # the failure being reported is the first one
                pass
        if self.process_index == 0:
            for step in uncommitted:
                self._remove(self.step_dir(step))
            for p in self._listing()[1]:
                p.rmtree(missing_ok=True)

    def _seal_what_committed(self, steps: list[int]) -> None:
        """After `abort` freed the failed save's space: seal the newest of `steps` that committed (its seal
        may have lost the race for space to the next save). One process seals it here; with several, the
        seal is collective and they may not all be here, so it is left to the next start (`_recover`)."""
        done = [s for s in steps if self._sealable(s)]
        if not done or self.process_count > 1:
            return
        try:
            self._seal(max(done))
        except Exception:  # still no room, say: the report stays the full disk's; the next start tries again
            return
        self._retain(max(done))

    def newest_complete(self, if_none: str = "none yet") -> str:
        """The newest step a restart resumes from, for a message: sealed, or committed (the next start seals it)."""
        sealed = self.sealed_steps()
        waiting = [s for s in self._listing()[0] if (not sealed or s > sealed[-1]) and self._sealable(s)]
        if waiting:
            return f"step {max(waiting)} (saved; the next start seals it)"
        return f"step {sealed[-1]}" if sealed else if_none

    def out_of_space(self, error: BaseException, writer_path=None) -> CheckpointError:
        """The one-line error for a full disk, after `abort` (the newest sealed step stays intact)."""
        unsealed = [s for s in self.started if not manifest.is_sealed(self.step_dir(s))]
        # the oldest save whose data did not commit ran out (a later one only started after it, an
        # earlier one's seal only failed because it took the space)
        failed = min((s for s in unsealed if not committed(self.step_dir(s))), default=max(unsealed, default=None))
        self.abort()
        self._seal_what_committed(unsealed)
        newest = self.newest_complete(if_none="none: no save completed")
        what = f"saving step {failed}" if failed is not None else f"writing {writer_path or self.directory}"
        return CheckpointError(f"no space left on {paths.device_of(self.directory)} while {what}; "
                               f"the newest complete checkpoint is {newest}")
