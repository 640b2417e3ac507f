"""One tokenizer and one token store for all the processes of a run.

A run's processes (hosts) must agree on every token id. Each could call `prepare` itself, but a
host whose cache is its own (its own HOME, say) would train its own tokenizer; heft's training is
deterministic (tokenizer.py), yet nothing should rest on two hosts producing the same bytes. So
`prepare_for_processes` does it once:

1. Process 0 prepares (trains the tokenizer if needed, writes the store) and sends every process
   its tokenizer's bytes and where its store is (`broadcast_one_to_all`, size first).
2. Every other process uses that store if its cache is process 0's (the same `data.cache_dir`,
   e.g. gs:// or a shared filesystem, where the store is then already complete), and otherwise
   tokenizes the corpus into its own cache with exactly process 0's tokenizer (never its own).
3. Every process checks that its tokenizer's sha256 is process 0's, and all of them learn
   whether any failed (`process_allgather`), so that a mistake on one host stops every host with
   the same one-line DataError instead of leaving the others waiting in a collective.
"""

import hashlib
import json

import numpy as np

from heft.data import pairs, seq2seq, spans
from heft.data import prepare as data_prepare
from heft.data.errors import DataError

_MESSAGE_BYTES = 1024  # of an error message sent to every process


def prepare_for_processes(config, tokenizer_path: str | None = None, *, progress: bool = True,
                          stop=lambda: False) -> "data_prepare.Prepared | pairs.Pairs":
    """`prepare(config)` on every process of a run, all with process 0's tokenizer; see the module docstring.
    Prompt/completion data (`data.format`) is packed in memory by each process instead (pairs.py).

    Args:
      config: the run's config (its `data` and `model.vocab`).
      tokenizer_path: a checkpoint's tokenizer to use instead of training one (read by process 0).
      stop: asked while one process tokenizes (data_prepare.prepare); with several, JAX owns SIGTERM
        and the processes only agree to stop at a training step, so it is not asked.
    Raises DataError on every process if any process failed, naming the process.
    """
    import jax
    from jax.experimental import multihost_utils

    form = config.data.get("format", "text")
    if form not in pairs.FORMATS:
        raise DataError(f"data.format={form!r} is unknown; choose one of {', '.join(pairs.FORMATS)}")
    if form == "prompt_completion":  # every process packs the same examples with the same given tokenizer
        return (seq2seq.prepare if seq2seq.is_encoder_decoder(config) else pairs.prepare)(config, tokenizer_path)
    if jax.process_count() == 1:  # (an encoder-decoder reads text through span corruption: spans.py)
        return spans.for_config(config, data_prepare.prepare(config, progress=progress, tokenizer_path=tokenizer_path,
                                                             stop=stop))
    me = jax.process_index()

    # 1. Process 0 prepares; the others wait in the broadcast for its tokenizer and store.
    header, tok_bytes, prepared, failure = {}, b"", None, None
    if me == 0:
        try:
            prepared = data_prepare.prepare(config, progress=progress, tokenizer_path=tokenizer_path)
            tok_bytes = prepared.tokenizer_bytes()
            header = {"store_path": prepared.store_path, "tokenizer_path": prepared.tokenizer_path,
                      "cache": str(data_prepare.cache_dir(config.data.cache_dir)), "sha256": _sha256(tok_bytes)}
        except Exception as e:  # told to the others before it is raised here, so that none waits forever
            header, failure = {"error": _message(e)}, e
    header, tok_bytes = _from_process_0(header, tok_bytes, multihost_utils)
    if failure is not None and not isinstance(failure, DataError):
        raise failure  # not a user's mistake: its traceback is what helps
    if "error" in header:
        raise DataError(f"process 0: {header['error']}")

    # 2. The others: process 0's store where the cache is shared, else their own with its tokenizer.
    error = ""
    if me != 0:
        try:
            prepared = _prepare_with(config, header, tok_bytes, progress)
            error = check_tokenizer(_sha256(prepared.tokenizer_bytes()), header["sha256"], me, prepared.tokenizer_path)
        except Exception as e:
            error, failure = _message(e), e

    # 3. Everyone learns whether anyone failed, and stops with the first failure's message.
    errors = _gather_errors(error, multihost_utils)
    if failure is not None and not isinstance(failure, DataError):
        raise failure  # not a user's mistake: its traceback is what helps
    if errors:
        raise DataError(errors[0])
    return spans.for_config(config, prepared)


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"


def check_tokenizer(mine: str, process_0s: str, process_index: int, path: str) -> str:
    """"" if the two sha256 agree, else the one-line message that says so and how to fix it."""
    if mine == process_0s:
        return ""
    return (
        f"process {process_index}'s tokenizer {path} has sha256 {mine}, process 0's has {process_0s}: "
        f"the token ids would differ; delete that file, or set data.cache_dir to one path every process shares (e.g. gs://...)"
    )


def _prepare_with(config, header: dict, tok_bytes: bytes, progress: bool) -> data_prepare.Prepared:
    if str(data_prepare.cache_dir(config.data.cache_dir)) == header["cache"]:
        found = data_prepare.existing(config, header["store_path"], header["tokenizer_path"])
        if found is not None:
            return found
    return data_prepare.prepare(config, progress=progress, tokenizer_bytes=tok_bytes)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _from_process_0(header: dict, payload: bytes, multihost_utils) -> tuple[dict, bytes]:
    """Process 0's (header, payload) on every process: the size first, then the bytes, as uint8."""
    mine = json.dumps(header).encode() + b"\n" + payload
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(mine))))
    buf = np.zeros(size, np.uint8)
    if len(mine) == size:  # process 0; the others' contents are ignored
        buf[:] = np.frombuffer(mine, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()
    head, _, payload = got.partition(b"\n")  # json.dumps never writes a raw newline
    return json.loads(head), payload


def _gather_errors(error: str, multihost_utils) -> list[str]:
    """Every process's error message (empty ones dropped), in process order."""
    buf = np.zeros(_MESSAGE_BYTES, np.uint8)
    raw = error.encode()[:_MESSAGE_BYTES]
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(-1, _MESSAGE_BYTES)
    out = []
    for i, row in enumerate(gathered):
        text = row.tobytes().rstrip(b"\0").decode(errors="replace")
        if text:
            out.append(text if text.startswith("process ") else f"process {i}: {text}")
    return out
