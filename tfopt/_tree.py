"""Walking and rewriting the layer tree of a Keras 3 model.

Sequential and functional models are rewritten by cloning their graph with
the same layer objects (weights are shared, as with tfmot). Subclassed models
and composite layers (for example MultiHeadAttention, whose projections are
EinsumDense layers) are rewritten in place, by swapping tracked sublayers.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import keras

from tfopt import _compat

Replace = Callable[[keras.layers.Layer], Optional[keras.layers.Layer]]


def walk(root: keras.layers.Layer, *, stop: Callable[[keras.layers.Layer], bool] = lambda _: False
         ) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yield ``(path, layer)`` for every layer below ``root``, each once.

    Layers for which ``stop`` is true are yielded but not descended into.
    """
    seen: set[int] = set()

    def visit(layer, prefix):
        for child in _compat.direct_sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}/{child.name}" if prefix else child.name
            yield path, child
            if not stop(child):
                yield from visit(child, path)

    yield from visit(root, "")


def find(root: keras.layers.Layer, predicate: Callable[[keras.layers.Layer], bool]
         ) -> list[keras.layers.Layer]:
    """Every layer below ``root`` for which ``predicate`` holds, not looking inside them."""
    return [layer for _, layer in walk(root, stop=predicate) if predicate(layer)]


def lookup(table: dict, layer: keras.layers.Layer):
    """``table``'s entry for the layer's class or its nearest base class, or None."""
    for cls in type(layer).__mro__:
        if cls in table:
            return table[cls]
    return None


def rewrite(layer: keras.layers.Layer, replace: Replace) -> keras.layers.Layer:
    """Return ``layer`` with every sublayer for which ``replace`` gives a new one swapped.

    ``replace(layer)`` returns the substitute, or ``None`` to keep the layer
    (and look inside it).
    """
    substitute = replace(layer)
    if substitute is not None:
        return substitute
    if _compat.is_graph_model(layer):
        return _compat.clone_graph_model(layer, lambda child: rewrite(child, replace))
    for child in _compat.direct_sublayers(layer):
        new_child = rewrite(child, replace)
        if new_child is not child:
            _compat.replace_sublayer(layer, child, new_child)
    return layer
