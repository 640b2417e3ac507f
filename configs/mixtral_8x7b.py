"""Mixtral 8x7B: Mistral 7B's shape (32 layers of width 4096, 32 heads over 8 kv heads, RoPE base 1e6)
with 8 SwiGLU experts of width 14336 in every block, 2 per token: 46.7B parameters, 12.9B active.

Laid out for a pod as MaxText's v5p recipe is (bf16 compute, full remat, FSDP over the slice),
with expert parallelism on top: each of 8 expert-axis devices holds one expert of every layer.
"""

from heft.configs import base


def get_config():
    c = base.get_config()
    c.name = "mixtral_8x7b"
    m = c.model
    m.vocab = 32000
    m.width = 4096
    m.depth = 32
    m.heads = 32
    m.kv_heads = 8
    m.mlp_width = 14336
    m.max_len = 32768
    m.rope_theta = 1e6
    m.norm_eps = 1e-5
    m.mlp = "moe"
    m.moe.experts = 8
    m.moe.top_k = 2
    m.moe.balance_loss_weight = 0.02  # Mixtral's config.json: router_aux_loss_coef
    m.param_dtype = "float32"
    m.compute_dtype = "bfloat16"
    m.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 8
    c.data.document_start = "bos"  # Mistral's sentencepiece tokenizer leads text with BOS
    c.train.seq_len = 4096
    c.train.batch_size = 256
    c.train.lr = 3e-4
    c.train.warmup_steps = 100
    return c
