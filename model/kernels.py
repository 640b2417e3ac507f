"""Which attention kernel a training step runs: XLA's, or the platform's fused (flash) kernel.

`model.attention` = auto | xla | flash. flash is JAX's own kernels: on TPU the Pallas splash-attention
kernel (`jax.experimental.pallas.ops.tpu.splash_attention`: block-sparse causal and document masks,
grouped kv heads, its own backward), on GPU cuDNN's fused attention through
`jax.nn.dot_product_attention(implementation="cudnn")`. Neither materialises the [heads, length,
length] scores: the memory of a long sequence's attention is then that of its q, k and v. auto picks
flash where the platform has it and the shapes suit it (a length the kernel's blocks divide), else
xla; the CPU has no fused kernel (XLA's attention is what runs there).

The platform is the one the step compiles for: the active mesh's devices (an abstract TPU slice when
`heft plan` compiles on a CPU), else JAX's default backend.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from heft.model.checks import ATTENTIONS, ConfigError, head_dim  # noqa: F401  (auto | xla | flash)

FLASH_PLATFORMS = ("tpu", "gpu")
SPLASH_BLOCK = 512  # splash's q and kv block (MaxText's default sa_block_*): a multiple of 128 that divides the length
LANE = 128  # TPU vector lanes: splash's blocks are multiples of it


def platform() -> str:
    """The platform a step being traced compiles for: the active mesh's, else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve(m, where: str | None = None, length: int | None = None) -> str:
    """"xla" or "flash" for model config `m` on platform `where` (default: `platform()`), for
    sequences of `length` tokens (None: any length the kernel takes).

    Raises ConfigError for flash on a platform without a fused kernel."""
    choice = m.get("attention", "auto")
    where = where or platform()
    if choice == "flash" and where not in FLASH_PLATFORMS:
        raise ConfigError(f"model.attention=flash needs a TPU (Pallas splash attention) or a GPU (cuDNN), and this "
                          f"step compiles for {where}; set model.attention=auto or xla")
    if choice == "auto":
        return "flash" if where in FLASH_PLATFORMS and _suits(m, where, length) else "xla"
    if choice == "flash" and where == "tpu" and length is not None and not whole_blocks(length):
        raise ConfigError(f"train.seq_len={length} does not split into splash attention's blocks ({LANE} to "
                          f"{SPLASH_BLOCK} tokens, a multiple of {LANE}, dividing the length); use a multiple of "
                          f"{LANE} (of {SPLASH_BLOCK} above {SPLASH_BLOCK}) or set model.attention=auto or xla")
    return choice


def whole_blocks(length: int) -> bool:
    """Whether splash's blocks (whole multiples of the TPU's lanes) tile a sequence of `length`."""
    block = splash_block(length)
    return length % block == 0 and block % LANE == 0


def _suits(m, where: str, length: int | None) -> bool:
    """Whether auto may take the fused kernel: on a TPU, a length splash's blocks tile, and a head_dim
    the lanes divide (smaller heads compile, for v5e at 32, 64 and 96, but fill a fraction of each
    lane: asked for with model.attention=flash, not taken by auto)."""
    if where != "tpu":
        return True
    return head_dim(m) % LANE == 0 and (length is None or whole_blocks(length))


def causal_attention(q, k, v, segment_ids, m):
    """Causal attention, within each document when `segment_ids` is given.

    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim] (heads a multiple of
    kv_heads); segment_ids: [batch, length] or None. Returns [batch, length, heads, head_dim].
    """
    where = platform()
    if resolve(m, where, q.shape[1]) == "xla":
        return _xla(q, k, v, segment_ids)
    if where == "gpu":
        return _cudnn(q, k, v, segment_ids)
    return _splash(q, k, v, segment_ids, interpret=False)


def _document_mask(segment_ids):
    """[batch, length] -> [batch, 1, length, length]: key and query in the same document."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _xla(q, k, v, segment_ids):
    mask = None if segment_ids is None else _document_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)


def _cudnn(q, k, v, segment_ids):
    """cuDNN's fused attention; a document mask goes in as a [batch, 1, length, length] boolean (its
    scores are never materialised, the mask is)."""
    mask = None if segment_ids is None else _document_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def splash_block(length: int) -> int:
    """splash's block: SPLASH_BLOCK, or the whole length when shorter."""
    return min(SPLASH_BLOCK, length)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = splash_block(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, segment_ids, interpret: bool):
    """Pallas splash attention on each device's shard (heads and batch split as the rules say; the
    length must be whole on a device). splash takes one example's [heads, length, head_dim] and does
    not scale the queries: both done here. `interpret` runs the kernel on the CPU (tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    length = q.shape[1]
    if length % splash_block(length) or splash_block(length) % 8:
        raise ConfigError(f"train.seq_len={length} is not a multiple of splash attention's block "
                          f"({SPLASH_BLOCK}); pick such a length or set model.attention=xla")
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    scale = q.shape[-1] ** -0.5

    def local(q, k, v, segment_ids):
        kernel = _splash_kernel(q.shape[2], q.shape[1], interpret)

        def one(q, k, v, ids):  # [length, heads, head_dim] -> [heads, length, head_dim] and back
            y = kernel((q * scale).swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                       segment_ids=splash.SegmentIds(q=ids, kv=ids))
            return y.swapaxes(0, 1)

        return jax.vmap(one)(q, k, v, segment_ids)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "act_kv_heads", None))
    ids_spec = nn.logical_to_mesh_axes(("batch", "length"))
    if spec[1] is not None:
        raise ConfigError(f"splash attention needs each sequence whole on a device, but the rules shard `length` "
                          f"over {spec[1]}; set model.attention=xla or map length to None in mesh.rules")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, kv_spec, kv_spec, ids_spec), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids)
