"""`heft generate --checkpoint=DIR --prompt="..." [--temperature --top_k --top_p]`: sample text from a
checkpoint with a KV cache (eval/generate.py); repeat --prompt for a batch."""

import time

import jax
from absl import flags

from heft.eval.generate import check_sampling, check_text, generate


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a workdir, a step directory or a parameters-only checkpoint")
    flags.DEFINE_multi_string("prompt", [""], "text to continue; repeat the flag for a batch")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens to add to each prompt at most")
    flags.DEFINE_float("temperature", 0.8, "0 is greedy; higher is more random")
    flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens only (0: no limit)")
    flags.DEFINE_float("top_p", 0.95, "then among the fewest tokens reaching probability p (1: no limit)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.mark_flag_as_required("checkpoint")


def main(argv):
    del argv
    f = flags.FLAGS
    from heft.adapt import load as adapt_load
    from heft.data import tokenizer as tokenizers
    from heft.model import checks, decoder
    from heft.quantize.checkpoint import load_any
    from heft.train import sharding
    from heft.train.manifest import CheckpointError

    check_text(f.prompt)  # these before the slow load
    check_sampling(f.temperature, f.top_k, f.top_p)
    # A float or a quantized checkpoint (heft quantize): `bind` makes the model either holds.
    if adapt_load.is_finetune(f.checkpoint):  # a fine-tune, read with its base into the whole model
        config, params, tokenizer_path = adapt_load.load_params(f.checkpoint)
        bind = decoder.bind
    else:
        config, params, tokenizer_path, bind = load_any(f.checkpoint)
    if tokenizer_path is None:
        raise CheckpointError(f"checkpoint {f.checkpoint} holds no tokenizer (tokenizer.model or tokenizer.json); "
                              "generate needs one to turn text into tokens (save the checkpoint with its tokenizer)")
    tok = tokenizers.load(tokenizer_path)
    # As in training, a prompt is led by the token that leads every document (data.document_start:
    # EOS in heft's token store, BOS for imported Llama tokenizers); it ends at the next EOS. A
    # tokenizer.json is read by the tokenizers library, a tokenizer.model by sentencepiece.
    eos_id = tok.eos_id
    start_id = tok.bos_id if config.data.get("document_start", "eos") == "bos" else tok.eos_id
    prompts = [[start_id] + tok.encode(text) for text in f.prompt]
    if checks.family(config.model) == "encoder_decoder":  # the prompt is the encoder's input, ended by EOS
        from heft.data import seq2seq
        from heft.eval import seq2seq as generate_seq2seq

        prompts = [seq2seq.encoder_tokens(tok.encode(text), eos_id) for text in f.prompt]
        run = generate_seq2seq.generate
    else:
        run = generate
    mesh = jax.tree.leaves(params)[0].sharding.mesh  # load_params placed them on it
    start = time.perf_counter()
    with sharding.activated(mesh, config):  # a batch that does not split evenly is padded by XLA
        new = run(bind(config.model, params), prompts, f.max_new_tokens,
                  temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, seed=f.seed,
                  eos_id=eos_id)
    seconds = time.perf_counter() - start
    for text, tokens in zip(f.prompt, new):
        # A model's vocab may be padded past the tokenizer's pieces; such ids (and eos) have no text.
        tokens = [t for t in tokens if t < tok.vocab_size and t != eos_id]
        joint = "\n=> " if checks.family(config.model) == "encoder_decoder" else ""  # an output, not a continuation
        print(f"{text}{joint}{tok.decode(tokens)}\n" + "-" * 40)
    total = sum(len(t) for t in new)
    print(f"heft generate: {total} new tokens for {len(prompts)} prompts in {seconds:.1f} s "
          f"(including compilation)")
