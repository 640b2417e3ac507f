"""One path layer (heft.data.paths) with one rule, which every stage uses:

- a URL (gs://...) is kept as it is;
- a local path has `~` expanded and is made absolute, relative to where heft started;
- an epath already in that form is returned as it is, not wrapped again.
"""

import ast
import os
import pathlib

import pytest
from etils import epath

from heft.data import paths

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_relative_local_path_is_made_absolute_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = paths.path("runs/tiny")
    assert isinstance(p, epath.Path)
    assert str(p) == os.path.join(os.getcwd(), "runs", "tiny")
    assert str(paths.path("runs/./tiny/../tiny/")) == str(p)  # one spelling for one place


def test_a_tilde_path_is_expanded_to_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert str(paths.path("~/.cache/heft")) == str(tmp_path / ".cache" / "heft")


def test_a_gs_url_is_kept_as_given():
    p = paths.path("gs://bucket/runs/tiny")
    assert str(p) == "gs://bucket/runs/tiny"
    assert paths.is_remote(p) and paths.is_gcs(p) and not paths.is_remote("/tmp/gs:/x")
    assert str(p / "checkpoints" / "3") == "gs://bucket/runs/tiny/checkpoints/3"
    assert str(paths.path("gs://bucket/a/**/*.jsonl")) == "gs://bucket/a/**/*.jsonl"


def test_an_epath_in_the_rule_is_returned_as_is_not_wrapped_again(tmp_path, monkeypatch):
    local, remote = paths.path(tmp_path / "run"), paths.path("gs://bucket/run")
    assert paths.path(local) is local
    assert paths.path(remote) is remote
    monkeypatch.chdir(tmp_path)  # an epath that breaks the rule (relative) is converted like a string
    relative = epath.Path("run")
    assert paths.path(relative) is not relative and paths.path(relative) == local


def test_str_pathlib_and_epath_name_the_same_place(tmp_path):
    assert paths.path(str(tmp_path)) == paths.path(tmp_path) == paths.path(epath.Path(tmp_path))


def _defines_path(module: pathlib.Path) -> bool:
    tree = ast.parse(module.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "path" for n in tree.body)


def test_only_the_one_layer_defines_path():
    found = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                   if "tests" not in p.relative_to(ROOT).parts and _defines_path(p))
    assert found == [os.path.join("data", "paths.py")]


def test_train_convert_and_data_take_a_relative_path_by_the_same_rule(tmp_path, monkeypatch):
    """The same relative name, given to an entry point of each stage, names the same absolute place
    in what each says back."""
    from heft.convert import checkpoints as convert_checkpoints
    from heft.convert.errors import ConvertError
    from heft.data import corpus
    from heft.train import checkpoint
    from heft.train.manifest import CheckpointError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.txt").write_text("not a folder\n")
    where = str(paths.path("taken.txt"))
    assert where == os.path.join(os.getcwd(), "taken.txt")

    with pytest.raises(CheckpointError) as train_error:
        checkpoint.resolve("taken.txt")
    with pytest.raises(ConvertError) as convert_error:
        convert_checkpoints.run_import("hf", "taken.txt")
    assert str(train_error.value).startswith(f"{where} is a file, not a checkpoint")
    assert str(convert_error.value).startswith(f"--out={where} is an existing file")
    assert corpus.resolve("taken.txt") == [where]
