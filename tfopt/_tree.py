"""Walking and rewriting the layer tree of a Keras 3 model.

Sequential and functional models are rewritten by cloning their graph with
the same layer objects (weights are shared, as with tfmot). Composite layers
(for example MultiHeadAttention, whose projections are EinsumDense layers)
are rewritten as structural copies that share their weights and untouched
sublayers, so the user's model keeps its own. Subclassed models are
rewritten in place, by swapping tracked sublayers.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional, Union

import keras

from tfopt import _compat
from tfopt.errors import ConfigError

Replace = Callable[[keras.layers.Layer], Optional[keras.layers.Layer]]
LayerSelection = Union[None, str, Iterable[str], Callable[[keras.layers.Layer], bool]]


def selector(layers: LayerSelection) -> Optional[Callable[[keras.layers.Layer], bool]]:
    """The predicate a ``layers=`` argument stands for (a name, names, or a predicate)."""
    if layers is None:
        return None
    if callable(layers):
        return layers
    if not isinstance(layers, (str, list, tuple, set, frozenset)):
        raise ConfigError(
            f"layers must be a layer name, a list of names or a predicate, got {layers!r} "
            f"({type(layers).__name__})."
        )
    names = {layers} if isinstance(layers, str) else set(layers)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"layers must be a layer name, a list of names or a predicate, got {layers!r}."
        )
    return lambda layer: layer.name in names


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


# What a tfopt wrapper class does, in its ``_tfopt_role`` class attribute: pruning and
# quantization recognize each other's wrappers by it, without importing each other.
PRUNING, QUANTIZATION = "pruning", "quantization"


def carries(model: keras.layers.Layer, role: str) -> bool:
    """Whether any layer below ``model`` is a tfopt wrapper of ``role``."""
    return bool(find(model, lambda layer: getattr(layer, "_tfopt_role", None) == role))


def lookup(table: dict, layer: keras.layers.Layer):
    """``table``'s entry for the layer's class or its nearest base class, or None."""
    for cls in type(layer).__mro__:
        if cls in table:
            return table[cls]
    return None


class Journal:
    """The in-place swaps a rewrite made, so that a failure can undo them.

    Cloned graph models are new objects and need no undoing; what a rewrite
    changes in place (subclassed models, composite layers such as
    MultiHeadAttention or a keras-hub TransformerEncoder, wherever they sit)
    is recorded here and put back, newest first, by :meth:`undo`.
    """

    def __init__(self):
        self._swaps: list[tuple[keras.layers.Layer, keras.layers.Layer, keras.layers.Layer]] = []
        self._memo: dict[int, keras.layers.Layer] = {}

    def swap(self, parent, old, new) -> None:
        _compat.replace_sublayer(parent, old, new)
        self._swaps.append((parent, old, new))

    def undo(self) -> None:
        while self._swaps:
            parent, old, new = self._swaps.pop()
            _compat.replace_sublayer(parent, new, old)


@contextlib.contextmanager
def transaction() -> Iterator[Journal]:
    """Rewrites made with the yielded journal are undone if the block raises.

    Example:
        >>> with transaction() as journal:
        ...     new = rewrite(model, replace, journal)
        ...     calibrate(new)   # a failure here puts model's sublayers back too
    """
    journal = Journal()
    try:
        yield journal
    except BaseException:
        journal.undo()
        raise


def rewrite(layer, replace: Replace, journal: Optional[Journal] = None):
    """Return ``layer`` with every sublayer for which ``replace`` gives a new one swapped.

    ``replace(layer)`` returns the substitute, or ``None`` to keep the layer
    (and look inside it). Every node of a functional graph is visited:
    operation nodes that are not layers (``keras.ops`` calls, ``GetItem``,
    arithmetic on tensors) pass through untouched; a layer shared by several
    nodes or parents is replaced once, by the same substitute. Without a
    ``journal`` the rewrite is its own transaction: if it fails, the in-place
    swaps it made are undone before the error propagates.
    """
    if journal is None:
        with transaction() as journal:
            return rewrite(layer, replace, journal)
    if not _compat.is_layer(layer):
        return layer
    if id(layer) in journal._memo:
        return journal._memo[id(layer)]
    substitute = replace(layer)
    if substitute is not None:
        result = substitute
    elif _compat.is_graph_model(layer):
        result = _compat.clone_graph_model(layer, lambda child: rewrite(child, replace, journal))
    else:
        swaps = [(child, rewrite(child, replace, journal))
                 for child in _compat.direct_sublayers(layer)]
        swaps = [(old, new) for old, new in swaps if new is not old]
        result = layer
        if swaps and not isinstance(layer, keras.Model):
            # A composite layer (MultiHeadAttention, a keras-hub TransformerEncoder) is
            # shared with the user's model: swap inside a copy, leave theirs as it was.
            result = _compat.structural_copy(layer)
        for old, new in swaps:
            journal.swap(result, old, new)
    journal._memo[id(layer)] = result
    return result
