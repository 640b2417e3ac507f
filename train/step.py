"""The train and eval steps: pure functions of (state, batch), jitted over the mesh by the loop.

The state is state.py's {"step", "params", "opt_state"}; the model is built and run through
heft.model.build, so one step serves every family.
"""

import jax
import jax.numpy as jnp
import optax

from heft.model import build
from heft.train import optimizer


def loss_sums(config, params, batch, bind=build.bind):
    """(sum of weighted next-token losses, sum of weights) over a batch of [batch, length] arrays.
    `bind(model config, params)` makes the model (another for quantized parameters: heft.quantize)."""
    logits, _ = build.forward(config.model, bind(config.model, params), batch)
    return _weighted_sums(logits, batch)


def _weighted_sums(logits, batch):
    """(sum of weighted next-token losses, sum of weights) of logits [batch, length, vocab]."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["weights"].astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


def training_sums(config, params, batch, bind=build.bind):
    """What training minimises, as sums: (objective sum, (weight sum, {name: sum to log})).

    A dense model's objective is `loss_sums`' and it logs nothing more. A mixture of experts adds
    its router losses (model/moe.py), each times its weight (model.moe.balance_loss_weight,
    z_loss_weight) and times the weight sum, so that the division by the weight sum in `gradients`
    adds weight * router loss to the mean; it logs the language-model loss alone as "loss" and each
    router loss unweighted, all as sums over the weighted tokens.
    """
    m = config.model
    logits, router = build.forward(m, bind(m, params), batch)
    total, count = _weighted_sums(logits, batch)
    if not router:
        return total, (count, {})
    penalty = m.moe.balance_loss_weight * router["balance_loss"] + m.moe.z_loss_weight * router["z_loss"]
    return total + penalty * count, (count, {"loss": total} | {k: v * count for k, v in router.items()})


def _split_micro(batch, n: int):
    """[batch, ...] -> [n, batch // n, ...]: micro-batches taken as consecutive rows."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def gradients(config, params, batch, loss=None):
    """Mean loss and its gradient over the global batch, accumulated over `train.micro_batches`, and
    the means of what the loss logs: (loss, gradients, {name: mean}).

    `loss(params, batch) -> (loss sum, weight sum)`, or (loss sum, (weight sum, {name: sum})) to log
    more, defaults to `training_sums`; a fine-tune (heft.adapt) passes a loss of its trainable
    weights alone, the frozen base closed over.

    Accumulation is a scan inside the step rather than optax.MultiSteps: the step then consumes the
    whole global batch in one call (one host round trip), and the mean is over all tokens of the
    batch, so any micro-batch count gives the same update.
    """
    n = config.train.micro_batches
    grad_fn = jax.value_and_grad(loss or (lambda p, b: training_sums(config, p, b)), has_aux=True)

    def sums(batch):
        (total, aux), grads = grad_fn(params, batch)
        count, logged = aux if isinstance(aux, tuple) else (aux, {})
        return total, count, logged, grads

    if n == 1:
        total, count, logged, grads = sums(batch)
    else:
        def body(carry, micro):
            total, count, logged, grads = sums(micro)
            acc_total, acc_count, acc_logged, acc_grads = carry
            return (acc_total + total, acc_count + count, jax.tree.map(jnp.add, acc_logged, logged),
                    jax.tree.map(jnp.add, acc_grads, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        micro = _split_micro(batch, n)
        logged = jax.eval_shape(sums, jax.tree.map(lambda x: x[0], micro))[2]  # its names, nothing computed
        logged = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), logged)
        (total, count, logged, grads), _ = jax.lax.scan(body, (0.0, 0.0, logged, zeros), micro)
    count = jnp.maximum(count, 1.0)
    return total / count, jax.tree.map(lambda g: g / count, grads), jax.tree.map(lambda x: x / count, logged)


def train_step(config, state, batch, loss=None, tx=None):
    """One optimizer update. Returns (new state, metrics); a non-finite loss or gradient leaves the
    parameters and Adam's moments as they were but advances the step and the schedule with it (the
    loop then stops or skips, by `train.on_nonfinite`). The logged `lr` is the one applied.

    `loss` (see `gradients`) and `tx` (default: the run's optimizer) let a fine-tune train other
    weights than the model's with this same update."""
    tx = tx or optimizer.make_for(config)
    loss, grads, logged = gradients(config, state["params"], batch, loss)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    # A skipped step still counts: the step and the schedule move on, the weights and moments do not.
    keep = {"step": state["step"] + 1, "params": state["params"], "opt_state": optimizer.skip(state["opt_state"])}
    state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, keep)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": optimizer.schedule(config.train)(state["step"] - 1),
        "finite": finite,
    }
    # A mixture of experts: "loss" becomes the language-model loss alone, and each router loss joins it.
    return state, metrics | logged


def eval_step(config, params, batch):
    """(sum of losses, sum of weights) on a held-out batch; the loop divides after summing batches."""
    return loss_sums(config, params, batch)
