"""FLOPs per sample read off the model graph, so throughput numbers (FLOP/s, MFU) follow any architecture change.

Counted: multiply-adds x 2 of Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D, Conv2DTranspose and Dense, from
each call's input/output shapes (a layer called twice counts twice; nested models are walked). Not counted:
bias adds, normalisation, activations, pooling, resizing and element-wise merges (a few % of a conv net).
Training FLOPs are taken as 3x forward: the backward pass needs a gradient for the activations and one for the
weights, each about as costly as the forward pass.
"""
from __future__ import annotations

import math

import keras

TRAINING_FACTOR = 3


def _static(shape, where: str) -> list[int]:
    dims = list(shape)[1:]
    if any(d is None for d in dims):
        raise ValueError(f"{where}: FLOPs need static shapes, got {tuple(shape)}; build the model with a fixed patch")
    return dims


def _layer_flops(layer, in_shape, out_shape) -> int:
    L = keras.layers
    if isinstance(layer, L.Dense):
        return 2 * math.prod(_static(in_shape, layer.name)) * layer.units
    if isinstance(layer, L.Conv2DTranspose):
        cin = _static(in_shape, layer.name)
        return 2 * math.prod(cin) * math.prod(layer.kernel_size) * layer.filters
    if isinstance(layer, L.DepthwiseConv2D):
        out = _static(out_shape, layer.name)
        return 2 * math.prod(out) * math.prod(layer.kernel_size)
    if isinstance(layer, L.SeparableConv2D):
        cin = _static(in_shape, layer.name)[-1]
        out = _static(out_shape, layer.name)
        spatial = math.prod(out[:-1])
        depthwise = spatial * cin * layer.depth_multiplier * math.prod(layer.kernel_size)
        pointwise = spatial * cin * layer.depth_multiplier * layer.filters
        return 2 * (depthwise + pointwise)
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        cin = _static(in_shape, layer.name)[-1]
        out = _static(out_shape, layer.name)
        return 2 * math.prod(out) * math.prod(layer.kernel_size) * (cin // layer.groups)
    return 0


def flops_per_sample(model: keras.Model) -> int:
    """Forward-pass FLOPs for one sample (batch size 1) of a functional or sequential Keras model."""
    graph = getattr(model, "_functional", None) or model  # a Sequential keeps its graph in a Functional
    nodes_by_depth = getattr(graph, "_nodes_by_depth", None)
    if not nodes_by_depth:
        raise ValueError(f"model {model.name!r} has no graph to walk: build it functionally with a fixed input shape")
    total = 0
    for nodes in nodes_by_depth.values():
        for node in nodes:
            op = node.operation
            if isinstance(op, keras.Model):
                total += flops_per_sample(op)
            elif node.input_tensors:
                total += _layer_flops(op, node.input_tensors[0].shape, node.output_tensors[0].shape)
    return total


def training_flops_per_sample(model: keras.Model) -> int:
    """Forward + backward FLOPs per sample, ``TRAINING_FACTOR`` x forward (see module docstring)."""
    return TRAINING_FACTOR * flops_per_sample(model)
