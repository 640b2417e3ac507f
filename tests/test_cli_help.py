"""`heft VERB --help` and `heft help VERB` list that verb's flags, one line each, and exit 0, for every
verb. The flags expected are read from each verb's source, not from the flags the CLI reports."""

import importlib.util
import re
import subprocess

import pytest
from test_launch_safety import heft_here  # noqa: F401  (a fixture: heft run in this process)

from heft.launch import cli


def _defined_in_source(verb: str) -> list[str]:
    """The flags a verb's module defines, by reading it: define_config()'s --config, define_verify_key()'s
    --verify_key, then each DEFINE_*."""
    source = open(importlib.util.find_spec(cli.VERBS[verb][0]).origin).read()
    return (["config"] * ("define_config(" in source) + ["verify_key"] * ("define_verify_key(" in source)
            + re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source))


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_verb_help_lists_each_of_its_flags_on_one_line_and_exits_0(verb, heft_here):  # noqa: F811
    code, out, err = heft_here(verb, "--help")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"heft {verb}: {cli.VERBS[verb][1]}"
    names = _defined_in_source(verb)
    assert names, verb
    for name in names:
        (line,) = [line for line in lines if re.match(rf"  --(\[no\])?{name} ", line)]  # exactly one line
        assert len(line.split(None, 1)) == 2, line  # and what the flag is for, on it
    rows = [line for line in lines if line.startswith("  --")]
    assert len(rows) == len(names) + ("config" in names)  # nothing else but --config.FIELD=VALUE
    assert heft_here("help", verb)[:2] == (0, out)
    assert heft_here(verb, "--workdir=x", "-h")[:2] == (0, out)


def test_help_after_the_double_dash_belongs_to_the_command_behind_it(heft_here):  # noqa: F811
    """`heft launch local -- --help` passes --help on to `heft train` rather than answering it."""
    code, out, err = heft_here("launch", "local", "--workdir=runs/x", "--dry_run", "--", "--help")
    assert code == 0 and out.startswith("#!/bin/bash") and " --help --coordinator=" in out, err + out


def test_help_for_an_unknown_verb_is_one_line(heft_here):  # noqa: F811
    code, out, err = heft_here("help", "nope")
    assert code == 1 and out == "" and err.strip().splitlines() == [
        "heft: unknown verb 'nope'; choose one of " + ", ".join(cli.VERBS)]


def test_sweep_help_through_the_installed_command_exits_0():
    r = subprocess.run(["heft", "sweep", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("heft sweep: ") and "  --sweep " in r.stdout, r.stderr
