"""Every kind of checkpoint the `heft` command reads, registered with heft.train.checkpoint's one loader.

A kind belongs to the stage that makes it (a fine-tune to adapt/, a quantized checkpoint to
quantize/) and registers itself when that stage's module is imported, so that train/ never imports
a floor above it. The verbs that read a checkpoint call `load` here, which is `checkpoint.load` with
every kind known.
"""

from heft.adapt import load as _finetune  # noqa: F401  (registers the "finetune" kind)
from heft.quantize import checkpoint as _quantized  # noqa: F401  (registers the "quantized" kind)
from heft.train.checkpoint import load  # noqa: F401
