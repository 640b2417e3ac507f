"""`heft convert` with folders in a bucket (gs://, on the local GCS server of tests/gcs.py): the
files written there are the ones written to a disk, and the parameters come back bit for bit."""

import os
import tempfile

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from heft.configs import base
from heft.convert.checkpoints import run_export, run_import
from heft.convert.hf import export_hf, import_hf
from heft.model.build import init_params

SHARD = 24_000  # bytes: the small model below spans several shards and an index


def _model():
    """A small Llama-shaped config with random parameters (as a nested dict of numpy arrays)."""
    c = base.get_config()
    c.model.update(vocab=64, width=32, depth=2, heads=4, kv_heads=2, mlp_width=64, max_len=64)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(c.model, 0))
    return c, jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece as spm

    text = [f"the {a} {b} walks over the {c} hill" for a in "red old lazy quick".split()
            for b in "dog cat fox".split() for c in "far green low".split()]
    prefix = str(tmp_path_factory.mktemp("sp") / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 10), model_prefix=prefix, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    return prefix + ".model"


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in epath.Path(folder).iterdir()}


def _leftovers() -> set[str]:
    return {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("heft-convert-")}


def test_export_to_a_bucket_writes_the_files_it_writes_to_disk(gcs, tmp_path, sentencepiece_model):
    c, params = _model()
    local = export_hf(c, params, str(tmp_path / "hf"), SHARD, tokenizer_path=sentencepiece_model)
    remote = export_hf(c, params, f"{gcs}/hf", SHARD, tokenizer_path=sentencepiece_model)
    assert local == remote and "model.safetensors.index.json" in remote and "tokenizer.model" in remote
    assert _files(f"{gcs}/hf") == _files(tmp_path / "hf")


def test_import_from_a_bucket_gives_the_parameters_back_bit_for_bit_and_leaves_no_temporary_file(
        gcs, tmp_path, sentencepiece_model):
    c, params = _model()
    export_hf(c, params, str(tmp_path / "hf"), SHARD, tokenizer_path=sentencepiece_model)
    for name, data in _files(tmp_path / "hf").items():
        epath.Path(f"{gcs}/hf/{name}").write_bytes(data)
    before = _leftovers()
    _, imported = import_hf(f"{gcs}/hf")
    assert _leftovers() == before
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(nnx.to_pure_dict(imported)))


def test_convert_from_a_bucket_to_a_bucket_and_back_keeps_every_file(gcs, tmp_path, sentencepiece_model):
    """--from_hf=gs:// --out=gs://, then --to_hf=gs:// --out=gs://: the Hugging Face files come back."""
    c, params = _model()
    export_hf(c, params, f"{gcs}/hf", SHARD, tokenizer_path=sentencepiece_model)
    run_import(f"{gcs}/hf", f"{gcs}/heft")
    assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")  # nothing went to a local "gs:" folder
    run_export(f"{gcs}/heft", f"{gcs}/back", max_shard_bytes=SHARD)
    assert _files(f"{gcs}/back") == _files(f"{gcs}/hf")


def test_weight_map_leading_out_of_a_bucket_folder_is_refused(gcs, tmp_path):
    """A bucket has no symlinks, but a weight_map's `../` still leads out of the model's prefix."""
    import json

    from heft.convert.errors import ConvertError

    c, params = _model()
    export_hf(c, params, str(tmp_path / "hf"), SHARD)
    files = _files(tmp_path / "hf")
    index = json.loads(files["model.safetensors.index.json"])
    index["weight_map"] = {name: "../other/" + file for name, file in index["weight_map"].items()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    for name, data in files.items():  # every shard is also beside the folder, where the map points
        epath.Path(f"{gcs}/{'other' if name.startswith('model-') else 'hf'}/{name}").write_bytes(data)
    with pytest.raises(ConvertError, match=r"index\.json names '\.\./other/model-00001-of-\d+\.safetensors', which "
                                           r"is outside gs://.*/hf; heft reads a model's files from its own folder"):
        import_hf(f"{gcs}/hf")
