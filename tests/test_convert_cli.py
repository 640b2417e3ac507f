"""`heft convert` end to end: a Hugging Face Llama folder becomes a heft checkpoint that
`load_params` and the generator read with transformers' numbers, and goes back unchanged."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_convert import _hf_greedy, _hf_logits, _llama_hf_config, _save_hf, _tokens, sentencepiece_model  # noqa: F401

from heft.convert.checkpoints import run_export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _heft(*args):
    command = [sys.executable, "-c", "from heft.launch.cli import main; main()", "convert", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, sentencepiece_model):  # noqa: F811  (the fixture imported above)
    """(transformers model, its folder, the heft checkpoint `heft convert --from_hf` wrote)."""
    root = tmp_path_factory.mktemp("cli")
    original = str(root / "original")
    model = _save_hf(transformers.LlamaForCausalLM, _llama_hf_config(), original)
    shutil.copyfile(sentencepiece_model, os.path.join(original, "tokenizer.model"))
    checkpoint = str(root / "checkpoint")
    done = _heft(f"--from_hf={original}", f"--out={checkpoint}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote llama_from_hf checkpoint" in done.stdout
    return model, original, checkpoint


def test_imported_checkpoint_loads_with_transformers_logits_and_greedy_continuation(imported):
    import jax.numpy as jnp

    from heft.data import tokenizer as tokenizers
    from heft.eval.generate import generate
    from heft.model.build import bind
    from heft.train import checkpoint, sharding

    model, original, directory = imported
    config, params, tokenizer_path = checkpoint.load_params(directory)
    with open(tokenizer_path, "rb") as a, open(os.path.join(original, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()
    mesh = params["embed"].sharding.mesh  # load_params placed them on it
    tokens = _tokens(batch=8)  # the batch splits over the 8 devices of the serving mesh
    with sharding.activated(mesh, config):
        heft_model = bind(config.model, params)
        logits = np.asarray(heft_model(jnp.asarray(tokens)))
        tok = tokenizers.load(tokenizer_path)
        # transformers' Llama tokenizer leads a prompt with BOS.
        prompt = [tok.bos_id] + tok.encode("def rope(x, positions, m):")
        new = generate(heft_model, [prompt], 20)
    np.testing.assert_allclose(logits, _hf_logits(model, tokens), atol=ATOL, rtol=0)
    assert new[0] == _hf_greedy(model, np.array([prompt]))[0, len(prompt):].tolist()


def test_exported_checkpoint_holds_the_original_tensors_bit_for_bit(imported, tmp_path):
    _, original, directory = imported
    files = run_export(directory, str(tmp_path / "hf"))
    assert "tokenizer.model" in files
    before = load_file(os.path.join(original, "model.safetensors"))
    after = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and before[name].tobytes() == after[name].tobytes(), name


def test_pickled_weights_stop_the_command_with_one_line(tmp_path, imported):
    shutil.copyfile(os.path.join(imported[1], "config.json"), tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    done = _heft(f"--from_hf={tmp_path}", f"--out={tmp_path / 'out'}")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("heft convert:") and "convert them to safetensors first" in last, done.stderr[-2000:]


def test_heft_generate_on_an_imported_llama_prints_transformers_greedy_continuation(imported):
    from heft.data import tokenizer as tokenizers

    model, original, directory = imported
    text = "def rope(x, positions, m):"
    tok = tokenizers.load(os.path.join(original, "tokenizer.model"))
    prompt = [tok.bos_id] + tok.encode(text)  # as transformers' Llama tokenizer encodes it
    ids = _hf_greedy(model, np.array([prompt]))[0, len(prompt):].tolist()
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    expected = text + tok.decode([t for t in ids if t < tok.vocab_size])
    command = [sys.executable, "-c", "from heft.launch.cli import main; main()", "generate",
               f"--checkpoint={directory}", f"--prompt={text}", "--temperature=0", "--max_new_tokens=20"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n" + "-" * 40)[0] == expected


def test_tiny_model_trained_a_few_steps_exports_to_transformers_with_same_logits_and_greedy_ids(tmp_path):
    import jax
    from test_convert import _heft_greedy, _heft_logits

    from heft.configs import tiny
    from heft.train import checkpoint, compiled, sharding
    from heft.train import state as train_state

    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    config.train.update(batch_size=4, seq_len=32, warmup_steps=1)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    rng = np.random.default_rng(0)
    state = train_state.init(config, mesh)
    with sharding.activated(mesh, config):
        step = compiled.train_step(config, mesh)
        for _ in range(3):
            seq = rng.integers(0, config.model.vocab, (4, 33)).astype(np.int32)
            batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "segment_ids": np.ones((4, 32), np.int32),
                     "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1)), "weights": np.ones((4, 32), np.float32)}
            state, metrics = step(state, batch)
    assert int(state["step"]) == 3
    params = jax.device_get(state["params"])
    checkpoint.save_params(str(tmp_path / "trained"), config, params)
    run_export(str(tmp_path / "trained"), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = rng.integers(0, config.model.vocab, (2, 24))
    np.testing.assert_allclose(_hf_logits(model, tokens), _heft_logits(config, params, tokens), atol=ATOL, rtol=0)
    prompt = rng.integers(0, config.model.vocab, (2, 8))
    np.testing.assert_array_equal(_hf_greedy(model, prompt), _heft_greedy(config, params, prompt))
