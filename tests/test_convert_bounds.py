"""`heft convert --from_hf` trusts nothing in the folder it reads: sizes in config.json are checked
against the tensors stored before anything is planned or allocated, every malformed file stops the
import with one line naming the file, the field and what it must hold, no file outside the folder is
read, and every read is bounded. Each folder here is written by the test: a tiny Llama exported by heft
(zeros), or a config.json and a few tensors by hand; nothing needs torch."""

import json
import os
import re
import shutil
import signal
import struct
import time
import tracemalloc

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from heft.configs import base
from heft.convert import hf_folder, safetensors_io, tokenizer
from heft.convert.checkpoints import run_import
from heft.convert.errors import ConvertError
from heft.convert.hf import export_hf, import_hf
from heft.data import paths
from heft.model.build import init_params

INDEX = safetensors_io.INDEX


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """{"single": a tiny Llama folder with model.safetensors, "sharded": the same in shards with an index}."""
    c = base.get_config()
    c.model.update(vocab=64, width=32, depth=2, heads=2, kv_heads=1, mlp_width=64, max_len=64)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: init_params(c.model, 0)))
    root = tmp_path_factory.mktemp("llama")
    export_hf(c, zeros, str(root / "single"))
    export_hf(c, zeros, str(root / "sharded"), max_shard_bytes=20_000)
    return {"single": root / "single", "sharded": root / "sharded"}


def _copy(llama, tmp_path, kind="single"):
    return shutil.copytree(llama[kind], tmp_path / "hf")


def _edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def _refused(folder, tmp_path, says: str) -> str:
    """Runs the import as `heft convert --from_hf` does; it must stop with one line matching `says`
    (a regular expression) and leave no checkpoint behind. Returns the line."""
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=says) as e:
        run_import(str(folder), str(out))
    assert "\n" not in str(e.value), str(e.value)
    assert not out.exists()
    return str(e.value)


# Sizes in config.json are checked against the stored tensors before anything is planned.


def test_ten_million_layers_in_config_json_fail_fast_allocating_nothing(llama, tmp_path):
    """Before: the tensor table for 10**7 layers grew to ~5 GB over minutes."""
    from heft.train import checkpoint  # what run_import imports, so that its import is not counted

    checkpoint.serving_mesh(base.get_config())
    folder = _copy(llama, tmp_path)
    _edit_config(folder, num_hidden_layers=10**7)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _refused(folder, tmp_path, r"config\.json in .* has num_hidden_layers=10000000, but its tensors hold 2 "
                                   r"\(numbered 0 to 1\); fix config\.json")
        seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 5 and peak < 50 << 20, (seconds, peak)


def _hand_folder(folder, config: dict, names: list[str]):
    """A folder of `config` and one safetensors file holding a one-element tensor under each name."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({n: np.zeros(1, np.float32) for n in names}, folder / "model.safetensors")
    return folder


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_embd": 32, "n_layer": 2,
        "n_head": 2, "n_positions": 64}
T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 64, "d_model": 32,
      "num_heads": 2, "d_ff": 64, "num_layers": 2, "tie_word_embeddings": False, "feed_forward_proj": "gated-gelu"}
MIXTRAL = {**LLAMA, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 4,
           "num_experts_per_tok": 2}
COUNTS = {  # config.json, the counts it claims, the names stored, and what the line says
    "gpt2 layers": (GPT2, {"n_layer": 10**7}, ["h.0.ln_1.weight", "h.1.ln_1.weight"],
                    r"n_layer=10000000, but its tensors hold 2 \(numbered 0 to 1\)"),
    "t5 decoder layers": (T5, {"num_decoder_layers": 10**7}, [f"{s}.block.{i}.layer.0.layer_norm.weight" for s in
                          ("encoder", "decoder") for i in range(2)],
                          r"num_decoder_layers=10000000, but its tensors hold 2"),
    "t5 layers without num_decoder_layers": (T5, {"num_layers": 3}, ["encoder.block.0.layer.0.layer_norm.weight"],
                                             r"num_layers=3, but its tensors hold 1 \(numbered 0 to 0\)"),
    "mixtral experts": (MIXTRAL, {"num_local_experts": 10**6}, ["model.layers.0.input_layernorm.weight"] +
                        [f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight" for e in range(4)],
                        r"num_local_experts=1000000, but its tensors hold 4 \(numbered 0 to 3\)"),
    "a stray layer number": (LLAMA, {"num_hidden_layers": 10**7}, ["model.layers.0.input_layernorm.weight",
                                                                     "model.layers.9999999.input_layernorm.weight"],
                             r"num_hidden_layers=10000000, but its tensors hold 2 \(numbered 0 to 9999999\)"),
}


@pytest.mark.parametrize("case", list(COUNTS))
def test_counts_in_config_json_must_match_the_stored_tensors_before_planning(case, tmp_path):
    config, claims, names, says = COUNTS[case]
    folder = _hand_folder(tmp_path / "hf", {**config, **claims}, names)
    start = time.perf_counter()
    with pytest.raises(ConvertError, match=says):
        import_hf(str(folder))
    assert time.perf_counter() - start < 2


# config.json: one line naming the file, the field and what it must hold.


CONFIGS = {  # what is done to the Llama's config.json, and what the line says
    "a list": (lambda c: [c], r"config\.json holds a list, not an object of fields"),
    "no vocab_size": (lambda c: {k: v for k, v in c.items() if k != "vocab_size"},
                      r"config\.json has no field vocab_size, which must be a positive integer"),
    "hidden_size a string": (lambda c: {**c, "hidden_size": "128"},
                             r'config\.json has hidden_size="128" \(a string\), but it must be a positive integer'),
    "intermediate_size a float": (lambda c: {**c, "intermediate_size": 64.0},
                                  r"intermediate_size=64\.0 \(a number\), but it must be a positive integer"),
    "model_type a list": (lambda c: {**c, "model_type": ["llama"]},
                          r'model_type=\["llama"\] \(a list\), but it must be a string'),
    "attention_bias a string": (lambda c: {**c, "attention_bias": "false"},
                                r'attention_bias="false" \(a string\), but it must be true or false'),
    "rope factor a string": (lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": "8"}},
                             r'rope_scaling\.factor="8" \(a string\), but it must be a finite number'),
    "a size past 2**31": (lambda c: {**c, "vocab_size": 2**40}, r"vocab_size=1099511627776 \(a number\), but it must "
                                                                r"be a positive integer below 2\*\*31"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_malformed_llama_config_json_is_one_line_naming_field_and_kind(case, llama, tmp_path):
    change, says = CONFIGS[case]
    folder = _copy(llama, tmp_path)
    (folder / "config.json").write_text(json.dumps(change(json.loads((folder / "config.json").read_text()))))
    _refused(folder, tmp_path, says)


@pytest.mark.parametrize("config, field", [(GPT2, "n_embd"), (T5, "d_model"), (MIXTRAL, "num_local_experts")])
def test_every_family_checks_its_fields(config, field, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, field: "32"}))
    _refused(folder, tmp_path, rf'has {field}="32" \(a string\), but it must be a positive integer')


# Safetensors headers: bounded, and checked whole before any size in them is used.


def _rewrite_header(file, change) -> None:
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = change(json.loads(data[8:8 + n]))
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def _entry(name, **fields):
    def change(header):
        header[name].update(fields)
        return header
    return change


def _swap_offsets(header):
    """Two tensors of one shape and dtype claim the same bytes (the second the first's)."""
    header["model.layers.1.input_layernorm.weight"]["data_offsets"] = \
        header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    return header


HEADERS = {
    "a JSON list": (lambda h: [1, 2], r"model\.safetensors is not a safetensors file \(its header is not a JSON object\)"),
    "a shape its bytes do not hold": (_entry("model.norm.weight", shape=[10**6, 10**6]),
                                      r"tensor 'model\.norm\.weight' has data_offsets \[\d+, \d+\], 128 bytes, but a "
                                      r"F32 tensor of shape \[1000000, 1000000\] takes 4,000,000,000,000 bytes"),
    "a shape of strings": (_entry("model.norm.weight", shape=["32"]), r"has shape \[\"32\"\], not a list of integers"),
    "an unknown dtype": (_entry("model.norm.weight", dtype="Q4"), r"has dtype \"Q4\", which is none of safetensors'"),
    "offsets not a pair": (_entry("model.norm.weight", data_offsets=5), r"has data_offsets 5, not \[first byte"),
    "two tensors on the same bytes": (_swap_offsets, r"starts at byte [\d,]+ of the data, not at [\d,]+ where the one before"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_malformed_safetensors_header_is_one_line(case, llama, tmp_path):
    change, says = HEADERS[case]
    folder = _copy(llama, tmp_path)
    _rewrite_header(folder / "model.safetensors", change)
    _refused(folder, tmp_path, says)


HEADER_LENGTHS = {  # the length field, the file's size, and what the line says
    "past the file": (2**62, 1000, r"header length field says 4,611,686,018,427,387,904 bytes, but the file holds 1,000"),
    # A sparse file: long enough to hold the header it claims, and never read.
    "past safetensors' limit": (safetensors_io.MAX_HEADER + 1, safetensors_io.MAX_HEADER + 200,
                                r"header length field says 100,000,001 bytes, over safetensors' limit of 100,000,000"),
}


@pytest.mark.parametrize("case", list(HEADER_LENGTHS))
def test_header_length_field_beyond_the_file_or_the_limit_is_refused_unread(case, llama, tmp_path):
    n, size, says = HEADER_LENGTHS[case]
    folder = _copy(llama, tmp_path)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(size)
    _refused(folder, tmp_path, r"model\.safetensors's " + says)


# weight_map: file names only, inside the folder.


def _edit_weight_map(folder, value):
    index = json.loads((folder / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = value
    (folder / INDEX).write_text(json.dumps(index))
    return first


def test_weight_map_value_that_is_not_a_file_name_is_one_line(llama, tmp_path):
    folder = _copy(llama, tmp_path, "sharded")
    first = _edit_weight_map(folder, 5)
    _refused(folder, tmp_path, rf"{INDEX} has weight_map\['{first}'\]=5, but it must be the name of a safetensors file")


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_weight_map_naming_a_file_outside_the_folder_is_refused(how, llama, tmp_path):
    """Before: `../other/model.safetensors` was read from beside the folder."""
    folder = _copy(llama, tmp_path, "sharded")
    shutil.copytree(llama["single"], tmp_path / "other")  # a real safetensors file holding every tensor
    name = "../other/model.safetensors" if how == "relative" else str(tmp_path / "other" / "model.safetensors")
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {tensor: name for tensor in index["weight_map"]}
    (folder / INDEX).write_text(json.dumps(index))
    _refused(folder, tmp_path, rf"{INDEX} names '{re.escape(name)}', which is outside .*hf; heft reads a model's "
                               "files from its own folder only")


# Files: regular, and inside the folder (a symlink out of it is refused).


@pytest.mark.parametrize("file", ["model.safetensors", "config.json", "tokenizer.json"])
def test_symlink_out_of_the_folder_is_refused(file, llama, tmp_path):
    """Before: each was read through the link (and a tokenizer.json copied into the checkpoint)."""
    folder = _copy(llama, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    source = llama["single"] / file if file != "tokenizer.json" else _write_tokenizer(outside / "source.json")
    shutil.copyfile(source, outside / file)
    (folder / file).unlink(missing_ok=True)
    (folder / file).symlink_to(outside / file)
    _refused(folder, tmp_path, rf"hf/{file} is a symlink to .*elsewhere/{file}, outside .*hf; heft reads a model's "
                               "files from its own folder only, so copy the file in")


@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_file_that_is_not_a_regular_file_is_refused_unopened(kind, file, llama, tmp_path):
    """Before: a FIFO blocked the import forever; a folder gave IsADirectoryError's traceback (a
    tokenizer.json of either kind: the tokenizers library's error, then an import without it)."""
    folder = _copy(llama, tmp_path)
    (folder / file).unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(folder / file)
    else:
        (folder / file).mkdir()

    def stuck(*_):
        raise TimeoutError("the import blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(20)
    try:
        what = "not a regular file" if kind == "fifo" else "a folder"
        _refused(folder, tmp_path, rf"{re.escape(file)} is {what}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_hub_cache_snapshot_whose_files_link_into_its_blobs_imports(llama, tmp_path):
    """The hub cache's layout, models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/HASH, is the one
    way out of the folder that is taken: the links stay inside the model's own cache entry."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(["config.json", "model.safetensors"]):
        shutil.copyfile(llama["single"] / file, repo / "blobs" / f"blob{i}")
        (snapshot / file).symlink_to(f"../../blobs/blob{i}")
    config, params = import_hf(str(snapshot))
    assert config.model.depth == 2 and params["embed"][...].shape == (64, 32)


# Every read is bounded before it starts.


@pytest.mark.parametrize("file, limit", [("config.json", hf_folder.MAX_JSON), (INDEX, hf_folder.MAX_JSON),
                                         ("tokenizer.json", tokenizer.MAX_BYTES)])
def test_file_past_its_size_limit_is_refused_unread(file, limit, llama, tmp_path):
    folder = _copy(llama, tmp_path, "sharded")
    with open(folder / file, "wb") as f:  # sparse: no disk, and nothing would be read in time if it were
        f.truncate(limit + 1)
    start = time.perf_counter()
    _refused(folder, tmp_path, rf"{file} holds {limit + 1:,} bytes, more than the {limit:,} heft reads")
    assert time.perf_counter() - start < 2


# tokenizer.json: one the tokenizers library cannot parse is left behind with a note; one it parses that
# heft cannot use stops the import, instead of a checkpoint without it.


def _write_tokenizer(path, template_token=None):
    """A tiny word-level tokenizer.json; `template_token`: the special token its post-processor puts
    first (named by the template and by its special_tokens, but perhaps not in its vocabulary)."""
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1, "b": 2}, "unk_token": "<unk>"}}
    if template_token:
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": template_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {template_token: {"id": template_token, "ids": [99], "tokens": [template_token]}}}
    path.write_text(json.dumps(spec))
    return path


def test_tokenizer_template_naming_a_token_not_in_the_vocabulary_is_one_line(llama, tmp_path):
    """Before: a TypeError's traceback once config.json gave a bos_token_id (bos_id was None)."""
    pytest.importorskip("tokenizers")
    folder = _copy(llama, tmp_path)
    _edit_config(folder, bos_token_id=1)
    _write_tokenizer(folder / "tokenizer.json", template_token="<s>")
    _refused(folder, tmp_path, r"tokenizer\.json: tokenizer\.json's post_processor template starts with '<s>', "
                               r"which is not in its vocabulary; add the token")


def test_tokenizer_json_the_library_cannot_parse_is_left_behind_with_a_note(llama, tmp_path, capsys):
    """A format newer than the installed tokenizers library: the weights are imported alone, and a note
    says so (as before the bounds), rather than no import at all."""
    pytest.importorskip("tokenizers")
    folder = _copy(llama, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "9.0", "model": {"type": "NoSuchModel"}}')
    out = tmp_path / "out"
    run_import(str(folder), str(out))
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("heft convert:")]
    assert note == [f"heft convert: {folder / 'tokenizer.json'} cannot be read by the tokenizers library; the "
                    "weights are imported without a tokenizer"]
    from heft.train import checkpoint

    config, params, tokenizer_path = checkpoint.load_params(out)
    assert config.model.depth == 2 and tokenizer_path is None


def test_readable_tokenizer_json_with_its_template_token_in_the_vocabulary_is_found(tmp_path):
    """The check above refuses only what it should: the same file, its template naming a known token."""
    pytest.importorskip("tokenizers")
    path = _write_tokenizer(tmp_path / "tokenizer.json", template_token="a")
    assert tokenizer.find(paths.path(tmp_path)) == (paths.path(path), None)
    assert tokenizer.special_ids(paths.path(path))[0] == 1
