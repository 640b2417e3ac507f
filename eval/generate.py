"""Continuing prompts with a model and a KV cache (what `heft generate` runs).

How a batch of prompts of different lengths is decoded:
  1. right-pad them to a bucketed length and run them through the model in one pass (prefill),
     writing every layer's keys and values into a fixed-size cache from slot 0;
  2. set each row's cache end to its own prompt length, so the padded slots are masked and later
     overwritten, and pick the first new token from the logits at each row's last prompt token;
  3. feed one token per row per step under `jax.lax.while_loop`, at position = that row's end.
The loop stops early once every row has emitted `eos_id`. Prompt length and cache length are
rounded up (`padded_lengths`) so that new prompts rarely mean a new compile.

`full_forward_generate` is the reference without a cache: every step reruns the whole prefix.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heft.eval import sampling
from heft.model import precision
from heft.model.build import init_cache
from heft.model.checks import ConfigError

MIN_PROMPT_BUCKET = 16  # prompts are padded to a power of two at least this long
CACHE_MULTIPLE = 128  # the cache length is a multiple of this


def padded_lengths(prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prefill length, cache length) for prompts of at most `prompt_len` tokens.

    The prefill writes all its padded slots, so the cache holds at least prefill + new tokens.
    """
    prefill = max(MIN_PROMPT_BUCKET, 1 << (prompt_len - 1).bit_length())
    cache = -(-(prefill + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    return prefill, cache


def pad_prompts(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists with 0. Returns (tokens [batch, length] int32, lengths [batch] int32)."""
    tokens = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


def check_tokens(m, prompts: list[list[int]], max_new_tokens: int,
                 empty: str = "start it with at least one (e.g. EOS)") -> None:
    """Raises ConfigError for no prompts, an empty one (`empty` says what to do), a token outside the
    vocabulary or nothing to generate: what a decoder and an encoder-decoder both refuse."""
    if not prompts:
        raise ConfigError("no prompts given; pass at least one")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ConfigError(f"prompt {i} has no tokens; {empty}")
        if min(prompt) < 0 or max(prompt) >= m.vocab:
            raise ConfigError(f"prompt {i} has a token outside 0..{m.vocab - 1} (model.vocab={m.vocab})")


def check_request(m, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raises ConfigError, before anything compiles, for a request the model cannot serve."""
    check_tokens(m, prompts, max_new_tokens)
    longest = max(len(p) for p in prompts)
    # The last token fed to the model sits at position longest + max_new_tokens - 2.
    if m.positions == "learned" and longest + max_new_tokens - 1 > m.max_len:
        raise ConfigError(
            f"a {longest}-token prompt plus max_new_tokens={max_new_tokens} needs "
            f"{longest + max_new_tokens - 1} positions but model.max_len={m.max_len} (learned "
            "positions); shorten the prompt or lower max_new_tokens"
        )


def check_text(prompts: list[str]) -> None:
    """Each prompt is text: the shell hands over bytes that are not UTF-8 as lone surrogates, which
    neither the tokenizer nor the terminal can take."""
    for i, text in enumerate(prompts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"--prompt #{i + 1} is not valid UTF-8 (byte {ord(text[e.start]) & 0xFF:#04x} at "
                              f"character {e.start}); pass UTF-8 text") from None


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ConfigError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: need temperature "
                          ">= 0, top_k >= 0 and 0 < top_p <= 1")


@nnx.jit(static_argnames=("max_new_tokens", "cache_len", "greedy"))
def decode(model, tokens, lengths, key, temperature, top_k, top_p, eos_id, *,
           max_new_tokens: int, cache_len: int, greedy: bool):
    """New tokens for a right-padded batch of prompts, with a KV cache.

    tokens: [batch, prefill] int32 right-padded prompts; lengths: [batch] int32 (>= 1);
    key: a jax.random key; temperature, top_p: float scalars; top_k, eos_id: int scalars
    (eos_id < 0: none). Returns [batch, max_new_tokens] int32; after a row's eos (and after an
    early stop) the entries are eos_id and meaningless.
    """
    m = model.m
    batch, prefill = tokens.shape
    rows = jnp.arange(batch)
    # An NNX module's arrays cannot be closed over by the loop body (NNX refuses tracers of an
    # outer trace), so the parameters ride in the loop's carry and the model is rebuilt inside.
    graphdef, params = nnx.split(model)

    def choose(logits, step):
        """logits [batch, vocab] -> [batch] int32."""
        if greedy:
            return sampling.greedy(logits)
        return sampling.sample(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)

    # Prefill. Padding gets position 0, a valid row of any position table: its slots are masked.
    t = jnp.arange(prefill)[None, :]
    positions = jnp.where(t < lengths[:, None], t, 0)
    cache = init_cache(m, batch, cache_len, precision.dtype(m.compute_dtype))
    logits, (keys, values, _) = model(tokens, positions, cache=cache)
    first = choose(logits[rows, lengths - 1], 0)
    # The attention leaves `end` to its caller: each row's filled slots stop at its prompt.
    cache = (keys, values, jnp.broadcast_to(lengths, (m.depth, batch)))

    out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
    state = (params, jnp.int32(1), first, cache, first == eos_id, out)

    def running(state):
        _, step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(state):
        params, step, token, cache, done, out = state
        end = cache[2]
        model = nnx.merge(graphdef, params)
        logits, (keys, values, _) = model(token[:, None], end[0][:, None], cache=cache)
        token = jnp.where(done, eos_id, choose(logits[:, 0], step))
        out = out.at[:, step].set(token)
        return params, step + 1, token, (keys, values, end + 1), done | (token == eos_id), out

    return jax.lax.while_loop(running, one_token, state)[-1]


def cut_after_eos(rows: np.ndarray, eos_id: int | None) -> list[list[int]]:
    """[batch, n] -> token lists, each ending at (and keeping) its first eos_id."""
    result = []
    for row in rows.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None
             ) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens; returns the new tokens only.

    temperature 0 is greedy (top_k, top_p, seed unused); otherwise tokens are sampled after top-k
    (0: off) then top-p (1.0: off) filtering, reproducibly for a given seed and batch. A row
    stops at its first `eos_id`, which is kept as its last token.
    """
    m = model.m
    check_request(m, prompts, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    prefill, cache_len = padded_lengths(max(len(p) for p in prompts), max_new_tokens)
    tokens, lengths = pad_prompts(prompts, prefill)
    return sample(decode, model, tokens, lengths, max_new_tokens, cache_len, temperature, top_k, top_p, seed,
                  eos_id)


def sample(decode_fn, model, tokens, lengths, max_new_tokens: int, cache_len: int, temperature: float,
           top_k: int, top_p: float, seed: int, eos_id: int | None) -> list[list[int]]:
    """Runs a jitted cached decoder (a decoder's `decode` or an encoder-decoder's) on right-padded
    prompts `tokens` [batch, length] with their `lengths` [batch], the sampling settings passed as
    arrays so that one compile serves them all; each row is cut after its first `eos_id`."""
    out = decode_fn(model, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
                    jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                    jnp.int32(-1 if eos_id is None else eos_id),
                    max_new_tokens=max_new_tokens, cache_len=cache_len, greedy=temperature == 0)
    return cut_after_eos(np.asarray(out), eos_id)


@nnx.jit(static_argnames=("n",))
def _full_forward(model, tokens, lengths, n: int):
    """tokens: [batch, longest + n - 1] right-padded; lengths: [batch]. Returns [batch, n] int32."""
    rows = jnp.arange(tokens.shape[0])
    graphdef, params = nnx.split(model)  # carried through the loop, as in `decode`

    def step(s, carry):
        params, tokens, out = carry
        logits = nnx.merge(graphdef, params)(tokens)  # [batch, length, vocab]: all of it, every step
        token = sampling.greedy(logits[rows, lengths - 1 + s])
        # The longest row's last token has no slot and is never fed back; drop that write.
        tokens = tokens.at[rows, lengths + s].set(token, mode="drop")
        return params, tokens, out.at[:, s].set(token)

    out = jnp.zeros((tokens.shape[0], n), jnp.int32)
    return jax.lax.fori_loop(0, n, step, (params, tokens, out))[-1]


def full_forward_generate(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy decoding without a cache: `n` new tokens per prompt, each from a full forward pass.

    The buffer is exactly as long as the last fed position needs, so learned positions never
    index past model.max_len (padding past a row's end does not reach it: attention is causal).
    """
    check_request(model.m, prompts, n)
    tokens, lengths = pad_prompts(prompts, max(len(p) for p in prompts) + n - 1)
    return np.asarray(_full_forward(model, jnp.asarray(tokens), jnp.asarray(lengths), n)).tolist()
