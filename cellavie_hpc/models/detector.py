"""Anchor-free centre-based cell detector (CenterNet-style, output stride 4) and its backend-portable decoding.

Red cells are near-round objects of one size range, so per-class centre heatmaps with box-size and sub-cell offset
regression are enough: no anchors to tune, and one peak per cell. Outputs are on the (P/4, P/4) grid: ``heatmap``
logits (num_classes), ``size`` (h, w) in grid units, ``offset`` in [0, 1) grid units (see
:func:`cellavie_hpc.models.targets.detector_targets`). Decoding uses keras.ops only (max-pool peaks, top-k, greedy
NMS in a fori_loop), so it runs inside a TensorFlow graph or under JAX jit.
"""
from __future__ import annotations

import dataclasses
import math

import keras
from keras import layers, ops

from cellavie_hpc.models.metrics import box_iou
from cellavie_hpc.models.unet import conv_bn_relu, float32_output, residual_block

STRIDE = 4
CLASSES = ("healthy", "infected")
PRIOR_PROBABILITY = 0.1  # initial heatmap score: starts training near the (low) background rate, as in CenterNet


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """width: filters at stride 4 (x2 per deeper level); levels: extra stride-2 levels fused back to stride 4
    (receptive field for large cells); blocks: residual blocks per level; head_width: filters of each head;
    num_classes: 2 (healthy, infected) or 4 (stages); size_weight/offset_weight: CenterNet's loss weights."""
    width: int = 48
    levels: int = 2
    blocks: int = 2
    head_width: int = 64
    num_classes: int = 2
    size_weight: float = 0.1
    offset_weight: float = 1.0


PRESETS = {
    "tiny": DetectorConfig(width=12, levels=1, blocks=1, head_width=16),
    "base": DetectorConfig(width=48, levels=2, blocks=2, head_width=64),
}


def min_patch_multiple(config: DetectorConfig) -> int:
    return STRIDE * 2 ** config.levels


def _head(x, channels: int, width: int, name: str, bias_init=None):
    y = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"{name}_hidden")(x)
    y = layers.Conv2D(channels, 1, name=f"{name}_conv",
                      bias_initializer=bias_init if bias_init is not None else "zeros")(y)
    return float32_output(y, name)


def build(config: DetectorConfig, patch: int, in_channels: int) -> keras.Model:
    """(P, P, C) -> {"heatmap": (P/4, P/4, K) logits, "size": (P/4, P/4, 2), "offset": (P/4, P/4, 2)}."""
    inputs = keras.Input((patch, patch, in_channels), name="image")
    w = config.width
    x = conv_bn_relu(inputs, w // 2, "stem1", strides=2)
    x = conv_bn_relu(x, w, "stem2", strides=2)
    feats = []
    for level in range(config.levels + 1):
        filters = w * 2 ** level
        if level:
            x = conv_bn_relu(x, filters, f"down{level}", strides=2)
        for b in range(config.blocks):
            x = residual_block(x, filters, f"l{level}_b{b}")
        feats.append(x)
    x = feats[-1]
    for level in reversed(range(config.levels)):
        x = layers.UpSampling2D(2, interpolation="nearest", name=f"fuse{level}_up")(x)
        lateral = layers.Conv2D(w * 2 ** level, 1, name=f"fuse{level}_lateral")(feats[level])
        x = layers.Conv2D(w * 2 ** level, 1, name=f"fuse{level}_reduce")(x)
        x = layers.Add(name=f"fuse{level}_add")([x, lateral])
        x = conv_bn_relu(x, w * 2 ** level, f"fuse{level}_smooth")
    prior = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
    outputs = {
        "heatmap": _head(x, config.num_classes, config.head_width, "heatmap", keras.initializers.Constant(prior)),
        "size": _head(x, 2, config.head_width, "size"),
        "offset": _head(x, 2, config.head_width, "offset"),
    }
    return keras.Model(inputs, outputs, name="detector")


def non_max_suppression(boxes, scores, iou_threshold: float):
    """Greedy NMS on score-sorted boxes (B, K, 4), scores (B, K) -> keep mask (B, K) bool.

    A box is dropped when a kept, higher-scoring box overlaps it by more than ``iou_threshold``. Fixed shapes and
    a fori_loop over K instead of a data-dependent while loop, so it compiles under XLA and JAX.
    """
    k = boxes.shape[1]
    iou = box_iou(boxes, boxes)  # (B, K, K)
    later = ops.arange(k)[None, :] > ops.arange(k)[:, None]  # [i, j]: j ranks below i
    overlaps = (iou > iou_threshold) & later[None]

    def body(i, keep):
        row = ops.take(overlaps, i, axis=1)  # (B, K): what box i would suppress
        keep_i = ops.take(keep, i, axis=1)[:, None]
        return keep & ~(row & keep_i)

    return ops.fori_loop(0, k, body, ops.ones_like(scores, dtype="bool"))


def target_boxes(targets, stride: int = STRIDE):
    """Ground-truth boxes back from detector targets (exact: ``size`` and ``offset`` are the box's own values).

    Returns ``boxes`` (B, G*G, 4) in input pixels, ``classes`` (B, G*G) int32 (the channel of the heatmap peak) and
    ``valid`` (B, G*G) bool (where ``mask`` is 1), one row per grid cell, so batches keep fixed shapes.
    """
    heat = ops.cast(targets["heatmap"], "float32")
    batch = ops.shape(heat)[0]
    _, grid_h, grid_w, num_classes = heat.shape
    gy, gx = ops.meshgrid(ops.arange(grid_h, dtype="float32"), ops.arange(grid_w, dtype="float32"), indexing="ij")
    offset = ops.cast(targets["offset"], "float32")
    size = ops.cast(targets["size"], "float32")
    centre_y = (gy[None] + offset[..., 0]) * stride
    centre_x = (gx[None] + offset[..., 1]) * stride
    half_h, half_w = size[..., 0] * stride / 2, size[..., 1] * stride / 2
    boxes = ops.stack([centre_y - half_h, centre_x - half_w, centre_y + half_h, centre_x + half_w], axis=-1)
    return {"boxes": ops.reshape(boxes, (batch, -1, 4)),
            "classes": ops.reshape(ops.cast(ops.argmax(heat, axis=-1), "int32"), (batch, -1)),
            "valid": ops.reshape(ops.cast(targets["mask"], "float32")[..., 0] > 0.5, (batch, -1))}


def decode_detections(outputs, score_threshold: float = 0.3, max_detections: int = 100, iou_threshold: float = 0.5,
                      class_agnostic: bool = True, stride: int = STRIDE):
    """Boxes from detector outputs: 3x3 max-pool peaks, top-k, then NMS.

    Returns a dict of fixed-shape arrays, best first: ``boxes`` (B, K, 4) in input pixels (y0, x0, y1, x1),
    ``scores`` (B, K), ``classes`` (B, K) int32, ``valid`` (B, K) bool (score >= threshold and kept by NMS); rows
    that are not valid have score 0. ``class_agnostic`` NMS (default) keeps one class per cell, which is what a
    cell-level diagnosis wants; otherwise boxes of different classes never suppress each other.
    """
    heat = ops.sigmoid(ops.cast(outputs["heatmap"], "float32"))
    size = ops.cast(outputs["size"], "float32")
    offset = ops.cast(outputs["offset"], "float32")
    batch = ops.shape(heat)[0]
    _, grid_h, grid_w, num_classes = heat.shape
    peaks = ops.where(ops.equal(heat, ops.max_pool(heat, 3, strides=1, padding="same")), heat, 0.0)
    k = min(max_detections, grid_h * grid_w * num_classes)
    scores, flat = ops.top_k(ops.reshape(peaks, (batch, -1)), k)
    cell = flat // num_classes
    classes = ops.cast(flat % num_classes, "int32")
    cy = ops.cast(cell // grid_w, "float32")
    cx = ops.cast(cell % grid_w, "float32")
    size_k = ops.take_along_axis(ops.reshape(size, (batch, -1, 2)), ops.stack([cell, cell], -1), axis=1)
    off_k = ops.take_along_axis(ops.reshape(offset, (batch, -1, 2)), ops.stack([cell, cell], -1), axis=1)
    centre_y = (cy + off_k[..., 0]) * stride
    centre_x = (cx + off_k[..., 1]) * stride
    half_h = ops.maximum(size_k[..., 0], 0.0) * stride / 2
    half_w = ops.maximum(size_k[..., 1], 0.0) * stride / 2
    boxes = ops.stack([centre_y - half_h, centre_x - half_w, centre_y + half_h, centre_x + half_w], axis=-1)
    nms_boxes = boxes
    if not class_agnostic:  # shift each class to its own region of the plane so classes cannot overlap
        span = float(max(grid_h, grid_w) * stride * 4)
        nms_boxes = boxes + ops.cast(classes, "float32")[..., None] * span
    keep = non_max_suppression(nms_boxes, scores, iou_threshold) & (scores >= score_threshold)
    scores = ops.where(keep, scores, 0.0)
    order = ops.argsort(-scores, axis=-1)
    return {
        "boxes": ops.take_along_axis(boxes, ops.stack([order] * 4, -1), axis=1),
        "scores": ops.take_along_axis(scores, order, axis=1),
        "classes": ops.take_along_axis(classes, order, axis=1),
        "valid": ops.take_along_axis(keep, order, axis=1),
    }
