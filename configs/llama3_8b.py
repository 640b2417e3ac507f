"""Llama-3 8B: 32 layers of width 4096, 32 heads over 8 kv heads, SwiGLU 14336, vocab 128256."""

from heft.configs import llama2_7b


def get_config():
    c = llama2_7b.get_config()
    c.name = "llama3_8b"
    m = c.model
    m.vocab = 128256
    m.kv_heads = 8
    m.mlp_width = 14336
    m.max_len = 8192
    m.rope_theta = 500000.0
    c.train.seq_len = 8192
    return c
