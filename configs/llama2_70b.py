"""Llama-2 70B: 80 layers of width 8192, 64 query heads sharing 8 kv heads (GQA), SwiGLU 28672."""

from heft.configs import llama2_7b


def get_config():
    c = llama2_7b.get_config()
    c.name = "llama2_70b"
    m = c.model
    m.width = 8192
    m.depth = 80
    m.heads = 64
    m.kv_heads = 8
    m.mlp_width = 28672
    c.train.lr = 1.5e-4
    return c
