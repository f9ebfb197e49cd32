"""Running a wrapped layer with some of its weights replaced by computed tensors.

Both the pruning and the quantization wrappers compute with a transformed
weight (``weight * mask``, ``fake_quant(weight)``) without touching the wrapped
layer's code: ``keras.StatelessScope`` makes the layer read the given tensor
in place of the variable, and gradients flow through the transformation to
the variable.
"""

from __future__ import annotations

from typing import Sequence

import keras


def call_with_weights(wrapper: keras.layers.Layer, layer: keras.layers.Layer,
                      mapping: Sequence[tuple[keras.Variable, object]], *args, **kwargs):
    """Call ``layer`` with each ``(variable, tensor)`` of ``mapping`` substituted.

    What the layer does to its other state inside the scope (moving
    statistics, say) is carried out afterwards, and the losses it adds are
    added to ``wrapper``.
    """
    with keras.StatelessScope(state_mapping=list(mapping), collect_losses=True) as scope:
        outputs = layer(*args, **kwargs)
    substituted = {id(variable) for variable, _ in mapping}
    for variable in layer.variables:
        if id(variable) not in substituted:
            updated = scope.get_current_value(variable)
            if updated is not None:
                variable.assign(updated)
    if scope.losses:
        wrapper.add_loss(scope.losses)
    return outputs
