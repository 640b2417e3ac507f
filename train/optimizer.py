"""The optimizer: optax AdamW with a warmup-then-decay schedule, global-norm clipping and a
weight-decay mask, all from `config.train`; what its state costs; what a skipped step does to it."""

import jax.numpy as jnp
import optax
from flax import traverse_util

from heft.model import build
from heft.model.checks import ConfigError
from heft.train.checks import SCHEDULES


def schedule(t) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine, linear or constant."""
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={t.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    end = t.lr * t.min_lr_ratio
    warmup = optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
    rest = max(t.steps - t.warmup_steps, 1)
    after = {
        "cosine": optax.cosine_decay_schedule(t.lr, rest, alpha=t.min_lr_ratio),
        "linear": optax.linear_schedule(t.lr, end, rest),
        "constant": optax.constant_schedule(t.lr),
    }[t.schedule]
    return optax.join_schedules([warmup, after], [t.warmup_steps])


def decays(path: tuple[str, ...], t) -> bool:
    """Whether weight decay applies to the parameter at `path` (matrices always; the rest by config)."""
    name = path[-1]
    if path[-2:-1] and path[-2].endswith("norm"):
        return t.decay_norms
    if name.endswith("_bias"):
        return t.decay_biases
    if name in ("embed", "position_embed"):
        return t.decay_embeddings
    return True


def decay_mask(params: dict, t) -> dict:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: decays(path, t) for path in flat})


def make(t, lr_multipliers: dict | None = None) -> optax.GradientTransformation:
    """AdamW over nested-dict parameters, clipped by global norm (`train.grad_clip`, 0 disables).

    `lr_multipliers` ({parameter path: factor}, μP's from `mup_multipliers`) gives parameters a
    multiple of the schedule's learning rate: they are grouped by factor under
    `optax.multi_transform`, one AdamW per group.
    """
    def adamw(factor: float = 1.0):
        rate = schedule(t)
        return optax.adamw(
            rate if factor == 1.0 else (lambda count: factor * rate(count)), b1=t.b1, b2=t.b2, eps=t.eps,
            weight_decay=t.weight_decay, mask=lambda params: decay_mask(params, t),
        )

    if lr_multipliers is None:
        tx = adamw()
    else:
        groups = {str(f): adamw(f) for f in set(lr_multipliers.values())}
        labels = traverse_util.unflatten_dict({path: str(f) for path, f in lr_multipliers.items()})
        tx = optax.multi_transform(groups, labels)
    if t.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
    return tx


def mup_multipliers(config) -> dict:
    """μP's per-parameter learning-rate factors for Adam (Tensor Programs V), {path: factor}: every
    matrix whose fan-in grows with the width (attention, MLP, the readout) learns at
    lr · base_width / width; embeddings, norm scales and biases at lr. With `model.init=mup` and a
    fixed head_dim, the best lr found at `model.mup_base_width` carries over to other widths."""
    ratio = config.model.mup_base_width / config.model.width

    def factor(path) -> float:
        name = path[-1]
        fixed = name in ("embed", "position_embed") or name.endswith("_bias") or (
            len(path) > 1 and path[-2].endswith("norm"))
        return 1.0 if fixed else ratio

    return {path: factor(path) for path in traverse_util.flatten_dict(build.abstract_params(config.model))}


def make_for(config) -> optax.GradientTransformation:
    """The run's optimizer: `make(config.train)`, with μP's multipliers when `model.init == "mup"`."""
    if config.model.get("init") == "mup":
        return make(config.train, mup_multipliers(config))
    return make(config.train)


def state_bytes_per_param(param_dtype: str) -> int:
    """Bytes of optimizer state per parameter: AdamW's two moments, each kept in the parameter's
    dtype (optax's `mu_dtype=None` follows the parameters, and `nu` always does). The few scalar
    step counts are left out. `heft size` counts training memory with it; `heft plan` reads the
    same state's shapes from optax itself, and the tests hold the two equal."""
    return 2 * jnp.dtype(param_dtype).itemsize


def _is_schedule(path, _) -> bool:
    return getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"


def schedule_count(opt_state):
    """The step at which optax reads the learning-rate schedule for the next update (every group's
    schedule moves together, so the first one says it)."""
    return optax.tree.get_all_with_path(opt_state, "count", filtering=_is_schedule)[0][1]


def skip(opt_state):
    """The optimizer state after a step whose update is dropped (a NaN or Inf loss or gradient).

    Adam's moments and its bias-correction count stay as they were: no gradient went into them.
    The schedule's count moves on, as the train step does, so the learning rate optax applies at
    step s is always schedule(s), the one the loop logs (optax.apply_if_finite would hold the
    schedule back instead, and every later step would run at an earlier step's rate).
    """
    return optax.tree.set(opt_state, _is_schedule, count=schedule_count(opt_state) + 1)
