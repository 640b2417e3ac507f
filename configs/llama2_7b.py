"""Llama-2 7B: 32 layers of width 4096, 32 heads (MHA), SwiGLU 11008, RoPE, vocab 32000."""

from heft.configs import base


def get_config():
    c = base.get_config()
    c.name = "llama2_7b"
    m = c.model
    m.vocab = 32000
    m.width = 4096
    m.depth = 32
    m.heads = 32
    m.kv_heads = 32
    m.mlp_width = 11008
    m.max_len = 4096
    m.norm_eps = 1e-5
    m.param_dtype = "float32"
    m.compute_dtype = "bfloat16"
    m.remat = "full"
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.train.seq_len = 4096
    c.train.batch_size = 256
    c.train.lr = 3e-4
    # Llama 2 warmed up for 2,000 of ~500,000 steps; this preset keeps base's 1,000 steps, so it
    # warms up for a tenth of them (raise both together for a long run; warmup stays below steps).
    c.train.warmup_steps = 100
    return c
