"""Logical names for activations. The model names axes; the rules table outside model/ maps them.

Outside a mesh and a rules context (`flax.linen.logical_axis_rules`) these are no-ops.
"""

import flax.linen as nn


def constrain(x, *names):
    """Asks the compiler to lay out `x` as the logical axes `names` say (one name per dimension)."""
    return nn.with_logical_constraint(x, names)
