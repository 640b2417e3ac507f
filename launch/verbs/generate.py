"""`heft generate --checkpoint=DIR --prompt="..." [--temperature --top_k --top_p]`: sample text from a
checkpoint with a KV cache (eval/generate.py); repeat --prompt for a batch."""

import time

from absl import flags

from heft.launch.flags import define_verify_key


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a workdir, a step directory or a parameters-only checkpoint")
    flags.DEFINE_multi_string("prompt", [""], "text to continue; repeat the flag for a batch")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens to add to each prompt at most")
    flags.DEFINE_float("temperature", 0.8, "0 is greedy; higher is more random")
    flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens only (0: no limit)")
    flags.DEFINE_float("top_p", 0.95, "then among the fewest tokens reaching probability p (1: no limit)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    define_verify_key()
    flags.mark_flag_as_required("checkpoint")


def main(argv):
    del argv
    f = flags.FLAGS
    from heft.data import tokenizer as tokenizers
    from heft.eval import text
    from heft.eval.generate import check_sampling, check_text  # here: `heft generate --help` needs no JAX
    from heft.launch.checkpoints import load
    from heft.train import sharding
    from heft.train.manifest import CheckpointError

    check_text(f.prompt)  # these before the slow load
    check_sampling(f.temperature, f.top_k, f.top_p)
    loaded = load(f.checkpoint, verify_key=f.verify_key)  # any kind: float, quantized, or a fine-tune made whole with its base
    if loaded.tokenizer is None:
        raise CheckpointError(f"checkpoint {f.checkpoint} holds no tokenizer (tokenizer.model or tokenizer.json); "
                              "generate needs one to turn text into tokens (save the checkpoint with its tokenizer)")
    tok = tokenizers.load(loaded.tokenizer)  # a tokenizer.json by the tokenizers library, else sentencepiece
    start = time.perf_counter()
    with sharding.activated(loaded.mesh, loaded.config):  # a batch that does not split evenly is padded by XLA
        outputs = text.complete(loaded.config, loaded.model(), tok, f.prompt, f.max_new_tokens,
                                temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, seed=f.seed)
    seconds = time.perf_counter() - start
    for prompt, (new, _) in zip(f.prompt, outputs):
        print(f"{prompt}{new}\n" + "-" * 40)
    print(f"heft generate: {sum(n for _, n in outputs)} new tokens for {len(f.prompt)} prompts in {seconds:.1f} s "
          f"(including compilation)")
