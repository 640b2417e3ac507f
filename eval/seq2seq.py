"""Generating with an encoder-decoder (what `heft generate` runs for model.family=encoder_decoder):
one encoder pass over the prompts, then the decoder one token at a time with a KV cache.

  1. right-pad the prompts (each its tokens then EOS, as the encoder was trained:
     data/seq2seq.py) to a bucketed length and encode them once, the padding masked (encoder
     segment ids 1 for a prompt's tokens, 0 for its padding);
  2. compute every decoder layer's cross-attention keys and values of the encoder's output once;
  3. from model.decoder_start, feed one token per row per step under `jax.lax.while_loop`, its
     self-attention's keys and values written at slot = step of a fixed-size cache.
The loop stops early once every row has emitted `eos_id`. Sampling is eval/sampling.py's, as for
decoders. `full_forward_generate` is the reference without a cache: every step reruns the decoder
over everything it has written.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heft.eval import sampling
from heft.eval.generate import CACHE_MULTIPLE, check_sampling, check_tokens, pad_prompts, padded_lengths, sample
from heft.model import precision
from heft.model.build import init_cache
from heft.model.checks import ConfigError


def check_request(m, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raises ConfigError, before anything compiles, for a request the model cannot serve."""
    check_tokens(m, prompts, max_new_tokens, empty="an encoder input holds at least its EOS")
    for i, prompt in enumerate(prompts):
        if len(prompt) > m.max_len:
            raise ConfigError(f"prompt {i} is {len(prompt)} tokens with its EOS but model.max_len={m.max_len} is the "
                              "longest input this encoder-decoder reads (its relative positions were trained up "
                              f"to it; from model.relative_max_distance={m.relative_max_distance} on they share one "
                              "bucket); shorten the prompt")
    if max_new_tokens > m.max_len:
        raise ConfigError(f"max_new_tokens={max_new_tokens} exceeds model.max_len={m.max_len}, the longest output "
                          "this encoder-decoder writes; lower it")


def _encoder_segments(lengths, length: int):
    """[batch] prompt lengths -> encoder segment ids [batch, length]: 1 on a prompt, 0 on its padding."""
    return (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)


@nnx.jit(static_argnames=("max_new_tokens", "cache_len", "greedy"))
def decode(model, tokens, lengths, key, temperature, top_k, top_p, eos_id, *,
           max_new_tokens: int, cache_len: int, greedy: bool):
    """New tokens for a right-padded batch of encoder inputs.

    tokens: [batch, input_length] int32 right-padded prompts; lengths: [batch] int32 (>= 1); the
    sampling arguments as in eval/generate.py's `decode`. Returns [batch, max_new_tokens] int32;
    after a row's eos (and after an early stop) the entries are eos_id and meaningless.
    """
    m = model.m
    batch = tokens.shape[0]
    segments = _encoder_segments(lengths, tokens.shape[1])
    cross = model.cross_keys_values(model.encode(tokens, segments))  # [depth, batch, input_length, ...] each
    graphdef, params = nnx.split(model)  # carried through the loop (see eval/generate.py)

    def choose(logits, step):
        if greedy:
            return sampling.greedy(logits)
        return sampling.sample(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)

    cache = init_cache(m, batch, cache_len, precision.dtype(m.compute_dtype))
    first = jnp.full((batch,), m.decoder_start, jnp.int32)
    out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32)
    state = (params, jnp.int32(0), first, cache, jnp.zeros((batch,), bool), out)

    def running(state):
        _, step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(state):
        params, step, token, cache, done, out = state
        logits, (keys, values, end) = nnx.merge(graphdef, params).decode(
            token[:, None], encoder_segment_ids=segments, cache=cache, cross=cross)
        token = jnp.where(done, eos_id, choose(logits[:, 0], step))
        out = out.at[:, step].set(token)
        return params, step + 1, token, (keys, values, end + 1), done | (token == eos_id), out

    return jax.lax.while_loop(running, one_token, state)[-1]


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """The decoder's output for each encoder input (its tokens, ending with EOS), up to
    `max_new_tokens` tokens; sampling and stopping as eval/generate.py's `generate`."""
    m = model.m
    check_request(m, prompts, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    length, _ = padded_lengths(max(len(p) for p in prompts), 0)
    tokens, lengths = pad_prompts(prompts, length)
    cache_len = -(-max_new_tokens // CACHE_MULTIPLE) * CACHE_MULTIPLE
    return sample(decode, model, tokens, lengths, max_new_tokens, cache_len, temperature, top_k, top_p, seed,
                  eos_id)


@nnx.jit(static_argnames=("n",))
def _full_forward(model, tokens, lengths, n: int):
    """tokens: [batch, input_length] right-padded; lengths: [batch]. Returns [batch, n] int32."""
    m = model.m
    segments = _encoder_segments(lengths, tokens.shape[1])
    encoded = model.encode(tokens, segments)
    graphdef, params = nnx.split(model)

    def step(s, carry):
        params, written, out = carry
        logits = nnx.merge(graphdef, params).decode(written, encoded, encoder_segment_ids=segments)
        token = sampling.greedy(logits[:, s])  # causal: the slots after s do not change it
        return params, written.at[:, s + 1].set(token, mode="drop"), out.at[:, s].set(token)

    written = jnp.zeros((tokens.shape[0], n), jnp.int32).at[:, 0].set(m.decoder_start)
    out = jnp.zeros((tokens.shape[0], n), jnp.int32)
    return jax.lax.fori_loop(0, n, step, (params, written, out))[-1]


def full_forward_generate(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy decoding without a cache: `n` tokens per encoder input, each from a full decoder pass."""
    check_request(model.m, prompts, n)
    tokens, lengths = pad_prompts(prompts, max(len(p) for p in prompts))
    return np.asarray(_full_forward(model, jnp.asarray(tokens), jnp.asarray(lengths), n)).tolist()
