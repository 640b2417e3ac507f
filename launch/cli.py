"""The `heft` command: one verb per stage in the life of the weights.

Each verb is a module with `define_flags()` and a `main(argv)` that absl runs; only the chosen
verb's module is imported and only its flags are defined, so importing a module has no side effects.
"""

import importlib
import sys

VERBS = {
    "size": ("heft.model.size", "count parameters, bytes, training memory and FLOPs of a config"),
    "prepare": ("heft.data.prepare", "train the tokenizer and write the corpus's tokens"),
    "train": ("heft.train.main", "train a model on a device mesh"),
    "eval": ("heft.eval.main", "held-out loss, perplexity and bits per byte of a checkpoint"),
    "generate": ("heft.eval.generate", "sample text from a checkpoint"),
    "verify": ("heft.train.verify", "check a checkpoint's manifest against its files"),
    "export": ("heft.train.export", "write a parameters-only checkpoint for serving"),
    "plan": ("heft.launch.plan", "compile the train step for a TPU topology and predict fit and speed"),
    "convert": ("heft.convert.main", "import or export Hugging Face weights"),
}


def usage() -> str:
    lines = ["usage: heft VERB --config=configs/NAME.py [--config.FIELD=VALUE ...]", "", "verbs:"]
    lines += [f"  {name:<9} {about}" for name, (_, about) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    verb = argv[1]
    if verb not in VERBS:
        sys.exit(f"heft: unknown verb {verb!r}; choose one of {', '.join(VERBS)}")
    try:
        module = importlib.import_module(VERBS[verb][0])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("heft."):
            sys.exit(f"heft: the verb {verb!r} is not available in this version of heft")
        raise
    from absl import app

    from heft.model.checks import ConfigError
    from heft.train.manifest import CheckpointError

    try:
        from heft.data.errors import DataError
    except ImportError:  # data/ not built yet
        DataError = ConfigError

    try:
        # config_flags applies --config.FIELD overrides while flags are defined and parsed, so a
        # misspelt field surfaces here as ml_collections' KeyError / AttributeError.
        module.define_flags()
        # Libraries (orbax above all) log every step of a save at INFO; show warnings and up
        # unless the user asks for more with --verbosity.
        quiet = [] if any(a.startswith(("--verbosity", "-v")) for a in argv[2:]) else ["--verbosity=-1"]
        app.run(module.main, argv=[f"heft {verb}"] + quiet + argv[2:])
    except (ConfigError, CheckpointError, DataError) as e:  # a user's mistake: one line, no trace
        sys.exit(f"heft {verb}: {e}")
    except (KeyError, AttributeError) as e:
        if "Did you mean" not in str(e) and not _is_override_error(e, argv):
            raise
        sys.exit(f"heft {verb}: the config has no field {_first_line(e)}; {_hint(e)}see docs/config.md")


def _first_line(e: Exception) -> str:
    return str(e).strip("'\"").replace("\\n", "\n").split("\n")[0].strip("'\"\\")


def _hint(e: Exception) -> str:
    text = str(e).replace("\\n", "\n")
    return text.split("\n", 1)[1].strip("'\"\\ ") + " " if "Did you mean" in text else ""


def _is_override_error(e: Exception, argv: list[str]) -> bool:
    key = _first_line(e)
    return any(a.startswith("--config.") and key in a for a in argv)
