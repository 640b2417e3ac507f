"""T5 v1.1 base (google/t5-v1_1-base): a 12 + 12 layer encoder-decoder, 247,577,856 parameters.

Gated-GELU MLPs, RMSNorm without centring, no biases, relative position buckets (32 up to distance
128) shared by the layers of each stack, one embedding for both stacks and a separate readout. Its
pretraining is T5's span corruption (data/spans.py) on 512-token inputs, with 100 sentinels above a
32,028-piece tokenizer here (T5's own: 32,000 sentencepiece pieces, then <extra_id_99..0>, then 28
ids of padding); `heft convert --from_hf` imports the released weights.
"""

from heft.configs import base


def get_config():
    c = base.get_config()
    c.name = "t5_v1_1_base"
    m = c.model
    m.family = "encoder_decoder"
    m.vocab = 32128
    m.width = 768  # d_model
    m.depth = 12  # the decoder's blocks
    m.encoder_depth = 12
    m.heads = m.kv_heads = 12
    m.head_dim = 64  # d_kv
    m.mlp_width = 2048  # d_ff
    m.max_len = 512  # the longest input and output (distances from 128 on share one bucket)
    m.norm = "rmsnorm"
    m.norm_eps = 1e-6
    m.activation = "geglu"  # "gated-gelu"
    m.positions = "relative"
    m.relative_buckets = 32
    m.relative_max_distance = 128
    m.tied_embeddings = False
    c.data.sentinels = 100
    c.mesh.data, c.mesh.fsdp = 1, -1
    t = c.train
    t.seq_len = 512  # inputs; the targets are span corruption's own 114 tokens
    t.batch_size = 128  # T5 trained on 2^16 tokens a step: 128 x 512
    t.lr = 1e-3
    t.steps = 524_288  # T5's 2^19 pretraining steps
    t.warmup_steps = 10_000  # T5's constant-then-inverse-sqrt warmup length
    t.weight_decay = 0.0
    return c
