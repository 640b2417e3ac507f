"""Quantization-aware training (`quantize.qat=true`): the forward pass sees every weight that
`heft quantize` would convert fake-quantized to `quantize.weights` (quantized, then scaled back,
with the same groups), and gradients pass through the rounding unchanged (the straight-through
estimator of qwix's QtProvider). Parameters stay float; `heft quantize` turns the result into
integers, which then lose less than a model trained without seeing them.
"""

from heft.model.build import bind as bind_float
from heft.model.checks import ConfigError
from heft.quantize import model, rules


def check(config) -> None:
    """Raises ConfigError for a quantize section that training cannot follow: qat without an
    integer type, or an integer type without qat (training keeps float weights)."""
    q = rules.section(config)
    if q["qat"] and q["weights"] == "none":
        raise ConfigError("quantize.qat=true needs quantize.weights=int8 or int4: the type to train against")
    if not q["qat"] and q["weights"] != "none":
        raise ConfigError(f"quantize.weights={q['weights']} without quantize.qat=true: training keeps float weights; "
                          "set quantize.qat=true to train against them, or quantize afterwards with heft quantize")


def binder(config):
    """`(model config, params) -> model` whose matched matmul weights are fake-quantized (under jit,
    inside the loss); the float decoder's own `bind` when quantize.qat is off. The rules are made
    for the model config given at bind time (a fine-tune's model is its base's)."""
    if not rules.section(config)["qat"]:
        return bind_float
    check(config)
    q = model.qwix()
    section = rules.section(config)

    def bind(m, params):
        rules.check_section(section, m)
        provider = q.QtProvider(rules.qwix_rules(config, m=m))
        # QT creates no variables for weight-only rules, so the one pass quantize_model would make
        # to set them up is skipped.
        return q.quantize_model(bind_float(m, params), provider, model.SAMPLE_SHAPE, skip_nnx_init=True)

    return bind
