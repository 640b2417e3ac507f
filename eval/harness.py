"""A heft checkpoint as an lm-evaluation-harness model (what `heft eval --tasks=...` runs).

`HeftLM` implements lm-eval's `LM` interface through its `TemplateLM` (which splits a context and
its continuation into tokens the way Hugging Face models are scored):

- `loglikelihood`: the log-probability of each continuation after its context, and whether greedy
  decoding would produce it;
- `loglikelihood_rolling`: a whole text's log-probability, in windows of `max_length` tokens each
  predicting new tokens after one token of context (lm-eval's own windowing), which is what heft's
  held-out loss does with rows of `train.seq_len` (eval/heldout.py);
- `generate_until`: greedy or sampled continuations from eval/generate.py's KV-cache loop, cut at
  the first stop string.

Text is tokenized as heft trains: every context starts with the document-start token
(`data.document_start`: EOS in heft's store, BOS for imported Llama tokenizers). Requests are
scored in batches of `batch_size` rows, longest first, padded to a power-of-two length, so a few
shapes compile once each; rows are laid out over the mesh's batch axes, so any mesh (and several
processes, each holding the same requests) works.

Tasks come from lm-eval's registry (hub tasks: hellaswag, arc_easy, ... need the internet) and from
`eval/tasks/` (heft's own, offline: heft_shakespeare_cloze). Results are written as JSON beside
the checkpoint (`results_path`).
"""

import collections
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from heft.data import paths
from heft.eval import generate as generation
from heft.model.build import bind as bind_float
from heft.model.checks import ConfigError
from heft.train import checks, sharding, storage

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
MIN_LENGTH = 16  # the shortest padded row length


def _padded_length(n: int, most: int) -> int:
    return min(most, max(MIN_LENGTH, 1 << (n - 1).bit_length()))


def _score(model, inputs, targets, weights):
    """Per row: (sum of log p(target) where weight is 1, whether every such target is the argmax).

    inputs, targets, weights: [batch, length]. Returns ([batch] float32, [batch] bool).
    """
    logits = model(inputs)  # [batch, length, vocab] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(picked * weights, axis=-1), jnp.all(greedy | (weights == 0), axis=-1)


class HeftLM(TemplateLM):
    """lm-eval's model interface over heft parameters already placed on `mesh`.

    bind: `(model config, params) -> model` (default: the float decoder; heft.quantize's for
      quantized parameters). batch_size: rows per scoring call (rounded up to fill the mesh's batch
      axes). max_length: the longest row (default: model.max_len).
    """

    def __init__(self, config, params, tokenizer, mesh, bind=None, batch_size: int = 16,
                 max_length: int | None = None, **kwargs):
        super().__init__()
        self.config, self.params, self.tok, self.mesh = config, params, tokenizer, mesh
        self.m = config.model
        self.bind = bind or bind_float
        self.max_length = int(max_length or self.m.max_len)
        rows = checks.batch_devices(config, mesh.shape)
        self.batch_size = -(-int(batch_size) // rows) * rows
        start = config.data.get("document_start", "eos")
        self.start_id = tokenizer.bos_id if start == "bos" else tokenizer.eos_id
        if self.start_id is None or self.start_id < 0:
            raise ConfigError(f"the checkpoint's tokenizer has no {start.upper()} token to start texts with "
                              f"(data.document_start={start!r}); evaluate a checkpoint whose tokenizer has one")
        self._batch_sharding = sharding.batch_sharding(config, mesh)
        self._scorer = jax.jit(lambda p, i, t, w: _score(self.bind(self.m, p), i, t, w),
                               out_shardings=sharding.replicated(mesh))

    # TemplateLM's tokenization hooks.

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.start_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's ids, led by the document-start token unless add_special_tokens is False."""
        return ([self.start_id] if add_special_tokens is not False else []) + self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode([t for t in tokens if 0 <= t < self.tok.vocab_size])

    # Scoring.

    def _place(self, x: np.ndarray):
        """A [batch, length] host array (the same on every process) laid out over the mesh."""
        return jax.make_array_from_callback(x.shape, self._batch_sharding, lambda index: x[index])

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) for each (context ids, continuation ids) pair.

        A row longer than max_length + 1 tokens loses its oldest context tokens.
        """
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list = [None] * len(pairs)
        with sharding.activated(self.mesh, self.config):
            for start in range(0, len(order), self.batch_size):
                chunk = order[start: start + self.batch_size]
                rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in chunk]
                length = _padded_length(max(len(r) - 1 for r in rows), self.max_length)
                inputs = np.zeros((self.batch_size, length), np.int32)
                targets = np.zeros_like(inputs)
                weights = np.zeros((self.batch_size, length), np.float32)
                for row, (i, tokens) in enumerate(zip(chunk, rows)):
                    n = len(tokens) - 1
                    inputs[row, :n], targets[row, :n] = tokens[:-1], tokens[1:]
                    weights[row, n - len(pairs[i][1]): n] = 1.0
                sums, greedy = self._scorer(self.params, *map(self._place, (inputs, targets, weights)))
                sums, greedy = np.asarray(sums.addressable_data(0)), np.asarray(greedy.addressable_data(0))
                for row, i in enumerate(chunk):
                    out[i] = (float(sums[row]), bool(greedy[row]))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self.score_tokens([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok.encode(text), prefix_token=self.start_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self.score_tokens(windows)):
            totals[i] += logp
        return totals

    # Generation.

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = collections.defaultdict(list)
        for i, request in enumerate(requests):
            context, kwargs = request.args
            groups[json.dumps(kwargs, sort_keys=True, default=str)].append((i, context))
        out: list = [None] * len(requests)
        model = self.bind(self.m, self.params)
        with sharding.activated(self.mesh, self.config):
            for key, items in groups.items():
                kwargs = json.loads(key)
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(kwargs.get("max_gen_toks", 256))
                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                for start in range(0, len(items), self.batch_size):
                    chunk = items[start: start + self.batch_size]
                    keep = max(1, self.max_length - new)
                    prompts = [self.tok_encode(context)[-keep:] for _, context in chunk]
                    rows = generation.generate(model, prompts, new, temperature=temperature,
                                               eos_id=self.tok.eos_id if self.tok.eos_id >= 0 else None)
                    for (i, _), tokens in zip(chunk, rows):
                        text = self.tok_decode([t for t in tokens if t != self.tok.eos_id])
                        cuts = [text.index(s) for s in until if s and s in text]
                        out[i] = text[: min(cuts)] if cuts else text
        return out



# Running tasks, and where their results go.


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager: heft's own tasks only when they are all that is asked for (no
    network, and indexing lm-eval's thousands of task files takes seconds), else those and
    lm-eval's. Raises ConfigError naming an unknown task."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=TASKS_DIR)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks names {', '.join(unknown)}, which lm-eval does not know; heft's own tasks are "
                          f"{', '.join(own_tasks())}, and `lm-eval ls tasks` lists the hub's")
    return manager


def own_tasks() -> list[str]:
    return sorted(f[:-len(".yaml")] for f in os.listdir(TASKS_DIR) if f.endswith(".yaml"))


def evaluate(lm: HeftLM, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """lm-eval's results for `tasks` (its `results`, `n-samples` and `configs`, as simple_evaluate
    returns them; per-sample logs are not kept)."""
    import logging

    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on custom datasets and seeds are not ours
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(tasks), limit=limit,
                                   num_fewshot=num_fewshot, log_samples=False, verbosity="ERROR")


def summary(results: dict) -> dict:
    """{task: {metric: value, metric_stderr: value, "samples": n}} from lm-eval's results."""
    out = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):  # "metric,filter" keys hold results
                continue
            name, _, _ = key.partition(",")  # "acc,none" -> "acc"
            row[name] = value
        row["samples"] = results.get("n-samples", {}).get(task, {}).get("effective")
        out[task] = row
    return out


def table(summary_: dict) -> str:
    """One line per task and metric: value ± stderr, and the number of samples."""
    lines = [f"{'task':<28} {'metric':<10} {'value':>8} {'stderr':>8} {'n':>6}"]
    for task, row in summary_.items():
        for name, value in row.items():
            if name.endswith("_stderr") or name == "samples":
                continue
            err = row.get(f"{name}_stderr")
            err = f"{err:8.4f}" if isinstance(err, (int, float)) else f"{'':>8}"
            lines.append(f"{task:<28} {name:<10} {value:8.4f} {err} {row.get('samples') or '':>6}")
    return "\n".join(lines)


def results_path(checkpoint_dir: epath.PathLike) -> epath.Path:
    """Where a checkpoint's results go: beside it, as NAME.eval.json; for a step of a training
    workdir (WORKDIR/checkpoints/STEP), WORKDIR/eval/STEP.json, outside the folder that orbax and
    retention manage. Local or gs://."""
    p = paths.path(checkpoint_dir)
    if p.parent.name == "checkpoints" and p.name.isdigit():
        return p.parent.parent / "eval" / f"{p.name}.json"
    return p.parent / f"{p.name}.eval.json"


def write_results(checkpoint_dir: epath.PathLike, summary_: dict, **facts) -> epath.Path:
    """Adds these tasks' results to the checkpoint's results file (earlier tasks are kept); returns its path."""
    checkpoint_dir = paths.path(checkpoint_dir)
    p = results_path(checkpoint_dir)
    previous = storage.read_json(p) if p.exists() else {}
    tasks = {**previous.get("tasks", {}), **summary_}
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    p.parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(p, {**previous, "checkpoint": str(checkpoint_dir), "tasks": tasks, "updated_at": when, **facts})
    return p
