"""The one exception that a user's input can cause in `heft.data`."""


class DataError(ValueError):
    """A problem with the corpus or the data config, said in one line with its fix.

    Raised before any slow work starts where possible, e.g.
    `data.corpus='/x' does not exist; pass a directory or glob of .txt/.jsonl/.parquet files`.
    """


class TokenizerFormatError(DataError):
    """A tokenizer file the tokenizers library cannot parse at all (often a format newer than the one
    installed). Unlike a file that parses but contradicts itself (a DataError), a caller that can go on
    without the tokenizer may do so: `heft convert --from_hf` imports the weights alone, with a note."""


class PrepareStopped(Exception):
    """A stop was asked for (SIGTERM, Ctrl-C) while the corpus was being tokenized: what was written
    is removed, and a rerun prepares it again."""
