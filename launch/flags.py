"""Flags every verb shares: `--config=configs/NAME.py` plus `--config.FIELD=VALUE` overrides."""

import os

from ml_collections import config_flags

import heft.configs

CONFIG_DIR = os.path.dirname(heft.configs.__file__)


def define_config(default: str = "tiny.py"):
    """Defines --config (a ConfigDict file, overridable field by field); returns the flag holder.

    The config is locked, so an override of a field that does not exist is an error naming it.
    """
    return config_flags.DEFINE_config_file(
        "config", os.path.join(CONFIG_DIR, default), "a configs/NAME.py file", lock_config=True
    )
