"""Every field heft reads, with its default. Presets start here and change what differs.

A preset is `get_config()` in its own file: `base.get_config()` plus the fields that make it that
model. Fields are documented in docs/config.md; the model's are checked by `heft.model.checks`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"

    # Model: a decoder-only transformer (Llama-style defaults).
    m = c.model = ml_collections.ConfigDict()
    m.vocab = 8192
    m.width = 256  # D, the residual stream
    m.depth = 4  # L, number of blocks
    m.heads = 4  # H, query heads
    m.kv_heads = 4  # K, key/value heads: = heads for MHA, < heads for GQA, 1 for MQA
    m.head_dim = config_dict.placeholder(int)  # None: width // heads
    m.mlp_width = 1024  # F
    m.max_len = 1024  # longest sequence (size of the learned position table; RoPE ignores it)
    m.norm = "rmsnorm"  # rmsnorm | layernorm
    m.norm_eps = 1e-5
    m.activation = "swiglu"  # relu | gelu | swiglu | geglu
    m.use_bias = False  # biases on every projection (GPT-2: True)
    m.tied_embeddings = False  # the readout reuses the token embedding
    m.positions = "rope"  # rope | learned
    m.rope_theta = 10000.0
    # Llama 3.1's long-context RoPE ("llama3"): wavelengths above original_max_len / low_freq_factor
    # are stretched by rope_scaling_factor, below original_max_len / high_freq_factor kept, blended between.
    m.rope_scaling = "none"  # none | llama3
    m.rope_scaling_factor = 8.0
    m.rope_low_freq_factor = 1.0
    m.rope_high_freq_factor = 4.0
    m.rope_original_max_len = 8192
    m.param_dtype = "float32"
    m.compute_dtype = "float32"  # float32 | bfloat16: matmuls; softmax, norms and logits stay float32
    m.init = "scaled_normal"  # scaled_normal | mup: fan-in-scaled truncated normal, residual outputs / sqrt(2 * depth)
    m.init_scale = 1.0  # multiplies every matrix's fan-in-scaled std
    # init=mup: the same fan-in-scaled init (its readout std init_scale / width is already μP's) with
    # μP's learning rates: matrices learn at lr * mup_base_width / width (train/optimizer.py).
    m.mup_base_width = 128
    # Token (and learned position) embedding std. 1.0 puts the residual stream at unit scale, so
    # the depth-scaled blocks move it little at init; tied embeddings need a small one (GPT-2: 0.02).
    m.embed_init_std = 1.0
    m.scan_layers = True  # stacked blocks under a scan; False unrolls them (same parameters)
    # What the backward pass keeps vs recomputes: auto | none | full | save_matmuls. save_matmuls keeps
    # matmul outputs and recomputes the elementwise ops; full keeps each block's input only. Which is
    # fastest depends on the machine (bench/RESULTS.md), so auto chooses at the start of a run: on a
    # TPU the least recompute the plan says fits, elsewhere the fastest of a few timed steps each;
    # cached by config and machine, and logged (train/remat.py).
    m.remat = "auto"
    # Attention stays inside each packed document (by the batch's segment ids). Packing restarts
    # positions at every document, so without the mask a token would also see the previous
    # document's keys at RoPE offsets it never meets at inference (MaxText masks and resets together).
    m.document_mask = True
    # The MLP of every block: dense, or moe, a mixture of experts (Mixtral's; model/moe.py): a router
    # sends each token to top_k of `experts` gated MLPs, so parameters grow while the work per token does not.
    m.mlp = "dense"  # dense | moe
    e = m.moe = ml_collections.ConfigDict()
    e.experts = 8  # E
    e.top_k = 2  # experts per token
    e.expert_width = config_dict.placeholder(int)  # each expert's hidden width; None: mlp_width
    # 0: dropless (every choice is computed: tokens sorted by expert, grouped matmuls, jax.lax.ragged_dot).
    # > 0: each expert takes at most capacity_factor * its even share of a sequence's tokens; the rest drop.
    e.capacity_factor = 0.0
    # Router losses added to the training loss (each logged in metrics.jsonl): load balancing (Switch;
    # top_k when balanced) and z-loss (ST-MoE: mean squared logsumexp of the router's logits).
    e.balance_loss_weight = 0.01
    e.z_loss_weight = 0.001
    # auto | xla | flash: training's attention. flash is the platform's fused kernel (TPU: Pallas splash
    # attention; GPU: cuDNN), which never materialises [heads, length, length] scores; auto takes it where
    # the platform has one (model/kernels.py) and XLA's attention elsewhere (the CPU).
    m.attention = "auto"
    # Fine-tuning's pieces, set by heft finetune from the finetune section below (0 is off; with all
    # three off the model is exactly the pretrained one).
    m.adapter_width = 0  # bottleneck adapters after the attention and the MLP of every block
    m.adapter_activation = "gelu"  # relu | gelu | silu
    m.prefix_length = 0  # learned keys and values that every layer attends to first
    m.prompt_length = 0  # learned input embeddings ahead of every sequence
    # The family: decoder (the above) | encoder_decoder (T5: a bidirectional encoder reads the input, a
    # decoder attends to it; model/encoder_decoder.py). An encoder_decoder has positions=relative
    # (T5's bucketed bias, per stack), an untied readout, and these fields besides:
    m.family = "decoder"
    m.encoder_depth = config_dict.placeholder(int)  # the encoder's blocks; None: depth (the decoder's)
    m.relative_buckets = 32  # T5's relative position buckets (half exact distances, half log-spaced)
    m.relative_max_distance = 128  # distances from this on share the last bucket
    m.decoder_start = 0  # the decoder's first input (T5's: the pad id)

    # Mesh: sizes of the data, fsdp and tensor axes; -1 fills the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    # TPU slices the run spans, joined by the data-center network (DCN): the outermost mesh axis.
    # data, fsdp and tensor split each slice; the rules below put only the batch across slices.
    c.mesh.slices = 1
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Expert parallelism (model.mlp=moe): each device holds model.moe.experts / mesh.expert of every layer's
    # experts; the batch is split over this axis too, so attention and the dense parts see data parallelism.
    c.mesh.expert = 1
    # Logical axis -> mesh axes (a name, a tuple of names, or None for replicated).
    # One table for every parameter and activation; change the parallelism here, never in model/.
    c.mesh.rules = (
        ("batch", ("slices", "data", "fsdp", "expert")),
        ("length", None),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("layers", None),
        ("expert", "expert"),  # a mixture of experts' stacked expert weights (train/experts.py runs them)
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
        ("lora_rank", None),  # fine-tuning's own axes: LoRA's rank, the adapters' bottleneck,
        ("adapter", None),  # the prefix's and prompt's length; small, so kept whole
        ("prefix", None),
        ("relative_buckets", None),  # T5's relative position bias: a few dozen rows, kept whole
    )

    # Data: the corpus, its tokenizer and the loader.
    d = c.data = ml_collections.ConfigDict()
    d.corpus = "embedded"  # "embedded" or a directory / glob of .txt, .jsonl (text field), .parquet
    d.text_field = "text"  # the field holding a document in .jsonl and .parquet files
    d.tokenizer = "bpe"  # bpe | unigram (sentencepiece); vocab size is model.vocab
    d.heldout_fraction = 0.05  # the last documents, by this fraction, are the held-out split
    d.cache_dir = ""  # where tokenizers and token stores live; "" means $HEFT_CACHE or ~/.cache/heft
    d.workers = 2  # processes that tokenize in parallel
    d.seed = 0  # shuffle order of packed sequences
    # The token that leads every document, and so every prompt: heft's token store leads each
    # document with EOS; Llama tokenizers imported from Hugging Face lead with BOS.
    d.document_start = "eos"  # eos | bos
    # text: documents (pretraining). prompt_completion: .jsonl lines {"prompt": .., "completion": ..}
    # whose loss falls on the completion alone (fine-tuning; data/pairs.py).
    d.format = "text"
    d.prompt_field = "prompt"
    d.completion_field = "completion"
    # encoder_decoder on text: T5's span corruption (data/spans.py). The tokenizer heft trains keeps the
    # top `sentinels` ids of model.vocab free for the sentinels that stand for the dropped spans.
    d.noise_density = 0.15  # the share of tokens dropped from the input (and written by the decoder)
    d.mean_noise_span = 3.0  # the mean length of a dropped span
    d.sentinels = 0  # ids above the tokenizer's for sentinels (T5: 100); 0 for decoders

    # Training.
    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000
    t.batch_size = 8  # global, in sequences, over all processes
    t.seq_len = 256
    # encoder_decoder: seq_len is the encoder's row, this the decoder's; 0: span corruption's own
    # targets for seq_len inputs (data/spans.py), or seq_len for input/target pairs.
    t.target_len = 0
    t.micro_batches = 1  # gradient accumulation: batch_size is split into this many
    t.lr = 3e-3
    t.min_lr_ratio = 0.1  # the schedule ends at lr * min_lr_ratio
    t.schedule = "cosine"  # cosine | linear | constant, after warmup
    t.warmup_steps = 100
    t.b1 = 0.9
    t.b2 = 0.95
    t.eps = 1e-8
    t.weight_decay = 0.1
    t.decay_norms = False  # weight decay on norm scales
    t.decay_biases = False
    t.decay_embeddings = False
    t.grad_clip = 1.0  # global-norm clip; 0 disables it
    t.seed = 0  # parameter init
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 8
    t.checkpoint_every = 500
    t.on_nonfinite = "stop"  # stop | skip: what a NaN or Inf loss does
    t.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 measures this machine's matmul peak
    # A jax.profiler trace of steps FIRST..STOP-1 (e.g. "10:13"), into WORKDIR/tensorboard/plugins/profile
    # for TensorBoard's profile plugin or XProf; "" traces nothing. On the processes profile_hosts names.
    t.profile_steps = ""
    t.profile_hosts = "0"  # "all", or process indices: "0,3"
    # JAX's persistent compilation cache: "" = $JAX_COMPILATION_CACHE_DIR or ~/.cache/heft/compile;
    # a gs:// folder lets every host of a pod, and every restart, reuse one compile; "none" turns it off.
    t.compilation_cache = ""

    # Checkpoints (orbax).
    k = c.checkpoint = ml_collections.ConfigDict()
    k.keep = 3  # the newest this many
    k.keep_every = 0  # and every this-many-th step forever (0: none)
    k.async_save = True
    k.verify = True  # check the manifest's hashes before restoring
    # Resuming on another corpus (fine-tuning) is refused unless this is set; the checkpoint's
    # tokenizer then tokenizes the new corpus.
    k.allow_data_change = False
    k.signing_key = ""  # an ed25519 private key (PEM) that signs each seal; "" signs nothing
    k.verify_key = ""  # its public key: restore only checkpoints whose seal it verifies

    # Fine-tuning (`heft finetune --base=CHECKPOINT`): what is trained on top of the frozen base.
    # The model is the base's; train.* and data.* say how and on what. docs/config.md has the details.
    f = c.finetune = ml_collections.ConfigDict()
    f.method = "lora"  # full | lora | adapter | prefix | prompt
    f.freeze = ""  # full: a regex over parameter paths kept frozen, e.g. "embed|norm" ("" freezes none)
    f.freeze_layers = 0  # full: the first this-many blocks stay frozen
    f.lora_rank = 8  # r
    f.lora_alpha = 16.0  # the update is (alpha / r) * A @ B
    f.lora_dropout = 0.0  # drops input features of the low-rank branch, during training
    f.lora_targets = "q|k|v|o"  # a regex over projection names: q k v o gate up down readout
    f.adapter_width = 16  # the bottleneck of each adapter
    f.adapter_activation = "gelu"  # relu | gelu | silu
    f.prefix_length = 16  # learned keys and values per layer
    f.prefix_mlp = 0  # > 0: make the prefix through an MLP this wide while training (Li and Liang)
    f.prompt_length = 16  # learned input embeddings

    # Weight-only quantization (qwix): what `heft quantize` writes (its checkpoint's config says what
    # its integers are), or, with qat, what training fake-quantizes so that quantizing later costs less.
    q = c.quantize = ml_collections.ConfigDict()
    q.weights = "none"  # none | int8 | int4
    q.group_size = 0  # 0: one scale per output channel; N: one per N inputs (must divide width, head_dim, mlp_width)
    q.qat = False  # train with the weights fake-quantized to quantize.weights (straight-through gradients)
    return c
