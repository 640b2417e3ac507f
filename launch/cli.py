"""The `heft` command: one verb per stage in the life of the weights.

Each verb is a module in launch/verbs/ with `define_flags()` and a thin `main(argv)` that absl runs
over the stages' functions; only the chosen verb's module is imported and only its flags are
defined. The stages (model, data, train, eval, convert) never import launch/: it is the top floor.
"""

import glob
import importlib
import os
import select
import signal
import sys

VERBS = {
    "size": ("heft.launch.verbs.size", "count parameters, bytes, training memory and FLOPs of a config"),
    "prepare": ("heft.launch.verbs.prepare", "train the tokenizer and write the corpus's tokens"),
    "train": ("heft.launch.verbs.train", "train a model on a device mesh"),
    "eval": ("heft.launch.verbs.eval", "held-out loss, perplexity and bits per byte of a checkpoint, or harness tasks"),
    "generate": ("heft.launch.verbs.generate", "sample text from a checkpoint"),
    "verify": ("heft.launch.verbs.verify", "check a checkpoint's seal and files against its manifest"),
    "export": ("heft.launch.verbs.export", "write a parameters-only checkpoint for serving"),
    "plan": ("heft.launch.verbs.plan", "compile the train step for a TPU topology and predict fit and speed"),
    "convert": ("heft.launch.verbs.convert", "import or export Hugging Face weights"),
    "finetune": ("heft.launch.verbs.finetune", "fine-tune a checkpoint: full, LoRA, adapters, prefix or prompt tuning"),
    "merge": ("heft.launch.verbs.merge", "write a fine-tune and its base as one parameters-only checkpoint"),
    "launch": ("heft.launch.verbs.launch", "run heft train on every host: local processes, TPU VMs, GKE, SLURM"),
    "quantize": ("heft.launch.verbs.quantize", "quantize a checkpoint's weights to int8 or int4 (qwix)"),
    "sweep": ("heft.launch.verbs.sweep", "run a sweep's points and fit scaling laws to them"),
}


HELP = ("-h", "-help", "--help", "--helpshort", "-?")  # absl's own --help shows the main module's flags: none


def usage() -> str:
    lines = ["usage: heft VERB --config=configs/NAME.py [--config.FIELD=VALUE ...]", "", "verbs:"]
    lines += [f"  {name:<9} {about}" for name, (_, about) in VERBS.items()]
    lines += ["", "heft VERB --help (or heft help VERB) lists the verb's flags"]
    return "\n".join(lines)


def verb_usage(verb: str, defined: list) -> str:
    """`heft VERB --help`: the verb's flags (absl Flag objects, in the order defined), one line each."""
    rows = []
    for flag in defined:
        rows.append((f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}", " ".join(flag.help.split()),
                     _default(flag)))
        if flag.name == "config":  # heft.launch.flags: a config file, then its fields one by one
            rows.append(("--config.FIELD=VALUE", "set one field of the config, e.g. --config.train.steps=100 "
                         "(the fields: docs/config.md)", None))
    width = max([len(name) for name, _, _ in rows], default=0) + 2
    lines = [f"heft {verb}: {VERBS[verb][1]}", "", "flags:" if rows else "flags: none"]
    lines += [f"  {name:<{width}}{about}" + (f" (default: {default})" if default else "")
              for name, about, default in rows]
    return "\n".join(lines)


def _default(flag) -> str | None:
    if flag.name == "config":  # the ConfigDict's file, named as a user would write it
        from heft.launch.flags import CONFIG_DIR

        path = flag.default_as_str.strip("'\"")
        return "configs/" + os.path.relpath(path, CONFIG_DIR) if path.startswith(CONFIG_DIR + os.sep) else path
    if flag.default is None or flag.default == [] or flag.default == [""]:
        return None
    if isinstance(flag.default, bool):
        return str(flag.default).lower()
    return ",".join(map(str, flag.default)) if isinstance(flag.default, list) else str(flag.default)


def main(argv: list[str] | None = None) -> None:
    # `heft ... | head` ends quietly when the reader stops, as command-line tools do. Not by restoring
    # SIGPIPE's default: that would let any library's write to a closed socket or pipe (asyncio's
    # wake-up socket while orbax shuts down, say) kill a training run without a word.
    try:
        _main(argv)
    except SystemExit:
        _flush_stdout()
        raise
    except BrokenPipeError:
        _end_quietly_if_reader_gone()
        raise
    _flush_stdout()


def _flush_stdout() -> None:
    """Flushes here rather than at exit, where a reader gone early prints 'Exception ignored'."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _end_quietly_if_reader_gone()
        raise


def _end_quietly_if_reader_gone() -> None:
    if _reader_gone(sys.stdout):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        os._exit(128 + signal.SIGPIPE)  # the status a shell shows for a reader gone: 141


def _reader_gone(stream) -> bool:
    """Whether `stream` is a pipe whose reading end has closed (poll reports an error on its writing end)."""
    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):
        return False


def _hide_ipython() -> None:
    """Makes `import IPython` fail in this process, as it would without IPython installed.

    flax asks IPython at import whether it runs in a notebook (to colour its reprs), and importing
    IPython costs ~0.6 s of every command's start-up. A `heft` command never runs inside IPython;
    heft imported as a library (in a notebook) is left alone.
    """
    if "IPython" not in sys.modules:
        sys.modules["IPython"] = None


def _main(argv: list[str] | None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 2 and argv[1] == "help":  # heft help VERB: what heft VERB --help prints
        argv = [argv[0], argv[2], "--help"]
    if len(argv) < 2 or argv[1] in ("help", *HELP):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    verb = argv[1]
    if verb not in VERBS:
        sys.exit(f"heft: unknown verb {verb!r}; choose one of {', '.join(VERBS)}")
    skip_absent_tpu()
    _hide_ipython()
    try:
        module = importlib.import_module(VERBS[verb][0])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("heft."):
            sys.exit(f"heft: the verb {verb!r} is not available in this version of heft")
        raise
    from absl import app, flags

    from heft.launch.flags import config_file_error
    from heft.model.checks import ConfigError
    from heft.train.manifest import CheckpointError

    try:
        from heft.data.errors import DataError
    except ImportError:  # data/ not built yet
        DataError = ConfigError

    before = set(flags.FLAGS)  # absl's own (logging's) among them: what the verb adds is the rest
    try:
        # config_flags applies --config.FIELD overrides while flags are defined and parsed, so a
        # misspelt field surfaces here as ml_collections' KeyError / AttributeError.
        module.define_flags()
        defined = list({id(flags.FLAGS[n]): flags.FLAGS[n] for n in flags.FLAGS if n not in before}.values())
        given = argv[2: argv.index("--")] if "--" in argv[2:] else argv[2:]
        if any(a in HELP for a in given):
            print(verb_usage(verb, defined))
            sys.exit(0)
        # Libraries (orbax above all) log every step of a save at INFO; show warnings and up
        # unless the user asks for more with --verbosity.
        quiet = [] if any(a.startswith(("--verbosity", "-v")) for a in argv[2:]) else ["--verbosity=-1"]
        # absl's own parser prints a flag error with a second line of advice; ours raises it to here.
        app.run(module.main, argv=[f"heft {verb}"] + quiet + argv[2:], flags_parser=lambda args: flags.FLAGS(args))
    except (ConfigError, CheckpointError, DataError) as e:  # a user's mistake: one line, no trace
        sys.exit(f"heft {verb}: {e}")
    except flags.Error as e:  # an unknown flag, or a value of the wrong type
        known = sorted(f"--{flag.name}" for flag in defined)
        fix = f"; heft {verb} takes {', '.join(known)}" if isinstance(e, flags.UnrecognizedFlagError) else ""
        sys.exit(f"heft {verb}: {str(e).splitlines()[0]}{fix}")
    except (OSError, SyntaxError) as e:
        error = config_file_error(e, argv)
        if error is None:
            raise
        sys.exit(f"heft {verb}: {error}")
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


GOOGLE_PCI_VENDOR = "0x1ae0"
NOT_TPU = {"0x0042"}  # Google PCI devices that are not TPUs: gVNIC, the network card of Compute Engine VMs
GPU_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, AMD


def accelerator_attached() -> bool:
    """Whether a TPU or a GPU may be attached: JAX's own probe (jax._src.hardware_utils reads the
    PCI bus for Google devices, and the device files GPU drivers make), repeated here so that a
    mistake in the flags is still reported before the seconds importing JAX takes. A Google device
    of a kind not known here counts as a TPU: at worst, the warnings stay."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                if f.read().strip() == GOOGLE_PCI_VENDOR and g.read().strip() not in NOT_TPU:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or any(os.path.exists(p) for p in GPU_FILES))


def skip_absent_tpu() -> None:
    """Runs JAX on the CPU where no accelerator is attached, so libtpu stays quiet.

    libtpu (from the [tpu] and [test] extras) prints five warnings whenever JAX tries it as a
    backend on a machine without a TPU. Where no TPU or GPU is attached, the CPU is the only backend
    anyway, so JAX_PLATFORMS=cpu (for this process and its children) skips libtpu and changes
    nothing else. With a TPU or GPU present, or JAX_PLATFORMS set, nothing changes: real TPU errors
    still show. `heft plan` loads libtpu by itself for its abstract topologies either way.
    """
    if "JAX_PLATFORMS" in os.environ or accelerator_attached():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already (heft called from Python): its config read the variable
        sys.modules["jax"].config.update("jax_platforms", "cpu")


if __name__ == "__main__":
    main()
