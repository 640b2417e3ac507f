"""The embedded fine-tuning task: given three lines of Paradise Lost, write the next (data/next_line.py).

    heft train --config=configs/tiny.py --workdir=runs/tiny                       # the base
    heft finetune --config=configs/milton.py --base=runs/tiny --workdir=runs/milton  # LoRA
    heft finetune --config=configs/milton.py:prompt --base=runs/tiny --workdir=runs/milton_prompt

The argument after the colon picks the method (full, lora, adapter, prefix, prompt) together with
a learning rate that suits it at this scale (bench/RESULTS.md, "Fine-tuning"). The model is the
base's; this file says what to train, on what and how long.
"""

from heft.configs import base

LR = {"full": 1e-3, "lora": 1e-2, "adapter": 1e-2, "prefix": 3e-2, "prompt": 1e-1}


def get_config(method: str = "lora"):
    c = base.get_config()
    c.name = f"milton_{method}"
    c.data.corpus = "embedded:milton_next_line"
    c.data.format = "prompt_completion"
    c.finetune.method = method
    t = c.train
    t.steps = 300
    t.batch_size = 16
    t.seq_len = 128
    t.lr = LR.get(method, 1e-2)  # an unknown method is named by heft finetune's own check
    t.warmup_steps = 30
    t.weight_decay = 0.0
    t.log_every = 25
    t.eval_every = 100
    t.eval_batches = 8
    t.checkpoint_every = 100
    return c
