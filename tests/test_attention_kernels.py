"""`model.attention = auto | xla | flash` (model/kernels.py): which kernel runs where, and that each
computes causal attention within documents, with grouped kv heads, as a NumPy reference does."""

import jax
import ml_collections
import numpy as np
import pytest

from heft.configs import tiny
from heft.model import kernels
from heft.model.checks import ConfigError, check_model


def _model(attention="auto", head_dim=None):
    m = tiny.get_config().model
    m.attention = attention
    m.head_dim = head_dim
    return m


def _qkv(batch=2, length=16, heads=4, kv_heads=2, head_dim=8, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, length, heads, head_dim))
    k = jax.random.normal(kk, (batch, length, kv_heads, head_dim))
    v = jax.random.normal(kv, (batch, length, kv_heads, head_dim))
    # Two documents in the first row (cut at 5), three in the second (cut at 3 and 11).
    segments = np.zeros((batch, length), np.int32)
    segments[0, 5:] = 1
    if batch > 1:
        segments[1, 3:], segments[1, 11:] = 1, 2
    return q, k, v, segments


def _reference(q, k, v, segments):
    """Causal attention within each document, every kv head shared by heads // kv_heads heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    length = q.shape[1]
    allowed = np.tril(np.ones((length, length), bool))[None] & (segments[:, :, None] == segments[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("attention", ["xla", "auto"])
def test_the_cpu_attention_is_causal_within_documents_with_grouped_kv_heads(attention):
    q, k, v, segments = _qkv()
    y = kernels.causal_attention(q, k, v, segments, _model(attention))
    np.testing.assert_allclose(np.asarray(y), _reference(q, k, v, segments), rtol=1e-5, atol=1e-5)
    whole = kernels.causal_attention(q, k, v, None, _model(attention))  # no mask: one document a row
    np.testing.assert_allclose(np.asarray(whole), _reference(q, k, v, np.zeros_like(segments)), rtol=1e-5, atol=1e-5)


def test_auto_takes_the_fused_kernel_where_the_platform_has_one():
    assert kernels.resolve(_model("auto"), "cpu") == "xla"
    assert kernels.resolve(_model("auto", head_dim=128), "tpu") == "flash"
    assert kernels.resolve(_model("auto", head_dim=64), "tpu") == "xla"  # splash wants 128 lanes
    assert kernels.resolve(_model("auto", head_dim=128), "tpu", 8192) == "flash"
    assert kernels.resolve(_model("auto", head_dim=128), "tpu", 1000) == "xla"  # not in whole blocks
    assert kernels.resolve(_model("auto", head_dim=64), "gpu") == "flash"
    assert kernels.resolve(_model("xla", head_dim=128), "tpu") == "xla"
    assert kernels.platform() == "cpu"


def test_flash_where_it_cannot_run_and_unknown_names_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^model.attention=flash needs a TPU .* compiles for cpu; set "
                                          r"model.attention=auto or xla$"):
        kernels.causal_attention(*_qkv(), _model("flash"))
    m = _model("fast")
    with pytest.raises(ConfigError, match=r"^model.attention='fast' is unknown; choose one of auto, xla, flash$"):
        check_model(m)
    with pytest.raises(ConfigError, match=r"^train.seq_len=64 does not split into splash attention's blocks \(128 to "
                                          r"512 tokens, a multiple of 128, dividing the length\); use a multiple of 128 "
                                          r"\(of 512 above 512\) or set model.attention=auto or xla$"):
        kernels.resolve(_model("flash"), "tpu", 64)
    assert kernels.resolve(_model("flash"), "tpu", 384) == "flash" and kernels.resolve(_model("flash"), "tpu", 1024)
    with pytest.raises(ConfigError, match=r"^train.seq_len=1000 does not split"):
        kernels.resolve(_model("flash"), "tpu", 1000)
    old = ml_collections.ConfigDict(_model().to_dict())
    del old["attention"]  # a config saved before the field existed trains with auto
    assert kernels.resolve(old, "cpu") == "xla"


def test_splash_kernel_interpreted_on_the_cpu_matches_the_reference():
    """The TPU kernel itself (Pallas interpret mode), with document segments and grouped kv heads."""
    q, k, v, segments = _qkv(batch=1, length=128, heads=2, kv_heads=1, head_dim=128)
    segments[0, 70:] = 1
    y = kernels._splash(q, k, v, segments, interpret=True)
    np.testing.assert_allclose(np.asarray(y), _reference(q, k, v, segments), rtol=1e-4, atol=1e-4)
