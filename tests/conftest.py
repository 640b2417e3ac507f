"""Every test sees 8 fake CPU devices, so sharding runs as it would over 8 chips.

The session has one scratch folder, removed at its end: heft's cache ($HEFT_CACHE: tokenizers,
token stores, remat choices) and JAX's persistent compilation cache live there, set through the
environment so that every `heft` subprocess shares them. A program compiled once (the tiny train
step, eval step, initializer) is read back by the next process or test that compiles it, instead of
compiled again; and the suite leaves nothing in ~/.cache/heft. A test of a cache sets its own folder.

The `gcs` fixture gives a test its own `gs://` folder on a local GCS API server (tests/gcs.py);
the server starts once per session, on first use.
"""

import atexit
import os
import shutil
import sys
import tempfile
import uuid

import pytest

# LLVM's optimization level 0 for the CPU's code: XLA's own passes (fusion, layout, sharding) run as
# always; the tests' small programs compile ~20% faster and run fast enough.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# model.remat=auto would compile and time three policies for every new shape the tests train; they
# run save_matmuls instead (tests/test_remat.py measures for real, with this unset).
os.environ.setdefault("HEFT_REMAT_AUTO", "save_matmuls")

# pytest-xdist's workers inherit the controller's environment, so they share its scratch folder (and
# its compiles); only the process that made the folder removes it.
if "HEFT_TEST_SCRATCH" not in os.environ:
    os.environ["HEFT_TEST_SCRATCH"] = tempfile.mkdtemp(prefix="heft-tests-")
    atexit.register(shutil.rmtree, os.environ["HEFT_TEST_SCRATCH"], ignore_errors=True)
_SCRATCH = os.environ["HEFT_TEST_SCRATCH"]
os.environ.setdefault("HEFT_CACHE", os.path.join(_SCRATCH, "heft"))
# Read by JAX at import (here and in every subprocess); heft's train.compilation_cache="" defers to it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_SCRATCH, "compile"))
# Every compile is kept, not only those over JAX's default 1 s: on 2 cores the tests' many small
# programs are each a fraction of a second to compile, and together most of a subprocess's compile time.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def gcs_server():
    import gcs

    server = gcs.Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # before any client in this process reads them
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def gcs(gcs_server):
    """A fresh `gs://BUCKET/PREFIX` for one test (as a string); subprocesses inherit the server's env."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    return f"gs://{gcs_server.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def tiny_run():
    """(workdir, the finished `heft train`) of tests/test_train_loop.py's tiny model trained 10 steps on
    its small corpus, evaluated and checkpointed at steps 5 and 10: trained once, shared by every test
    that needs a trained run, on every xdist worker (the first to ask trains it in the session's
    scratch folder while the others wait on a lock). Read it, never change it: a test that damages,
    extends or resumes a run copies it first (shutil.copytree into its tmp_path)."""
    import fcntl
    import json
    import pathlib
    import subprocess

    from test_train_loop import _heft, _overrides

    root = pathlib.Path(_SCRATCH) / "tiny_run"
    root.mkdir(exist_ok=True)
    workdir, done = root / "run", root / "finished.json"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            r = _heft(["train", f"--workdir={workdir}", *_overrides(root, steps=10)])
            assert r.returncode == 0, r.stderr[-3000:]
            done.write_text(json.dumps({"args": r.args, "stdout": r.stdout, "stderr": r.stderr}))
    finished = json.loads(done.read_text())
    return str(workdir), subprocess.CompletedProcess(finished["args"], 0, finished["stdout"], finished["stderr"])
