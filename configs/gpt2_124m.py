"""GPT-2 small (124M): LayerNorm, GeLU, biases, learned positions, tied embeddings."""

from heft.configs import base


def get_config():
    c = base.get_config()
    c.name = "gpt2_124m"
    m = c.model
    m.vocab = 50257
    m.width = 768
    m.depth = 12
    m.heads = 12
    m.kv_heads = 12
    m.mlp_width = 3072
    m.max_len = 1024
    m.norm = "layernorm"
    m.activation = "gelu"
    m.use_bias = True
    m.tied_embeddings = True
    m.positions = "learned"
    m.embed_init_std = 0.02  # tied: the readout is the embedding, so it must start small
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.train.seq_len = 1024
    c.train.batch_size = 512
    c.train.lr = 6e-4
    c.train.warmup_steps = 700
    return c
