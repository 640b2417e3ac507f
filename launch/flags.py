"""Flags every verb shares: `--config=configs/NAME.py` plus `--config.FIELD=VALUE` overrides."""

import os

from absl import flags
from ml_collections import config_flags

import heft.configs
from heft.model.checks import ConfigError

CONFIG_DIR = os.path.dirname(heft.configs.__file__)


def define_config(default: str = "tiny.py"):
    """Defines --config (a ConfigDict file, overridable field by field); returns the flag holder.

    The config is locked, so an override of a field that does not exist is an error naming it.
    Once every flag is parsed (overrides applied), the whole config is checked
    (`heft.train.checks.check_config`): a bad field stops any verb before it does any work.
    """
    holder = config_flags.DEFINE_config_file(
        "config", os.path.join(CONFIG_DIR, default), "a configs/NAME.py file", lock_config=True
    )
    flags.register_validator("config", _check)
    return holder


def define_verify_key():
    """--verify_key, for the verbs that read checkpoints (their one loader enforces it)."""
    flags.DEFINE_string("verify_key", None, "an ed25519 public key (PEM): read only checkpoints whose seal is a "
                        "statement signed by its private key (checkpoint.signing_key)")


def _check(config) -> bool:
    from heft.train import checks

    checks.check_config(config)  # raises ConfigError, which `heft` prints as one line
    return True


def config_file_error(e: BaseException, argv: list[str]) -> ConfigError | None:
    """The one-line error for a --config file that cannot be loaded (missing, or not valid Python);
    None when `e` is something else.

    ml_collections reports a missing file as an OSError when the config is first read, and a file
    that does not parse as the SyntaxError itself, each with a traceback that hides the path.
    """
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    given += [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    # A config file may take an argument after a colon (configs/sweep.py:small).
    path = given[-1].split(":", 1)[0] if given else os.path.join(CONFIG_DIR, "tiny.py")
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == os.path.abspath(path):
        return ConfigError(f"--config={path} is not valid Python ({e.msg}, line {e.lineno}); fix the file")
    if isinstance(e, OSError) and "Failed loading config file" in str(e):
        if not os.path.exists(path):
            return ConfigError(f"--config={path} does not exist; pass a config file such as configs/tiny.py "
                               f"(the presets are in {CONFIG_DIR})")
        return ConfigError(f"--config={path} could not be loaded ({str(e).splitlines()[-1].strip()}); "
                           "pass a file whose get_config() returns a ConfigDict")
    return None
