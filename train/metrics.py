"""Where training metrics go: JSON lines and TensorBoard in the workdir, and the terminal."""

import json
import os
import resource
import sys

import jax


def memory_in_use_bytes() -> int:
    """Device memory in use on the first local device; on CPU, this process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Writer:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors it to
    TensorBoard (WORKDIR/tensorboard). Only process 0 writes."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()


class Progress:
    """A live bar with loss and tokens/s in a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int):
        self.live = sys.stderr.isatty() and jax.process_index() == 0
        self.bar = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict) -> None:
        text = (f"loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:,.0f} tok/s  "
                f"mfu {100 * metrics['mfu']:.1f}%")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text)
        elif jax.process_index() == 0:
            print(f"step {step}: {text}  lr {metrics['lr']:.2e}  grad_norm {metrics['grad_norm']:.3f}",
                  flush=True)

    def note(self, text: str) -> None:
        if jax.process_index() != 0:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
