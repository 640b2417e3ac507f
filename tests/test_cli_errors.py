"""Every mistake a user can make on the `heft` command line prints one line, `heft VERB: problem;
fix`, and exits non-zero: no traceback, no warnings around it."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (arguments, what the one line says). Each fails before any slow work (and `heft train` imports
# nothing heavy before its flags are checked, so config mistakes are tested through it); {tmp} is a
# fresh folder.
MISTAKES = {
    "missing config file": (["train", "--config=configs/nope.py"], "--config=configs/nope.py does not exist"),
    "config syntax error": (["train", "--config={tmp}/bad.py"], "bad.py is not valid Python (invalid syntax, line 1)"),
    "checkpoint_every=0": (["train", "--config.train.checkpoint_every=0"], "train.checkpoint_every=0 must be"),
    "batch_size=0": (["train", "--config.train.batch_size=0"], "train.batch_size=0 must be an integer >= 1"),
    "seq_len=-4": (["train", "--config.train.seq_len=-4"], "train.seq_len=-4 must be an integer >= 1"),
    "warmup not below steps": (["train", "--config=configs/llama2_7b.py", "--config.train.warmup_steps=2000"],
                               "train.warmup_steps=2000 is not below train.steps=1000"),
    "eval mesh of two sizes": (["eval", "--checkpoint={tmp}", "--mesh=1,2"], "--mesh=1,2 is not three sizes"),
    "eval mesh of letters": (["eval", "--checkpoint={tmp}", "--mesh=a,b,c"], "--mesh=a,b,c is not three sizes"),
    "prompt not UTF-8": (["generate", "--checkpoint={tmp}", b"--prompt=\xff"], "#1 is not valid UTF-8 (byte 0xff"),
    "export --params_only": (["export", "--params_only", "--checkpoint={tmp}", "--out={tmp}/out"],
                             "Unknown command line flag 'params_only'; heft export takes --checkpoint, --out"),
}


def heft(args, cwd, env=None):
    """Runs `heft` with arguments (str or bytes); {tmp} in a str argument becomes `cwd`."""
    args = [a.replace("{tmp}", str(cwd)) if isinstance(a, str) else a for a in args]
    return subprocess.run(["heft", *args], capture_output=True, cwd=cwd, env=env, timeout=300)


def assert_one_line(r, verb: str, says: str) -> None:
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode != 0, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr[-3000:]
    assert stderr.startswith(f"heft {verb}: ") and says in stderr, stderr


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistake_prints_one_line_and_exits_non_zero(mistake, tmp_path):
    args, says = MISTAKES[mistake]
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    (tmp_path / "configs").symlink_to(os.path.join(ROOT, "configs"))  # --config=configs/... as in the README
    assert_one_line(heft(args, tmp_path), args[0], says)


def test_eval_batch_that_does_not_split_over_the_mesh_is_one_line_with_libtpu_installed(tmp_path):
    """Also the libtpu check: JAX_PLATFORMS unset, and libtpu free to load even while another
    process holds its lock, as on a fresh machine; its five warnings must not appear."""
    import jax
    import numpy as np

    from heft.configs import tiny
    from heft.model.build import init_params
    from heft.train import checkpoint

    c = tiny.get_config()
    c.model.update(depth=1, vocab=256, width=32, heads=2, kv_heads=1, mlp_width=64)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: init_params(c.model, 0)))
    checkpoint.save_params(str(tmp_path / "ckpt"), c, zeros)  # any values do: eval stops before reading them
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    r = heft(["eval", f"--checkpoint={tmp_path / 'ckpt'}", "--batch_size=3"], tmp_path, env)
    assert_one_line(r, "eval", "--batch_size=3 is not divisible by the 8 devices")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small Llama folder as Hugging Face saves it (written by heft's exporter; values are zeros)."""
    import jax
    import numpy as np

    from heft.configs import base
    from heft.convert.hf import export_hf
    from heft.model.build import init_params

    c = base.get_config()
    c.model.update(vocab=64, width=32, depth=1, heads=2, kv_heads=1, mlp_width=64, max_len=64)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: init_params(c.model, 0)))
    folder = tmp_path_factory.mktemp("hf") / "llama"
    export_hf(c, zeros, str(folder))
    return folder


@pytest.mark.parametrize("mistake", ["truncated safetensors", "ten million layers", "import --out is a file",
                                     "export --out is a file"])
def test_convert_mistake_prints_one_line_before_the_slow_part(mistake, hf_folder, tmp_path):
    import json
    import shutil

    (tmp_path / "file").write_text("not a folder")
    if mistake == "truncated safetensors":  # a download cut short
        shutil.copytree(hf_folder, tmp_path / "cut")
        weights = tmp_path / "cut" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        args, says = [f"--from_hf={tmp_path / 'cut'}", f"--out={tmp_path / 'new'}"], "is truncated or damaged"
    elif mistake == "ten million layers":  # before: a tensor table of ~5 GB, built over minutes
        shutil.copytree(hf_folder, tmp_path / "deep")
        config = json.loads((tmp_path / "deep" / "config.json").read_text())
        (tmp_path / "deep" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**7}))
        args, says = [f"--from_hf={tmp_path / 'deep'}", f"--out={tmp_path / 'new'}"], "num_hidden_layers=10000000"
    elif mistake == "import --out is a file":
        args, says = [f"--from_hf={hf_folder}", f"--out={tmp_path / 'file'}"], "is an existing file"
    else:
        args, says = [f"--to_hf={tmp_path / 'nowhere'}", f"--out={tmp_path / 'file'}"], "is an existing file"
    assert_one_line(heft(["convert", *args], tmp_path), "convert", says)
    assert not (tmp_path / "new").exists()


def test_a_reader_gone_early_ends_heft_quietly_and_sigpipe_stays_ignored(tmp_path):
    """`heft ... | head`: exit 141 without a BrokenPipeError trace; and SIGPIPE keeps Python's disposition
    (ignored), since its default kills a run on any library's write to a closed socket (it did: a full
    disk's save, shutting orbax down, ended `heft train` with 141 and no message)."""
    read, write = os.pipe()
    os.close(read)
    r = subprocess.run(["heft", "help"], stdout=write, stderr=subprocess.PIPE, timeout=300)
    os.close(write)
    assert r.returncode == 141 and r.stderr == b"", r.stderr.decode()[-2000:]
    probe = ("import signal, sys\nfrom heft.launch import cli\ntry:\n    cli.main(['heft', 'help'])\n"
             "except SystemExit:\n    pass\nprint(signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN)")
    out = subprocess.run([os.sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out
