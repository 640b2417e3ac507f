"""Imported tokenizers: a Hugging Face tokenizer.json travels with the weights, and heft reads text
with it exactly as transformers does (a random GPT-2 generates transformers' greedy text)."""

import os
import subprocess
import sys

import pytest
import workers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = "".join(f"The {w} dog ran over the {v} hill, and {w} birds sang.\n" for w in
               ("red", "brown", "lazy", "quick", "old") for v in ("green", "far", "steep", "low"))
PROMPTS = ["The red dog", "A quick bird"]
NEW = 12


def _byte_level_bpe():
    """A byte-level BPE (GPT-2's kind) trained here, with <|endoftext|> as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("gpt2"))
    tok = _byte_level_bpe()
    eos = tok.token_to_id("<|endoftext|>")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                  eos_token="<|endoftext|>")
    hf_tok.save_pretrained(folder)
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     initializer_range=0.2, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def _heft(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=workers.xla_flags(1))
    return subprocess.run([sys.executable, "-c", "from heft.launch.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_imported_gpt2_with_tokenizer_json_generates_transformers_greedy_text(gpt2_folder, tmp_path):
    r = _heft("convert", f"--from_hf={gpt2_folder}", f"--out={tmp_path / 'ckpt'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == open(os.path.join(gpt2_folder, "tokenizer.json"),
                                                                        "rb").read()
    r = _heft("generate", f"--checkpoint={tmp_path / 'ckpt'}", *[f"--prompt={p}" for p in PROMPTS],
              f"--max_new_tokens={NEW}", "--temperature=0")
    assert r.returncode == 0, r.stderr[-2000:]

    hf_tok = transformers.AutoTokenizer.from_pretrained(gpt2_folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    for prompt in PROMPTS:  # heft leads a prompt with the document start: GPT-2's <|endoftext|>
        ids = torch.tensor([[hf_tok.eos_token_id] + hf_tok(prompt).input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                                 pad_token_id=hf_tok.eos_token_id)
        text = hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert f"{prompt}{text}\n" + "-" * 40 in r.stdout, (prompt, text, r.stdout)


def test_heft_and_transformers_read_text_into_the_same_ids(gpt2_folder):
    from heft.data import tokenizer

    tok = tokenizer.load(os.path.join(gpt2_folder, "tokenizer.json"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(gpt2_folder)
    text = "The old dog sang over the steep hill.\n  Twice!"
    assert tok.encode(text) == hf_tok(text).input_ids
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == hf_tok.eos_token_id and tok.vocab_size == len(hf_tok)


def test_prepare_tokenizes_a_corpus_with_a_given_tokenizer_json(gpt2_folder, tmp_path):
    import numpy as np

    from heft.configs import tiny
    from heft.data import loader, prepare, tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [TEXT[:200], TEXT[200:400], TEXT[400:]]
    for i, d in enumerate(docs):
        (corpus / f"{i}.txt").write_text(d)
    c = tiny.get_config()
    c.data.update(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), workers=1, heldout_fraction=0.2,
                  tokenizer=os.path.join(gpt2_folder, "tokenizer.json"))
    p = prepare.prepare(c, progress=False)
    tok = tokenizer.load(os.path.join(gpt2_folder, "tokenizer.json"))
    stream, starts = loader.split_stream(p, "train")
    assert stream.tolist() == [tok.eos_id] + tok.encode(docs[0]) + [tok.eos_id] + tok.encode(docs[1]) + [tok.eos_id]
    assert np.array_equal(starts, [0, 1 + len(tok.encode(docs[0]))])
