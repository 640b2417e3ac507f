"""A model that trains in minutes on 2 CPU cores on the embedded corpus."""

from heft.configs import base


def get_config():
    c = base.get_config()
    c.name = "tiny"
    m = c.model
    m.vocab = 4096
    m.width = 128
    m.depth = 4
    m.heads = 4
    m.kv_heads = 2
    m.mlp_width = 384
    m.max_len = 256
    c.train.seq_len = 128
    c.train.batch_size = 16
    c.train.steps = 600
    c.train.warmup_steps = 50
    c.train.lr = 3e-3
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    return c
