"""The channel dependency graph of a Sequential or functional Keras 3 model.

Every tensor of the graph gets a *layout*: what its last (channel) axis is
made of. A layout is a list of segments, each a run of ``size`` channels of
one *channel space* (a node of a union-find), every channel repeated
``inner`` times (a depthwise convolution with ``depth_multiplier`` m makes
``inner`` m), and the whole list repeated ``outer`` times (``Flatten`` of an
``HxWxC`` tensor makes ``outer`` ``H*W``: feature ``s*C + c`` is channel ``c``).

A convolution or Dense layer starts a new channel space for its output.
Layers that act on each channel alone (BatchNormalization, activations,
pooling, depthwise convolutions, dropout, padding, Flatten) carry their
input's layout over. Elementwise merges (``Add``, ``Multiply``, ...) join the
spaces of their inputs: those channels must be kept or removed together.
``Concatenate`` on the channel axis lays its inputs' segments end to end.

A space that reaches the model's inputs or outputs, or a layer that takes
channels as a whole (a softmax over channels) is *fixed*: never pruned. A
space that reaches an operation tfopt cannot follow (LayerNormalization, an
unknown custom layer, a Reshape that moves the channel axis, ...) is
*blocked*: also never pruned, and listed in one warning (``strict=True``
raises). Every other space is a *group*: its channels are ranked and masked
together, in every layer that produces, carries or consumes them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import keras
from keras import layers

from tfopt import _compat

FIXED = 0  # the channel space of model inputs and of layers that are not pruned


@dataclasses.dataclass(frozen=True)
class Segment:
    node: int
    size: int
    inner: int = 1


@dataclasses.dataclass(frozen=True)
class Layout:
    segments: tuple[Segment, ...]
    outer: int = 1

    @property
    def width(self) -> int:
        return self.outer * sum(s.size * s.inner for s in self.segments)

    def pattern(self):
        return self.outer, tuple((s.size, s.inner) for s in self.segments)

    def nodes(self) -> list[int]:
        return [s.node for s in self.segments]


def fixed(width: int) -> Layout:
    return Layout((Segment(FIXED, int(width or 0)),))


# -- what each kind of layer does to channels ------------------------------------

PRODUCERS = (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.Dense,
             layers.SeparableConv1D, layers.SeparableConv2D)
DEPTHWISE = (layers.DepthwiseConv1D, layers.DepthwiseConv2D)
PER_CHANNEL = (
    layers.Activation, layers.ReLU, layers.LeakyReLU, layers.ELU, layers.Dropout,
    layers.SpatialDropout1D, layers.SpatialDropout2D, layers.SpatialDropout3D,
    layers.GaussianDropout, layers.GaussianNoise, layers.AlphaDropout, layers.Identity,
    layers.ActivityRegularization,
    layers.MaxPooling1D, layers.MaxPooling2D, layers.MaxPooling3D,
    layers.AveragePooling1D, layers.AveragePooling2D, layers.AveragePooling3D,
    layers.GlobalAveragePooling1D, layers.GlobalAveragePooling2D, layers.GlobalAveragePooling3D,
    layers.GlobalMaxPooling1D, layers.GlobalMaxPooling2D, layers.GlobalMaxPooling3D,
    layers.ZeroPadding1D, layers.ZeroPadding2D, layers.ZeroPadding3D,
    layers.UpSampling1D, layers.UpSampling2D, layers.UpSampling3D,
    layers.Cropping1D, layers.Cropping2D, layers.Cropping3D,
)
ELEMENTWISE_MERGES = (layers.Add, layers.Subtract, layers.Multiply, layers.Average,
                      layers.Maximum, layers.Minimum)
# Operation nodes (keras.ops calls recorded in a functional graph) that act on
# each element alone, with scalars or broadcast tensors.
ELEMENTWISE_OPS = {
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Negative",
    "Abs", "Absolute", "Square", "Sqrt", "Exp", "Clip", "Cast", "Relu", "Relu6", "Sigmoid",
    "HardSigmoid", "Silu", "HardSilu", "Gelu", "Elu", "Selu", "LeakyRelu", "Softplus",
    "Softsign", "Tanh", "Celu", "HardTanh", "Power",
}
REDUCTIONS = {"Mean", "Max", "Min", "Sum"}  # fine when they keep the channel axis
CHANNEL_SOFTMAX = ("softmax", "log_softmax")


def _activation_name(layer) -> str:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") if activation is not None else ""


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


# -- the union-find of channel spaces --------------------------------------------

class _Spaces:
    def __init__(self):
        self.parent = [FIXED]
        self.size = [0]
        self.fixed = [True]
        self.blocked: list[list[str]] = [[]]

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.fixed.append(False)
        self.blocked.append([])
        return len(self.parent) - 1

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b == FIXED:
            a, b = b, a
        self.parent[b] = a
        self.fixed[a] = self.fixed[a] or self.fixed[b]
        self.blocked[a] = self.blocked[a] + self.blocked[b]

    def fix(self, node: int) -> None:
        self.fixed[self.find(node)] = True

    def block(self, node: int, reason: str) -> None:
        root = self.find(node)
        if root != FIXED and reason not in self.blocked[root]:
            self.blocked[root].append(reason)


# -- the plan --------------------------------------------------------------------

@dataclasses.dataclass
class LayerPlan:
    """How one layer's weights line up with channel spaces."""

    layer: keras.layers.Layer
    order: int  # position of the layer's first call in execution order
    kind: str  # "producer", "depthwise", "batchnorm" or "reshape"
    inputs: Optional[Layout] = None
    output: Optional[int] = None  # the space a producer starts


@dataclasses.dataclass
class ChannelPlan:
    """The result of :func:`analyze`: layers, and the spaces to prune."""

    layers: dict[int, LayerPlan]
    spaces: _Spaces
    pruned: set[int]  # roots of the spaces to prune
    unfollowable: dict[int, list[str]]  # root -> reasons, for spaces left unpruned
    producers: dict[int, list[LayerPlan]]  # root -> the layers that start it

    def root(self, node: int) -> int:
        return self.spaces.find(node)

    def is_pruned(self, node: int) -> bool:
        return self.spaces.find(node) in self.pruned


def analyze(model: keras.Model,
            select: Optional[Callable[[keras.layers.Layer], bool]] = None) -> ChannelPlan:
    """Build the channel dependency graph of a Sequential or functional model."""
    walker = _Walker(select)
    inputs, outputs, _ = _compat.graph_nodes(model)
    layouts = walker.run(model, [fixed(t.shape[-1] if t.shape else 1) for t in inputs])
    for layout in layouts:  # the model's outputs keep every channel
        for node in layout.nodes():
            walker.spaces.fix(node)
    spaces = walker.spaces
    producers: dict[int, list[LayerPlan]] = {}
    for plan in walker.plans.values():
        if plan.output is not None:
            producers.setdefault(spaces.find(plan.output), []).append(plan)
    pruned, unfollowable = set(), {}
    for root in producers:
        if spaces.fixed[root] or spaces.size[root] < 2:
            continue
        if spaces.blocked[root]:
            unfollowable[root] = list(spaces.blocked[root])
            continue
        pruned.add(root)
    return ChannelPlan(walker.plans, spaces, pruned, unfollowable, producers)


class _Walker:
    def __init__(self, select):
        self.select = select
        self.spaces = _Spaces()
        self.plans: dict[int, LayerPlan] = {}
        self.order = 0

    # tensors ----------------------------------------------------------------

    def run(self, model, input_layouts: list[Layout]) -> list[Layout]:
        inputs, outputs, nodes = _compat.graph_nodes(model)
        known: dict[int, Layout] = {}
        for tensor, layout in zip(inputs, input_layouts):
            known[id(tensor)] = layout
        sequential = isinstance(model, keras.Sequential)
        for node in nodes:
            ins = [known.get(id(t)) or fixed(_last(t)) for t in node.input_tensors]
            if sequential and _compat.is_graph_model(node.operation):
                # A Sequential parent is rebuilt with its layers' shapes as they are.
                for layout in ins:
                    for n in layout.nodes():
                        self.spaces.block(n, f"feeds the model {node.operation.name!r} nested "
                                             f"in the Sequential model {model.name!r}")
            outs = self.visit(node.operation, node, ins)
            for tensor, layout in zip(node.outputs, outs):
                known[id(tensor)] = layout
        return [known.get(id(t)) or fixed(_last(t)) for t in outputs]

    def opaque(self, what: str, ins: list[Layout], node) -> list[Layout]:
        """An operation tfopt cannot follow: the spaces reaching it stay unpruned."""
        for layout in ins:
            for n in layout.nodes():
                self.spaces.block(n, what)
        return [fixed(_last(t)) for t in node.outputs]

    def unify(self, a: Layout, b: Layout, what: str) -> Layout:
        if a.pattern() == b.pattern():
            for x, y in zip(a.segments, b.segments):
                self.spaces.union(x.node, y.node)
            return a
        for n in a.nodes() + b.nodes():
            if n != FIXED:
                self.spaces.block(n, f"{what} joins channels laid out differently")
        return a

    # operations ---------------------------------------------------------------

    def visit(self, op, node, ins: list[Layout]) -> list[Layout]:
        if not _compat.is_layer(op):
            return self.visit_operation(op, node, ins)
        name = f"{type(op).__name__} {op.name!r}"
        if _compat.is_graph_model(op):
            return self.run(op, ins)
        if isinstance(op, keras.Model):
            return self.opaque(f"feeds the subclassed model {name}", ins, node)
        if not ins or all(n == FIXED for layout in ins for n in layout.nodes()):
            # Nothing pruned reaches it; a producer still starts a space.
            if isinstance(op, PRODUCERS) and len(ins) == 1:
                return self.producer(op, node, ins[0], name)
            if ins and isinstance(op, DEPTHWISE + (layers.BatchNormalization,)):
                self.record(op, "depthwise" if isinstance(op, DEPTHWISE) else "batchnorm",
                            ins[0])
            return [fixed(_last(t)) for t in node.outputs]
        if isinstance(op, PRODUCERS):
            if len(ins) != 1:
                return self.opaque(f"feeds {name} with several inputs", ins, node)
            return self.producer(op, node, ins[0], name)
        if isinstance(op, DEPTHWISE):
            if not _channels_last(op) or ins[0].outer != 1:
                return self.opaque(f"feeds {name} (channels_first)", ins, node)
            self.record(op, "depthwise", ins[0])
            return [self.expand(self.plans[id(op)].inputs, op.depth_multiplier)]
        if isinstance(op, layers.BatchNormalization):
            rank = len(node.input_tensors[0].shape)
            axis = op.axis if isinstance(op.axis, int) else None
            if axis is None or axis % rank != rank - 1:
                return self.opaque(f"feeds {name}, which normalizes a non-channel axis",
                                   ins, node)
            self.record(op, "batchnorm", ins[0])
            return [ins[0]]
        if isinstance(op, PER_CHANNEL):
            if not _channels_last(op):
                return self.opaque(f"feeds {name} (channels_first)", ins, node)
            if isinstance(op, layers.Activation) and _activation_name(op) in CHANNEL_SOFTMAX:
                return self.fixed_by(ins, node)  # softmax takes the channels as a whole
            if _last(node.outputs[0]) != ins[0].width:
                return self.opaque(f"feeds {name}, which changes the channel count", ins, node)
            return [ins[0]]
        if isinstance(op, layers.Softmax):
            rank = len(node.input_tensors[0].shape)
            axes = op.axis if isinstance(op.axis, (list, tuple)) else [op.axis]
            if any(a % rank == rank - 1 for a in axes):
                return self.fixed_by(ins, node)
            return [ins[0]]
        if isinstance(op, layers.Flatten):
            shape = node.input_tensors[0].shape
            spatial = shape[1:-1]
            if not _channels_last(op) or any(d is None for d in spatial):
                return self.opaque(f"feeds {name} (unknown or channels_first shape)", ins, node)
            layout = ins[0]
            return [Layout(layout.segments, layout.outer * math.prod(spatial))]
        if isinstance(op, layers.Reshape):
            if ins[0].outer == 1 and _last(node.outputs[0]) == ins[0].width:
                self.record(op, "reshape", ins[0])  # its target shape names the width
                return [ins[0]]
            return self.opaque(f"feeds {name}, which moves the channel axis", ins, node)
        if isinstance(op, ELEMENTWISE_MERGES):
            return [self.merge(ins, node, name)]
        if isinstance(op, layers.Concatenate):
            return [self.concatenate(op.axis, ins, node, name)]
        return self.opaque(f"feeds {name}, which tfopt cannot follow", ins, node)

    def visit_operation(self, op, node, ins: list[Layout]) -> list[Layout]:
        kind = type(op).__name__
        name = f"the operation {kind} {getattr(op, 'name', '')!r}"
        if any(n != FIXED for layout in ins for n in layout.nodes()):
            for value in _compat.node_constants(node):
                if getattr(value, "ndim", 0) and getattr(value, "size", 1) > 1:
                    return self.opaque(f"feeds {name} with a constant array", ins, node)
        else:
            return [fixed(_last(t)) for t in node.outputs]
        if len(node.outputs) != 1:
            return self.opaque(f"feeds {name}", ins, node)
        if kind in ELEMENTWISE_OPS:
            return [self.merge(ins, node, name)]
        if kind in REDUCTIONS and len(ins) == 1:
            rank = len(node.input_tensors[0].shape)
            axis = getattr(op, "axis", None)
            axes = [] if axis is None else (list(axis) if isinstance(axis, (list, tuple))
                                            else [axis])
            if axes and all(a % rank != rank - 1 for a in axes) and ins[0].outer == 1 \
                    and _last(node.outputs[0]) == ins[0].width:
                return [ins[0]]
        return self.opaque(f"feeds {name}, which tfopt cannot follow", ins, node)

    # helpers --------------------------------------------------------------------

    def fixed_by(self, ins, node) -> list[Layout]:
        for layout in ins:
            for n in layout.nodes():
                self.spaces.fix(n)
        return [fixed(_last(t)) for t in node.outputs]

    def merge(self, ins: list[Layout], node, name: str) -> Layout:
        width = _last(node.outputs[0])
        full = [layout for layout in ins if layout.width == width]
        for layout in ins:
            if layout.width not in (width, 1):
                for n in layout.nodes():
                    self.spaces.block(n, f"{name} broadcasts it against another shape")
        if not full:
            return fixed(width)
        result = full[0]
        for other in full[1:]:
            result = self.unify(result, other, name)
        return result

    def concatenate(self, axis: int, ins: list[Layout], node, name: str) -> Layout:
        rank = len(node.outputs[0].shape)
        if axis % rank == rank - 1:
            if any(layout.outer != 1 for layout in ins):
                for layout in ins:
                    for n in layout.nodes():
                        self.spaces.block(n, f"{name} joins flattened features")
                return fixed(_last(node.outputs[0]))
            return Layout(tuple(s for layout in ins for s in layout.segments))
        result = ins[0]
        for other in ins[1:]:
            result = self.unify(result, other, name)
        return result

    def expand(self, layout: Layout, multiplier: int) -> Layout:
        if multiplier == 1:
            return layout
        return Layout(tuple(Segment(s.node, s.size, s.inner * multiplier)
                            for s in layout.segments), layout.outer)

    def record(self, layer, kind: str, inputs: Layout) -> LayerPlan:
        plan = self.plans.get(id(layer))
        if plan is None:
            plan = self.plans[id(layer)] = LayerPlan(layer, self.order, kind, inputs)
            self.order += 1
        else:  # a shared layer: every call must see the same channels
            plan.inputs = self.unify(plan.inputs, inputs, f"the shared layer {layer.name!r}")
        return plan

    def producer(self, layer, node, inputs: Layout, name: str) -> list[Layout]:
        if getattr(layer, "groups", 1) != 1 or not _channels_last(layer):
            return self.opaque(f"feeds {name} (grouped or channels_first)", [inputs], node)
        width = _last(node.outputs[0])
        if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)) \
                and inputs.outer != 1:
            return self.opaque(f"feeds {name} flattened", [inputs], node)
        plan = self.record(layer, "producer", inputs)
        if plan.output is None:
            plan.output = self.spaces.new(width)
            if self.select is not None and not self.select(layer):
                self.spaces.fix(plan.output)
            if _activation_name(layer) in CHANNEL_SOFTMAX:
                self.spaces.fix(plan.output)
        return [Layout((Segment(plan.output, width),))]


def _last(tensor) -> int:
    shape = tensor.shape
    return int(shape[-1]) if shape and shape[-1] is not None else 0
