"""Text in, text out, for any model family: what `heft generate` runs.

Each family reads a prompt its own way and decodes with its own loop (a KV cache either way); this
table, keyed by heft.model.build's family names, is the one place eval says which:
- a decoder continues its prompt, led by the token that leads every document in training
  (`data.document_start`: EOS in heft's token store, BOS for imported Llama tokenizers): generate.py;
- an encoder-decoder's encoder reads the prompt ended by EOS (data/seq2seq.py) and its decoder
  writes an answer: seq2seq.py.
"""

import dataclasses
from collections.abc import Callable

from heft.data import seq2seq as seq2seq_rows
from heft.eval import generate, seq2seq
from heft.model import build


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt: Callable  # (token ids, start id, eos id) -> what the model reads
    loop: Callable  # generate.generate's signature: (model, prompts, max_new_tokens, **sampling) -> new ids
    continues: bool  # the output continues the prompt (else it answers it)


GENERATIONS = {
    "decoder": Generation(lambda ids, start, eos: [start] + ids, generate.generate, continues=True),
    "encoder_decoder": Generation(lambda ids, start, eos: seq2seq_rows.encoder_tokens(ids, eos), seq2seq.generate,
                                  continues=False),
}


def start_id(config, tok) -> int:
    """The token that leads every document in training (`data.document_start`)."""
    return tok.bos_id if config.data.get("document_start", "eos") == "bos" else tok.eos_id


def complete(config, model, tok, texts: list[str], max_new_tokens: int, **sampling) -> list[tuple[str, int]]:
    """(new text, new token count) for each text, from `model` (built for `config` by heft.model.build,
    float or quantized): a continuation, or with an encoder-decoder an answer shown after "\\n=> ".
    `sampling`: generate's temperature, top_k, top_p, seed. Run it under `sharding.activated`."""
    how = GENERATIONS[build.family(config.model).name]
    eos = tok.eos_id
    prompts = [how.prompt(tok.encode(text), start_id(config, tok), eos) for text in texts]
    new = how.loop(model, prompts, max_new_tokens, eos_id=eos, **sampling)
    joint = "" if how.continues else "\n=> "
    # A model's vocab may be padded past the tokenizer's pieces; such ids (and eos) have no text.
    return [(joint + tok.decode([t for t in tokens if t < tok.vocab_size and t != eos]), len(tokens))
            for tokens in new]
