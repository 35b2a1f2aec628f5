"""Training targets computed from the truth rasters with TensorFlow ops only, so tf.data can map them.

Raster contract (per sample, unbatched): ``instance`` int32 (P, P) cell ids (0 = background, ids need not be
contiguous), ``cls`` int32 (P, P) per-pixel class (0 background, 1 healthy, 2 ring, 3 trophozoite, 4 schizont),
``phase`` float32 (P, P) in-focus phase in radians.

Box convention used everywhere in the models package: ``(y0, x0, y1, x1)`` in continuous pixel coordinates,
end-exclusive, so a cell covering rows 3..6 has ``y0 = 3, y1 = 7`` and height 4.
"""
from __future__ import annotations

import tensorflow as tf

from cellavie_hpc.models.classifier import STAGES


def stage_label(stage: str) -> int:
    """Classifier label of a stage name from ``ds.cells()`` (``'healthy'`` -> 0 ... ``'schizont'`` -> 3)."""
    if stage not in STAGES:
        raise ValueError(f"unknown parasite stage {stage!r}; expected one of {', '.join(STAGES)}")
    return STAGES.index(stage)


def _check_raster(raster: tf.Tensor, name: str) -> tf.Tensor:
    raster = tf.convert_to_tensor(raster)
    if raster.shape.rank is not None and raster.shape.rank != 2:
        raise ValueError(f"{name} raster must be 2-D (P, P), got shape {raster.shape}")
    return tf.cast(raster, tf.int32)


def segmentation_targets(instance: tf.Tensor, boundary_px: int = 1) -> tf.Tensor:
    """int32 (P, P) classes {0 background, 1 interior, 2 boundary} from an instance raster.

    A cell pixel is boundary when its (2*boundary_px+1)^2 neighbourhood holds another id (background or a
    touching cell), which is what separates touching cells. Pixels on the patch edge are not boundary just because
    the patch ends: the pooling windows ignore outside pixels.
    """
    instance = _check_raster(instance, "instance")
    _, compact = tf.unique(tf.reshape(instance, [-1]))  # small ids: exact in float32 whatever the cell ids are
    ids = tf.cast(tf.reshape(compact, tf.shape(instance)), tf.float32)[tf.newaxis, :, :, tf.newaxis]
    window = 2 * boundary_px + 1
    hi = tf.nn.max_pool2d(ids, window, 1, "SAME")
    lo = -tf.nn.max_pool2d(-ids, window, 1, "SAME")
    edge = tf.not_equal(hi, lo)[0, :, :, 0]
    cell = instance > 0
    return tf.where(cell, tf.where(edge, 2, 1), 0)


def _cell_table(instance: tf.Tensor, cls: tf.Tensor, min_area_px: int):
    """Per visible cell: box (N, 4) float32 end-exclusive and class (N,) int32 (the cell's largest pixel class)."""
    flat_id = tf.reshape(instance, [-1])
    ids, seg = tf.unique(flat_id)
    n = tf.size(ids)
    width = tf.shape(instance)[1]
    pos = tf.range(tf.size(flat_id))
    yy, xx = pos // width, pos % width
    y0 = tf.math.unsorted_segment_min(yy, seg, n)
    y1 = tf.math.unsorted_segment_max(yy, seg, n) + 1
    x0 = tf.math.unsorted_segment_min(xx, seg, n)
    x1 = tf.math.unsorted_segment_max(xx, seg, n) + 1
    area = tf.math.unsorted_segment_sum(tf.ones_like(seg), seg, n)
    klass = tf.math.unsorted_segment_max(tf.reshape(cls, [-1]), seg, n)
    keep = (ids > 0) & (area >= min_area_px)
    boxes = tf.cast(tf.stack([y0, x0, y1, x1], axis=1), tf.float32)
    return tf.boolean_mask(boxes, keep), tf.boolean_mask(klass, keep)


def cell_boxes(instance: tf.Tensor, cls: tf.Tensor, min_area_px: int = 8) -> tuple[tf.Tensor, tf.Tensor]:
    """Ground-truth boxes (N, 4) float32 and detector classes (N,) int32 (0 healthy, 1 infected) of a patch."""
    instance, cls = _check_raster(instance, "instance"), _check_raster(cls, "cls")
    boxes, klass = _cell_table(instance, cls, min_area_px)
    return boxes, tf.cast(klass >= 2, tf.int32)


def detector_targets(instance: tf.Tensor, cls: tf.Tensor, stride: int = 4, num_classes: int = 2,
                     min_area_px: int = 8, sigma_scale: float = 0.15) -> dict[str, tf.Tensor]:
    """Fixed-shape centre-based detector targets on the (P/stride, P/stride) output grid.

    Returns ``heatmap`` (G, G, num_classes) with a Gaussian peak of exactly 1 at each cell's box-centre grid cell
    (sigma = max(0.5, sigma_scale * sqrt(h*w)) in grid units), ``size`` (G, G, 2) box (h, w) in grid units,
    ``offset`` (G, G, 2) sub-cell centre offset in [0, 1), ``mask`` (G, G, 1) 1 where size/offset are supervised.
    Classes: 0 healthy, 1 infected (num_classes=2); with num_classes=4 the four parasite stages. Cells clipped by
    the patch edge get the box of their visible part; fragments under ``min_area_px`` pixels are ignored.
    """
    instance, cls = _check_raster(instance, "instance"), _check_raster(cls, "cls")
    if num_classes not in (2, 4):
        raise ValueError(f"num_classes must be 2 (healthy/infected) or 4 (stages), got {num_classes}")
    if instance.shape[0] is not None and (instance.shape[0] % stride or instance.shape[1] % stride):
        raise ValueError(f"patch {tuple(instance.shape)} is not a multiple of the output stride {stride}")
    boxes, klass = _cell_table(instance, cls, min_area_px)
    label = tf.cast(klass >= 2, tf.int32) if num_classes == 2 else klass - 1
    grid_h, grid_w = tf.shape(instance)[0] // stride, tf.shape(instance)[1] // stride

    centre = (boxes[:, 0:2] + boxes[:, 2:4]) / (2.0 * stride)  # (N, 2) grid units
    size = (boxes[:, 2:4] - boxes[:, 0:2]) / stride
    cell = tf.minimum(tf.cast(tf.floor(centre), tf.int32), tf.stack([grid_h - 1, grid_w - 1]))
    offset = centre - tf.cast(cell, tf.float32)

    sigma = tf.maximum(0.5, sigma_scale * tf.sqrt(size[:, 0] * size[:, 1]))
    gy = tf.cast(tf.range(grid_h), tf.float32)
    gx = tf.cast(tf.range(grid_w), tf.float32)
    cy = tf.cast(cell[:, 0], tf.float32)[:, None, None]
    cx = tf.cast(cell[:, 1], tf.float32)[:, None, None]
    d2 = (gy[None, :, None] - cy) ** 2 + (gx[None, None, :] - cx) ** 2
    gauss = tf.exp(-d2 / (2.0 * sigma[:, None, None] ** 2))  # (N, G, G)
    per_class = gauss[..., None] * tf.one_hot(label, num_classes)[:, None, None, :]
    zeros = tf.zeros([1, grid_h, grid_w, num_classes])
    heatmap = tf.reduce_max(tf.concat([zeros, per_class], axis=0), axis=0)

    def scatter(values, depth):
        return tf.tensor_scatter_nd_update(tf.zeros([grid_h, grid_w, depth]), cell, values)

    return {
        "heatmap": heatmap,
        "size": scatter(size, 2),
        "offset": scatter(offset, 2),
        "mask": scatter(tf.ones([tf.shape(cell)[0], 1]), 1),
    }


def classifier_target(instance: tf.Tensor, cls: tf.Tensor) -> tf.Tensor:
    """Label () int32 of the cell a crop is centred on: its most frequent non-background pixel class, minus 1.

    When the centre pixel is background (a crop centred between cells), every cell pixel in the crop votes.
    """
    instance, cls = _check_raster(instance, "instance"), _check_raster(cls, "cls")
    centre_id = instance[tf.shape(instance)[0] // 2, tf.shape(instance)[1] // 2]
    owner = tf.where(centre_id > 0, tf.equal(instance, centre_id), instance > 0)
    votes = tf.math.bincount(tf.boolean_mask(cls, owner & (cls > 0)), minlength=5, maxlength=5)
    return tf.cast(tf.argmax(votes[1:]), tf.int32)


def refocus_targets(phase: tf.Tensor, focus_distance_m: tf.Tensor | float | None = None) -> dict[str, tf.Tensor]:
    """``phase`` (P, P, 1) float32 radians and, when a focus distance is given, ``defocus_um`` (1,) float32."""
    phase = tf.convert_to_tensor(phase, tf.float32)
    if phase.shape.rank is not None and phase.shape.rank != 2:
        raise ValueError(f"phase raster must be 2-D (P, P), got shape {phase.shape}")
    out = {"phase": phase[..., tf.newaxis]}
    if focus_distance_m is not None:
        out["defocus_um"] = tf.reshape(tf.cast(focus_distance_m, tf.float32) * 1e6, [1])
    return out
