"""Evaluation metrics: pure functions of arrays (numpy in, keras.ops inside, any back-end).

Per-batch in-graph values (for the training loop) and whole-set values (for reports) use the same functions; ratios
that must not be averaged over batches (IoU, sensitivity) come with count variants that add up.
Box convention: ``(y0, x0, y1, x1)`` end-exclusive, as in :mod:`cellavie_hpc.models.targets`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from keras import ops


def box_iou(boxes_a, boxes_b):
    """Pairwise IoU (..., N, M) of boxes (..., N, 4) and (..., M, 4); empty boxes have IoU 0."""
    a = ops.cast(boxes_a, "float32")
    b = ops.cast(boxes_b, "float32")
    a_exp, b_exp = ops.expand_dims(a, -2), ops.expand_dims(b, -3)
    lo = ops.maximum(a_exp[..., :2], b_exp[..., :2])
    hi = ops.minimum(a_exp[..., 2:], b_exp[..., 2:])
    wh = ops.maximum(hi - lo, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = ops.maximum(a[..., 2] - a[..., 0], 0.0) * ops.maximum(a[..., 3] - a[..., 1], 0.0)
    area_b = ops.maximum(b[..., 2] - b[..., 0], 0.0) * ops.maximum(b[..., 3] - b[..., 1], 0.0)
    union = ops.expand_dims(area_a, -1) + ops.expand_dims(area_b, -2) - inter
    return ops.where(union > 0, inter / ops.maximum(union, 1e-12), 0.0)


def confusion_counts(labels, predicted, num_classes: int):
    """Per-class (intersection, true pixels, predicted pixels), each float32 (num_classes,): additive over batches."""
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    predicted = ops.reshape(ops.cast(predicted, "int32"), (-1,))
    t = ops.one_hot(labels, num_classes, dtype="float32")
    p = ops.one_hot(predicted, num_classes, dtype="float32")
    return ops.sum(t * p, axis=0), ops.sum(t, axis=0), ops.sum(p, axis=0)


def iou_from_counts(intersection, true_count, pred_count):
    """IoU per class; a class absent from both truth and prediction scores 1 (nothing to get wrong)."""
    union = true_count + pred_count - intersection
    return ops.where(union > 0, intersection / ops.maximum(union, 1e-12), 1.0)


def dice_from_counts(intersection, true_count, pred_count):
    """Dice per class; a class absent from both truth and prediction scores 1."""
    total = true_count + pred_count
    return ops.where(total > 0, 2.0 * intersection / ops.maximum(total, 1e-12), 1.0)


def segmentation_iou(labels, predicted, num_classes: int):
    """Per-class IoU (num_classes,) of integer label maps."""
    return iou_from_counts(*confusion_counts(labels, predicted, num_classes))


def segmentation_dice(labels, predicted, num_classes: int):
    """Per-class Dice (num_classes,) of integer label maps."""
    return dice_from_counts(*confusion_counts(labels, predicted, num_classes))


def infection_counts(true_labels, pred_labels):
    """(tp, fp, tn, fn) float32 scalars for "infected" = any stage label other than 0 (healthy)."""
    t = ops.cast(ops.reshape(true_labels, (-1,)), "int32") > 0
    p = ops.cast(ops.reshape(pred_labels, (-1,)), "int32") > 0

    def count(mask):
        return ops.sum(ops.cast(mask, "float32"))

    return count(t & p), count(~t & p), count(~t & ~p), count(t & ~p)


def infected_calls(stage_logits, threshold: float = 0.5):
    """int32 (N,) 1 where P(infected) = 1 - P(healthy) >= threshold, from stage logits (N, 4) (healthy first).

    Infection is the question a screen asks, and its probability is the sum over the three parasite stages; the
    argmax over stages under-calls it (a cell at 0.40 healthy, 0.30 ring, 0.30 trophozoite is infected at 0.60).
    """
    probs = ops.softmax(ops.cast(stage_logits, "float32"), axis=-1)
    return ops.cast(1.0 - probs[..., 0] >= threshold, "int32")


def infection_rates(tp, fp, tn, fn) -> dict[str, float]:
    """Cell-level sensitivity, specificity and precision; NaN where the denominator is 0 (undefined, not 0)."""
    tp, fp, tn, fn = (float(v) for v in (tp, fp, tn, fn))

    def ratio(num, den):
        return num / den if den > 0 else float("nan")

    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "precision": ratio(tp, tp + fp)}


def phase_rmse(phase_true, phase_pred):
    """Root-mean-square phase error in radians (float32 scalar)."""
    err = ops.cast(phase_true, "float32") - ops.cast(phase_pred, "float32")
    return ops.sqrt(ops.mean(ops.square(err)))


def voc_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (VOC 2010+ all-point interpolation)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def mean_average_precision(detections: Sequence[Mapping], truths: Sequence[Mapping], num_classes: int,
                           iou_threshold: float = 0.5) -> dict[str, float]:
    """VOC-style mAP@iou_threshold over images.

    ``detections[i]``: ``boxes`` (N, 4), ``scores`` (N,), ``classes`` (N,); ``truths[i]``: ``boxes`` (M, 4),
    ``classes`` (M,). Detections are matched in score order to the same-class truth of highest IoU; a match needs
    IoU >= threshold and a truth not matched before (a duplicate is a false positive), as in the VOC devkit.
    Returns ``ap_<c>`` per class (NaN when the class has no truth) and ``map`` over classes that have truth.
    """
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists but {len(truths)} truth lists: one of each per image")
    out: dict[str, float] = {}
    for c in range(num_classes):
        records = []  # (score, is_true_positive)
        n_truth = 0
        for det, gt in zip(detections, truths):
            gt_boxes = np.asarray(gt["boxes"], np.float32).reshape(-1, 4)[np.asarray(gt["classes"]) == c]
            n_truth += len(gt_boxes)
            sel = np.asarray(det["classes"]) == c
            d_boxes = np.asarray(det["boxes"], np.float32).reshape(-1, 4)[sel]
            d_scores = np.asarray(det["scores"], np.float32)[sel]
            order = np.argsort(-d_scores, kind="stable")
            iou = (ops.convert_to_numpy(box_iou(d_boxes[order], gt_boxes)) if len(gt_boxes) and len(order)
                   else np.zeros((len(order), len(gt_boxes))))
            taken = np.zeros(len(gt_boxes), bool)
            for row, k in enumerate(order):
                best = int(np.argmax(iou[row])) if len(gt_boxes) else -1
                hit = best >= 0 and iou[row, best] >= iou_threshold and not taken[best]
                if hit:
                    taken[best] = True
                records.append((float(d_scores[k]), hit))
        if n_truth == 0:
            out[f"ap_{c}"] = float("nan")
            continue
        records.sort(key=lambda r: -r[0])
        hits = np.array([r[1] for r in records], bool)
        tp = np.cumsum(hits)
        fp = np.cumsum(~hits)
        recall = tp / n_truth
        precision = tp / np.maximum(tp + fp, 1)
        out[f"ap_{c}"] = voc_average_precision(recall, precision) if len(records) else 0.0
    present = [v for v in out.values() if not np.isnan(v)]
    out["map"] = float(np.mean(present)) if present else float("nan")
    return out
