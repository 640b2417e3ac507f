"""A ~25M-parameter Llama-style model: a real experiment on one host, too slow for CI."""

from heft.configs import base


def get_config():
    c = base.get_config()
    c.name = "small"
    m = c.model
    m.vocab = 8192
    m.width = 512
    m.depth = 8
    m.heads = 8
    m.kv_heads = 4
    m.mlp_width = 1408
    m.max_len = 1024
    c.train.seq_len = 512
    c.train.batch_size = 32
    c.train.steps = 5000
    c.train.lr = 1e-3
    c.train.warmup_steps = 200
    return c
