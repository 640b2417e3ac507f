"""Checkpoints: saving and restoring with orbax, whole train states for resuming, parameters for
everything after training. One concept a file:

- arrays.py: how orbax writes an array (small replicated arrays by one replica, in one piece);
- facts.py: what a checkpoint records besides its arrays (the config as JSON, the data's hashes,
  the tokenizer);
- trainstate.py: the `Checkpointer` — async sharded saves of the train state, sealed in the
  background, recovery after a crash, retention, resume;
- params.py: parameters-only checkpoints (`save_params`, `export_params`);
- find.py: which checkpoint a path names (`resolve`: a workdir's newest sealed step);
- load.py: the one loader (`load`): any checkpoint, of any kind, onto any mesh, verified; later
  stages register the kinds they add (a fine-tune, a quantized checkpoint).

The integrity of every file (hashes, the manifest, its seal and signature) is custody.py's and
manifest.py's. Both kinds of checkpoint restore onto any mesh: arrays are read straight into the
shards the target mesh asks for, never gathered on one host. Nothing is pickled.
"""

from heft.train.checkpoint import arrays
from heft.train.checkpoint.facts import (  # noqa: F401
                                         TOKENIZER,
                                         TOKENIZERS,
                                         config_from_json,
                                         config_to_json,
                                         data_facts,
                                         read_facts,
                                         tokenizer_file,
                                         tokenizer_in,
)
from heft.train.checkpoint.find import checkpoints_in, is_checkpoint, read_config, resolve  # noqa: F401
from heft.train.checkpoint.load import (  # noqa: F401
                                         FLOAT,
                                         Kind,
                                         Loaded,
                                         is_finetune,
                                         kind_of,
                                         load,
                                         load_params,
                                         quantized_weights,
                                         read_params,
                                         register,
                                         serving_mesh,
                                         verified,
)
from heft.train.checkpoint.params import export_params, save_params  # noqa: F401
from heft.train.checkpoint.trainstate import Checkpointer, Resume, committed  # noqa: F401
from heft.train.manifest import CheckpointError  # noqa: F401

arrays.register()
