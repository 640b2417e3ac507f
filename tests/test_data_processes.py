"""Several processes: every one uses process 0's tokenizer, whether or not their caches are shared."""

import hashlib
import json
import textwrap

import workers
from test_data_prepare import write_corpus

from heft.data import processes

_WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + os.environ.get("XLA_FLAGS", "")
    import jax
    port, pid, corpus, shared = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    from heft.configs import base
    from heft.data import processes, tokenizer
    from heft.data.errors import DataError

    trained = []
    train = tokenizer.train
    tokenizer.train = lambda *a, **k: trained.append(1) or train(*a, **k)

    def config(cache_dir="", corpus=corpus):
        c = base.get_config()
        c.model.vocab, c.data.corpus, c.data.cache_dir = 400, corpus, cache_dir
        c.data.workers, c.data.heldout_fraction = 1, 0.1
        return c

    def facts(p):
        sha = lambda b: hashlib.sha256(b).hexdigest()
        return {"store": p.store_path, "tokenizer": sha(p.tokenizer_bytes()), "tokens": sha(p.open().tokens().tobytes()),
                "trained": len(trained)}

    out = {"own": facts(processes.prepare_for_processes(config(), progress=False)),
           "shared": facts(processes.prepare_for_processes(config(shared), progress=False))}
    for bad in (0, 1):  # one process's corpus is missing: every process stops with its message
        try:
            processes.prepare_for_processes(config("", corpus + "/missing" if int(pid) == bad else corpus), progress=False)
        except DataError as e:
            out[f"error{bad}"] = str(e)
    print("OUT", json.dumps(out), flush=True)
    """
)


def test_two_processes_with_their_own_caches_get_process_0s_tokenizer_and_the_same_ids(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    for i in range(2):  # data.cache_dir unset: each process caches under its own HOME
        (tmp_path / f"home{i}").mkdir()
    outs = workers.run(tmp_path, _WORKER, args=(corpus, tmp_path / "shared"),
                       env=lambda i: {"HOME": str(tmp_path / f"home{i}"), "HEFT_CACHE": None})
    zero, one = (json.loads(next(x for x in o.splitlines() if x.startswith("OUT "))[4:]) for o in outs)

    own0, own1 = zero["own"], one["own"]
    assert own0["store"].startswith(str(tmp_path / "home0")) and own1["store"].startswith(str(tmp_path / "home1"))
    assert own1["tokenizer"] == own0["tokenizer"] and own1["tokens"] == own0["tokens"]
    assert own0["trained"] == 1 and own1["trained"] == 0  # process 1 tokenized with process 0's tokenizer

    shared0, shared1 = zero["shared"], one["shared"]
    assert shared1["store"] == shared0["store"]  # a shared cache: process 1 read the store process 0 wrote
    assert shared1["tokens"] == own0["tokens"] and shared1["trained"] == 0

    for out in (zero, one):
        assert out["error0"].startswith("process 0: data.corpus=") and "missing' does not exist" in out["error0"]
        assert out["error1"].startswith("process 1: data.corpus=") and "missing' does not exist" in out["error1"]


def test_a_tokenizer_that_differs_from_process_0s_is_one_line_naming_both_hashes():
    a, b = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    assert processes.check_tokenizer(a, a, 1, "/c/t.model") == ""
    message = processes.check_tokenizer(a, b, 1, "/c/t.model")
    assert "\n" not in message and a[:16] in message and b[:16] in message
    assert "process 1" in message and "data.cache_dir" in message
