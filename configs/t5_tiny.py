"""A T5-style encoder-decoder that trains in minutes on 2 CPU cores on the embedded corpus.

    heft train --config=configs/t5_tiny.py --workdir=runs/t5_tiny

Pretraining is T5's span corruption (data/spans.py): 15% of each 128-token window's tokens dropped
in spans of mean length 3, the encoder reading the rest with a sentinel per span, the decoder
writing the spans (29 tokens a row). `heft generate --prompt` is the encoder's input.
"""

from heft.configs import base


def get_config():
    c = base.get_config()
    c.name = "t5_tiny"
    m = c.model
    m.family = "encoder_decoder"
    m.vocab = 4096  # 3,996 tokenizer pieces and 100 sentinels
    m.width = 128
    m.depth = 3  # the decoder's blocks
    m.encoder_depth = 3
    m.heads = m.kv_heads = 4
    m.mlp_width = 384
    m.max_len = 256
    m.norm_eps = 1e-6
    m.activation = "geglu"
    m.positions = "relative"
    c.data.sentinels = 100
    t = c.train
    t.seq_len = 128  # the encoder's inputs
    t.batch_size = 16
    t.steps = 600
    t.warmup_steps = 50
    t.lr = 3e-3
    t.log_every = 20
    t.eval_every = 200
    t.checkpoint_every = 200
    return c
